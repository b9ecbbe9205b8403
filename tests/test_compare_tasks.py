"""experiments.compare_tasks --part omniglot_methods with a fake trainer: the overrides of every
run are a valid trainer config, the teacher is the same seed's baseline, seed-major order, the
section is merged into an existing json/md (other sections kept, section 4 replaced), finished
runs are reused only when their config matches, --stop-at (the real runs are not part of the suite)."""

import json
import os

import pytest

from experiments import compare_tasks as c
from dmljax.train import cli
from dmljax.configs import get_config


def _fake_runner(calls):
    def run(argv):
        calls.append(argv)
        sets = dict(s.split("=", 1) for s in argv[5::2])
        r1 = 0.5 + 0.1 * int(sets["seed"]) + (0.02 if "distill.teacher" in sets else 0.0)
        final = {"recall@1": r1, "map_at_r": r1 / 2, "one_shot_error": 0.1, "train_seconds": 1.0, "total_seconds": 2.0}
        if sets.get("loss.name") == "ensemble":
            final.update({"loss_weight/0_multi_similarity": 0.7, "loss_weight/1_contrastive": 0.3})
        return final
    return run


def test_overrides_are_valid_trainer_config():
    for variant, *_ in c.OMNIGLOT_VARIANTS:
        argv = c.omniglot_method_argv(variant, 1, 7, "runs/x")
        assert argv[:4] == ["--config", "omniglot_small", "--workdir", f"runs/x/{variant}_seed1"]
        config = cli.apply_overrides(get_config("omniglot_small"), argv[5::2])  # unknown keys raise
        assert config.optim.num_steps == 7 and config.seed == 1 and config.train.final_nmi is False
        assert tuple(config.eval.tta_shifts) == ((0, 0),) and tuple(config.eval.tta_zooms) == (1.0,)
        student = variant.startswith("student")
        assert tuple(config.model.channels) == ((16, 32, 64, 128) if student else (32, 64, 128, 256))
        assert config.distill.teacher == ("runs/x/baseline_ms_seed1" if variant == "student_rkd" else "")
    ens = cli.apply_overrides(get_config("omniglot_small"),
                                  c.omniglot_method_argv("ensemble_ms_contrastive", 0, 7, "r")[5::2])
    assert ens.loss.name == "ensemble" and list(ens.loss.components) == ["multi_similarity", "contrastive"]


def test_section4_merged_reused_and_replaced(tmp_path):
    out, root = str(tmp_path / "cmp"), str(tmp_path / "runs")
    with open(out + ".json", "w") as f:
        json.dump({"rerank": {"x": 1}}, f)
    with open(out + ".md", "w") as f:
        f.write("# Tasks\n\n## 3. Re-ranking\n\nkept\n")
    calls = []
    args = ["--part", "omniglot_methods", "--seeds", "0", "1", "--omniglot-steps", "5", "--out", out,
            "--workroot", root, "--variants", "baseline_ms", "ensemble_ms_contrastive", "student_rkd"]
    sec = c.main(args, runner=_fake_runner(calls))
    assert [(r["variant"], r["seed"]) for r in sec["runs"]] == [
        ("baseline_ms", 0), ("ensemble_ms_contrastive", 0), ("student_rkd", 0),
        ("baseline_ms", 1), ("ensemble_ms_contrastive", 1), ("student_rkd", 1)]  # seed-major, teacher first
    assert sec["summary"]["ensemble_ms_contrastive"]["loss_weight/0_multi_similarity"]["mean"] == 0.7
    assert sec["meta"]["params"]["student_rkd"] < sec["meta"]["params"]["baseline_ms"]
    saved = json.load(open(out + ".json"))
    assert saved["rerank"] == {"x": 1} and len(saved["omniglot_methods"]["runs"]) == 6
    md = open(out + ".md").read()
    assert md.startswith("# Tasks\n\n## 3. Re-ranking\n\nkept\n\n## 4. ") and "| b | student_rkd |" in md
    assert "0_multi_similarity 0.7000" in md and "+0.0200 (student)" not in md  # no student run: no delta
    assert "| c | global_local_hybrid |" in md and "not run" in md

    # a finished workdir with the same config is reused, one with another config is retrained
    w = os.path.join(root, "baseline_ms_seed0")
    os.makedirs(w)
    argv = c.omniglot_method_argv("baseline_ms", 0, 5, root)
    with open(os.path.join(w, "config.json"), "w") as f:
        f.write(cli.apply_overrides(get_config("omniglot_small"), argv[5::2]).to_json(indent=1))
    with open(os.path.join(w, "final.json"), "w") as f:
        json.dump({"recall@1": 0.9, "map_at_r": 0.4, "one_shot_error": 0.05, "total_seconds": 33.0}, f)
    assert c._finished_run(c.omniglot_method_argv("baseline_ms", 0, 6, root)) is None  # other steps
    calls.clear()
    sec = c.main(["--part", "omniglot_methods", "--seeds", "0", "--omniglot-steps", "5", "--out", out,
                  "--workroot", root, "--variants", "baseline_ms", "student", "--reuse-runs"], runner=_fake_runner(calls))
    assert [a[3] for a in calls] == [os.path.join(root, "student_seed0")]
    r0 = sec["runs"][0]
    assert r0["reused"] and r0["recall@1"] == 0.9 and r0["wall_seconds"] == 33.0 and r0["load"] is None
    md = open(out + ".md").read()
    assert md.count("## 4. ") == 1 and "(finished run reused)" in md and "| b | student_rkd |" in md
    assert "-0.4000 (baseline_ms)" in md  # student 0.5 vs reused baseline 0.9


def test_stop_at_and_bad_args(tmp_path):
    calls = []
    out = str(tmp_path / "a")
    sec = c.main(["--part", "omniglot_methods", "--seeds", "0", "--out", out, "--workroot", str(tmp_path),
                  "--variants", "contrastive", "--stop-at", "00:00"], runner=_fake_runner(calls))
    assert calls == [] and sec["runs"] == [] and "Stopped early" in open(out + ".md").read()
    with pytest.raises(ValueError, match="teacher"):
        c.main(["--part", "omniglot_methods", "--out", out, "--variants", "student_rkd"], runner=_fake_runner(calls))
    with pytest.raises(SystemExit):
        c.main(["--part", "omniglot_methods", "--variants", "nope"], runner=_fake_runner(calls))
