"""Loss + gradient benchmark: dmljax vs PyTorch Metric Learning, same run, same machine.

For every case in ``experiments/bench/specs_*.py`` (format: experiments/bench/common.py)
and every (batch, dim) it times

  dmljax: jit(value_and_grad(loss w.r.t. embeddings and learnable params)), compiled ahead of
          the timing, one warm-up call, median of repeats, ``block_until_ready``;
  PML:    forward + backward of the matching loss (+ miner) on the same device
          (torch CUDA when JAX runs on a GPU and torch sees one, else CPU), one warm-up call,
          median of repeats,

and reports ``ratio = PML_time / dmljax_time`` (> 1 means dmljax is faster), a table on
stdout and JSON. Also times the floor: the pairwise distance matrix and its gradient
(``vs_floor = dmljax_time / floor_time``). Repeats stop early once a side has spent
``--budget-s`` seconds (at least one timed call after the warm-up).

Memory (recorded per row where available): ``dmljax_xla_temp_bytes`` / ``dmljax_xla_bytes`` from
XLA's buffer assignment of the compiled step (temporaries; temporaries + arguments + outputs),
and ``{dmljax,pml}_rss_delta_bytes``, the rise of the process's peak RSS over its RSS while the
side ran (Linux, approximate: see ``common.PeakRSS``).

Cases that cannot run are recorded, never fatal (``<side>_error`` in the row, the run goes on):

  * ``skipped: above pml_max_batch``: the spec's own cap (PML materialises B^3 triplet lists or
    B^3 tensors; e.g. all-triplets at B=4096 would be a 4096^3-byte = 64 GiB mask).
  * ``skipped: predicted ...``: the time cap. Before running a side at (B, D) the driver predicts
    its seconds per call from that side's earlier measurements (this run, plus ``--prior`` JSON
    files): from the largest smaller B at the same D, scaled by (B / B_prev)^k, k the exponent
    fitted between the two largest smaller batches, clamped to [2, 3] (k = 2.5 with one point);
    and from the same B at a smaller D, scaled by the D ratio measured at a smaller B. The larger
    estimate counts; above ``--max-case-s`` (default 60 s per call) the side is skipped. A side
    skipped, out of memory or killed at some (B, D) is skipped at every larger (B, D).
  * ``--isolate``: every timing runs in a worker process (restarted after a failure) under a
    hard wall-clock cap ``--case-timeout-s`` and an address-space limit ``--max-memory-gb``, so
    a case that hangs, aborts or runs out of memory is recorded (``skipped: no result within``,
    ``out of memory``, ``worker died``) instead of taking the run (or the machine) down.

Output: ``--out`` (all rows) and, with ``--out-dir``, one file per (B, D),
``<out-dir>/bench_losses_<tag>_b<B>_d<D>.json``, both rewritten after every row so an
interrupted run keeps its progress. ``--report FILE...`` prints markdown tables of such files.

    python -m experiments.bench.losses                       # B in {256,1024,4096}, D in {128,512}
    python -m experiments.bench.losses --batch 1024 --dim 128 --only triplet
    python -m experiments.bench.losses --isolate --max-memory-gb 8 --out-dir experiments/results --tag cpu
    python -m experiments.bench.losses --no-pml --out bench.json
    python -m experiments.bench.losses --report experiments/results/bench_losses_cpu_b*.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import pkgutil
import sys
import time
from typing import Any

import numpy as np

from experiments.bench.common import (Case, PeakRSS, format_table, geomean, load_average, machine_info,
                                      median_time, write_json)

SIDES = ("dmljax", "pml")


def load_cases(only: list[str] | None = None, names: list[str] | None = None) -> list[Case]:
    """All cases of the spec files; ``only``: keep names containing one of these substrings;
    ``names``: keep exactly these names."""
    import experiments.bench as bench_pkg

    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(bench_pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("specs_"):
            continue
        try:
            module = importlib.import_module(f"experiments.bench.{info.name}")
        except Exception as exc:  # one broken spec file must not hide the others
            print(f"warning: cannot import experiments.bench.{info.name}: {exc}", file=sys.stderr)
            continue
        cases.extend(getattr(module, "CASES", []))
    if only:
        cases = [c for c in cases if any(s in c.name for s in only)]
    if names:
        unknown = set(names) - {c.name for c in cases}
        if unknown:
            raise ValueError(f"names: unknown cases {sorted(unknown)}")
        cases = [c for c in cases if c.name in names]
    return cases


def make_inputs(batch: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = (np.arange(batch) % classes).astype(np.int32)
    rng.shuffle(labels)
    return x, labels


# --------------------------------------------------------------------------- one measurement


def _xla_memory(compiled) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
        temp = int(stats.temp_size_in_bytes)
        total = temp + int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)
    except Exception:  # not every backend / version reports it
        return {}
    return {"xla_temp_bytes": temp, "xla_bytes": total}


def measure_dmljax(case: Case, x: np.ndarray, labels: np.ndarray, classes: int, *, repeats: int,
                   budget_s: float) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    fn, params = case.dmljax(x.shape[0], x.shape[1], classes)
    params = tuple(jnp.asarray(p) for p in params)
    argnums = tuple(range(1 + len(params)))

    def objective(e, *p):
        return fn(e, jnp.asarray(labels), *p)

    e = jax.device_put(jnp.asarray(x))
    compiled = jax.jit(jax.value_and_grad(objective, argnums=argnums)).lower(e, *params).compile()
    with PeakRSS() as rss:
        seconds = median_time(lambda: jax.block_until_ready(compiled(e, *params)), repeats=repeats,
                              budget_s=budget_s)
    return {"ms": seconds * 1e3, "rss_delta_bytes": rss.delta_bytes, **_xla_memory(compiled)}


def measure_floor(x: np.ndarray, *, repeats: int, budget_s: float) -> dict[str, Any]:
    """Pairwise euclidean distances + gradient of their sum: the cost every loss pays."""
    import jax
    import jax.numpy as jnp

    from dmljax.distances import euclidean

    e = jnp.asarray(x)
    compiled = jax.jit(jax.value_and_grad(lambda e: jnp.sum(euclidean(e)))).lower(e).compile()
    seconds = median_time(lambda: jax.block_until_ready(compiled(e)), repeats=repeats, budget_s=budget_s)
    return {"ms": seconds * 1e3, **_xla_memory(compiled)}


def measure_pml(case: Case, x: np.ndarray, labels: np.ndarray, classes: int, *, repeats: int,
                budget_s: float, device: str) -> dict[str, Any]:
    import torch

    fn, params = case.pml(x.shape[0], x.shape[1], classes)
    for p in params:
        p.data = p.data.to(device)
    e = torch.tensor(x, device=device, requires_grad=True)
    y = torch.tensor(labels, device=device, dtype=torch.long)

    def run():
        e.grad = None
        for p in params:
            p.grad = None
        loss = fn(e, y)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with PeakRSS() as rss:
        seconds = median_time(run, repeats=repeats, budget_s=budget_s)
    return {"ms": seconds * 1e3, "rss_delta_bytes": rss.delta_bytes if device == "cpu" else None}


def torch_device() -> str:
    import jax

    try:
        import torch
    except ImportError:
        return "cpu"
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def run_job(job: dict[str, Any], cases: dict[str, Case]) -> dict[str, Any]:
    """One measurement: job = {kind: floor|dmljax|pml, B, D, classes, repeats, budget_s[, case, device]}.
    Returns the measurement or {"error": ...}; never raises for a failing case."""
    x, labels = make_inputs(job["B"], job["D"], job["classes"])
    timing = dict(repeats=job["repeats"], budget_s=job["budget_s"])
    try:
        if job["kind"] == "floor":
            return measure_floor(x, **timing)
        case = cases[job["case"]]
        if job["kind"] == "dmljax":
            return measure_dmljax(case, x, labels, job["classes"], **timing)
        return measure_pml(case, x, labels, job["classes"], device=job["device"], **timing)
    except MemoryError as exc:
        return {"error": f"out of memory: MemoryError {exc}"[:200]}
    except Exception as exc:  # a failing case must not hide the others
        text = f"{type(exc).__name__}: {exc}"
        if "can't allocate memory" in text or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
            text = "out of memory: " + text
        return {"error": text[:200]}
    finally:
        gc.collect()


class InProcessRunner:
    def __init__(self, cases: list[Case]):
        self.cases = {c.name: c for c in cases}

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        return run_job(job, self.cases)

    def close(self) -> None:
        pass


def _worker(conn, max_memory_gb: float) -> None:
    if max_memory_gb > 0:
        import resource

        limit = int(max_memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cases = {c.name: c for c in load_cases()}
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_job(job, cases))


class IsolatedRunner:
    """Runs each job in a (reused) spawned worker process with a hard wall-clock cap and an
    address-space limit; a worker that times out is killed, one that dies is replaced."""

    def __init__(self, *, timeout_s: float, max_memory_gb: float):
        import multiprocessing

        self.ctx = multiprocessing.get_context("spawn")
        self.timeout_s = timeout_s
        self.max_memory_gb = max_memory_gb
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.max_memory_gb), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def _stop(self, kill: bool) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if kill and proc.is_alive():
            proc.kill()
        proc.join(timeout=30)
        self.conn.close()
        return proc.exitcode

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send(job)
            if not self.conn.poll(self.timeout_s):
                self._stop(kill=True)
                return {"error": f"skipped: no result within the hard cap of {self.timeout_s:.0f} s (worker killed)"}
            return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self._stop(kill=True)
            why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return {"error": f"worker died ({why}; out of memory or an abort in native code)"}

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self._stop(kill=False)


# --------------------------------------------------------------------------- the time cap


def propagates(error: str) -> bool:
    """Failures that only get worse with B and D (so larger sizes are skipped without trying)."""
    return error.startswith("skipped") or "out of memory" in error or "worker died" in error


class History:
    """Seconds per call (or a propagating failure) of each (case, side) at each (B, D)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
        self.failed: dict[tuple[str, str], dict[tuple[int, int], str]] = {}

    def add_row(self, row: dict[str, Any]) -> None:
        for side in SIDES:
            key, size = (row["loss"], side), (int(row["B"]), int(row["D"]))
            if f"{side}_ms" in row:  # a later success at a size replaces an earlier failure there
                self.seconds.setdefault(key, {})[size] = row[f"{side}_ms"] / 1e3
                self.failed.get(key, {}).pop(size, None)
            elif f"{side}_error" in row and propagates(row[f"{side}_error"]) and "pml_max_batch" not in row[f"{side}_error"]:
                self.failed.setdefault(key, {})[size] = row[f"{side}_error"]

    def predict(self, case: str, side: str, batch: int, dim: int) -> tuple[float, str] | None:
        return predict_seconds(self.seconds.get((case, side), {}), batch, dim)

    def skip_reason(self, case: str, side: str, batch: int, dim: int, *, max_case_s: float) -> str | None:
        for (b, d), error in sorted(self.failed.get((case, side), {}).items()):
            if b <= batch and d <= dim and (b, d) != (batch, dim):
                return f"skipped: failed at B={b} D={d} ({error[:80]})"
        prediction = self.predict(case, side, batch, dim)
        if prediction is not None and prediction[0] > max_case_s:
            return f"skipped: predicted {prediction[0]:.3g} s per call > cap {max_case_s:.3g} s ({prediction[1]})"
        return None


