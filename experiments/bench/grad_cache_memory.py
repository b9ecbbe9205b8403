"""Peak memory and step time of the train step against the global batch, with and without
gradient caching (`dmljax.train.grad_cache`).

For every batch size of ``--batches`` and every mode (``direct``: `dmljax.train.step.train_step`;
``cached``: `dmljax.train.grad_cache.grad_cache_train_step` with ``--chunk-size``) the step is
jitted with the state donated, compiled, and measured:

  xla_temp_bytes: XLA's buffer assignment of the compiled step (temporaries: activations kept
      for the backward pass, the loss's B x B matrices, gradients) - the memory the step needs
      beyond its inputs and outputs; available on CPU and GPU without running the step;
  xla_bytes: temporaries + arguments + outputs;
  peak_bytes_in_use: the device allocator's peak after the timed steps (GPU/TPU only; None on CPU);
  step_s: median wall time of ``--steps`` steps (after a warm-up step), ``--steps 0`` skips timing;
  time_vs_direct: step_s / step_s of the direct step at the same batch (the recomputation cost,
      about 1.3-1.5x expected: two forward passes and one backward pass instead of one + one).

The direct step's temporaries grow linearly with the batch (activations); the cached step's stay
near those of one chunk plus the batch's [B, D] embeddings and the loss's O(B^2) matrices. A
batch too large for the device fails to compile or run: the row records the error and the
bench goes on (``status``).

Examples (CPU smoke run; on a GPU drop --model/--image-size overrides for ResNet-50 at 224 px):

    python -m experiments.bench.grad_cache_memory --model convnet --image-size 28 \\
        --batches 32,64 --chunk-size 16 --steps 1 --out /tmp/grad_cache_memory.json
    python -m experiments.bench.grad_cache_memory --model resnet50 --image-size 224 \\
        --batches 64,128,256,512,1024 --chunk-size 64 --steps 5 --dtype bfloat16

Output: a table on stdout and JSON (``--out``) with one row per (batch, mode).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import numpy as np

from experiments.bench.common import format_table, machine_info, write_json

MODELS = ("convnet", "resnet18", "resnet50")


def _model(name: str, *, embedding_dim: int, dtype, in_channels: int, width: int):
    from flax import nnx

    from dmljax.models.convnet import ConvNet
    from dmljax.models.heads import EmbeddingHead, EmbeddingModel
    from dmljax.models.resnet import ResNet

    rngs = nnx.Rngs(0)
    if name == "convnet":
        backbone = ConvNet(in_channels, (width, 2 * width, 2 * width, 4 * width), dtype=dtype, rngs=rngs)
        features = backbone.features
    else:
        block, layers = ("basic", (2, 2, 2, 2)) if name == "resnet18" else ("bottleneck", (3, 4, 6, 3))
        backbone = ResNet(block=block, layers=layers, width=width, in_channels=in_channels, dtype=dtype,
                          rngs=rngs)
        features = backbone.feature_dim
    return EmbeddingModel(backbone, EmbeddingHead(features, embedding_dim, rngs=rngs))


def _loss(name: str):
    from dmljax.losses.pair import contrastive_loss
    from dmljax.losses.triplet import triplet_margin_loss
    from dmljax.losses.weighted import multi_similarity_loss

    return {"multi_similarity": multi_similarity_loss, "contrastive": contrastive_loss,
            "batch_hard_triplet": functools.partial(triplet_margin_loss, mining="batch_hard")}[name]


def _xla_memory(compiled) -> dict[str, Any]:
    try:
        stats = compiled.memory_analysis()
        temp = int(stats.temp_size_in_bytes)
        return {"xla_temp_bytes": temp,
                "xla_bytes": temp + int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)}
    except Exception:  # not every backend reports it
        return {"xla_temp_bytes": None, "xla_bytes": None}


def _peak_bytes(device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(args, batch: int, mode: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    from dmljax.train.grad_cache import grad_cache_train_step
    from dmljax.train.state import create_train_state
    from dmljax.train.step import train_step

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    row: dict[str, Any] = {"batch": batch, "mode": mode, "chunk_size": args.chunk_size if mode == "cached" else None}
    if mode == "cached" and batch % args.chunk_size:
        return {**row, "status": f"skipped: chunk_size {args.chunk_size} does not divide {batch}"}
    model = _model(args.model, embedding_dim=args.embedding_dim, dtype=dtype, in_channels=args.channels,
                   width=args.width)
    state = create_train_state(model, optax.adam(1e-4), _loss(args.loss))
    step = train_step if mode == "direct" else functools.partial(grad_cache_train_step, chunk_size=args.chunk_size,
                                                                 unroll=True if args.unroll else 1)
    jitted = jax.jit(step, donate_argnums=0)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(batch // args.per_class + 1), args.per_class)[:batch].astype(np.int32)
    images = rng.integers(0, 256, size=(batch, args.image_size, args.image_size, args.channels), dtype=np.uint8)
    batch_dict = {"images": jnp.asarray(images), "labels": jnp.asarray(labels)}
    key = jax.random.key(0)
    try:
        t0 = time.perf_counter()
        compiled = jitted.lower(state, batch_dict, key).compile()
        row["compile_s"] = time.perf_counter() - t0
        row.update(_xla_memory(compiled))
        if args.steps > 0:
            state, metrics = compiled(state, batch_dict, key)  # warm-up
            jax.block_until_ready(metrics)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch_dict, key)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
            row["step_s"] = float(np.median(times))
            row["images_per_s"] = batch / row["step_s"]
            row["loss"] = float(metrics["loss"])
        row["peak_bytes_in_use"] = _peak_bytes(jax.devices()[0])
        row["status"] = "ok"
    except Exception as err:  # out of memory: record and go on
        row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--width", type=int, default=64,
                        help="first-stage channels (ResNet width; conv-net channels w, 2w, 2w, 4w)")
    parser.add_argument("--batches", default="64,128,256,512")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--embedding-dim", type=int, default=512)
    parser.add_argument("--loss", default="multi_similarity", choices=("multi_similarity", "contrastive",
                                                                      "batch_hard_triplet"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (0: memory only)")
    parser.add_argument("--modes", default="direct,cached")
    parser.add_argument("--unroll", action="store_true",
                        help="unroll the loops over chunks (faster on CPU, no memory bound: see grad_cache)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    batches = [int(b) for b in args.batches.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("direct", "cached"):
            parser.error(f"--modes: unknown mode {m!r}")
    rows = []
    for batch in batches:
        direct_time = None
        for mode in modes:
            row = measure(args, batch, mode)
            if mode == "direct":
                direct_time = row.get("step_s")
            elif direct_time and row.get("step_s"):
                row["time_vs_direct"] = row["step_s"] / direct_time
            for k in ("xla_temp_bytes", "xla_bytes", "peak_bytes_in_use"):
                if row.get(k) is not None:
                    row[k.replace("bytes", "mib")] = row[k] / 2**20
            rows.append(row)
            print(f"batch {batch} {mode}: {row.get('status')}", flush=True)
    columns = ["batch", "mode", "chunk_size", "xla_temp_mib", "xla_mib", "peak_mib_in_use", "step_s",
               "time_vs_direct", "images_per_s", "status"]
    print(format_table(rows, columns))
    payload = {"bench": "grad_cache_memory", "args": vars(args), "machine": machine_info(), "rows": rows}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
