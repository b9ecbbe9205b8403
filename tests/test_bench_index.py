"""experiments/bench/index.py runs end to end at a tiny size (no timing assertions)."""

import json

import pytest

pytest.importorskip("usearch")

from experiments.bench import index as bench_index  # noqa: E402


def test_index_benchmark_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench_index.main(["--cases", "clustered:400:8", "--queries", "20", "--k", "5", "--json", str(out)])
    assert [r["method"] for r in rows] == ["exact", "hnsw"]
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
    assert rows[0]["recall_at_k"] == 1.0 and 0.9 <= rows[1]["recall_at_k"] <= 1.0
    assert all(r["queries_per_s"] > 0 and r["build_s"] > 0 for r in rows)


def test_recall_at_k_counts_the_true_neighbours_found():
    import numpy as np

    assert bench_index.recall_at_k(np.array([[1, 2], [3, 4]]), np.array([[2, 1], [3, 5]])) == 0.75
