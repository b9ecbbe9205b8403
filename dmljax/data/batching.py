"""Static-shape batching helpers: pad the last batch and return a ``valid`` mask.

A jitted embedding or loss function recompiles for every new batch shape. Evaluation over a
dataset whose size is not a multiple of the batch size therefore pads the last batch (with copies
of zeros) to the full size and passes ``valid`` [b] (True for real rows) to the library's
``valid=`` arguments, or drops the padded rows afterwards with ``embeddings[valid]``.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator

import numpy as np

__all__ = ["pad_batch", "iterate_padded"]


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def pad_batch(*arrays: np.ndarray, batch_size: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Zero-pad every array along axis 0 to ``batch_size`` rows.

    Returns ``((padded arrays...), valid bool [batch_size])``.

    Raises:
      ValueError: ``batch_size`` not positive or smaller than the number of rows, or arrays with
        different numbers of rows.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.batching import pad_batch
      >>> (x, y), valid = pad_batch(np.ones((3, 2)), np.array([4, 5, 6]), batch_size=4)
      >>> print(x.shape, y, valid)
      (4, 2) [4 5 6 0] [ True  True  True False]
    """
    batch_size = _check_batch_size(batch_size)
    if not arrays:
        raise ValueError("arrays must contain at least one array")
    rows = {np.shape(a)[0] for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"arrays must have the same number of rows, got {sorted(rows)}")
    n = rows.pop()
    if n > batch_size:
        raise ValueError(f"batch_size ({batch_size}) is smaller than the number of rows ({n})")
    padded = []
    for a in arrays:
        a = np.asarray(a)
        out = np.zeros((batch_size,) + a.shape[1:], dtype=a.dtype)
        out[:n] = a
        padded.append(out)
    valid = np.arange(batch_size) < n
    return tuple(padded), valid


def iterate_padded(*arrays: np.ndarray, batch_size: int) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Yield consecutive batches of ``arrays`` in order, all of ``batch_size`` rows (the last one
    zero-padded), each with its ``valid`` mask.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.batching import iterate_padded
      >>> for (labels,), valid in iterate_padded(np.arange(5), batch_size=2):
      ...     print(labels, valid)
      [0 1] [ True  True]
      [2 3] [ True  True]
      [4 0] [ True False]
    """
    batch_size = _check_batch_size(batch_size)
    if not arrays:
        raise ValueError("arrays must contain at least one array")
    n = np.shape(arrays[0])[0]
    if any(np.shape(a)[0] != n for a in arrays):
        raise ValueError(f"arrays must have the same number of rows, got {[np.shape(a)[0] for a in arrays]}")
    for start in range(0, n, batch_size):
        yield pad_batch(*(np.asarray(a)[start:start + batch_size] for a in arrays), batch_size=batch_size)
