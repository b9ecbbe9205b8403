"""Peak memory of the all-triplets / semi-hard triplet losses at a large batch (no B^3 tensors).

Compiles ``jit(value_and_grad(triplet_margin_loss))`` for one ``--mining`` at B x D float32 on the
default JAX device, runs it ``--repeats`` times and prints one JSON line with:

  xla_temp_bytes / xla_bytes: XLA's buffer assignment of the compiled step (temporaries;
      temporaries + arguments + outputs), the device memory the step needs beyond its inputs;
  rss_before_bytes / peak_rss_bytes: this process's RSS after compiling, and its peak RSS
      (VmHWM) over the whole process lifetime (imports and compilation included);
  b2_float32_bytes: B^2 * 4, one float32 B x B matrix; b3_bool_bytes: B^3, the smallest possible
      all-triplet mask (what PML's ``get_all_triplets_indices`` allocates).

``--mining floor`` runs the pairwise-distance floor instead (baseline for the process overhead).
Run each mining in its own process (``/usr/bin/time -v`` reports the same peak as
"Maximum resident set size"):

    for m in floor all semihard_triplets semihard batch_hard; do
      /usr/bin/time -v python -m experiments.bench.triplet_memory --mining $m --batch 4096 --dim 512
    done
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np

from experiments.bench.common import _proc_status_kib, median_time


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mining", default="all", help="triplet_margin_loss mining, or 'floor'")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from dmljax.distances import euclidean
    from dmljax.losses.triplet import triplet_margin_loss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.permutation(np.arange(args.batch) // args.per_class).astype(np.int32)
    e, y = jnp.asarray(x), jnp.asarray(labels)
    if args.mining == "floor":
        fn = lambda e, y: jnp.sum(euclidean(e))  # noqa: E731
    else:
        fn = functools.partial(triplet_margin_loss, margin=0.2, mining=args.mining, reduction="mean_nonzero")
    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(fn)).lower(e, y).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    rss_before = _proc_status_kib("VmRSS") * 1024
    value, grad = compiled(e, y)
    jax.block_until_ready(grad)
    seconds = median_time(lambda: jax.block_until_ready(compiled(e, y)), repeats=args.repeats, warmup=0)
    temp = int(stats.temp_size_in_bytes)
    result = {
        "mining": args.mining, "B": args.batch, "D": args.dim, "dtype": str(e.dtype),
        "device": str(jax.devices()[0]), "jax": jax.__version__,
        "loss": float(value), "grad_finite": bool(jnp.all(jnp.isfinite(grad))),
        "seconds_per_call": seconds, "compile_s": compile_s,
        "xla_temp_bytes": temp,
        "xla_bytes": temp + int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes),
        "rss_before_bytes": rss_before, "peak_rss_bytes": _proc_status_kib("VmHWM") * 1024,
        "b2_float32_bytes": args.batch**2 * 4, "b3_bool_bytes": args.batch**3,
    }
    result["xla_temp_over_b2_float32"] = temp / result["b2_float32_bytes"]
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
