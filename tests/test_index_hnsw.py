"""EmbeddingIndex(backend="hnsw"): the usearch HNSW graph behind the same API."""

import numpy as np
import pytest

pytest.importorskip("usearch")  # third-party optional extra dmljax[ann] (in the dev extra)

from dmljax.index import EmbeddingIndex  # noqa: E402

from tests.test_index import np_search  # noqa: E402


def _clustered(seed, n, dim, clusters=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, size=n)
    return centres[labels] + 0.3 * rng.normal(size=(n, dim)), labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "squared_euclidean", "dot"])
def test_hnsw_search_agrees_with_the_exact_loop(metric):
    g, y = _clustered(0, 300, 8)
    q, _ = _clustered(1, 20, 8)
    index = EmbeddingIndex(8, metric=metric, backend="hnsw", dtype=np.float64)
    index.add(g, y)
    res = index.search(q, k=5)
    want_idx, want_dist = np_search(q, g, 5, metric)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(res.indices, want_idx)])
    assert recall >= 0.95
    # distances are recomputed exactly for the returned rows, nearest first
    for i, (rows, dist) in enumerate(zip(res.indices, res.distances)):
        _, row_dist = np_search(q[i:i + 1], g[rows], 5, metric)
        np.testing.assert_allclose(dist, row_dist[0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.distances[:, 0], want_dist[:, 0], rtol=1e-6, atol=1e-9)
    assert np.all(np.diff(res.distances, axis=1) >= 0)
    np.testing.assert_array_equal(res.labels, y[res.indices])
    exact = index.search(q, k=5, exact=True)
    np.testing.assert_array_equal(exact.indices, want_idx)


def test_hnsw_add_remove_save_load(tmp_path):
    g, y = _clustered(2, 200, 8)
    index = EmbeddingIndex(8, metric="cosine", backend="hnsw", hnsw_options={"expansion_search": 32})
    index.add(g[:100], y[:100])
    index.search(g[:3], k=3)  # builds the graph
    index.add(g[100:], y[100:])  # updates it
    index.remove(np.arange(0, 200, 2))
    res = index.search(g[1:20:2], k=1)
    np.testing.assert_array_equal(res.ids[:, 0], np.arange(1, 20, 2))  # each odd row finds itself
    assert not np.isin(res.ids, np.arange(0, 200, 2)).any()
    path = tmp_path / "ann.dmlidx"
    index.save(path)
    loaded = EmbeddingIndex.load(path)
    assert loaded.backend == "hnsw" and loaded.hnsw_options["expansion_search"] == 32
    assert loaded._ann is not None and len(loaded._ann) == 100  # the graph was stored, not rebuilt
    np.testing.assert_array_equal(loaded.search(g[1:20:2], k=4).ids, index.search(g[1:20:2], k=4).ids)


def test_hnsw_options_are_validated():
    with pytest.raises(ValueError, match="^hnsw_options must be a dict"):
        EmbeddingIndex(4, backend="hnsw", hnsw_options={"M": 8})
    with pytest.raises(ValueError, match="^hnsw_options\\['connectivity'\\]"):
        EmbeddingIndex(4, backend="hnsw", hnsw_options={"connectivity": 0})
    with pytest.raises(ValueError, match="^backend"):
        EmbeddingIndex(4, backend="faiss")


def test_missing_usearch_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("usearch"):
            raise ImportError("No module named 'usearch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"dmljax\[ann\]"):
        EmbeddingIndex(4, backend="hnsw")
