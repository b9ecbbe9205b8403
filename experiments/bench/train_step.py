"""Train-step throughput: a DML step vs a plain softmax-classification step (the DML overhead).

Both steps share the backbone, the batch, the optimizer and the step structure; they differ
only after the pooled backbone features:

    dml:      features -> Linear(F, 512) -> L2 normalise -> DML loss (global batch) [+ proxies]
    softmax:  features -> Linear(F, C)   -> softmax cross entropy over C classes

Each step is a pure function ``(state, images, labels) -> (state, loss)`` (forward with BN in
train mode, ``jax.value_and_grad``, one optax update), compiled with ``jax.jit`` and the state
donated. The images/labels live on the device before timing; after ``--warmup`` steps (compile
included) each of ``--steps`` steps is timed with ``block_until_ready`` and the median is
reported as images/s. Default: ResNet-50 at 224 px, batch 256, bf16 compute (float32 params,
float32 loss), Adam.

The bench has its own minimal step instead of `dmljax.train.step.train_step`: the trainer's step
also computes collapse metrics (a B x B distance matrix; the embedding gradient comes from the
step's single backward pass), which is trainer cost, not loss cost, and would be meaningless for the softmax step.
``--trainer-step`` adds a row timing the trainer's own step (`train_step` /
`make_parallel_train_step`) with the same model and loss, for reference.

Data parallel (``--devices N``, N > 1): ``jax.shard_map`` over a 1-D mesh axis "data" (weak
scaling: ``--batch`` images per device, global batch N x batch). The DML step all-gathers the
embeddings and labels (``tiled=True``) so the loss sees the global batch, and divides the loss
by N because ``jax.grad`` w.r.t. the replicated parameters already sums the per-device
contributions (/work/shared/DESIGN.md); the softmax step uses the per-device mean cross entropy
/ N (no gather needed). BatchNorm uses per-device batch statistics (running averages are
pmean-ed), the usual throughput setting; ``--sync-batch-norm`` averages them over the devices.
Scaling efficiency = images/s with N devices / (N x images/s with 1 device).
On CPU, fake devices give correctness only:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python -m experiments.bench.train_step --model convnet --image-size 16 --batch 8 \
        --steps 2 --devices 2 --dtype float32

Output: a table on stdout and JSON (``--out``) with one row per (mode, devices).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.bench.common import format_table, machine_info, median_time, write_json

MODELS = ("resnet18", "resnet50", "convnet")
DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "f32": jnp.float32,
          "float16": jnp.float16}
AXIS = "data"


# --------------------------------------------------------------------------- losses


def _loss_factory(name: str, num_classes: int, dim: int) -> tuple[Callable[..., jax.Array], Callable]:
    """(loss_fn(embeddings, labels, *loss_params), init(key) -> loss_params tuple) with paper defaults."""
    from dmljax.losses import classification, pair, proxy, triplet, weighted
    from dmljax.models.proxies import kaiming_normal_fan_out

    no_params = lambda key: ()  # noqa: E731
    proxies = lambda key: (kaiming_normal_fan_out(key, (num_classes, dim)),)  # noqa: E731
    class_weights = lambda key: (jax.random.normal(key, (num_classes, dim)),)  # noqa: E731
    table = {
        "multi_similarity": (weighted.multi_similarity_loss, no_params),
        "circle": (weighted.circle_loss, no_params),
        "contrastive": (pair.contrastive_loss, no_params),
        "triplet": (functools.partial(triplet.triplet_margin_loss, margin=0.2, mining="all"), no_params),
        "triplet_semihard": (functools.partial(triplet.triplet_margin_loss, margin=0.2, mining="semihard"),
                             no_params),
        "triplet_batch_hard": (functools.partial(triplet.triplet_margin_loss, margin=0.2, mining="batch_hard"),
                               no_params),
        "proxy_anchor": (proxy.proxy_anchor_loss, proxies),
        "proxy_nca": (proxy.proxy_nca_loss, proxies),
        "normalized_softmax": (classification.normalized_softmax_loss, class_weights),
        "arcface": (classification.arcface_loss, class_weights),
        "cosface": (classification.cosface_loss, class_weights),
    }
    if name not in table:
        raise ValueError(f"loss must be one of {sorted(table)}, got {name!r}")
    return table[name]


LOSSES = ("multi_similarity", "circle", "contrastive", "triplet", "triplet_semihard", "triplet_batch_hard",
          "proxy_anchor", "proxy_nca", "normalized_softmax", "arcface", "cosface")


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross entropy over the batch, computed in float32."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


# --------------------------------------------------------------------------- models


def _backbone(name: str, image_size: int, dtype, rngs: nnx.Rngs,
              convnet_channels: tuple[int, ...] = (32, 64, 128)) -> tuple[nnx.Module, int]:
    """(backbone images [N, H, W, 3] -> features [N, F], F); ``convnet_channels``: conv-net widths."""
    if name == "convnet":
        from dmljax.models.convnet import ConvNet

        net = ConvNet(3, convnet_channels, dtype=dtype, rngs=rngs)
        return net, net.features
    from dmljax.models import resnet

    # below 64 px the 7x7/2 stem + max-pool leave almost nothing: use the CIFAR-style stem
    net = getattr(resnet, name)(rngs=rngs, dtype=dtype, small_input=image_size < 64)
    return net, net.feature_dim


class _Model(nnx.Module):
    def __init__(self, backbone: nnx.Module, head: nnx.Module):
        self.backbone = backbone
        self.head = head

    def __call__(self, images):
        return self.head(self.backbone(images))


def build_model(kind: str, args, *, seed: int = 0) -> nnx.Module:
    """kind "dml": backbone + EmbeddingHead(F, dim) (L2-normalised); "softmax": backbone + Linear(F, C)."""
    from dmljax.models.heads import EmbeddingHead, EmbeddingModel

    rngs = nnx.Rngs(seed)
    dtype = DTYPES[args.dtype]
    backbone, features = _backbone(args.model, args.image_size, dtype, rngs, tuple(args.convnet_channels))
    if kind == "dml":
        return EmbeddingModel(backbone, EmbeddingHead(features, args.dim, dtype=dtype, rngs=rngs))
    return _Model(backbone, nnx.Linear(features, args.classes, dtype=dtype, rngs=rngs))


# --------------------------------------------------------------------------- steps


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate)
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {name!r}")


def init_state(model: nnx.Module, tx, loss_params: tuple) -> tuple[Any, dict]:
    """(graphdef, state dict) with params = {"model": nnx.Param state, "loss": loss arrays}."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    trainable = {"model": params, "loss": tuple(loss_params)}
    return graphdef, {"params": trainable, "batch_stats": batch_stats, "opt_state": tx.init(trainable)}


