"""Trace-time argument checks shared by every public function.

All checks look only at static information (shapes, ranks, dtypes, Python
scalars), so they run once while `jax.jit` traces and cost nothing afterwards.
Each raises a `ValueError` whose message starts with the argument's name.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _dtype(x: Any) -> np.dtype:
    return jnp.result_type(x)


def accumulation_dtype(dtype: Any) -> np.dtype:
    """float32 for half precision inputs, the input dtype otherwise (float32/float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def as_float(x: Any, *, name: str = "x") -> jax.Array:
    """Return `x` as a floating array with at least float32 precision (bf16 -> f32)."""
    dtype = _dtype(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating point array, got dtype {dtype}")
    return jnp.asarray(x, dtype=accumulation_dtype(dtype))


def check_embeddings(x: Any, *, name: str = "embeddings") -> jax.Array:
    """Check a [B, D] floating array and return it upcast to >= float32.

    Raises:
      ValueError: if `x` is not rank 2, has a zero-sized feature axis, or is not floating.
    """
    shape = _shape(x)
    if len(shape) != 2:
        raise ValueError(f"{name} must have rank 2 [batch, dim], got shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty feature axis, got shape {shape}")
    return as_float(x, name=name)


def check_labels(
    labels: Any, *, batch_size: int | None = None, name: str = "labels", allow_multi_hot: bool = False
) -> jax.Array:
    """Check integer class labels of shape [B] (or multi-hot [B, C] when allowed).

    Raises:
      ValueError: wrong rank, a non-integer dtype for class labels, or a batch size that
        differs from `batch_size`.
    """
    shape = _shape(labels)
    dtype = _dtype(labels)
    if allow_multi_hot and len(shape) == 2:
        if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
                or jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"{name} (multi-hot) must be bool, integer or float, got {dtype}")
    else:
        if len(shape) != 1:
            raise ValueError(f"{name} must have rank 1 [batch], got shape {shape}")
        if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
            raise ValueError(f"{name} must be an integer array of class ids, got dtype {dtype}")
    if batch_size is not None and shape[0] != batch_size:
        raise ValueError(f"{name} has batch size {shape[0]} but the embeddings have {batch_size}")
    return jnp.asarray(labels)


def check_valid(valid: Any, *, batch_size: int, name: str = "valid") -> jax.Array | None:
    """Check an optional [B] mask of real (non-padding) rows; returns bool array or None."""
    if valid is None:
        return None
    shape = _shape(valid)
    if shape != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},), got {shape}")
    return jnp.asarray(valid).astype(bool)


def check_scalar(
    value: Any,
    *,
    name: str,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> Any:
    """Check a configuration scalar against a range when it is a concrete Python number.

    Traced values (e.g. a learnable margin passed as an array) are only checked for rank.
    """
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        v = float(value)
        if not np.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value}")
        if min_value is not None and (v < min_value or (not min_inclusive and v == min_value)):
            op = ">=" if min_inclusive else ">"
            raise ValueError(f"{name} must be {op} {min_value}, got {value}")
        if max_value is not None and (v > max_value or (not max_inclusive and v == max_value)):
            op = "<=" if max_inclusive else "<"
            raise ValueError(f"{name} must be {op} {max_value}, got {value}")
        return value
    shape = _shape(value)
    if len(shape) > 1:
        raise ValueError(f"{name} must be a scalar or a vector, got shape {shape}")
    return value


def check_positive_int(value: Any, *, name: str) -> int:
    """A Python integer >= 1 (bools refused); ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_bool(value: Any, *, name: str) -> bool:
    """A Python (or numpy) bool option; ValueError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a Python bool, got {value!r}")
    return bool(value)


def check_choice(value: Any, *, name: str, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_matrix(x: Any, *, name: str, shape: tuple[int | None, ...]) -> jax.Array:
    """Check rank and (where given) dims of a floating array, returning it as >= float32."""
    actual = _shape(x)
    if len(actual) != len(shape) or any(s is not None and s != a for s, a in zip(shape, actual)):
        want = tuple("?" if s is None else s for s in shape)
        raise ValueError(f"{name} must have shape {want}, got {actual}")
    return as_float(x, name=name)


def check_key(key: Any, *, name: str = "key") -> jax.Array:
    """Check a PRNG key (new-style typed key or legacy uint32[2])."""
    if key is None:
        raise ValueError(f"{name} must be a jax.random key, got None")
    dtype = _dtype(key)
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return key
    if _shape(key) != (2,) or dtype != jnp.uint32:
        raise ValueError(f"{name} must be a jax.random key, got shape {_shape(key)} dtype {dtype}")
    return key


def check_label_range(labels: Any, num_classes: int, *, name: str = "labels", what: str = "") -> None:
    """Raise if concrete ``labels`` leave [0, num_classes).

    Traced labels (inside jit / vmap / grad) cannot be inspected: the losses that index
    per-class arrays mask such rows out instead and document it. ``what`` says what the
    classes index (e.g. "one per proxy class") in the message.
    """
    try:
        values = np.asarray(labels)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        detail = f" ({what})" if what else ""
        raise ValueError(
            f"{name} must be class ids in [0, {num_classes}){detail}, "
            f"got values in [{values.min()}, {values.max()}]"
        )