def predict_seconds(times: dict[tuple[int, int], float], batch: int, dim: int) -> tuple[float, str] | None:
    """Predicted seconds per call at (batch, dim) from measurements ``times[(B, D)]`` at smaller
    sizes (rules in the module docstring); None when nothing smaller was measured."""
    estimates = []
    smaller_b = sorted(b for (b, d) in times if d == dim and b < batch)
    if smaller_b:
        b1 = smaller_b[-1]
        t1 = times[(b1, dim)]
        k = 2.5  # one point: between the B^2 and B^3 losses (the hard cap of --isolate backs it up)
        if len(smaller_b) >= 2:
            b0 = smaller_b[-2]
            t0 = times[(b0, dim)]
            k = min(max(math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(b1 / b0), 2.0), 3.0)
        estimates.append((t1 * (batch / b1) ** k, f"B={b1}: {t1:.3g} s x ({batch}/{b1})^{k:.2f}"))
    smaller_d = sorted(d for (b, d) in times if b == batch and d < dim)
    if smaller_d:
        d1 = smaller_d[-1]
        t1 = times[(batch, d1)]
        both = [b for (b, d) in times if d == dim and b < batch and (b, d1) in times]
        ratio = max(times[(max(both), dim)] / times[(max(both), d1)], 1.0) if both else dim / d1
        estimates.append((t1 * ratio, f"D={d1}: {t1:.3g} s x {ratio:.2f}"))
    return max(estimates) if estimates else None


