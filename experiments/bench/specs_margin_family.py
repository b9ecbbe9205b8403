"""Benchmark cases: margin-family losses (dmljax.losses.margin_family) and the extra miners
(dmljax.mining.extra) vs PyTorch Metric Learning.

Equivalent settings on both sides (the driver feeds unit-norm float32 embeddings):
  * tuplet_margin / intra_pair_variance / tcm: PML defaults (CosineSimilarity, which normalises;
    dmljax normalises inside too).
  * snr_contrastive: PML ``SignalToNoiseRatioContrastiveLoss`` + ``ZeroMeanRegularizer`` with
    ``embedding_reg_weight=0.1`` = dmljax ``snr_contrastive_loss`` defaults.
  * p2sgrad: class weights [C, D] are the learnable parameter on both sides (PML stores [D, C]).
  * dynamic_soft_margin: both over all triplets from a zero histogram (the first step). PML builds
    the B^3 triplet index list, so it stops at ``pml_max_batch=256``; dmljax is O(B^2) memory,
    O(B^3) time.
  * manifold: the labels serve as the meta-classes on both sides (PML ``indices_tuple``), K =
    number of classes; the proxies are learnable.
  * miners: "mine + contrastive loss on the mined pairs" (pos_margin 0, neg_margin 1, euclidean
    distances without normalisation, PML's AvgNonZeroReducer with multiplicities). The angular
    miner's PML twin materialises all triplets (``pml_max_batch=256``); the uniform histogram
    miner draws with different random streams (same distribution). n-hardest and hard-cluster
    mining have no PML twin.
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.bench.common import Case


def _dml(name: str, **config):
    def make(batch: int, dim: int, classes: int):
        from dmljax.losses import margin_family

        return functools.partial(getattr(margin_family, name), **config), ()

    return make


def _pml(name: str, **config):
    def make(batch: int, dim: int, classes: int):
        from pytorch_metric_learning import losses

        loss = getattr(losses, name)(**config)
        return (lambda e, l: loss(e, l)), []

    return make


def _dml_snr(batch, dim, classes):
    from dmljax.losses.margin_family import snr_contrastive_loss

    return functools.partial(snr_contrastive_loss, regularizer_weight=0.1), ()


def _pml_snr(batch, dim, classes):
    from pytorch_metric_learning import losses, regularizers

    loss = losses.SignalToNoiseRatioContrastiveLoss(
        embedding_regularizer=regularizers.ZeroMeanRegularizer(), embedding_reg_weight=0.1)
    return (lambda e, l: loss(e, l)), []


def _unit_rows(rows, dim, seed):
    w = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _dml_p2sgrad(batch, dim, classes):
    from dmljax.losses.margin_family import p2sgrad_loss

    return p2sgrad_loss, (_unit_rows(classes, dim, 0),)


def _pml_p2sgrad(batch, dim, classes):
    import torch
    from pytorch_metric_learning import losses

    loss = losses.P2SGradLoss(dim, classes)
    loss.weight.data = torch.tensor(_unit_rows(classes, dim, 0).T.copy())
    return (lambda e, l: loss(e, l)), list(loss.parameters())


def _dml_dsm(batch, dim, classes):
    import jax.numpy as jnp

    from dmljax.losses.margin_family import dynamic_soft_margin_loss

    def fn(e, l):
        return dynamic_soft_margin_loss(e, l, jnp.zeros(10, jnp.float32))[0]

    return fn, ()


def _pml_dsm(batch, dim, classes):
    import torch
    from pytorch_metric_learning import losses

    loss = losses.DynamicSoftMarginLoss()

    def fn(e, l):
        # Reset to the zero histogram each call, like the dmljax side. This also works around
        # PML keeping the autograd graph in its histogram state, so a second backward fails.
        loss.hist_ = torch.zeros_like(loss.hist_)
        return loss(e, l)

    return fn, []


def _dml_manifold(batch, dim, classes):
    from dmljax.losses.margin_family import manifold_loss

    return manifold_loss, (np.random.default_rng(1).normal(size=(classes, dim)).astype(np.float32),)


def _pml_manifold(batch, dim, classes):
    import torch
    from pytorch_metric_learning import losses

    loss = losses.ManifoldLoss(l=dim, K=classes)
    loss.proxies.data = torch.tensor(np.random.default_rng(1).normal(size=(classes, dim)).astype(np.float32))
    return (lambda e, l: loss(e, indices_tuple=l)), list(loss.parameters())


# --------------------------------------------------------------------------- miners


def _mined_contrastive(e, positive_weights, negative_weights):
    """Contrastive loss on weighted mined pairs with PML's AvgNonZeroReducer (multiplicities count)."""
    import jax
    import jax.numpy as jnp

    from dmljax.distances import euclidean

    d = euclidean(e)
    total = 0.0
    for w, values in ((positive_weights, d), (negative_weights, jax.nn.relu(1.0 - d))):
        w = w.astype(d.dtype)
        count = jnp.sum(jnp.where(values > 0, w, 0.0))
        total = total + jnp.sum(w * values) / jnp.maximum(count, 1.0)
    return total


