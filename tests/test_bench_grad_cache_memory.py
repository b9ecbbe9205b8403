"""Smoke test of experiments/bench/grad_cache_memory.py (memory only, no timing)."""

import json

import pytest

from experiments.bench import grad_cache_memory


@pytest.mark.slow  # four train-step compilations: ~40-50 s on the shared 2-core machine
def test_cached_step_temporaries_do_not_grow_with_the_batch(tmp_path):
    out = tmp_path / "gcm.json"
    payload = grad_cache_memory.main(["--model", "convnet", "--image-size", "8", "--channels", "1",
                                      "--batches", "8,32", "--chunk-size", "4", "--steps", "0",
                                      "--embedding-dim", "8", "--width", "4", "--loss", "contrastive", "--out", str(out)])
    rows = {(r["batch"], r["mode"]): r for r in payload["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(payload["rows"], default=str))
    if rows[(8, "direct")]["xla_temp_bytes"] is not None:
        direct_growth = rows[(32, "direct")]["xla_temp_bytes"] - rows[(8, "direct")]["xla_temp_bytes"]
        cached_growth = rows[(32, "cached")]["xla_temp_bytes"] - rows[(8, "cached")]["xla_temp_bytes"]
        assert cached_growth < 0.5 * direct_growth
