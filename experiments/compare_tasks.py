"""Task comparison: multi-label sampling, modality-aware mining, similarity-network re-ranking.

    python -m experiments.compare_tasks                       # 3 seeds each (~10 min on 2 busy cores)
    python -m experiments.compare_tasks --seeds 0 --omniglot-steps 100   # smoke run
    python -m experiments.compare_tasks --part omniglot_methods --seeds 0 --stop-at 15:25
                                          # section 4 only (~5 min per run on 2 busy cores)

``--part original`` (the default) runs the three comparisons below, each over ``--seeds``;
``--part omniglot_methods`` runs section 4 only and merges it into the existing outputs.

1. synthetic multi-label (`experiments.synthetic`, config synthetic_multilabel): multi-label triplet
   selection (``loss.label_mode=multi``) vs the naive single-label baseline (``first``), same data
   and batches; test queries vs the training archive, multi-label precision@k / mAP@k / nDCG@k.
2. synthetic zero-shot cross-modal (config synthetic_cross_modal): modality-aware triplet hard
   mining (MATHM, ``loss.mining=modality_aware``) vs plain batch-hard on the union of both
   modalities; sketch queries vs photo gallery of unseen classes, R@1, MAP@R, mAP@all.
3. similarity-network re-ranking on Omniglot: a short run of the minimal protocol
   (``experiments.train.main(["--config", "omniglot_small", "--set", "optim.num_steps=..."])``,
   plain single-view evaluation, no mid-run evaluation), its last checkpoint restored, the
   background_small1 (train, no rotation classes) and minimal_test embeddings computed with
   `dmljax.train.step.embed`, then `dmljax.train.rerank.rerank_report` (top-10 re-ranked).

4. (``--part omniglot_methods``) the methods that are trainer flags, on minimal Omniglot
   with the budget and protocol of `experiments.compare_methods` (``--omniglot-steps`` steps,
   plain single-view evaluation once at the end, no NMI): R@1, MAP@R, 20-way one-shot error,
   wall time (``OMNIGLOT_VARIANTS``):
   (a) ``loss.name=ensemble loss.components=['multi_similarity','contrastive']`` (learned loss
       weights, reported at the end) vs each component alone;
   (b) RKD teacher-student: the baseline run (default conv-net 32-64-128-256) is the teacher of a
       smaller student (``model.channels=(16,32,64,128)``) trained with ``distill.teacher=<the
       baseline's workdir> distill.weight=1.0``, vs the same student without distillation;
   (c) ``model.backbone=global_local loss.name=hybrid_pair_proxy`` vs the baseline, and each of the
       two changes alone (``global_local_ms``: the backbone with the baseline loss;
       ``convnet_hybrid``: the baseline conv-net with the hybrid loss).
   Runs go seed-major in the order of ``OMNIGLOT_VARIANTS`` (the teacher first); ``--stop-at HH:MM``
   (UTC) starts no run expected to end later; ``--reuse-runs`` takes a run's ``final.json`` instead
   of retraining when its workdir holds a finished run of exactly the same config. Run directories
   go to ``runs/compare_tasks_methods/``; the result is stored under the ``omniglot_methods`` key of the
   json and as section 4 of the md (the other sections are kept as they are).

Writes ``experiments/results/tasks_comparison.json`` (every run, means/stds, timings, machine
load) and ``tasks_comparison.md`` (the tables). Run directories go to ``runs/compare_tasks/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from typing import Callable

import jax
import numpy as np

from experiments.bench.common import load_average
from experiments.compare_methods import format_stat
from dmljax.configs import get_config
from dmljax.train.cli import apply_overrides, main as train_main
from dmljax.train.rerank import rerank_report
from experiments.synthetic import run as run_synthetic

RESULTS = os.path.join(os.path.dirname(__file__), "results")

MULTILABEL_KEYS = ("precision@1", "precision@10", "map@10", "ndcg@10", "positive_pair_fraction", "train_seconds")
CROSS_MODAL_KEYS = ("recall@1", "recall@5", "map_at_r", "map_at_all", "train_seconds")


def _summary(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs])),
                "values": [float(r[k]) for r in runs]} for k in keys}


def synthetic_comparison(name: str, option: str, variants: tuple[str, ...], seeds, workroot: str) -> dict:
    out = {}
    for variant in variants:
        runs = []
        for seed in seeds:
            config = get_config(name)
            config.seed = seed
            section, leaf = option.split(".")
            config[section][leaf] = variant
            t0 = time.perf_counter()
            metrics = run_synthetic(config, os.path.join(workroot, f"{name}_{variant}_seed{seed}"))
            print(f"{name} {option}={variant} seed {seed}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items()) + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
            runs.append(metrics)
        out[variant] = _summary(runs)
    return out


def _omniglot_sets(seed: int, steps: int) -> list[str]:
    return [f"seed={seed}", f"optim.num_steps={steps}", f"optim.warmup_steps={max(steps // 10, 1)}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.final_nmi=False",
            "train.progress=False", "eval.tta_shifts=((0, 0),)", "eval.tta_zooms=(1.0,)"]


def _template_state(config, labels, num_classes):
    """A fresh train state built exactly as `dmljax.train.train_and_evaluate` builds it (so the
    checkpoint's trees match)."""
    from dmljax.train.builders import build_sampler, build_train_state
    sampler = build_sampler(config, labels)
    state, _ = build_train_state(config, num_classes=num_classes, num_train=len(labels),
                                 steps_per_epoch=sampler.steps_per_epoch)
    return state


def omniglot_embeddings(workdir: str, sets: list[str]):
    """Restore the run's last checkpoint and embed (`dmljax.train.step.embed`, plain view) the
    training characters (background_small1 without the rotation classes) and the test characters."""
    from dmljax.data.omniglot import load_omniglot
    from dmljax.train.checkpoint import Checkpointer
    from dmljax.train.step import embed
    from dmljax.data.sources import load_data_source

    config = apply_overrides(get_config("omniglot_small"), sets)
    test = load_data_source(config)
    template = _template_state(config, np.asarray(test.train_labels, np.int32), test.num_classes)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), best_metric=None)
    state = checkpointer.restore_latest(template)
    checkpointer.close()
    if state is None or int(state.step) != config.optim.num_steps:
        raise RuntimeError(f"no checkpoint of step {config.optim.num_steps} under {workdir}")
    train = load_omniglot(config.data.train_split, image_size=config.data.image_size)
    return (embed(state, train.images), train.labels.astype(np.int32),
            embed(state, test.images), test.labels.astype(np.int32))