def _dml_miner(kind: str, **config):
    def make(batch, dim, classes):
        import jax

        from dmljax.distances import euclidean
        from dmljax.masks import label_masks
        from dmljax.mining import extra

        def fn(e, l):
            if kind == "angular":
                sel = extra.angular_miner(e, l, **config)
            elif kind == "hard_cluster_miner":
                sel = extra.hard_cluster_miner(e, l, **config)
            else:
                d = euclidean(e)
                pos, neg = label_masks(l)
                if kind == "uniform_histogram_miner":
                    sel = extra.uniform_histogram_miner(jax.random.key(0), d, pos, neg, **config)
                else:
                    sel = getattr(extra, kind)(d, pos, neg, **config)
            return _mined_contrastive(e, sel[0], sel[1])

        return fn, ()

    return make


def _pml_miner(name: str, lp_distance: bool = True, **config):
    def make(batch, dim, classes):
        from pytorch_metric_learning import distances, losses, miners

        if lp_distance:
            config["distance"] = distances.LpDistance(normalize_embeddings=False, p=2, power=1)
        miner = getattr(miners, name)(**config)
        loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.0,
                                      distance=distances.LpDistance(normalize_embeddings=False, p=2, power=1))
        return (lambda e, l: loss(e, l, miner(e, l))), []

    return make


CASES = [
    Case("tuplet_margin", _dml("tuplet_margin_loss"), _pml("TupletMarginLoss")),
    Case("intra_pair_variance", _dml("intra_pair_variance_loss"), _pml("IntraPairVarianceLoss")),
    Case("snr_contrastive", _dml_snr, _pml_snr),
    Case("threshold_consistent_margin", _dml("threshold_consistent_margin_loss"),
         _pml("ThresholdConsistentMarginLoss")),
    Case("p2sgrad", _dml_p2sgrad, _pml_p2sgrad),
    Case("dynamic_soft_margin", _dml_dsm, _pml_dsm, pml_max_batch=256),
    Case("manifold", _dml_manifold, _pml_manifold),
    Case("miner_angular", _dml_miner("angular", angle=20.0),
         _pml_miner("AngularMiner", lp_distance=False, angle=20), pml_max_batch=256),
    Case("miner_batch_easy_hard", _dml_miner("batch_easy_hard"), _pml_miner("BatchEasyHardMiner")),
    Case("miner_hdc", _dml_miner("hdc_miner", filter_percentage=0.5),
         _pml_miner("HDCMiner", filter_percentage=0.5)),
    Case("miner_uniform_histogram", _dml_miner("uniform_histogram_miner"), _pml_miner("UniformHistogramMiner")),
    Case("miner_n_hardest", _dml_miner("n_hardest", n=3)),
    Case("miner_hard_cluster", _dml_miner("hard_cluster_miner", num_hard_classes=2)),
]
