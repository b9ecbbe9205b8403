"""experiments.compare_methods with a fake trainer: argument parsing, the overrides every run gets,
the seed-major order, mean/std, resume, --stop-at and the written json/md (the real runs are not
part of the suite)."""

import json

import numpy as np
import pytest

from experiments import compare_methods as c
from dmljax.train import cli
from dmljax.configs import get_config


def _fake_runner(calls):
    def run(argv):
        calls.append(argv)
        sets = dict(s.split("=", 1) for s in argv[1::2] if "=" in s)
        seed = int(sets["seed"])
        r1 = 0.5 + 0.1 * seed + (0.05 if sets["method.name"] != "none" else 0.0)
        return {"recall@1": r1, "map_at_r": r1 / 2, "one_shot_error": 0.1 + seed / 100, "train_seconds": 1.0}
    return run


def test_overrides_are_valid_trainer_config():
    for variant, sets, _ in c.VARIANTS:
        argv = c.train_argv(variant, 1, 7, "runs/x")
        assert argv[:2] == ["--config", "omniglot_small"] and argv[3] == f"runs/x/{variant}_seed1"
        overrides = argv[5::2]
        assert argv[4::2] == ["--set"] * len(overrides)
        config = cli.apply_overrides(get_config("omniglot_small"), overrides)  # unknown keys raise
        assert config.optim.num_steps == 7 and config.seed == 1 and config.train.final_nmi is False
        assert tuple(config.eval.tta_shifts) == ((0, 0),) and tuple(config.eval.tta_zooms) == (1.0,)
        assert config.method.name == dict(s.split("=") for s in sets)["method.name"]
        assert config.data.label_noise == (0.2 if variant.endswith("noise0.2") else 0.0)


def test_runs_summary_and_outputs(tmp_path):
    calls = []
    out = str(tmp_path / "cmp")
    result = c.main(["--seeds", "2", "--steps", "5", "--out", out, "--variants", "baseline", "bspml"],
                    runner=_fake_runner(calls))
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [
        ("baseline", 0), ("bspml", 0), ("baseline", 1), ("bspml", 1)]  # seed-major
    s = result["summary"]["bspml"]["recall@1"]
    np.testing.assert_allclose([s["mean"], s["std"]], [np.mean([0.55, 0.65]), np.std([0.55, 0.65])])
    assert result["meta"]["seeds_run"] == [0, 1] and result["meta"]["num_runs"] == 4
    with open(out + ".json") as f:
        assert json.load(f)["summary"]["baseline"]["seeds"] == [0, 1]
    md = open(out + ".md").read()
    assert "Seeds run: 0 ([]) for every variant; seed 0 only for ['baseline', 'bspml']" in md and "| bspml |" in md and "+0.0500" in md and "| daml |" in md
    assert "not run" in md  # variants left out are listed as such

    calls.clear()  # resume: only the missing seed is trained
    result = c.main(["--seeds", "3", "--steps", "5", "--out", out, "--variants", "baseline", "bspml", "--resume"],
                    runner=_fake_runner(calls))
    assert len(calls) == 2 and result["meta"]["seeds_run"] == [0, 1, 2] and len(result["runs"]) == 6
    assert [p["num_runs"] for p in result["meta"]["previous_invocations"]] == [4]
    assert "Runs kept from an earlier invocation" in open(out + ".md").read()
    runs = [{"variant": v, "seed": 0} for v, _, _ in c.VARIANTS] + [{"variant": "iaa", "seed": 1}]
    assert c.seed_text(runs) == "1 ([0]) for every variant; seed 1 only for ['iaa']"


def test_stop_at_and_bad_args(tmp_path):
    calls = []
    result = c.main(["--seeds", "1", "--out", str(tmp_path / "a"), "--stop-at", "00:00"], runner=_fake_runner(calls))
    # 00:00 UTC today has passed (unless the test runs at exactly midnight): nothing is started
    assert calls == [] and result["runs"] == [] and "Stopped early" in open(str(tmp_path / "a.md")).read()
    with pytest.raises(ValueError, match="--seeds"):
        c.main(["--seeds", "0", "--out", str(tmp_path / "b")], runner=_fake_runner(calls))
    with pytest.raises(SystemExit):
        c.main(["--variants", "nope"], runner=_fake_runner(calls))


def test_paired_delta_uses_common_seeds_only():
    runs = [{"variant": "baseline", "seed": 0, "recall@1": 0.80}, {"variant": "baseline", "seed": 1, "recall@1": 0.90},
            {"variant": "iaa", "seed": 0, "recall@1": 0.83}]
    assert c.paired_delta(runs, "iaa", "baseline") == "+0.0300"  # not 0.83 - mean(0.80, 0.90)
    runs.append({"variant": "iaa", "seed": 1, "recall@1": 0.89})
    assert c.paired_delta(runs, "iaa", "baseline") == "+0.0100 (2 seeds)"
    assert c.paired_delta(runs, "das", "baseline") == "n/a"


def test_failed_run_is_recorded_and_the_rest_go_on(tmp_path):
    calls = []
    ok = _fake_runner(calls)

    def runner(argv):
        if "method.name=iaa" in argv:
            raise ValueError("boom")
        return ok(argv)

    out = str(tmp_path / "f")
    result = c.main(["--seeds", "1", "--out", out, "--variants", "iaa", "das"], runner=runner)
    assert [r["variant"] for r in result["runs"]] == ["das"]
    assert result["failures"][0]["variant"] == "iaa" and "boom" in result["failures"][0]["error"]
    assert "iaa, seed 0: FAILED" in open(out + ".md").read()