# --------------------------------------------------------------------------- driver


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    floors = [r["vs_floor"] for r in rows if "vs_floor" in r]
    return {"geomean_ratio": geomean(ratios), "min_ratio": min(ratios) if ratios else None,
            "max_ratio": max(ratios) if ratios else None, "ratios": len(ratios),
            "geomean_vs_floor": geomean(floors), "cases": len(rows)}


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f).get("rows", []))
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--classes-per-batch", type=int, default=0,
                        help="classes in a batch (default: batch // 4, i.e. 4 samples per class)")
    parser.add_argument("--only", nargs="*", help="substrings of case names to run")
    parser.add_argument("--cases", nargs="*", help="exact case names to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=20.0,
                        help="stop repeating a side after this many seconds (>= 1 timed call)")
    parser.add_argument("--no-pml", action="store_true")
    parser.add_argument("--pml-max-batch", type=int, default=1 << 30,
                        help="skip PML above this batch size (its B^3 miners)")
    parser.add_argument("--max-case-s", type=float, default=60.0,
                        help="skip a side whose predicted seconds per call exceed this (0: no cap)")
    parser.add_argument("--prior", nargs="*", default=[],
                        help="JSON files of earlier runs whose times feed the prediction")
    parser.add_argument("--isolate", action="store_true",
                        help="time in a worker process with a hard time cap and a memory limit")
    parser.add_argument("--case-timeout-s", type=float, default=600.0, help="hard cap per side (--isolate)")
    parser.add_argument("--max-memory-gb", type=float, default=0.0,
                        help="address-space limit of the worker (--isolate; 0: none)")
    parser.add_argument("--out", default="bench_losses.json")
    parser.add_argument("--out-dir", help="also write one JSON per (B, D) here")
    parser.add_argument("--tag", default="cpu", help="file name tag for --out-dir")
    parser.add_argument("--report", nargs="+", metavar="JSON", help="print markdown tables of these files and exit")
    args = parser.parse_args(argv)
    if args.report:
        text = markdown_report([json.load(open(p)) for p in args.report])
        print(text)
        return {"report": text}
    if args.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {args.repeats}")

    cases = load_cases(args.only, args.cases)
    use_pml = not args.no_pml
    if use_pml:
        try:
            import pytorch_metric_learning  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch Metric Learning not installed (pip install -e '.[bench]'): dmljax only", file=sys.stderr)
            use_pml = False
    device = torch_device() if use_pml else None
    history = History()
    for row in load_rows(args.prior):
        history.add_row(row)
    runner = (IsolatedRunner(timeout_s=args.case_timeout_s, max_memory_gb=args.max_memory_gb) if args.isolate
              else InProcessRunner(cases))
    header = {"machine": machine_info(), "torch_device": device, "args": vars(args),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_at_start": load_average()}
    rows: list[dict[str, Any]] = []
    per_size: list[dict[str, Any]] = []
    try:
        for batch in args.batch:
            for dim in args.dim:
                classes = args.classes_per_batch or max(batch // 4, 2)
                job = {"B": batch, "D": dim, "classes": classes, "repeats": args.repeats,
                       "budget_s": args.budget_s, "device": device}
                size = {**header, "B": batch, "D": dim, "classes": classes, "load_at_start": load_average(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "partial": True, "rows": []}
                per_size.append(size)
                floor = runner({**job, "kind": "floor"})
                size["floor"] = floor
                for case in cases:
                    row = _run_case(case, job, floor, runner, history, use_pml=use_pml, args=args)
                    row["load1"] = (load_average() or [None])[0]
                    history.add_row(row)
                    rows.append(row)
                    size["rows"].append(row)
                    print(format_table([row], ["loss", "B", "D", "dmljax_ms", "pml_ms", "ratio", "vs_floor",
                                               "load1"]).splitlines()[-1], flush=True)
                    _save(args, header, rows, per_size, partial=True)
                size.update(partial=False, finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                            load_at_end=load_average(), summary=summarize(size["rows"]))
                _save(args, header, rows, per_size, partial=True)
    finally:
        runner.close()
    payload = _save(args, header, rows, per_size, partial=False)
    print()
    print(format_table(rows, ["loss", "B", "D", "dmljax_ms", "pml_ms", "ratio", "floor_ms", "vs_floor"]))
    for r in rows:
        for side in SIDES:
            if f"{side}_error" in r and "above pml_max_batch" not in r[f"{side}_error"]:
                print(f"  {r['loss']} B={r['B']} D={r['D']} {side}: {r[f'{side}_error']}")
    for size in per_size:
        print(f"B={size['B']} D={size['D']}: geometric mean PML/dmljax {size['summary']['geomean_ratio']} "
              f"over {size['summary']['ratios']} losses")
    print(f"wrote {args.out}" + (f" and {args.out_dir}/bench_losses_{args.tag}_b*_d*.json" if args.out_dir else ""))
    return payload


def _run_case(case: Case, job: dict[str, Any], floor: dict[str, Any], runner, history: History, *,
              use_pml: bool, args) -> dict[str, Any]:
    batch, dim = job["B"], job["D"]
    row: dict[str, Any] = {"loss": case.name, "B": batch, "D": dim, "floor_ms": floor.get("ms")}
    for side in SIDES:
        if side == "pml":
            if not use_pml or case.pml is None:
                continue
            if batch > min(case.pml_max_batch, args.pml_max_batch):
                row["pml_error"] = "skipped: above pml_max_batch (B^3 mining)"
                continue
        reason = history.skip_reason(case.name, side, batch, dim, max_case_s=args.max_case_s or math.inf)
        if reason:
            row[f"{side}_error"] = reason
            continue
        prediction = history.predict(case.name, side, batch, dim)
        if prediction is not None:
            row[f"{side}_predicted_ms"] = prediction[0] * 1e3
        result = runner({**job, "kind": side, "case": case.name})
        if "error" in result:
            row[f"{side}_error"] = result["error"]
            continue
        row[f"{side}_ms"] = result["ms"]
        for key, value in result.items():
            if key != "ms" and value is not None:
                row[f"{side}_{key}"] = value
    if "dmljax_ms" in row and "pml_ms" in row:
        row["ratio"] = row["pml_ms"] / row["dmljax_ms"]
    if "dmljax_ms" in row and row["floor_ms"]:
        row["vs_floor"] = row["dmljax_ms"] / row["floor_ms"]
    return row


def _save(args, header, rows, per_size, *, partial: bool) -> dict[str, Any]:
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for size in per_size:
            write_json(os.path.join(args.out_dir, f"bench_losses_{args.tag}_b{size['B']}_d{size['D']}.json"), size)
    payload = {**header, "partial": partial, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "summary": summarize(rows),
               "per_size": [{"B": s["B"], "D": s["D"], "summary": s.get("summary") or summarize(s["rows"])}
                            for s in per_size],
               "rows": rows}
    write_json(args.out, payload)
    return payload


# --------------------------------------------------------------------------- markdown


def _ms(v):
    return "-" if v is None else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def markdown_report(payloads: list[dict[str, Any]]) -> str:
    """One markdown table per (B, D) payload (the ``--out-dir`` files), with its geometric mean.
    Memory columns are bytes divided by B^2 (4 = one float32 B x B matrix)."""
    out = []
    for p in payloads:
        rows = p["rows"]
        s = summarize(rows)
        floor_ms = (p.get("floor") or {}).get("ms")
        load = f"load {p.get('load_at_start')} -> {p.get('load_at_end')}" if p.get("load_at_start") else ""
        out.append(f"### B={p['B']}, D={p['D']} ({p.get('classes')} classes x 4)")
        out.append("")
        out.append(f"floor (distances + gradient) {_ms(floor_ms)} ms; geometric mean PML/dmljax "
                   f"**{s['geomean_ratio']:.3g}** over {s['ratios']} losses (min {s['min_ratio']:.3g}, "
                   f"max {s['max_ratio']:.3g}); geometric mean loss/floor {s['geomean_vs_floor']:.3g}; "
                   f"{load}; {p.get('started')} -> {p.get('finished', 'unfinished')}"
                   if s["ratios"] else f"no ratios; {load}")
        out.append("")
        out.append("| loss | dmljax ms | PML ms | ratio | floor ms | loss/floor | dmljax XLA temp / B^2 "
                   "| PML peak RSS rise / B^2 | note |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        b2 = p["B"] ** 2
        for r in rows:
            notes = []
            for side in SIDES:
                err = r.get(f"{side}_error")
                if err:
                    notes.append(f"{'PML' if side == 'pml' else 'dmljax'}: {err}")
            temp, rss = r.get("dmljax_xla_temp_bytes"), r.get("pml_rss_delta_bytes")
            out.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["loss"], _ms(r.get("dmljax_ms")), _ms(r.get("pml_ms")),
                f"{r['ratio']:.3g}" if "ratio" in r else "-", _ms(r.get("floor_ms")),
                f"{r['vs_floor']:.3g}" if "vs_floor" in r else "-",
                f"{temp / b2:.3g}" if temp is not None else "-", f"{rss / b2:.3g}" if rss is not None else "-",
                "; ".join(n.replace("|", "/") for n in notes)))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