def make_step(graphdef, tx, loss_fn: Callable[..., jax.Array], *, gather: bool, axis_name: str | None = None,
              sync_batch_norm: bool = False):
    """Pure step ``(state, images, labels) -> (state, loss)``.

    ``gather``: all-gather the model outputs and labels over ``axis_name`` before the loss (the
    DML global batch); otherwise the loss is the per-device loss (softmax cross entropy).
    In both cases the objective is divided by the number of devices (see module docstring).
    ``sync_batch_norm``: BatchNorm statistics averaged over ``axis_name`` (then the step equals
    the single-device step on the global batch; used by the tests, costs one collective per BN).
    """

    def step(state, images, labels):
        num_devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)

        def objective(trainable):
            # fresh Variables at this trace level (BatchNorm writes its statistics in place)
            model_params, stats = jax.tree.map(lambda x: x, (trainable["model"], state["batch_stats"]))
            model = nnx.merge(graphdef, model_params, stats)
            if sync_batch_norm and axis_name is not None:
                for _, module in nnx.iter_modules(model):
                    if isinstance(module, nnx.BatchNorm):
                        module.axis_name = axis_name
            outputs = model(images)
            new_stats = nnx.state(model, nnx.BatchStat)
            loss_labels = labels
            if axis_name is not None and gather:
                outputs = jax.lax.all_gather(outputs, axis_name, tiled=True)
                loss_labels = jax.lax.all_gather(labels, axis_name, tiled=True)
            loss = loss_fn(outputs, loss_labels, *trainable["loss"])
            return loss / num_devices, (loss, new_stats)

        (_, (loss, new_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        if axis_name is not None:
            # replicated outputs: per-device BN statistics and (softmax) losses differ; the
            # gathered DML loss is equal on every device but typed as varying
            new_stats = jax.tree.map(lambda s: jax.lax.pmean(s, axis_name), new_stats)
            loss = jax.lax.pmean(loss, axis_name)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "batch_stats": new_stats, "opt_state": opt_state}, loss

    return step


def compile_step(step, devices: list) -> tuple[Callable, Callable]:
    """(jitted donated step, place(state, images, labels) -> device arrays) for 1 or N devices."""
    if len(devices) == 1:
        place = functools.partial(jax.device_put, device=devices[0])
        return jax.jit(step, donate_argnums=0), lambda *xs: tuple(place(x) for x in xs)
    from dmljax.train.step import data_mesh

    mesh = data_mesh(devices, AXIS)
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))

    def place(state, images, labels):
        return jax.device_put(state, replicated), jax.device_put(images, split), jax.device_put(labels, split)

    return jax.jit(sharded, donate_argnums=0), place


