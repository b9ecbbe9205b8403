"""Method comparison: the baseline loss with and without each training method on minimal Omniglot.

    python -m experiments.compare_methods                          # 3 seeds (~5 min per run on 2 busy cores)
    python -m experiments.compare_methods --seeds 1 --stop-at 15:25  # 1 seed, start no run after 15:25 UTC
    python -m experiments.compare_methods --seeds 3 --resume        # add seeds to an earlier result

Every run is ``experiments.train.main(["--config", "omniglot_small", "--set", ...])`` with the SAME
budget (``--steps`` steps, default 300, of the config's batch; warm-up steps/10), the baseline
loss of the config (multi-similarity, Wang et al. 2019) and plain single-view evaluation (no
test-time augmentation, no mid-run evaluation, no NMI): R@1, MAP@R on the 106 unseen
minimal_test characters and the 20-way one-shot error of the 20 official runs.

Variants (``VARIANTS``): ``baseline`` (``method.name=none``), one per training method with its
default options (``method.name=daml / hard_sample_generation / iaa / das / divide_conquer /
alternating_projection / bspml``), the lifted-structured hard-negative batches
(``sampler.name=lifted_hard_negative``, Oh Song et al. 2016 Sec. 4, with the baseline loss: 16
random positive pairs x 6 nearest other-class items of a 4096-image pool re-embedded every epoch),
and the noisy-label pair ``baseline`` vs ``bspml`` with ``data.label_noise=0.2`` (symmetric noise
on the training labels; test labels clean).

Runs go seed-major (every variant of the first seed, then the next seed), and the results are
rewritten after every run, so an interrupted comparison still leaves a consistent table of the
runs that finished. ``--seeds N`` is the NUMBER of seeds (seeds 0 .. N-1); ``--resume`` keeps the
runs already in ``--out``.json (same steps) and only trains the missing ones. ``--stop-at HH:MM``
(UTC): no run is started unless it is expected (mean wall time of the runs so far) to end before
then. Writes ``<out>.json`` (every run, per-variant mean/std, machine, load average, command line)
and ``<out>.md``. Run directories go to ``runs/compare_methods/``.
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

import numpy as np

from experiments.bench.common import load_average

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# (variant name, --set overrides, description)
VARIANTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("baseline", ("method.name=none",), "multi-similarity, no method"),
    ("daml", ("method.name=daml",), "DAML hard-negative generator (Duan 2018)"),
    ("hard_sample_generation", ("method.name=hard_sample_generation",), "two-stage hard sample generation"),
    ("iaa", ("method.name=iaa",), "intra-class adaptive augmentation (IAA)"),
    ("das", ("method.name=das",), "dense anchor sampling (DAS, Liu 2022)"),
    ("divide_conquer", ("method.name=divide_conquer",), "divide and conquer (Sanakoyeu 2019)"),
    ("alternating_projection", ("method.name=alternating_projection",), "alternating projections (Can 2021)"),
    ("bspml", ("method.name=bspml",), "BSPML (clean labels)"),
    ("lifted_hard_negative", ("method.name=none", "sampler.name=lifted_hard_negative"),
     "multi-similarity on lifted hard-negative batches (Oh Song 2016)"),
    ("baseline_noise0.2", ("method.name=none", "data.label_noise=0.2"), "multi-similarity, 20% noisy labels"),
    ("bspml_noise0.2", ("method.name=bspml", "data.label_noise=0.2"), "BSPML, 20% noisy labels"),
)
METRICS = ("recall@1", "map_at_r", "one_shot_error")


def run_sets(seed: int, steps: int) -> list[str]:
    """The budget and protocol shared by every run (plain evaluation once, at the end)."""
    return [f"seed={seed}", f"optim.num_steps={steps}", f"optim.warmup_steps={max(steps // 10, 1)}",
            f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.final_nmi=False",
            "train.progress=False", "eval.tta_shifts=((0, 0),)", "eval.tta_zooms=(1.0,)"]


def train_argv(variant: str, seed: int, steps: int, workroot: str) -> list[str]:
    sets = dict((v, s) for v, s, _ in VARIANTS)[variant]
    argv = ["--config", "omniglot_small", "--workdir", os.path.join(workroot, f"{variant}_seed{seed}")]
    for s in run_sets(seed, steps) + list(sets):
        argv += ["--set", s]
    return argv


def summarize(runs: list[dict]) -> dict:
    """Per variant: mean / population std / values over its seeds of each metric and the wall time."""
    out = {}
    for variant, _, _ in VARIANTS:
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not rs:
            continue
        out[variant] = {"seeds": [r["seed"] for r in rs]}
        for k in METRICS + ("wall_seconds",):
            vals = [float(r[k]) for r in rs if r.get(k) is not None]
            if vals:
                out[variant][k] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
    return out


def paired_delta(runs: list[dict], variant: str, reference: str, key: str = "recall@1") -> str:
    """Mean over the seeds both have run of ``key(variant) - key(reference)`` ("n/a" if none)."""
    a = {r["seed"]: r[key] for r in runs if r["variant"] == variant and r.get(key) is not None}
    b = {r["seed"]: r[key] for r in runs if r["variant"] == reference and r.get(key) is not None}
    common = sorted(set(a) & set(b))
    if not common:
        return "n/a"
    return f"{np.mean([a[s] - b[s] for s in common]):+.4f}" + (f" ({len(common)} seeds)" if len(common) > 1 else "")


def seed_text(runs: list[dict]) -> str:
    """"N (seeds [...]) for every variant" plus the seeds only some variants ran."""
    variants = [v for v, _, _ in VARIANTS]
    per_seed = {}
    for r in runs:
        per_seed.setdefault(r["seed"], set()).add(r["variant"])
    full = sorted(s for s, vs in per_seed.items() if set(variants) <= vs)
    text = f"{len(full)} ({full}) for every variant"
    for s in sorted(set(per_seed) - set(full)):
        text += f"; seed {s} only for {sorted(per_seed[s], key=variants.index)}"
    return text


def format_stat(stat: dict | None, pct: bool = False) -> str:
    """"mean ± std" of a summary entry (percent with ``pct``), "n/a" when missing."""
    if stat is None:
        return "n/a"
    s = 100.0 if pct else 1.0
    return f"{s * stat['mean']:.{2 if pct else 4}f} ± {s * stat['std']:.{2 if pct else 4}f}"


def markdown(result: dict) -> str:
    m, summary = result["meta"], result["summary"]
    lines = [
        "# Method comparison: the training methods on the minimal Omniglot protocol",
        "",
        f"`python -m experiments.compare_methods {' '.join(m['argv'])}` at commit `{m['commit']}`, "
        f"{m['date']}. Seeds run: {seed_text(result['runs'])} (asked for {m['seeds_requested']}); "
        f"{len(result['runs'])} runs. Mean ± std over seeds (population std; 0 with one seed).",
        f"Machine: {m['machine']}; load average (1/5/15 min) {m['load_start']} at the start, "
        f"{m['load_end']} at the end (a shared machine: other engineers' jobs ran concurrently, so the "
        f"wall times are inflated and not comparable between runs to better than ~30%).",
    ] + [f"Runs kept from an earlier invocation: `{p['argv']}` at commit `{p['commit']}`, {p['date']}, "
         f"{p['num_runs']} runs, load {p['load_start']} -> {p['load_end']}, {p['wall_seconds']:.0f} s."
         for p in m.get("previous_invocations", [])] + [
        "",
        f"Same budget for every run: `--config omniglot_small`, {m['steps']} steps (batch 16 classes x 8), "
        "multi-similarity base loss, method default options, plain single-view evaluation at the end only "
        "(106 unseen minimal_test characters, each image a query vs all others; one-shot = 20 official "
        "20-way runs).",
        "",
        "| variant | what | R@1 | ΔR@1 vs baseline (same seeds) | MAP@R | one-shot error % | wall s / run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, _, what in VARIANTS:
        s = summary.get(variant)
        if s is None:
            lines.append(f"| {variant} | {what} | not run | | | | | 0 |")
            continue
        r1 = s.get("recall@1")
        delta = "" if variant == "baseline" else paired_delta(result["runs"], variant, "baseline")
        if variant == "bspml_noise0.2":
            delta += f" ({paired_delta(result['runs'], variant, 'baseline_noise0.2')} vs noisy baseline)"
        wall = s.get("wall_seconds")
        lines.append(f"| {variant} | {what} | {format_stat(r1)} | {delta} | {format_stat(s.get('map_at_r'))} | "
                     f"{format_stat(s.get('one_shot_error'), pct=True)} | {wall['mean']:.0f} | {len(s['seeds'])} |")
    lines += ["", "Per run (variant, seed: R@1 / MAP@R / one-shot error / wall s):", ""]
    for r in result["runs"]:
        lines.append(f"- {r['variant']}, seed {r['seed']}: {r['recall@1']:.4f} / {r['map_at_r']:.4f} / "
                     f"{100 * r['one_shot_error']:.2f}% / {r['wall_seconds']:.0f} s" if r.get("one_shot_error")
                     is not None else f"- {r['variant']}, seed {r['seed']}: {r['recall@1']:.4f} / "
                     f"{r['map_at_r']:.4f} / n/a / {r['wall_seconds']:.0f} s")
    for f in result.get("failures", []):
        lines.append(f"- {f['variant']}, seed {f['seed']}: FAILED after {f['wall_seconds']:.0f} s: {f['error']}")
    if m.get("caveats"):
        lines += ["", "Caveats:", ""] + [f"- {c}" for c in m["caveats"]]
    return "\n".join(lines) + "\n"


CAVEATS = (
    "300 steps is a short budget (the full protocol trains 3000 steps on 964 characters, R@1 ~0.87 plain); "
    "the methods' default options were not tuned for it, so this ranks the methods at a small, equal budget only.",
    "Few seeds: Omniglot R@1 differences of ~0.01 between seeds of the same config are typical at this "
    "budget (see tasks_comparison.md), so gaps of that size are noise.",
    "lifted_hard_negative samples class-balanced batches until its first pool refresh (one epoch, "
    "34 steps here), then 16 random positive pairs + their 6 hardest pool negatives each, with the "
    "baseline loss (not the lifted structured loss).",
    "Wall times are taken on a 2-core machine shared with other engineers (load average above), so they "
    "mostly measure the others' load; they are only a rough indication of each method's overhead.",
)


def _default_runner(argv: list[str]) -> dict:
    from dmljax.train.cli import main as train_main

    return train_main(argv)


def main(argv=None, runner: Callable[[list[str]], dict] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=[v for v, _, _ in VARIANTS],
                        choices=[v for v, _, _ in VARIANTS])
    parser.add_argument("--workroot", default="runs/compare_methods")
    parser.add_argument("--out", default=os.path.join(RESULTS, "methods_comparison"),
                        help="output path without extension (.json and .md are written)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in <out>.json")
    parser.add_argument("--stop-at", default=None, help="HH:MM UTC: start no run expected to end later")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    deadline = None
    if args.stop_at is not None:
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    runner = runner or _default_runner
    t0 = time.perf_counter()
    load_start = load_average()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    runs: list[dict] = []
    previous: list[dict] = []  # the meta of the invocations whose runs are kept (--resume)
    if args.resume and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        runs = [r for r in old["runs"] if r.get("steps") == args.steps]
        if runs:
            meta = dict(old["meta"])
            previous = meta.pop("previous_invocations", []) + [
                {k: meta[k] for k in ("argv", "commit", "date", "load_start", "load_end", "wall_seconds", "num_runs")
                 if k in meta}]
    done = {(r["variant"], r["seed"]) for r in runs}
    failures: list[dict] = []  # runs that raised (not retried here; listed in the report)

    def write(stopped: str | None = None) -> dict:
        result = {"runs": runs, "failures": failures, "summary": summarize(runs), "meta": {
            "argv": list(argv) if argv is not None else [], "commit": commit,
            "seeds_requested": list(range(args.seeds)), "seeds_run": sorted({r["seed"] for r in runs}),
            "num_runs": len(runs), "steps": args.steps, "metrics": list(METRICS),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{_backend()}", "load_start": load_start, "load_end": load_average(),
            "wall_seconds": time.perf_counter() - t0, "stopped": stopped,
            "previous_invocations": previous,
            "caveats": list(CAVEATS) + ([f"Stopped early: {stopped}."] if stopped else [])}}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))
        return result

    stopped = None
    for seed in range(args.seeds):
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            if deadline is not None:
                walls = [r["wall_seconds"] for r in runs] or [0.0]
                if time.time() + float(np.mean(walls)) > deadline:
                    stopped = f"--stop-at {args.stop_at} UTC reached before {variant} seed {seed}"
                    break
            t_run = time.perf_counter()
            try:
                final = runner(train_argv(variant, seed, args.steps, args.workroot))
            except Exception as e:  # a broken method must not end the comparison: record it, go on
                failures.append({"variant": variant, "seed": seed, "error": f"{type(e).__name__}: {e}",
                                 "wall_seconds": time.perf_counter() - t_run})
                print(f"[methods] {variant} seed {seed} FAILED: {failures[-1]['error']}", flush=True)
                write()
                continue
            record = {"variant": variant, "seed": seed, "steps": args.steps,
                      "wall_seconds": time.perf_counter() - t_run, "load": load_average()}
            for k in METRICS + ("train_seconds",):
                record[k] = float(final[k]) if k in final else None
            runs.append(record)
            print(f"[methods] {variant} seed {seed}: R@1 {record['recall@1']:.4f} MAP@R {record['map_at_r']:.4f} "
                  f"({record['wall_seconds']:.0f} s, load {record['load']})", flush=True)
            write()
        if stopped:
            break
    result = write(stopped)
    print(markdown(result))
    return result


def _backend() -> str:
    import jax

    return f"jax {jax.__version__} on {jax.default_backend()}"


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
