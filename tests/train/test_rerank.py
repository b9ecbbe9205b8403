"""dmljax.train.rerank: similarity-network re-ranking report (tiny sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.train import rerank as rr

FAST = {"rerank_steps": 150, "rerank_hidden": (32, 32), "rerank_batch_size": 128, "rerank_learning_rate": 3e-3,
        "rerank_neighbours": 10, "rerank_k": 8}


def _misled(seed, n_classes, per_class, offset):
    """Classes live in 2 dims with small spread; 6 loud class-free dims dominate the cosine."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, 2)) * 3.0
    labels = np.repeat(np.arange(n_classes), per_class) + offset
    signal = centers[labels - offset] + 0.3 * rng.normal(size=(len(labels), 2))
    noise = 2.0 * rng.normal(size=(len(labels), 6))
    return np.concatenate([signal, noise], 1).astype(np.float32), labels.astype(np.int32)


def _np_metrics(ranked, labels, k):
    """Plain loops: R@1, R@k and MAP@R (Musgrave et al. 2020) of ranked neighbour lists."""
    r1, rk, maps = [], [], []
    for q, row in enumerate(ranked):
        rel = [labels[j] == labels[q] for j in row]
        r1.append(float(rel[0]))
        rk.append(float(any(rel[:k])))
        big_r = int(np.sum(labels == labels[q])) - 1
        if big_r:
            hits, total = 0, 0.0
            for i in range(big_r):
                if rel[i]:
                    hits += 1
                    total += hits / (i + 1)
            maps.append(total / big_r)
    return np.mean(r1), np.mean(rk), np.mean(maps)


def test_options_defaults_and_overrides():
    assert rr._options(None) == {**rr.DEFAULTS, "rerank_hidden": (512, 512)}
    assert rr._options({"eval": {}})["rerank_k"] == 10
    assert rr._options({"other": 1})["rerank_steps"] == 1000  # no eval section at all
    got = rr._options({"eval": {"rerank_k": 3, "rerank_margin": 0.0, "rerank_hidden": [8]}})
    assert got["rerank_k"] == 3 and got["rerank_margin"] == 0.0 and got["rerank_hidden"] == (8,)


class _KnownNet:
    """A stand-in similarity network with a known score: -squared distance in the 2 class dims."""

    def __call__(self, x1, x2):
        return -jnp.sum((x1[..., :2] - x2[..., :2]) ** 2, axis=-1)


def test_report_matches_numpy_reference(monkeypatch):
    x, y = _misled(0, 6, 5, 0)
    monkeypatch.setattr(rr, "train_similarity_network", lambda key, *a, **kw: (_KnownNet(), [1.0, 0.5]))
    k = 4
    got = rr.rerank_report(train_embeddings=x, train_labels=y, test_embeddings=x, test_labels=y,
                           key=jax.random.key(0), config={"eval": {"rerank_k": k}})
    xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
    order = []
    for q in range(len(x)):
        sims = [(-(xn[q] @ xn[j]), j) for j in range(len(x)) if j != q]  # cosine, ties by index
        order.append([j for _, j in sorted(sims)])
    before = _np_metrics(order, y, k)
    after_rows = []
    for q, row in enumerate(order):
        scores = [-np.sum((x[q, :2] - x[j, :2]) ** 2) for j in row[:k]]
        top = [row[i] for i in sorted(range(k), key=lambda i: (-scores[i], i))]  # stable descending
        after_rows.append(top + row[k:])
    after = _np_metrics(after_rows, y, k)
    assert (got["recall@1"], got[f"recall@{k}"], got["map_at_r"]) == pytest.approx(before, abs=1e-6)
    assert (got["recall@1_rerank"], got[f"recall@{k}_rerank"], got["map_at_r_rerank"]) == pytest.approx(after, abs=1e-6)
    assert got["rerank_k"] == k and got["rerank_final_loss"] == pytest.approx(0.5)
    assert after[0] > before[0]  # the known score reads the class dims: a real improvement


@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
def test_learned_reranker_improves_r1_when_the_metric_is_misled():
    # unseen test classes: the network must learn a comparison, not memorise classes
    xtr, ytr = _misled(1, 24, 8, 0)
    xte, yte = _misled(2, 12, 8, 100)
    key = jax.random.key(0)
    got = rr.rerank_report(train_embeddings=xtr, train_labels=ytr, test_embeddings=xte, test_labels=yte,
                           key=key, config={"eval": FAST})
    print({k: round(v, 3) for k, v in got.items()})
    assert got["recall@1_rerank"] > got["recall@1"] + 0.05
    assert got["map_at_r_rerank"] > got["map_at_r"]
    assert got["recall@8_rerank"] == got["recall@8"]  # same candidates, re-ordered
    assert all(np.isfinite(v) for v in got.values())
    again = rr.rerank_report(train_embeddings=xtr, train_labels=ytr, test_embeddings=xte, test_labels=yte,
                             key=key, config={"eval": FAST})
    assert {k: v for k, v in got.items() if k != "rerank_seconds"} == \
        {k: v for k, v in again.items() if k != "rerank_seconds"}


def test_degenerate_embeddings_stay_finite():
    x = np.ones((12, 4), np.float32)  # identical embeddings: every cosine is 1
    y = np.repeat(np.arange(3), 4).astype(np.int32)
    got = rr.rerank_report(train_embeddings=x, train_labels=y, test_embeddings=x, test_labels=y,
                           key=jax.random.key(1), config={"eval": {**FAST, "rerank_steps": 5, "rerank_k": 3}})
    assert all(np.isfinite(v) for v in got.values())
    one_class = np.zeros(12, np.int32)
    got = rr.rerank_report(train_embeddings=x, train_labels=one_class, test_embeddings=x, test_labels=one_class,
                           key=jax.random.key(1), config={"eval": {**FAST, "rerank_steps": 5, "rerank_k": 3}})
    assert got["recall@1"] == got["recall@1_rerank"] == 1.0


@pytest.mark.parametrize("change,match", [
    ({"test_embeddings": np.zeros((10, 3), np.float32)}, "test_embeddings must have feature dim"),
    ({"train_labels": np.zeros(20, np.float32)}, "train_labels must be integer"),
    ({"test_labels": np.zeros(9, np.int32)}, r"test_labels must be integer class ids of shape \(10,\)"),
    ({"train_embeddings": np.full((20, 4), np.nan, np.float32)}, "train_embeddings must be finite"),
    ({"test_embeddings": np.zeros((10,), np.float32)}, "test_embeddings must be a floating"),
    ({"config": {"eval": {"rerank_k": 10}}}, "rerank_k must be <= 9"),
    ({"config": {"eval": {"rerank_k": 0}}}, "rerank_k must be an int >= 1"),
    ({"config": {"eval": {"rerank_steps": 2.5}}}, "rerank_steps must be an int >= 1"),
    ({"config": {"eval": {"rerank_margin": -1.0}}}, "rerank_margin must be a finite number >= 0"),
    ({"config": {"eval": {"rerank_learning_rate": 0.0}}}, "rerank_learning_rate must be a finite number > 0"),
    ({"config": {"eval": {"rerank_hidden": ()}}}, "rerank_hidden must be a non-empty"),
    ({"key": None}, "key must be a jax.random key"),
])
def test_bad_inputs_raise(change, match):
    args = {"train_embeddings": np.ones((20, 4), np.float32), "train_labels": np.arange(20, dtype=np.int32) % 4,
            "test_embeddings": np.ones((10, 4), np.float32), "test_labels": np.arange(10, dtype=np.int32) % 2,
            "key": jax.random.key(0), "config": None}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rr.rerank_report(**args)
