"""Benchmark cases: the centroid triplet loss and the maximum-loss
subset miner, vs PyTorch Metric Learning.

Both PML twins were removed in pytorch-metric-learning 2.0 (``CentroidTripletLoss`` in v2.0.0,
``MaximumLossMiner`` with the subset miners): their PML side exists only when a PML 1.x is on the
path, e.g.

    pip install --no-deps --target /tmp/pml173 pytorch-metric-learning==1.7.3
    PYTHONPATH=/tmp/pml173 python -m experiments.bench.losses --batch 256 --dim 128 --only centroid

Without it the cases are dmljax-only (``pml=None``: no error row). The check looks for the files
without importing PML (importing torch at spec-loading time would slow every benchmark run).

Equivalent settings:
  * centroid_triplet: defaults on both sides (margin 0.05, euclidean distance between normalised
    vectors, all (query, other-class centroid) triplets, AvgNonZeroReducer). PML builds, per
    instance position, the full triplet index list of 3P items (O(P^3) memory), and with P >= 5
    classes per batch its bookkeeping keeps only 3 negative centroids per query (see the docstring
    of `dmljax.losses.centroid.centroid_triplet_loss`): at the driver's default P = B / 4 PML
    computes fewer triplets than dmljax, so the time ratio flatters PML. ``pml_max_batch=1024``.
  * miner_maximum_loss: 5 random subsets of B/2 items, all-triplet margin loss (margin 0.05) on
    each, the max-loss subset kept; timed is mining + the loss on the chosen subset + its gradient.
    Random streams differ (same distribution). PML's all-triplet loss materialises (B/2)^3 triplet
    lists per trial: ``pml_max_batch=512``.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from experiments.bench.common import Case


def _pml1_has(relative_path: str) -> bool:
    """True if the installed PML ships ``relative_path`` (PML 1.x files removed in 2.0)."""
    try:
        spec = importlib.util.find_spec("pytorch_metric_learning")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.exists(os.path.join(p, relative_path)) for p in spec.submodule_search_locations)


def _dml_centroid(batch, dim, classes):
    from dmljax.losses.centroid import centroid_triplet_loss

    return centroid_triplet_loss, ()


def _pml_centroid(batch, dim, classes):
    from pytorch_metric_learning.losses import CentroidTripletLoss

    loss = CentroidTripletLoss()
    return (lambda e, l: loss(e, l)), []


def _dml_max_loss(batch, dim, classes):
    import jax

    from dmljax.losses.triplet import triplet_margin_loss
    from dmljax.mining.subset import maximum_loss_miner

    loss = functools.partial(triplet_margin_loss, margin=0.05)
    key = jax.random.key(0)

    def fn(e, l):
        chosen = maximum_loss_miner(e, l, key, loss_fn=loss, subset_size=batch // 2, num_trials=5)
        return loss(e[chosen.indices], l[chosen.indices])

    return fn, ()


def _pml_max_loss(batch, dim, classes):
    from pytorch_metric_learning import losses, miners

    loss = losses.TripletMarginLoss(margin=0.05)
    miner = miners.MaximumLossMiner(loss=loss, output_batch_size=batch // 2, num_trials=5)

    def fn(e, l):
        idx = miner(e, l).to(e.device)
        return loss(e[idx], l[idx])

    return fn, []


CASES = [
    Case("centroid_triplet", _dml_centroid,
         _pml_centroid if _pml1_has(os.path.join("losses", "centroid_triplet_loss.py")) else None,
         pml_max_batch=1024),
    Case("miner_maximum_loss", _dml_max_loss,
         _pml_max_loss if _pml1_has(os.path.join("miners", "maximum_loss_miner.py")) else None,
         pml_max_batch=512),
]
