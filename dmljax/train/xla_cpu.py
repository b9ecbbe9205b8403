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
"""

from __future__ import annotations

import os
from typing import MutableMapping

__all__ = ["FAST_CPU_FLAGS", "TESTED_JAXLIB_VERSIONS", "use_fast_cpu_flags"]

FAST_CPU_FLAGS: tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
# jaxlib "major.minor" prefixes on which FAST_CPU_FLAGS exist and were measured to help
TESTED_JAXLIB_VERSIONS: tuple[str, ...] = ("0.10",)
OPT_OUT_VARIABLE = "DMLJAX_DEFAULT_XLA_FLAGS"


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
    if env.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
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
