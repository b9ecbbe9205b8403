"""``loss.matryoshka_*``: the trainer's Matryoshka loss and the per-prefix metrics of the final table.

The wrapped objective is checked against the unwrapped one applied by hand to each
(numpy-normalised) prefix, the proxies of a proxy loss included; the prefix metrics against a
numpy nearest-neighbour Recall@1; the run end to end on the toy source (8-dim embedding).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dmljax.train import builders, evaluation
from dmljax.data import sources
from tests.train.test_trainer import _config, _main, _toy_state

DIMS = "loss.matryoshka_dims=(8,4,2)"


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("loss_sets, weights", [
    (["loss.name=multi_similarity"], None),
    (["loss.name=proxy_anchor", "loss.options.margin=0.2"], (1.0, 0.5, 2.0)),
])
def test_wrapped_loss_is_weighted_sum_over_prefixes(loss_sets, weights):
    sets = [*loss_sets, DIMS] + ([] if weights is None else [f"loss.matryoshka_weights={weights}"])
    state, _, _, _, _ = _toy_state(_config(*sets))
    plain_state, _, _, _, _ = _toy_state(_config(*loss_sets))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(16, 8)).astype(np.float32)
    labels = np.repeat(np.arange(4), 4).astype(np.int32)
    params = state.params["loss"]
    got = float(state.loss_fn(emb, labels, *params))
    expected = 0.0
    for m, c in zip((8, 4, 2), weights or (1.0, 1.0, 1.0)):
        cut = tuple(np.asarray(p)[..., :m] if np.ndim(p) >= 1 and np.shape(p)[-1] == 8 else p for p in params)
        expected += c * float(plain_state.loss_fn(_unit(emb[:, :m]), labels, *cut))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    if "proxy_anchor" in loss_sets[0]:
        assert np.shape(params[0])[-1] == 8  # the proxies were really sliced above


def _numpy_recall_at_1(x, labels):
    x = _unit(x)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[np.argmax(sim, axis=1)] == labels))


def test_prefix_metrics_equal_numpy_recall():
    source = sources.load_data_source(_config())
    labels = np.asarray(source.eval_set.query_labels)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(labels), 8)).astype(np.float32)
    emb[:, :2] += 3.0 * rng.normal(size=(labels.max() + 1, 2))[labels]  # informative first coordinates
    out = evaluation.prefix_metrics(source, emb, dims=(8, 2, 1))
    for m in (8, 2, 1):
        np.testing.assert_allclose(out[f"d{m}/recall@1"], _numpy_recall_at_1(emb[:, :m], labels), atol=1e-6)
        assert f"d{m}/map_at_r" in out and f"d{m}/r_precision" in out
    assert out["d2/recall@1"] != out["d1/recall@1"]


def test_run_reports_every_prefix(tmp_path):
    final = _main(tmp_path, DIMS)
    for m in (8, 4, 2):
        for name in ("recall@1", "recall@2", "map_at_r", "r_precision"):
            assert 0.0 <= final[f"d{m}/{name}"] <= 1.0
    # the full-dimension prefix is the plain evaluation (cosine kNN normalises anyway)
    np.testing.assert_allclose(final["d8/recall@1"], final["recall@1"], atol=1e-6)
    with open(tmp_path / "final.json") as f:
        assert json.load(f)["d4/recall@1"] == pytest.approx(final["d4/recall@1"])
    with open(tmp_path / "run_info.json") as f:
        assert json.load(f)["matryoshka_dims"] == [8, 4, 2]
    assert "d4/recall@1" in evaluation.format_results(final)


@pytest.mark.parametrize("sets, match", [
    (["loss.matryoshka_dims=(16,4)"], "loss.matryoshka_dims must be ints in \\[1, 8\\]"),
    (["loss.matryoshka_dims=(8,8)"], "loss.matryoshka_dims must be distinct"),
    (["loss.matryoshka_dims=()"], "loss.matryoshka_dims must not be empty"),
    ([DIMS, "loss.matryoshka_weights=(1.0,2.0)"], "loss.matryoshka_weights must have one weight per prefix"),
    ([DIMS, "loss.matryoshka_weights=(1.0,-1.0,1.0)"], "loss.matryoshka_weights must be finite and >= 0"),
    (["loss.matryoshka_weights=(1.0,)"], "loss.matryoshka_weights given without loss.matryoshka_dims"),
    ([DIMS, "method.name=daml", "method.options.margin=0.2"], "loss.matryoshka_dims needs a plain loss"),
])
def test_bad_matryoshka_config_raises(sets, match):
    with pytest.raises(ValueError, match=match):
        _toy_state(_config(*sets))
