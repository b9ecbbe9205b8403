"""dmljax.train.xla_cpu: the XLA:CPU flag the training CLI adds before the backend starts."""

import os
import subprocess
import sys
import textwrap

import pytest

from dmljax.train.xla_cpu import FAST_CPU_FLAGS, OPT_OUT_VARIABLE, use_fast_cpu_flags

FLAG = FAST_CPU_FLAGS[0]


def test_adds_the_flag_and_keeps_existing_ones():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert use_fast_cpu_flags(environ=env, jaxlib_version="0.10.2")
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", FLAG]
    empty = {}
    assert use_fast_cpu_flags(environ=empty, jaxlib_version="0.10.0")
    assert empty["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize("env, version", [
    ({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}, "0.10.2"),  # the user's choice wins
    ({OPT_OUT_VARIABLE: "0"}, "0.10.2"),
    ({OPT_OUT_VARIABLE: "false", "XLA_FLAGS": "--a=1"}, "0.10.2"),
    ({}, "0.11.0"),  # not measured there (an unknown flag would abort the backend start)
    ({}, "0.9.1"),
])
def test_leaves_the_environment_alone(env, version):
    before = dict(env)
    assert not use_fast_cpu_flags(environ=env, jaxlib_version=version)
    assert env == before


def test_does_nothing_once_a_backend_started():
    import jax

    jax.devices()  # the test session's backend is up: setting XLA_FLAGS now would be a silent no-op
    before = os.environ.get("XLA_FLAGS")
    assert not use_fast_cpu_flags()
    assert os.environ.get("XLA_FLAGS") == before


_PROBE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from dmljax.train.xla_cpu import use_fast_cpu_flags
    added = use_fast_cpu_flags()
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # large enough for XLA to hand it to YNNPACK by default (a 2x8x8x4 one it keeps)
    text = jax.jit(conv).lower(jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text()
    print(added, "__ynn_fusion" in text)
""")


@pytest.mark.parametrize("opt_out", [False, True])
def test_flag_reaches_the_compiler(opt_out):
    import jaxlib

    if not jaxlib.__version__.startswith("0.10."):
        pytest.skip("the flag is only added on jaxlib 0.10")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT_VARIABLE)}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out:
        env[OPT_OUT_VARIABLE] = "0"
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    added, ynn = out.stdout.split()
    # with the flag the convolution is no YNNPACK fusion; without it (the jaxlib default) it is
    assert (added, ynn) == (("False", "True") if opt_out else ("True", "False"))


# a worker thread allocates, touches and frees 96 MB four times (what XLA:CPU does with its
# temporary buffers every step); minor page faults of rounds 2-4
_ALLOC_PROBE = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from dmljax.train.xla_cpu import keep_freed_host_memory
    kept = keep_freed_host_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size, faults = 96 << 20, []

    def rounds():
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(size)
            ctypes.memset(p, 1, size)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    t = threading.Thread(target=rounds)
    t.start(); t.join()
    print(kept, sum(faults[1:]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_host_memory_stops_refaulting():
    out = {}
    for opt_out in (False, True):
        env = dict(os.environ)
        env.pop("DMLJAX_KEEP_HOST_MEMORY", None)
        if opt_out:
            env["DMLJAX_KEEP_HOST_MEMORY"] = "0"
        res = subprocess.run([sys.executable, "-c", _ALLOC_PROBE], capture_output=True, text=True, env=env,
                             timeout=120, check=True)
        kept, faults = res.stdout.split()
        out[opt_out] = (kept == "True", int(faults))
    assert out[True][0] is False and out[False][0] is True
    pages = 3 * (96 << 20) // 4096  # rounds 2-4 without reuse: every page faults again
    assert out[True][1] > pages // 2, out
    assert out[False][1] < pages // 20, out
