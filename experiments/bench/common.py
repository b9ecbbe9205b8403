"""Shared pieces of the benchmarks: the case format, timers, tables and JSON output.

A loss benchmark case (files ``experiments/bench/specs_*.py`` each define ``CASES``):

    Case(name, dmljax=make_dmljax, pml=make_pml_or_None)

    make_dmljax(batch, dim, classes) -> (fn, params)
        fn(embeddings, labels, *params) -> scalar loss (pure JAX). The benchmark times
        jit(value_and_grad(fn, argnums=(0, 1+i for params))) i.e. gradients w.r.t. the
        embeddings and every learnable parameter (proxies, class weights, ...).
    make_pml(batch, dim, classes) -> (fn, params)
        fn(embeddings: torch.Tensor, labels: torch.Tensor) -> scalar torch loss, the matching
        PyTorch Metric Learning loss (+ miner); params: list of its learnable tensors
        (e.g. list(loss.parameters())). The benchmark times forward + backward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    dmljax: Callable[[int, int, int], tuple[Callable[..., Any], tuple]]
    pml: Callable[[int, int, int], tuple[Callable[..., Any], list]] | None = None
    # largest batch worth running (PML's B^3 miners run out of memory / time beyond it)
    pml_max_batch: int = 1 << 30


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` calls; stops early past budget."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and len(times) >= 1:
            break
    return statistics.median(times)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "processor": platform.processor()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # pragma: no cover - informational only
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["torch"] = None
    try:
        import pytorch_metric_learning

        info["pytorch_metric_learning"] = pytorch_metric_learning.__version__
    except Exception:
        info["pytorch_metric_learning"] = None
    info["cpu_count"] = os.cpu_count()
    return info


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temp file + rename): an interrupted run leaves the last full file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``uptime``), None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - non-POSIX
        return None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakRSS:
    """Peak resident memory of this process inside a ``with`` block, above the RSS at its start.

    Linux only: writing 5 to /proc/self/clear_refs resets the high-water mark ``VmHWM``, which is
    read back at exit. ``delta_bytes`` (None where unsupported) is approximate: memory the
    allocators kept from earlier work is reused without raising the mark, and other threads of
    the process count too. Good for "did this build a B^3 tensor" questions, not for byte counts.
    """

    def __init__(self) -> None:
        self.delta_bytes: int | None = None
        self._start: int | None = None

    def __enter__(self) -> "PeakRSS":
        self._start = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        peak = _proc_status_kib("VmHWM")
        if self._start is not None and peak is not None:
            self.delta_bytes = max(peak - self._start, 0) * 1024