def synthetic_batch(batch: int, image_size: int, dtype, num_classes: int, per_class: int, seed: int = 0):
    """Random images [B, S, S, 3] in ``dtype`` and class-balanced labels (``per_class`` per class)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    labels = (np.arange(batch) // per_class) % num_classes
    rng.shuffle(labels)
    return jnp.asarray(images, dtype=dtype), jnp.asarray(labels.astype(np.int32))


def time_steps(step_fn: Callable, state, images, labels, *, steps: int, warmup: int, budget_s: float) -> dict:
    """Median seconds per step (after warm-up) and the compile time of the first call."""
    holder = {"state": state}

    def one():
        holder["state"], loss = step_fn(holder["state"], images, labels)
        jax.block_until_ready((holder["state"], loss))
        holder["loss"] = loss

    t0 = time.perf_counter()
    one()  # compile + first step
    first = time.perf_counter() - t0
    # at least one more untimed step: the donated output state may carry other shardings/layouts
    # than the initial one, which can trigger a second compilation
    seconds = median_time(one, repeats=steps, warmup=max(warmup - 1, 1), budget_s=budget_s)
    loss = float(holder["loss"])
    return {"step_ms": seconds * 1e3, "first_step_s": first, "loss_value": loss,
            "loss_finite": math.isfinite(loss)}


def _trainer_step_row(args, devices, loss_fn, loss_params, images, labels):
    """Time dmljax.train.step's own train step (with its collapse metrics) on the DML model."""
    from dmljax.train.state import create_train_state
    from dmljax.train.step import data_mesh, make_parallel_train_step, train_step

    state = create_train_state(build_model("dml", args), make_optimizer(args.optimizer, args.lr), loss_fn,
                               loss_params)
    key = jax.random.key(0)
    if len(devices) == 1:
        jitted = jax.jit(train_step, donate_argnums=0)
        state, images, labels = jax.device_put((state, images, labels), devices[0])
    else:
        mesh = data_mesh(devices, AXIS)
        jitted = make_parallel_train_step(mesh)
        state = jax.device_put(state, NamedSharding(mesh, P()))
        images, labels = jax.device_put((images, labels), NamedSharding(mesh, P(AXIS)))

    def step_fn(s, x, y):
        s, metrics = jitted(s, {"images": x, "labels": y}, key)
        return s, metrics["loss"]

    return time_steps(step_fn, state, images, labels, steps=args.steps, warmup=args.warmup, budget_s=args.budget)


