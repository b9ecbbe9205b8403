"""XLA:CPU settings for conv-net training on CPU (measured, opt-out).

On jaxlib 0.10 XLA:CPU hands convolutions, reductions and element-wise chains to YNNPACK
fusions by default. For the Omniglot conv-net train step (batch 128, 32 px, 4 conv blocks) on a
2-core AMD EPYC (Zen 4) this was the slow path: turning the YNN fusions off
(``--xla_cpu_experimental_ynn_fusion_type=``, i.e. an empty list: the convolutions then run on
XLA's own Eigen kernels) took the jitted step from 234-278 ms to 188-201 ms in back-to-back
pairs (`experiments/results/performance.md`, section 5). The flag is experimental and only
exists in recent jaxlib releases (an unknown flag aborts the process at backend start), so it
is added only for the jaxlib minor versions it was measured on.

Flags are read once, when the first backend starts: call :func:`use_fast_cpu_flags` before
anything touches a device (the training CLI does it first thing in ``main``).

:func:`keep_freed_host_memory` is the allocator side: every XLA:CPU execution of the 36 px
Omniglot step takes ~180 MB of temporary buffers from worker threads, which glibc serves with
fresh ``mmap`` pages and returns with ``munmap`` each step (~21k page faults and ~45 ms of
kernel time per step). One never-trimmed heap keeps those pages mapped (``mallopt``: one arena,
no ``mmap``, no trimming): page faults per step ~25x fewer, the trainer's system time
203 s -> see `experiments/results/performance.md` section 6.
"""

from __future__ import annotations

import os
from typing import MutableMapping

__all__ = ["FAST_CPU_FLAGS", "TESTED_JAXLIB_VERSIONS", "use_fast_cpu_flags", "keep_freed_host_memory"]

FAST_CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
# jaxlib "major.minor" prefixes on which FAST_CPU_FLAGS exist and were measured to help
TESTED_JAXLIB_VERSIONS: tuple[str, ...] = ("0.10",)
OPT_OUT_VARIABLE = "DMLJAX_DEFAULT_XLA_FLAGS"
HOST_MEMORY_OPT_OUT_VARIABLE = "DMLJAX_KEEP_HOST_MEMORY"
# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1


def _jaxlib_minor() -> str:
    import jaxlib

    return ".".join(jaxlib.__version__.split(".")[:2])


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved: assume not started
        return False
    return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def use_fast_cpu_flags(*, environ: MutableMapping[str, str] | None = None, jaxlib_version: str | None = None) -> bool:
    """Append :data:`FAST_CPU_FLAGS` to ``XLA_FLAGS`` in ``environ`` (default ``os.environ``).

    Nothing is changed (returns False) when ``DMLJAX_DEFAULT_XLA_FLAGS=0`` is set, when
    ``XLA_FLAGS`` already mentions the flag (the user's choice wins), or when the jaxlib version
    (``jaxlib_version``, default the installed one, "major.minor[.patch]") is not one of
    :data:`TESTED_JAXLIB_VERSIONS`, or (for ``os.environ``) when a backend already started:
    XLA reads its flags once. Returns True when the flags were added. GPU / TPU backends ignore
    them.
    """
    env = os.environ if environ is None else environ
    if environ is None and _backend_started():
        return False  # too late to matter; leave the process environment alone
    if _opted_out(env, OPT_OUT_VARIABLE):
        return False
    minor = ".".join((jaxlib_version or _jaxlib_minor()).split(".")[:2])
    if minor not in TESTED_JAXLIB_VERSIONS:
        return False
    current = env.get("XLA_FLAGS", "")
    missing = [f for f in FAST_CPU_FLAGS if f.split("=")[0] not in current]
    if not missing:
        return False
    env["XLA_FLAGS"] = " ".join([current.strip(), *missing]).strip()
    return True


def _opted_out(env: MutableMapping[str, str], variable: str) -> bool:
    return env.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def keep_freed_host_memory(*, environ: MutableMapping[str, str] | None = None) -> bool:
    """Make glibc's ``malloc`` keep freed memory mapped for reuse (Linux / glibc only).

    ``mallopt(M_ARENA_MAX, 1)``, ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD,
    2**31 - 1)``: all threads allocate from the main heap, large blocks come from it instead of
    their own ``mmap`` (a thread arena would still ``mmap`` blocks above its 64 MB heap), and
    the heap is not given back to the kernel when its top is free. The per-step temporary
    buffers of XLA:CPU are then reused pages instead of fresh zero-filled ones. The cost: the
    process's resident memory stays at its peak. Call it before the backend starts (threads
    created earlier keep their arenas).

    Returns False, changing nothing, when ``DMLJAX_KEEP_HOST_MEMORY=0`` is set in ``environ``
    (default ``os.environ``) or the C library has no ``mallopt`` (not glibc); True otherwise.
    """
    env = os.environ if environ is None else environ
    if _opted_out(env, HOST_MEMORY_OPT_OUT_VARIABLE):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
