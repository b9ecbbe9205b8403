"""Issue 8 comparison: multi-label sampling, modality-aware mining, similarity-network re-ranking.

    python -m experiments.compare_issue8                       # 3 seeds each (~10 min on 2 busy cores)
    python -m experiments.compare_issue8 --seeds 0 --omniglot-steps 100   # smoke run

Three comparisons, each over ``--seeds``:

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
   `dmljax.train.step.embed`, then `experiments.rerank.rerank_report` (top-10 re-ranked).

Writes ``experiments/results/issue8_comparison.json`` (every run, means/stds, timings, machine
load) and ``issue8_comparison.md`` (the tables). Run directories go to ``runs/issue8/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time

import jax
import numpy as np

from experiments.configs import get_config
from experiments.rerank import rerank_report
from experiments.synthetic import run as run_synthetic

RESULTS = os.path.join(os.path.dirname(__file__), "results")

MULTILABEL_KEYS = ("precision@1", "precision@10", "map@10", "ndcg@10", "positive_pair_fraction", "train_seconds")
CROSS_MODAL_KEYS = ("recall@1", "recall@5", "map_at_r", "map_at_all", "train_seconds")


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


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


def _template_state(trainer, config, images, labels, num_classes):
    """A fresh train state built exactly as ``experiments.train.main`` builds it (so the
    checkpoint's leaves match): ``build_train_state`` where the trainer has it, else the parts."""
    if hasattr(trainer, "build_train_state"):
        sampler = trainer.build_sampler(config, labels)
        state, _ = trainer.build_train_state(config, num_classes=num_classes, num_train=len(labels),
                                             steps_per_epoch=sampler.steps_per_epoch)
        return state
    from dmljax.train.optim import make_optimizer
    from dmljax.train.state import create_train_state

    k_loss, _ = jax.random.split(jax.random.key(config.seed))
    model = trainer.build_model(config, config.seed)
    loss_fn, loss_params = trainer.build_loss(config, num_classes, k_loss)
    o = config.optim
    tx = make_optimizer(learning_rate=o.learning_rate, total_steps=o.num_steps,
                        warmup_steps=min(o.warmup_steps, o.num_steps), backbone_lr_mult=o.backbone_lr_mult,
                        head_lr_mult=o.head_lr_mult, loss_lr_mult=o.loss_lr_mult, weight_decay=o.weight_decay,
                        optimizer=o.optimizer)
    return create_train_state(model, tx, loss_fn, loss_params, freeze_batch_norm=o.freeze_batch_norm)


def omniglot_embeddings(workdir: str, sets: list[str]):
    """Restore the run's last checkpoint and embed (`dmljax.train.step.embed`, plain view) the
    training characters (background_small1 without the rotation classes) and the test characters."""
    from dmljax.data.omniglot import load_omniglot
    from dmljax.train.checkpoint import Checkpointer
    from dmljax.train.step import embed
    from experiments import train as trainer

    config = trainer.apply_overrides(get_config("omniglot_small"), sets)
    images, labels, num_classes, test, _ = trainer.load_data(config)
    template = _template_state(trainer, config, images, np.asarray(labels, np.int32), num_classes)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), best_metric=None)
    state = checkpointer.restore_latest(template)
    checkpointer.close()
    if state is None or int(state.step) != config.optim.num_steps:
        raise RuntimeError(f"no checkpoint of step {config.optim.num_steps} under {workdir}")
    train = load_omniglot(config.data.train_split, image_size=config.data.image_size)
    return (embed(state, train.images), train.labels.astype(np.int32),
            embed(state, test.images), test.labels.astype(np.int32))


def rerank_comparison(seeds, steps: int, workroot: str, rerank_options: dict) -> dict:
    from experiments import train as trainer

    runs = []
    for seed in seeds:
        workdir = os.path.join(workroot, f"omniglot_small_seed{seed}")
        sets = _omniglot_sets(seed, steps)
        argv = ["--config", "omniglot_small", "--workdir", workdir]
        for s in sets:
            argv += ["--set", s]
        t0 = time.perf_counter()
        final = trainer.main(argv)
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
        "# Issue 8 comparison: multi-label sampling, modality-aware mining, similarity re-ranking",
        "",
        f"`python -m experiments.compare_issue8 {' '.join(m['argv'])}` at commit `{m['commit']}`, "
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--omniglot-steps", type=int, default=300)
    parser.add_argument("--rerank-steps", type=int, default=1000)
    parser.add_argument("--workroot", default="runs/issue8")
    parser.add_argument("--out", default=os.path.join(RESULTS, "issue8_comparison"),
                        help="output path without extension (.json and .md are written)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    load_start = _load()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "unknown"
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
        "load_start": load_start, "load_end": _load(), "wall_seconds": time.perf_counter() - t0,
        "omniglot_steps": args.omniglot_steps, "rerank_options": rerank_options,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