def run_config(args, num_devices: int) -> list[dict]:
    """Rows for the softmax step, the DML step (and the trainer's step) on ``num_devices``."""
    devices = jax.devices()[:num_devices]
    dtype = DTYPES[args.dtype]
    global_batch = args.batch * num_devices
    images, labels = synthetic_batch(global_batch, args.image_size, dtype, args.classes, args.per_class)
    tx = make_optimizer(args.optimizer, args.lr)
    loss_fn, init_loss_params = _loss_factory(args.loss, args.classes, args.dim)
    if args.loss_kwargs:
        loss_fn = functools.partial(loss_fn, **args.loss_kwargs)
    common = {"model": args.model, "image_size": args.image_size, "dtype": args.dtype, "devices": num_devices,
              "sync_batch_norm": args.sync_batch_norm, "batch_per_device": args.batch,
              "global_batch": global_batch, "optimizer": args.optimizer}
    rows = []
    modes = [("softmax", "softmax_ce", softmax_cross_entropy, (), False),
             ("dml", args.loss, loss_fn, init_loss_params(jax.random.key(1)), True)]
    for mode, loss_name, fn, loss_params, gather in modes:
        graphdef, state = init_state(build_model(mode, args), tx, loss_params)
        step = make_step(graphdef, tx, fn, gather=gather, axis_name=AXIS if num_devices > 1 else None,
                         sync_batch_norm=args.sync_batch_norm)
        step_fn, place = compile_step(step, devices)
        state, x, y = place(state, images, labels)
        row = {"mode": mode, "loss": loss_name, **common}
        try:
            row.update(time_steps(step_fn, state, x, y, steps=args.steps, warmup=args.warmup, budget_s=args.budget))
            row["images_per_s"] = global_batch / (row["step_ms"] / 1e3)
        except Exception as err:  # keep the other rows; the error is part of the result
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        rows.append(row)
    if args.trainer_step:
        row = {"mode": "dml_trainer_step", "loss": args.loss, **common}
        try:
            row.update(_trainer_step_row(args, devices, loss_fn, init_loss_params(jax.random.key(1)),
                                         images, labels))
            row["images_per_s"] = global_batch / (row["step_ms"] / 1e3)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"[:500]
        rows.append(row)
    softmax = rows[0].get("images_per_s")
    for row in rows[1:]:
        if softmax and row.get("images_per_s"):
            row["dml_over_softmax"] = row["images_per_s"] / softmax
    return rows


def add_scaling(rows: list[dict]) -> None:
    """scaling_efficiency = images/s on N devices / (N * images/s on 1 device), per mode."""
    single = {r["mode"]: r.get("images_per_s") for r in rows if r["devices"] == 1}
    for r in rows:
        base = single.get(r["mode"])
        if r["devices"] > 1 and base and r.get("images_per_s"):
            r["scaling_efficiency"] = r["images_per_s"] / (r["devices"] * base)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="resnet50")
    p.add_argument("--convnet-channels", type=lambda v: [int(c) for c in v.split(",")], default=[32, 64, 128],
                   help="--model convnet: comma-separated block widths")
    p.add_argument("--batch", type=int, default=256, help="images per device")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype (params float32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps, compilation included")
    p.add_argument("--budget", type=float, default=120.0, help="stop timing a row after this many seconds")
    p.add_argument("--loss", choices=LOSSES, default="multi_similarity")
    p.add_argument("--loss-kwargs", type=str, default="", help='JSON dict of loss options, e.g. \'{"margin": 0.1}\'')
    p.add_argument("--classes", type=int, default=1000, help="classes of the softmax / proxy / class-weight losses")
    p.add_argument("--per-class", type=int, default=4, help="images per class in a batch (m-per-class sampler)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--devices", type=int, default=1,
                   help="N > 1: also run data parallel on N devices and report the scaling efficiency")
    p.add_argument("--sync-batch-norm", action="store_true",
                   help="data parallel: BatchNorm statistics over the global batch (default: per device)")
    p.add_argument("--trainer-step", action="store_true",
                   help="also time dmljax.train.step's train step (with its metrics) on the DML model")
    p.add_argument("--out", default="train_step_bench.json")
    args = p.parse_args(argv)
    args.loss_kwargs = json.loads(args.loss_kwargs) if args.loss_kwargs else {}
    for name in ("batch", "image_size", "steps", "classes", "per_class", "dim", "devices"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.devices > jax.device_count():
        raise SystemExit(f"--devices {args.devices} but only {jax.device_count()} devices are visible "
                         "(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting)")
    return args


COLUMNS = ["mode", "loss", "devices", "global_batch", "step_ms", "images_per_s", "dml_over_softmax",
           "scaling_efficiency", "first_step_s", "error"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows: list[dict] = []
    payload = {"benchmark": "train_step", "config": vars(args), "machine": machine_info(), "rows": rows}
    for num_devices in sorted({1, args.devices}):
        rows.extend(run_config(args, num_devices))
        add_scaling(rows)
        write_json(args.out, payload)  # partial results survive a later failure
    shown = [{**r, "error": r["error"][:60]} if "error" in r else r for r in rows]
    print(format_table(shown, COLUMNS))
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
