"""Benchmark cases: ranking and softmax-over-the-batch losses (dmljax.losses.ranking,
dmljax.losses.contrastive_family) vs PyTorch Metric Learning.

Equivalent settings on both sides (the driver feeds unit-norm float32 embeddings, 4 per class,
shuffled labels):
  * fastap: PML ``FastAPLoss(num_bins=10)`` (squared L2 of normalised embeddings) = dmljax defaults.
  * smooth_ap: PML ``SmoothAPLoss(temperature=0.01)`` = dmljax ``smooth_ap_loss(include_query=True)``.
    PML requires equal-sized classes laid out contiguously and, in PML 2.9, reshapes the batch as
    [per_class, classes] instead of [classes, per_class], so its *value* is only right when the
    two are equal; the cost (three B x B x B tensors) is what is timed. dmljax is O(B^2) memory.
    PML stops at ``pml_max_batch=512`` (B^3 floats).
  * pnp: PML ``PNPLoss(variant="Dq", b=2, alpha=1, anneal=0.01)`` (B^3 memory, same cap).
  * histogram: PML ``HistogramLoss(n_bins=100)`` = dmljax ``histogram_loss(num_steps=100)``; PML
    enumerates all (a, p, n) triplets and ``unique``s their pairs, so it stops at 1024.
  * supcon / ntxent: PML ``SupConLoss(0.1)`` / ``NTXentLoss(0.07)``, cosine similarity.
  * nca: PML ``NCALoss(softmax_scale=1)`` with ``LpDistance(normalize_embeddings=False, power=2)``.
  * instance: PML ``InstanceLoss(gamma=64)`` classifies each item against the batch itself with the
    label's rank among the batch's unique labels as target = dmljax ``instance_loss(x, rank(labels),
    x, scale=64, normalize=True)`` (the rank is computed with masks, static shapes).
  * vicreg: the batch's first half and second half as the two views, PML ``VICRegLoss()`` defaults.
  * precision_at_k (OML ``SurrogatePrecision``), soft_nearest_neighbour (TF-Similarity),
    multiple_negatives_ranking (sentence-transformers; halves as anchors / positives), pn
    (TF-Similarity PNLoss, hard positives / semi-hard negatives): no PML twin.
"""

from __future__ import annotations

import functools

from experiments.bench.common import Case


def _dml(module: str, name: str, **config):
    def make(batch: int, dim: int, classes: int):
        import importlib

        mod = importlib.import_module(f"dmljax.losses.{module}")
        return functools.partial(getattr(mod, name), **config), ()

    return make


def _pml(name: str, distance: str | None = None, **config):
    def make(batch: int, dim: int, classes: int):
        from pytorch_metric_learning import distances, losses

        if distance == "lp2":
            config["distance"] = distances.LpDistance(normalize_embeddings=False, p=2, power=2)
        loss = getattr(losses, name)(**config)
        return (lambda e, l: loss(e, l)), []

    return make


def _dml_instance(batch: int, dim: int, classes: int):
    import jax.numpy as jnp

    from dmljax.losses.contrastive_family import instance_loss

    def fn(e, labels):
        # rank of each label among the batch's distinct labels (PML: torch.unique inverse)
        earlier = jnp.tril(labels[:, None] == labels[None, :], k=-1)
        first = ~jnp.any(earlier, axis=1)
        ranks = jnp.sum(first[None, :] & (labels[None, :] < labels[:, None]), axis=1).astype(jnp.int32)
        return instance_loss(e, ranks, e, scale=64.0, normalize=True)

    return fn, ()


def _dml_halves(name: str, **config):
    def make(batch: int, dim: int, classes: int):
        from dmljax.losses import contrastive_family

        loss = getattr(contrastive_family, name)
        half = batch // 2
        return (lambda e, l: loss(e[:half], e[half: 2 * half], **config)), ()

    return make


def _pml_vicreg(batch: int, dim: int, classes: int):
    from pytorch_metric_learning import losses

    loss = losses.VICRegLoss()
    half = batch // 2
    return (lambda e, l: loss(e[:half], ref_emb=e[half: 2 * half])), []


CASES = [
    Case("fastap", _dml("ranking", "fastap_loss", num_bins=10), _pml("FastAPLoss", num_bins=10)),
    Case("smooth_ap", _dml("ranking", "smooth_ap_loss", temperature=0.01, include_query=True),
         _pml("SmoothAPLoss", temperature=0.01), pml_max_batch=512),
    Case("pnp_Dq", _dml("ranking", "pnp_loss", variant="Dq"), _pml("PNPLoss", variant="Dq"), pml_max_batch=512),
    Case("histogram", _dml("ranking", "histogram_loss", num_steps=100), _pml("HistogramLoss", n_bins=100),
         pml_max_batch=1024),
    Case("precision_at_4", _dml("ranking", "surrogate_precision_at_k_loss", k=4)),
    Case("supcon", _dml("contrastive_family", "supcon_loss", temperature=0.1), _pml("SupConLoss", temperature=0.1)),
    Case("ntxent", _dml("contrastive_family", "ntxent_loss", temperature=0.07),
         _pml("NTXentLoss", temperature=0.07)),
    Case("nca", _dml("contrastive_family", "nca_loss", softmax_scale=1.0),
         _pml("NCALoss", distance="lp2", softmax_scale=1.0)),
    Case("soft_nearest_neighbour", _dml("contrastive_family", "soft_nearest_neighbour_loss", temperature=1.0)),
    Case("instance", _dml_instance, _pml("InstanceLoss", gamma=64)),
    Case("vicreg", _dml_halves("vicreg_loss"), _pml_vicreg),
    Case("multiple_negatives_ranking", _dml_halves("multiple_negatives_ranking_loss", scale=20.0)),
    Case("pn", _dml("contrastive_family", "pn_loss")),
]
