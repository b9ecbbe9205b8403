"""Test configuration: float64 everywhere so numpy references match to 1e-5 relative.

Tests that check float32 / bf16 behaviour pass explicit dtypes.
"""

import os

_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
    _xla_flags += " --xla_force_host_platform_device_count=8"
# No --xla_backend_optimization_level=0 (tried for ~30% less compile CPU): on jaxlib
# 0.10.2 level 0 combined with the legacy emitters below miscompiled the conv-net's 2x2 max pool
# (strided slices / reshape + max and its custom VJP): the gradient norm of a train step came out
# 2.3108 instead of 2.2923 (test_parallel_step_equals_single_device caught it; either flag alone
# and the defaults agree). Correct numbers first.


def _jaxlib_minor() -> tuple[int, ...]:
    from importlib.metadata import version  # does not import jaxlib (XLA_FLAGS is read at backend start)

    return tuple(int(p) for p in version("jaxlib").split(".")[:2] if p.isdigit())


# The legacy elemental fusion emitters compile these small programs about twice as fast as the
# MLIR fusion emitters (same HLO, IEEE math; measured on jaxlib 0.10.2: compile CPU of five loss
# gradients 3.1 s -> 1.6 s, op-by-op eager 3.1 s -> 1.9 s). XLA aborts at start-up on a flag it
# does not know, so it is only set on the jaxlib minor version it was checked with; re-check on
# an upgrade. XLA_FLAGS=--xla_cpu_use_fusion_emitters=true runs the suite on the default emitters.
if "xla_cpu_use_fusion_emitters" not in _xla_flags and _jaxlib_minor() == (0, 10):
    _xla_flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _xla_flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# the XLA:CPU setting the training CLI runs with (dmljax.train.xla_cpu: no YNNPACK fusions), so
# that the trainer tests compile what `python -m experiments.train` compiles
from dmljax.train.xla_cpu import use_fast_cpu_flags  # noqa: E402

use_fast_cpu_flags()

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "dmljax", max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# more examples on demand: HYPOTHESIS_PROFILE=thorough python -m pytest
settings.register_profile(
    "thorough", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dmljax"))