def rerank_comparison(seeds, steps: int, workroot: str, rerank_options: dict) -> dict:
    runs = []
    for seed in seeds:
        workdir = os.path.join(workroot, f"omniglot_small_seed{seed}")
        sets = _omniglot_sets(seed, steps)
        argv = ["--config", "omniglot_small", "--workdir", workdir]
        for s in sets:
            argv += ["--set", s]
        t0 = time.perf_counter()
        final = train_main(argv)
        t_train = time.perf_counter() - t0
        xtr, ytr, xte, yte = omniglot_embeddings(workdir, sets)
        report = rerank_report(train_embeddings=xtr, train_labels=ytr, test_embeddings=xte, test_labels=yte,
                               key=jax.random.key(seed), config={"eval": rerank_options})
        report["trainer_recall@1"] = float(final["recall@1"])  # the CLI's own evaluation (same protocol)
        report["omniglot_train_seconds"] = t_train
        print(f"omniglot seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()), flush=True)
        runs.append(report)
    return _summary(runs)


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# Task comparison: multi-label sampling, modality-aware mining, similarity re-ranking",
        "",
        f"`python -m experiments.compare_tasks {' '.join(m['argv'])}` at commit `{m['commit']}`, "
        f"{m['date']}; seeds {m['seeds']} (mean ± std over seeds; std is the population std).",
        f"Machine: {m['machine']}; load average (1/5/15 min) {m['load_start']} at the start, {m['load_end']} "
        f"at the end (a shared machine: other engineers' jobs ran concurrently, so the timings are inflated). "
        f"Total wall time {m['wall_seconds']:.0f} s.",
        "",
        "## 1. Synthetic multi-label retrieval (`synthetic_multilabel`, `loss.label_mode`)",
        "",
        "Test queries vs the training archive; relevant = shares >= 1 label (nDCG graded by the shared-label "
        "count). `raw` = kNN on the input features (nuisance dims included).",
        "",
        "| label_mode | precision@1 | precision@10 | mAP@10 | nDCG@10 | positive pairs / batch pairs | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    ml = result["multilabel"]
    for variant, name in (("multi", "multi (multi-label triplet selection)"), ("first", "first (single-label baseline)")):
        s = ml[variant]
        lines.append(f"| {name} | " + " | ".join(_fmt(s[k]) for k in MULTILABEL_KEYS[:-1])
                     + f" | {s['train_seconds']['mean']:.1f} |")
    s = ml["multi"]
    lines.append(f"| raw features | {_fmt(s['raw_precision@1'])} | {_fmt(s['raw_precision@10'])} | "
                 f"{_fmt(s['raw_map@10'])} | {_fmt(s['raw_ndcg@10'])} | | |")
    lines += [
        "",
        "## 2. Synthetic zero-shot cross-modal retrieval (`synthetic_cross_modal`, `loss.mining`)",
        "",
        "Sketch queries vs photo gallery, 50 unseen classes (500 queries, 500 gallery photos).",
        "",
        "| mining | R@1 | R@5 | MAP@R | mAP@all | seconds |",
        "|---|---|---|---|---|---|",
    ]
    cm = result["cross_modal"]
    for variant, name in (("modality_aware", "modality_aware (MATHM)"), ("batch_hard", "batch_hard (plain)")):
        s = cm[variant]
        lines.append(f"| {name} | " + " | ".join(_fmt(s[k]) for k in CROSS_MODAL_KEYS[:-1])
                     + f" | {s['train_seconds']['mean']:.1f} |")
    rr = result["rerank"]
    k = int(rr["rerank_k"]["mean"])
    lines += [
        "",
        "## 3. Similarity-network re-ranking on Omniglot (`omniglot_small`, `rerank_report`)",
        "",
        f"Conv-net trained {m['omniglot_steps']} steps on background_small1 (multi-similarity loss, plain "
        f"single-view evaluation), then the similarity MLP (hidden {tuple(m['rerank_options'].get('rerank_hidden', (512, 512)))}, "
        f"{m['rerank_options'].get('rerank_steps', 1000)} steps) trained on pairs of the training-character "
        f"embeddings re-ranks the top {k} of each of the 2120 minimal_test queries (106 unseen characters).",
        "",
        f"| ranking | R@1 | R@{k} | MAP@R |",
        "|---|---|---|---|",
        f"| metric kNN | {_fmt(rr['recall@1'])} | {_fmt(rr[f'recall@{k}'])} | {_fmt(rr['map_at_r'])} |",
        f"| re-ranked top {k} | {_fmt(rr['recall@1_rerank'])} | {_fmt(rr[f'recall@{k}_rerank'])} | "
        f"{_fmt(rr['map_at_r_rerank'])} |",
        "",
        f"Per seed R@1 before -> after: " + ", ".join(
            f"{a:.4f} -> {b:.4f}" for a, b in zip(rr["recall@1"]["values"], rr["recall@1_rerank"]["values"]))
        + f"; the trainer's own R@1 {', '.join(f'{v:.4f}' for v in rr['trainer_recall@1']['values'])}. "
        f"Omniglot training {rr['omniglot_train_seconds']['mean']:.0f} s and re-ranking "
        f"{rr['rerank_seconds']['mean']:.0f} s per seed on average.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 4. Omniglot methods
STUDENT_CHANNELS = "model.channels=(16, 32, 64, 128)"
# (variant, --set overrides, description, group); "{teacher}" is the seed's baseline workdir
OMNIGLOT_VARIANTS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    ("baseline_ms", (), "multi-similarity, conv-net 32-64-128-256 (baseline; RKD teacher)", "a, b, c"),
    ("contrastive", ("loss.name=contrastive",), "contrastive alone", "a"),
    ("ensemble_ms_contrastive", ("loss.name=ensemble", "loss.components=['multi_similarity','contrastive']"),
     "ensemble of multi-similarity + contrastive, learned weights", "a"),
    ("student", (STUDENT_CHANNELS,), "student conv-net 16-32-64-128, multi-similarity, no distillation", "b"),
    ("student_rkd", (STUDENT_CHANNELS, "distill.teacher={teacher}", "distill.weight=1.0"),
     "same student + RKD from the baseline (distill.weight 1.0)", "b"),
    ("global_local_hybrid", ("model.backbone=global_local", "loss.name=hybrid_pair_proxy"),
     "global + local (second-order attention) embeddings, hybrid pair + proxy loss", "c"),
    # (c) split into its two parts: which of the two changes makes the difference
    ("global_local_ms", ("model.backbone=global_local",), "global + local embeddings, multi-similarity loss",
     "c (backbone only)"),
    ("convnet_hybrid", ("loss.name=hybrid_pair_proxy",), "baseline conv-net, hybrid pair + proxy loss",
     "c (loss only)"),
)
OMNIGLOT_METRICS = ("recall@1", "map_at_r", "one_shot_error")
OMNIGLOT_CAVEATS = (
    "300 steps is a short budget (the full protocol trains 3000 steps on 964 characters, R@1 ~0.87 plain); "
    "every method runs with its default options, untuned for this budget, so this compares the methods at "
    "a small, equal budget only.",
    "With 1 seed the differences carry no error bar; R@1 differences of ~0.01 between seeds of the same "
    "config are typical at this budget (section 3), so smaller gaps are noise.",
    "Wall times were taken on a 2-core machine shared with other engineers (load average above), so they "
    "mostly measure the others' load: only a rough indication of each method's cost.",
)


def omniglot_method_argv(variant: str, seed: int, steps: int, workroot: str) -> list[str]:
    """``experiments.train`` argv of one section-4 run (shared budget + the variant's overrides)."""
    sets = {v: s for v, s, _, _ in OMNIGLOT_VARIANTS}[variant]
    teacher = os.path.join(workroot, f"baseline_ms_seed{seed}")
    argv = ["--config", "omniglot_small", "--workdir", os.path.join(workroot, f"{variant}_seed{seed}")]
    for s in _omniglot_sets(seed, steps) + [x.format(teacher=teacher) for x in sets]:
        argv += ["--set", s]
    return argv


def _finished_run(argv: list[str]) -> dict | None:
    """``final.json`` of the argv's workdir if that workdir holds a finished run of exactly the
    config the argv asks for (its ``config.json``), else None."""
    workdir = argv[argv.index("--workdir") + 1]
    sets = argv[argv.index("--workdir") + 3::2]
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            done = json.load(f)
        with open(os.path.join(workdir, "final.json")) as f:
            final = json.load(f)
    except (OSError, ValueError):
        return None
    wanted = json.loads(apply_overrides(get_config("omniglot_small"), sets).to_json())
    return final if done == wanted else None


def _param_count(argv: list[str]) -> int:
    """Trainable parameters of the run's embedding model (`dmljax.train.models.build_model`)."""
    from flax import nnx

    config = apply_overrides(get_config("omniglot_small"), argv[argv.index("--workdir") + 3::2])
    from dmljax.train.models import build_model
    model = nnx.eval_shape(lambda: build_model(config, 0))  # shapes only, nothing computed
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def summarize_methods(runs: list[dict]) -> dict:
    out = {}
    for variant, *_ in OMNIGLOT_VARIANTS:
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not rs:
            continue
        out[variant] = {"seeds": [r["seed"] for r in rs]}
        keys = OMNIGLOT_METRICS + ("wall_seconds",) + tuple(sorted({k for r in rs for k in r if k.startswith("loss_weight/")}))
        for k in keys:
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                out[variant][k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    return out


def markdown_methods(section: dict) -> str:
    """Section 4 of the md (its own command line, commit, seeds, load)."""
    m, summary = section["meta"], section["summary"]
    seeds_run = sorted({r["seed"] for r in section["runs"]})
    r1 = {v: s["recall@1"]["mean"] for v, s in summary.items() if "recall@1" in s}
    ref = {"contrastive": None, "ensemble_ms_contrastive": "baseline_ms", "student_rkd": "student",
           "global_local_hybrid": "baseline_ms", "student": "baseline_ms",
           "global_local_ms": "baseline_ms", "convnet_hybrid": "baseline_ms"}
    lines = [
        "## 4. Trainer-flag methods on Omniglot (`omniglot_small`, `--part omniglot_methods`)",
        "",
        f"`python -m experiments.compare_tasks {' '.join(m['argv'])}` at commit `{m['commit']}`, {m['date']}. "
        f"Seeds run: {len(seeds_run)} ({seeds_run}; asked for {m['seeds_requested']}); {len(section['runs'])} runs; "
        "mean ± std over seeds (population std, 0 with one seed).",
        f"Machine: {m['machine']}; load average (1/5/15 min) {m['load_start']} at the start, {m['load_end']} at "
        "the end (shared with other engineers' jobs: wall times inflated).",
        "",
        f"Same budget for every run: {m['steps']} steps of 16 classes x 8 images on background_small1 (with the "
        "rotation classes), warm-up steps/10, AdamW 3e-3, then one plain single-view evaluation: 106 unseen "
        "minimal_test characters (2120 images, each a query vs all others) and the 20 official 20-way one-shot runs. "
        "Δ is the R@1 difference to the reference run named in brackets.",
        "",
        "| group | variant | what | params | R@1 | Δ R@1 | MAP@R | one-shot error % | wall s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, _, what, group in OMNIGLOT_VARIANTS:
        s = summary.get(variant)
        if s is None:
            lines.append(f"| {group} | {variant} | {what} | | not run | | | | | 0 |")
            continue
        base = ref.get(variant)
        delta = f"{r1[variant] - r1[base]:+.4f} ({base})" if base in r1 and variant in r1 else ""
        if variant == "ensemble_ms_contrastive" and "contrastive" in r1:
            delta += f", {r1[variant] - r1['contrastive']:+.4f} (contrastive)"
        params = m.get("params", {}).get(variant)
        lines.append(f"| {group} | {variant} | {what} | {params if params is not None else ''} | "
                     f"{format_stat(s.get('recall@1'))} | {delta} | {format_stat(s.get('map_at_r'))} | "
                     f"{format_stat(s.get('one_shot_error'), pct=True)} | {s['wall_seconds']['mean']:.0f} | "
                     f"{len(s['seeds'])} |")
    weights = {k: v for k, v in summary.get("ensemble_ms_contrastive", {}).items() if k.startswith("loss_weight/")}
    if weights:
        lines += ["", "Learned ensemble weights at the end (`loss_weight/<i>_<component>`, "
                      "`dmljax.losses.ensemble`, method uncertainty: 0.5 exp(-s_i), "
                      "0.5 at the start): "
                  + ", ".join(f"{k.removeprefix('loss_weight/')} {format_stat(v)}" for k, v in weights.items()) + "."]
    lines += ["", "Per run (variant, seed: R@1 / MAP@R / one-shot error / wall s):", ""]
    for r in section["runs"]:
        ose = "n/a" if r.get("one_shot_error") is None else f"{100 * r['one_shot_error']:.2f}%"
        lines.append(f"- {r['variant']}, seed {r['seed']}: {r['recall@1']:.4f} / {r['map_at_r']:.4f} / {ose} / "
                     f"{r['wall_seconds']:.0f} s" + (" (finished run reused)" if r.get("reused") else ""))
    caveats = list(m.get("caveats", ()))
    if caveats:
        lines += ["", "Caveats:", ""] + [f"- {c}" for c in caveats]
    return "\n".join(lines) + "\n"


SECTION4 = "\n## 4. "


def _with_section4(md: str, section: dict | None) -> str:
    """``md`` with its section 4 (if any) replaced by ``section``'s (or dropped if None)."""
    cut = md.find(SECTION4)
    head = md if cut < 0 else md[:cut + 1]
    if section is None:
        return head
    return head.rstrip("\n") + "\n\n" + markdown_methods(section)


def methods_comparison(args, argv, runner: Callable[[list[str]], dict], commit: str) -> dict:
    """Section 4: runs seed-major, rewrites <out>.json / .md after every run (other keys kept)."""
    variants = list(args.variants)
    if "student_rkd" in variants and "baseline_ms" not in variants:
        raise ValueError("--variants: student_rkd needs baseline_ms (its teacher)")
    deadline = None
    if args.stop_at is not None:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    t0, load_start = time.perf_counter(), load_average()
    runs: list[dict] = []
    params: dict[str, int] = {}

    def write(stopped: str | None = None) -> dict:
        section = {"runs": runs, "summary": summarize_methods(runs), "meta": {
            "argv": list(argv) if argv is not None else [], "commit": commit,
            "seeds_requested": list(args.seeds), "steps": args.omniglot_steps, "variants": variants,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
                       f"{jax.default_backend()}", "load_start": load_start, "load_end": load_average(),
            "wall_seconds": time.perf_counter() - t0, "stopped": stopped, "params": params,
            "caveats": list(OMNIGLOT_CAVEATS) + ([f"Stopped early: {stopped}."] if stopped else [])}}
        result = {}
        if os.path.exists(args.out + ".json"):
            with open(args.out + ".json") as f:
                result = json.load(f)
        result["omniglot_methods"] = section
        md = ""
        if os.path.exists(args.out + ".md"):
            with open(args.out + ".md") as f:
                md = f.read()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(_with_section4(md, section))
        return section

    stopped = None
    for seed in args.seeds:
        for variant in variants:
            run_argv = omniglot_method_argv(variant, seed, args.omniglot_steps, args.workroot)
            params.setdefault(variant, _param_count(run_argv))
            final = _finished_run(run_argv) if args.reuse_runs else None
            reused = final is not None
            if final is None and deadline is not None:
                walls = [r["wall_seconds"] for r in runs if not r["reused"]] or [0.0]
                if time.time() + float(np.mean(walls)) > deadline:
                    stopped = f"--stop-at {args.stop_at} UTC reached before {variant} seed {seed}"
                    break
            t_run = time.perf_counter()
            if final is None:
                final = runner(run_argv)
            record = {"variant": variant, "seed": seed, "steps": args.omniglot_steps, "reused": reused,
                      "wall_seconds": float(final.get("total_seconds", 0.0)) if reused else time.perf_counter() - t_run,
                      "load": None if reused else load_average(), "argv": run_argv}  # a reused run's load is unknown
            for k in OMNIGLOT_METRICS + ("train_seconds",):
                record[k] = float(final[k]) if k in final else None
            record.update({k: float(v) for k, v in final.items() if k.startswith("loss_weight/")})
            runs.append(record)
            print(f"[tasks omniglot] {variant} seed {seed}: R@1 {record['recall@1']:.4f} MAP@R "
                  f"{record['map_at_r']:.4f} ({record['wall_seconds']:.0f} s, load {record['load']}"
                  f"{', reused' if reused else ''})", flush=True)
            write()
        if stopped:
            break
    section = write(stopped)
    print(markdown_methods(section))
    return section


def _default_runner(argv: list[str]) -> dict:
    return train_main(argv)


def main(argv=None, runner: Callable[[list[str]], dict] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--omniglot-steps", type=int, default=300)
    parser.add_argument("--rerank-steps", type=int, default=1000)
    parser.add_argument("--workroot", default=None,
                        help="run directories (default runs/compare_tasks; runs/compare_tasks_methods for --part omniglot_methods)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "tasks_comparison"),
                        help="output path without extension (.json and .md are written)")
    parser.add_argument("--part", choices=("original", "omniglot_methods"), default="original",
                        help="original: sections 1-3; omniglot_methods: section 4 only (merged into --out)")
    parser.add_argument("--variants", nargs="+", default=[v for v, *_ in OMNIGLOT_VARIANTS],
                        choices=[v for v, *_ in OMNIGLOT_VARIANTS], help="section 4 variants")
    parser.add_argument("--stop-at", default=None, help="section 4: HH:MM UTC, start no run expected to end later")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="section 4: reuse a workdir's finished run of exactly the same config")
    args = parser.parse_args(argv)
    if args.workroot is None:
        args.workroot = "runs/compare_tasks_methods" if args.part == "omniglot_methods" else "runs/compare_tasks"
    t0 = time.perf_counter()
    load_start = load_average()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    if args.part == "omniglot_methods":
        return methods_comparison(args, argv, runner or _default_runner, commit)
    rerank_options = {"rerank_k": 10, "rerank_steps": args.rerank_steps}
    result = {
        "multilabel": synthetic_comparison("synthetic_multilabel", "loss.label_mode", ("multi", "first"),
                                           args.seeds, args.workroot),
        "cross_modal": synthetic_comparison("synthetic_cross_modal", "loss.mining", ("modality_aware", "batch_hard"),
                                            args.seeds, args.workroot),
        "rerank": rerank_comparison(args.seeds, args.omniglot_steps, args.workroot, rerank_options),
    }
    result["meta"] = {
        "argv": list(argv) if argv is not None else [], "commit": commit, "seeds": args.seeds,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on {jax.default_backend()}",
        "load_start": load_start, "load_end": load_average(), "wall_seconds": time.perf_counter() - t0,
        "omniglot_steps": args.omniglot_steps, "rerank_options": rerank_options,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    section4 = None  # keep an earlier --part omniglot_methods result
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            section4 = json.load(f).get("omniglot_methods")
    if section4 is not None:
        result["omniglot_methods"] = section4
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(_with_section4(markdown(result), section4))
    print(markdown(result))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
