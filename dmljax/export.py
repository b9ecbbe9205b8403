"""Export a trained embedding model as a self-contained artefact, and run it without dmljax's models.

``export_embedder(model, path, input_shape=(H, W, C))`` traces ``embed(images) -> embeddings``
of a Flax NNX model in eval mode (BatchNorm running statistics, no dropout) with
``jax.export`` (Frostig et al., "JAX export": serialized StableHLO with a SYMBOLIC batch
dimension, so one artefact serves any batch size) and writes ONE file (a zip, the ``.npz``
layout) holding:

* ``exported.bin``: the serialized ``jax.export.Exported`` (StableHLO + calling convention),
  lowered for ``platforms`` (default CPU and CUDA);
* ``param_00000.npy`` ...: the model's parameters and BatchNorm statistics, the function's
  arguments (not constants folded into the program, so the artefact stays small to compile
  and the weights can be inspected or swapped);
* ``embedder.json``: the spec -- format and version, input shape / dtype (images NHWC), the
  preprocessing applied INSIDE the program (``scale``, per-channel ``mean`` / ``std``), the
  embedding dimension, the metric the embeddings are meant for (``cosine`` ...), whether the
  output is L2-normalised, and free-form ``metadata`` (e.g. the run's config and metrics).

``load_embedder(path)`` needs only ``jax`` and ``numpy`` (this module imports no model code):
it validates the file and returns an `Embedder`, ``embedder(images) -> np.ndarray [N, D]``,
that runs the deserialized program in chunks of ``batch_size``. The file is written to a
temporary name in the same directory and renamed over ``path`` (atomic).

ONNX: not provided (jax2onnx is not a dependency here); the StableHLO artefact runs wherever
jaxlib runs, and StableHLO can be converted by other tool chains.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["EMBEDDER_FORMAT", "EMBEDDER_FORMAT_VERSION", "Embedder", "export_embedder", "load_embedder"]

EMBEDDER_FORMAT = "dmljax.Embedder"
EMBEDDER_FORMAT_VERSION = 1
EMBEDDING_METRICS = ("cosine", "euclidean", "squared_euclidean", "dot")  # dmljax.metrics.knn.KNN_METRICS
_INPUT_DTYPES = ("float32", "uint8", "bfloat16", "float16")
_SPEC = "embedder.json"
_EXPORTED = "exported.bin"


def _param_name(i: int) -> str:
    return f"param_{i:05d}.npy"


def _check_preprocessing(preprocessing: dict | None, channels: int) -> dict:
    spec = {"scale": 1.0, "mean": None, "std": None}
    if preprocessing is None:
        return spec
    if not isinstance(preprocessing, dict) or set(preprocessing) - set(spec):
        raise ValueError(f"preprocessing must be a dict with keys among {sorted(spec)}, got {preprocessing!r}")
    spec.update(preprocessing)
    if not isinstance(spec["scale"], (int, float)) or isinstance(spec["scale"], bool) or not spec["scale"] > 0:
        raise ValueError(f"preprocessing['scale'] must be a positive number, got {spec['scale']!r}")
    spec["scale"] = float(spec["scale"])
    for key in ("mean", "std"):
        if spec[key] is None:
            continue
        value = np.asarray(spec[key], dtype=np.float64).reshape(-1)
        if value.size not in (1, channels) or not np.all(np.isfinite(value)):
            raise ValueError(f"preprocessing[{key!r}] must be a finite number or {channels} numbers "
                             f"(one per channel), got {spec[key]!r}")
        if key == "std" and np.any(value <= 0):
            raise ValueError(f"preprocessing['std'] must be positive, got {spec[key]!r}")
        spec[key] = value.tolist()
    return spec


def _preprocess(images: jax.Array, spec: dict) -> jax.Array:
    if spec["scale"] == 1.0 and spec["mean"] is None and spec["std"] is None:
        return images  # identity: the model sees the input dtype (dmljax's ConvNet scales uint8 itself)
    x = images.astype(jnp.float32)
    if spec["scale"] != 1.0:
        x = x * spec["scale"]
    if spec["mean"] is not None:
        x = x - jnp.asarray(spec["mean"], jnp.float32)
    if spec["std"] is not None:
        x = x / jnp.asarray(spec["std"], jnp.float32)
    return x


def _l2_normalize(x: jax.Array) -> jax.Array:
    # safe at 0 (a zero row stays 0) and for large norms (scaled by the row's max-abs first)
    m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    y = x / jnp.where(m > 0, m, 1.0)
    n = jnp.sqrt(jnp.sum(y * y, axis=-1, keepdims=True))
    return y / jnp.where(n > 0, n, 1.0)


def _eval_copy(model):
    """(graphdef, state) of an eval-mode copy (the caller's model is not switched to eval)."""
    from flax import nnx  # the exporter needs flax; the loader does not

    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.eval()
    return nnx.split(copy)


def export_embedder(model, path: str | os.PathLike, *, input_shape: Sequence[int], metric: str = "cosine",
                    input_dtype: str = "float32", preprocessing: dict | None = None, normalize: bool = False,
                    platforms: Sequence[str] = ("cpu", "cuda"), metadata: dict | None = None) -> dict:
    """Write ``embed(images) -> embeddings`` of an NNX model to ONE artefact file; returns its spec.

    Args:
      model: a Flax NNX module mapping images [N, H, W, C] to embeddings [N, D] (e.g.
        `dmljax.models.EmbeddingModel`, or the trainer's ``merge_model(state, train=False)``);
        exported in eval mode (``model.eval()`` on a copy).
      path: the file to write (convention: ``*.dmlemb``).
      input_shape: (H, W, C) of one image; the batch dimension is symbolic.
      metric: the metric the embeddings are searched with (stored for the index; one of
        ``cosine``, ``euclidean``, ``squared_euclidean``, ``dot``).
      input_dtype: dtype of the images the artefact takes (``uint8`` for raw pixels).
      preprocessing: {"scale": s, "mean": m, "std": d}, applied inside the program before the
        model: ``x = (images * s - m) / d`` (per-channel m, d; default identity). dmljax's
        ConvNet already maps uint8 to [0, 1] itself: pass no preprocessing for it.
      normalize: L2-normalise the embeddings inside the program.
      platforms: lowering platforms of the StableHLO (``jax.export``).
      metadata: JSON-serialisable extra information (stored in the spec).
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be three positive ints (H, W, C), got {input_shape!r}")
    if metric not in EMBEDDING_METRICS:
        raise ValueError(f"metric must be one of {EMBEDDING_METRICS}, got {metric!r}")
    if input_dtype not in _INPUT_DTYPES:
        raise ValueError(f"input_dtype must be one of {_INPUT_DTYPES}, got {input_dtype!r}")
    pre = _check_preprocessing(preprocessing, input_shape[2])
    platforms = tuple(platforms)
    if not platforms or any(not isinstance(p, str) for p in platforms):
        raise ValueError(f"platforms must be a non-empty sequence of platform names, got {platforms!r}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serialisable: {err}") from None

    graphdef, state = _eval_copy(model)
    leaves, treedef = jax.tree.flatten(state)
    # typed PRNG keys (nnx.Rngs streams) are not weights: they stay constants of the program
    is_arg = [not jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key) for x in leaves]
    args = [np.asarray(x) for x, a in zip(leaves, is_arg) if a]
    consts = [x for x, a in zip(leaves, is_arg) if not a]

    def embed(params, images):
        from flax import nnx

        it_p, it_c = iter(params), iter(consts)
        merged = jax.tree.unflatten(treedef, [next(it_p) if a else next(it_c) for a in is_arg])
        out = nnx.merge(graphdef, merged)(_preprocess(images, pre))
        if out.ndim != 2:
            raise ValueError(f"model must return embeddings [N, D], got shape {out.shape}")
        out = out.astype(jnp.float32)
        return _l2_normalize(out) if normalize else out

    (batch,) = jax.export.symbolic_shape("batch")
    in_avals = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args],
                jax.ShapeDtypeStruct((batch, *input_shape), jnp.dtype(input_dtype)))
    exported = jax.export.export(jax.jit(embed), platforms=platforms)(*in_avals)
    out_shape = exported.out_avals[0].shape
    spec = {"format": EMBEDDER_FORMAT, "version": EMBEDDER_FORMAT_VERSION, "input_shape": list(input_shape),
            "input_dtype": input_dtype, "layout": "NHWC", "preprocessing": pre,
            "embedding_dim": int(out_shape[1]), "metric": metric, "normalized": bool(normalize),
            "platforms": list(platforms), "num_params": len(args),
            "param_shapes": [list(a.shape) for a in args], "param_dtypes": [a.dtype.str for a in args],
            "jax_version": jax.__version__, "metadata": metadata}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr(_SPEC, json.dumps(spec, indent=1))
        z.writestr(_EXPORTED, bytes(exported.serialize()))
        for i, a in enumerate(args):
            with z.open(_param_name(i), "w") as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    _atomic_write_bytes(os.fspath(path), buffer.getvalue())
    return spec


def _atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Embedder:
    """A loaded artefact: ``embedder(images [N, H, W, C]) -> embeddings np.ndarray [N, D]``.

    Attributes: ``spec`` (the stored JSON spec), ``input_shape``, ``input_dtype``,
    ``embedding_dim``, ``metric``, ``normalized``, ``exported`` (the ``jax.export.Exported``).
    """

    def __init__(self, exported, params: list, spec: dict, path: str):
        self.exported = exported
        self.params = [jnp.asarray(p) for p in params]  # on the device once
        self.spec = spec
        self.path = path
        self.input_shape = tuple(spec["input_shape"])
        self.input_dtype = np.dtype(spec["input_dtype"]) if spec["input_dtype"] != "bfloat16" else jnp.bfloat16
        self.embedding_dim = int(spec["embedding_dim"])
        self.metric = spec["metric"]
        self.normalized = bool(spec["normalized"])
        self._call = jax.jit(exported.call)

    def __call__(self, images, *, batch_size: int = 256) -> np.ndarray:
        x = np.asarray(images)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images must have shape [N, {', '.join(map(str, self.input_shape))}] "
                             f"(NHWC), got {x.shape}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if x.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        x = x.astype(self.input_dtype)
        out = [np.asarray(self._call(self.params, x[s:s + batch_size])) for s in range(0, len(x), batch_size)]
        return np.concatenate(out)


def load_embedder(path: str | os.PathLike) -> Embedder:
    """Load an artefact written by `export_embedder` (ValueError naming the file when it is bad)."""
    path = os.fspath(path)

    def bad(msg):
        return ValueError(f"{path}: {msg}")

    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise bad("not a dmljax embedder artefact, or a truncated one (not a complete zip file)") from None
    with z:
        names = set(z.namelist())
        for required in (_SPEC, _EXPORTED):
            if required not in names:
                raise bad(f"{required} is missing (not a dmljax embedder artefact)")
        try:
            spec = json.loads(z.read(_SPEC).decode("utf-8"))
            blob = z.read(_EXPORTED)
        except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, OSError, EOFError) as err:
            raise bad(f"corrupt file ({err})") from None
        if not isinstance(spec, dict) or spec.get("format") != EMBEDDER_FORMAT:
            raise bad(f"{_SPEC}: format must be {EMBEDDER_FORMAT!r}")
        if spec.get("version") != EMBEDDER_FORMAT_VERSION:
            raise bad(f"format version {spec.get('version')!r} is not supported (this dmljax reads "
                      f"version {EMBEDDER_FORMAT_VERSION})")
        required = ("input_shape", "input_dtype", "embedding_dim", "metric", "normalized", "num_params",
                    "param_shapes", "param_dtypes")
        missing = [k for k in required if k not in spec]
        if missing:
            raise bad(f"{_SPEC} misses {missing}")
        if spec["metric"] not in EMBEDDING_METRICS:
            raise bad(f"metric must be one of {EMBEDDING_METRICS}, got {spec['metric']!r}")
        if spec["input_dtype"] not in _INPUT_DTYPES:
            raise bad(f"input_dtype must be one of {_INPUT_DTYPES}, got {spec['input_dtype']!r}")
        params = []
        for i in range(int(spec["num_params"])):
            name = _param_name(i)
            if name not in names:
                raise bad(f"parameter {name} is missing")
            try:
                with z.open(name) as f:
                    a = np.lib.format.read_array(f, allow_pickle=False)
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise bad(f"parameter {name} is corrupt ({err})") from None
            if list(a.shape) != list(spec["param_shapes"][i]) or a.dtype.str != spec["param_dtypes"][i]:
                raise bad(f"parameter {name} has {a.dtype.str} {list(a.shape)}, the spec declares "
                          f"{spec['param_dtypes'][i]} {spec['param_shapes'][i]}")
            if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
                raise bad(f"parameter {name} contains NaN or inf values")
            params.append(a)
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # noqa: BLE001 - flatbuffers / MLIR raise various errors
        raise bad(f"{_EXPORTED} could not be deserialized ({type(err).__name__}: {err})") from None
    platform = jax.default_backend()
    if platform not in exported.platforms and not (platform == "gpu" and "cuda" in exported.platforms):
        raise bad(f"the program was lowered for {list(exported.platforms)}, not for this backend ({platform}): "
                  f"export it again with platforms including {platform!r}")
    return Embedder(exported, params, spec, path)
