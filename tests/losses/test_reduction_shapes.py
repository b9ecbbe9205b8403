"""Every loss with a ``reduction`` option, with every reduction it accepts: the output-shape rule.

Rule (dmljax.losses, "Vocabulary"): "mean", "sum", "mean_nonzero" give a scalar; "none" gives
one value per anchor, [B] (for the tuple losses, one per tuple / anchor row); "threshold" is not
a loss option (ValueError naming ``reduction``). The sum of the "none" output equals "sum"
where the loss is a plain sum of its anchors' terms.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import dmljax.losses as L
from dmljax.losses._core import LOSS_REDUCTIONS

B, D, C, K = 8, 5, 4, 2


def _inputs(fn):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (np.arange(B) % C).astype(np.int32)
    params = [p for p, v in inspect.signature(fn).parameters.items()
              if v.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    three_d = fn in (L.subcenter_arcface_loss, L.multi_proxy_anchor_loss, L.soft_triple_loss)
    table = {
        "embeddings": x, "labels": y, "anchors": x, "positives": np.roll(x, 1, axis=0),
        "negatives": rng.normal(size=(B, 3, D)),
        "weights": rng.normal(size=(C, K, D) if three_d else (C, D)),
        "proxies": rng.normal(size=(C, K, D) if three_d else (C, D)),
        "centers": rng.normal(size=(C, K, D) if three_d else (C, D)),
        "class_counts": np.arange(1, C + 1),
        "multi_hot": np.eye(C, dtype=bool)[y] | np.eye(C, dtype=bool)[(y + 1) % C],
    }
    return [table[p] for p in params], ({"k": 2} if fn is L.surrogate_precision_at_k_loss else {})


REDUCIBLE = sorted(
    (name, getattr(L, name)) for name in dir(L)
    if not name.startswith("_") and callable(getattr(L, name)) and not isinstance(getattr(L, name), type)
    and "reduction" in inspect.signature(getattr(L, name)).parameters
)


def test_the_table_covers_the_pair_losses():
    names = {n for n, _ in REDUCIBLE}
    assert {"contrastive_loss", "triplet_margin_loss", "multi_similarity_loss", "circle_loss",
            "lifted_structured_loss", "supcon_loss", "ntxent_loss", "angular_loss"} <= names


@pytest.mark.parametrize("name,fn", REDUCIBLE, ids=[n for n, _ in REDUCIBLE])
def test_every_reduction_follows_the_shape_rule(name, fn):
    args, kw = _inputs(fn)
    accepted = []
    for reduction in LOSS_REDUCTIONS:
        try:
            out = np.asarray(fn(*args, reduction=reduction, **kw))
        except ValueError as err:
            assert str(err).startswith("reduction"), f"{name}: {err}"
            continue
        accepted.append(reduction)
        assert np.isfinite(out).all(), (name, reduction)
        if reduction == "none":
            assert out.shape == (B,), f"{name}: reduction='none' gave shape {out.shape}, want ({B},)"
        else:
            assert out.shape == (), f"{name}: reduction={reduction!r} gave shape {out.shape}"
    assert "mean" in accepted and "sum" in accepted, (name, accepted)
    with pytest.raises(ValueError, match="^reduction"):
        fn(*args, reduction="threshold", **kw)


PAIR_LOSSES = [L.contrastive_loss, L.triplet_margin_loss, L.multi_similarity_loss, L.circle_loss,
               L.lifted_structured_loss, L.generalized_lifted_structured_loss, L.ranked_list_loss,
               L.angular_loss, L.npair_loss, L.supcon_loss, L.ntxent_loss]


@pytest.mark.parametrize("fn", PAIR_LOSSES, ids=lambda f: f.__name__)
def test_none_is_per_anchor_in_the_reference_form(fn):
    """[B] against a reference set of M != B rows; its sum is the "sum" reduction (l2_reg 0)."""
    rng = np.random.default_rng(1)
    x, ref = rng.normal(size=(B, D)), rng.normal(size=(11, D))
    y, ry = (np.arange(B) % C).astype(np.int32), (np.arange(11) % C).astype(np.int32)
    kw = {"l2_reg": 0.0} if fn is L.npair_loss else {}
    none = np.asarray(fn(x, y, ref_embeddings=ref, ref_labels=ry, reduction="none", **kw))
    total = float(fn(x, y, ref_embeddings=ref, ref_labels=ry, reduction="sum", **kw))
    assert none.shape == (B,)
    np.testing.assert_allclose(none.sum(), total, rtol=1e-9)
