"""The benchmark harness runs end to end at a tiny size (no timing assertions)."""

import json

import pytest

from experiments.bench import losses
from experiments.bench.common import format_table


@pytest.mark.slow  # compiles every loss of every spec file (~90 cases): run with -m slow
def test_every_case_runs_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    payload = losses.main(["--batch", "16", "--dim", "8", "--repeats", "1", "--no-pml", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows and len(rows) == len(losses.load_cases())
    failures = [(r["loss"], r["dmljax_error"]) for r in rows if "dmljax_error" in r]
    assert not failures, failures
    assert all(r["dmljax_ms"] > 0 for r in payload["rows"])


@pytest.mark.slow
def test_pml_side_runs_when_installed(tmp_path):
    pytest.importorskip("pytorch_metric_learning")
    payload = losses.main(["--batch", "16", "--dim", "8", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    errors = [(r["loss"], r["pml_error"]) for r in payload["rows"] if "pml_error" in r]
    assert not errors, errors
    assert any("ratio" in r for r in payload["rows"])


def test_a_few_cases_run_at_tiny_size(tmp_path):
    payload = losses.main(["--batch", "16", "--dim", "8", "--repeats", "1", "--no-pml", "--only", "triplet_all",
                           "contrastive", "proxy_anchor", "--out", str(tmp_path / "b.json")])
    assert len(payload["rows"]) >= 3 and all("dmljax_error" not in r for r in payload["rows"])


def test_format_table_aligns_columns():
    text = format_table([{"a": 1.23456, "b": None}, {"a": "xyz", "b": 2}], ["a", "b"])
    lines = text.splitlines()
    assert lines[0].startswith("a") and len({len(line) for line in lines}) == 1
    assert "1.235" in text and "-" in lines[2]


def test_predicted_time_scales_from_smaller_batches_and_dims():
    # exponent fitted between the two largest smaller batches, clamped to [2, 3]
    times = {(256, 128): 0.01, (1024, 128): 0.64}  # 4x batch -> 64x time: exponent 3
    seconds, _ = losses.predict_seconds(times, 4096, 128)
    assert seconds == pytest.approx(0.64 * 64)
    times = {(256, 128): 0.01, (1024, 128): 0.02}  # overhead-dominated: exponent clamped to 2
    assert losses.predict_seconds(times, 4096, 128)[0] == pytest.approx(0.02 * 16)
    assert losses.predict_seconds({(256, 128): 0.5}, 1024, 128)[0] == pytest.approx(0.5 * 32)  # one point: 2.5
    # same batch, smaller dim, scaled by the dim ratio seen at a smaller batch; the larger estimate wins
    times = {(256, 128): 0.01, (256, 512): 0.03, (1024, 128): 0.16, (1024, 512): 0.48, (4096, 128): 10.0}
    seconds, how = losses.predict_seconds(times, 4096, 512)
    assert seconds == pytest.approx(max(10.0 * 3, 0.48 * 16)) and "D=128" in how
    assert losses.predict_seconds({(1024, 128): 1.0}, 256, 128) is None  # nothing smaller measured


def test_history_skips_predicted_slow_and_previously_failed_sides():
    history = losses.History()
    history.add_row({"loss": "a", "B": 256, "D": 128, "dmljax_ms": 10.0, "pml_ms": 4000.0})
    history.add_row({"loss": "b", "B": 256, "D": 128, "pml_error": "out of memory: RuntimeError"})
    history.add_row({"loss": "c", "B": 256, "D": 128, "pml_error": "skipped: above pml_max_batch (B^3 mining)"})
    assert history.skip_reason("a", "dmljax", 1024, 128, max_case_s=60) is None  # 0.64 s predicted
    reason = history.skip_reason("a", "pml", 1024, 128, max_case_s=60)  # 128 s predicted
    assert reason.startswith("skipped: predicted 128 s")
    assert history.skip_reason("a", "pml", 1024, 128, max_case_s=200) is None
    assert "failed at B=256 D=128" in history.skip_reason("b", "pml", 256, 512, max_case_s=60)
    assert history.skip_reason("b", "pml", 256, 128, max_case_s=60) is None  # the size itself is retried
    assert history.skip_reason("c", "pml", 1024, 128, max_case_s=60) is None  # the spec cap decides alone
    history.add_row({"loss": "b", "B": 256, "D": 128, "pml_ms": 5.0})  # a later success replaces the failure
    assert history.skip_reason("b", "pml", 256, 512, max_case_s=60) is None


def test_run_case_records_a_skip_and_keeps_going(tmp_path):
    # a cap of 1 ns: the second batch size is predicted too slow on both sides and recorded as skipped
    payload = losses.main(["--batch", "8", "16", "--dim", "4", "--repeats", "1", "--no-pml", "--cases", "contrastive",
                           "--max-case-s", "1e-9", "--out", str(tmp_path / "b.json"), "--out-dir", str(tmp_path)])
    first, second = payload["rows"]
    assert "dmljax_ms" in first and second["dmljax_error"].startswith("skipped: predicted")
    per_size = json.loads((tmp_path / "bench_losses_cpu_b16_d4.json").read_text())
    assert per_size["B"] == 16 and not per_size["partial"] and per_size["rows"][0]["loss"] == "contrastive"
    assert "contrastive" in losses.markdown_report([per_size])


def test_triplet_memory_script_reports_xla_and_rss_memory():
    from experiments.bench import triplet_memory

    result = triplet_memory.main(["--mining", "all", "--batch", "16", "--dim", "4"])
    assert result["grad_finite"] and result["loss"] > 0
    assert result["b2_float32_bytes"] == 16 * 16 * 4 and result["b3_bool_bytes"] == 16**3
    assert 0 < result["xla_temp_bytes"] <= result["xla_bytes"]
    assert result["peak_rss_bytes"] >= result["rss_before_bytes"] > 0
