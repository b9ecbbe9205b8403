"""Blocked exact kNN against a brute-force numpy search (loops + stable argsort)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.metrics import knn as knn_module
from dmljax.metrics.knn import knn


def brute_force_knn(query, gallery, k, metric, exclude_self):
    """Distance of every pair by a double loop, then a stable argsort (lower index wins ties)."""
    n, m = len(query), len(gallery)
    dist = np.zeros((n, m))
    for i in range(n):
        for j in range(m):
            q, g = query[i], gallery[j]
            if metric == "euclidean":
                dist[i, j] = np.sqrt(np.sum((q - g) ** 2))
            elif metric == "squared_euclidean":
                dist[i, j] = np.sum((q - g) ** 2)
            elif metric == "cosine":
                dist[i, j] = 1.0 - q @ g / (np.linalg.norm(q) * np.linalg.norm(g))
            else:
                dist[i, j] = -(q @ g)
            if exclude_self and i == j:
                dist[i, j] = np.inf
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(dist, idx, axis=1)


@pytest.mark.parametrize("metric,blocks", [("euclidean", (4, 3)), ("squared_euclidean", (5, 16)),
                                           ("cosine", (64, 64)), ("dot", (4, 3))])
def test_self_search_matches_brute_force(metric, blocks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 6))
    idx, dist = knn(x, k=5, metric=metric, block_size=blocks[0], gallery_block_size=blocks[1])
    ref_idx, ref_dist = brute_force_knn(x, x, 5, metric, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-7)
    assert idx.dtype == jnp.int32


@pytest.mark.parametrize("metric,progress", [("euclidean", False), ("cosine", True)])
def test_query_gallery_matches_brute_force(metric, progress):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(11, 4)), rng.normal(size=(17, 4))
    idx, dist = knn(q, g, k=7, metric=metric, block_size=3, gallery_block_size=5, progress=progress)
    ref_idx, ref_dist = brute_force_knn(q, g, 7, metric, exclude_self=False)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gallery_block_size", [1, 3])
def test_ties_prefer_lower_index_across_blocks(gallery_block_size):
    # gallery points 1..4 are all at distance 1 from the query 0; 5 is farther
    g = np.array([[0.0], [1.0], [-1.0], [1.0], [-1.0], [3.0]])
    idx, dist = knn(g[:1], g, k=5, block_size=1, gallery_block_size=gallery_block_size)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4]])
    np.testing.assert_allclose(dist, [[0, 1, 1, 1, 1]])
    # self search of identical points: neighbours are all others in index order
    same = np.ones((5, 2))
    idx, dist = knn(same, k=4, gallery_block_size=gallery_block_size)
    np.testing.assert_array_equal(idx, [[1, 2, 3, 4], [0, 2, 3, 4], [0, 1, 3, 4], [0, 1, 2, 4], [0, 1, 2, 3]])
    np.testing.assert_allclose(dist, 0.0)


def test_exclude_self_flag_with_explicit_gallery():
    x = np.random.default_rng(2).normal(size=(6, 3))
    idx, _ = knn(x, x, k=2)
    np.testing.assert_array_equal(idx[:, 0], np.arange(6))  # itself first when not excluded
    idx_ex, _ = knn(x, x, k=2, exclude_self=True)
    np.testing.assert_array_equal(idx_ex, knn(x, k=2)[0])


def test_jit_equals_eager_and_bf16_upcast():
    x = np.random.default_rng(3).normal(size=(9, 4))
    eager = knn(x, k=3, block_size=4, gallery_block_size=4)
    jitted = jax.jit(functools.partial(knn, k=3, block_size=4, gallery_block_size=4))(x)
    np.testing.assert_array_equal(jitted[0], eager[0])
    np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-12)
    idx, dist = knn(jnp.asarray(x, jnp.bfloat16), k=3)
    assert dist.dtype == jnp.float32 and idx.shape == (9, 3)


def test_peak_memory_bounded_by_blocks_not_n_squared():
    n, d, bq, bg = 2048, 8, 128, 256
    x = np.random.default_rng(4).normal(size=(n, d)).astype(np.float32)
    q_blocks, g_blocks = x.reshape(n // bq, bq, d), x.reshape(n // bg, bg, d)
    compiled = knn_module._search_all_blocks.lower(
        q_blocks, (q_blocks ** 2).sum(-1), g_blocks, (g_blocks ** 2).sum(-1),
        k=5, metric="euclidean", num_gallery=n, exclude_self=True).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * bq * bg * 4, temp  # a few block tiles
    assert temp < n * n * 4 / 20  # far below the N x N matrix


def test_bad_input():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="^k must be <="):
        knn(x, k=5)  # only 4 other items
    with pytest.raises(ValueError, match="^k must be <="):
        knn(x, np.zeros((2, 3)), k=3)
    with pytest.raises(ValueError, match="^k must be a positive integer"):
        knn(x, k=0)
    with pytest.raises(ValueError, match="^gallery must have feature dim"):
        knn(x, np.zeros((4, 2)), k=1)
    with pytest.raises(ValueError, match="^query must have rank 2"):
        knn(np.zeros(3), k=1)
    with pytest.raises(ValueError, match="^exclude_self"):
        knn(x, np.zeros((4, 3)), k=1, exclude_self=True)
    with pytest.raises(ValueError, match="^metric must be one of"):
        knn(x, k=1, metric="manhattan")
    with pytest.raises(ValueError, match="^block_size"):
        knn(x, k=1, block_size=0)
    bad = np.ones((5, 3))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="^query contains NaN"):
        knn(bad, k=1)
    with pytest.raises(ValueError, match="^gallery contains NaN"):
        knn(x, bad, k=1)
    with pytest.raises(ValueError, match="^query must be a floating"):
        knn(np.zeros((3, 2), np.int32), k=1)


@given(st.integers(0, 10_000), st.sampled_from(["euclidean", "cosine"]))
def test_gallery_permutation_and_rotation_invariance(seed, metric):
    """Permuting the gallery permutes the returned indices; rotations change nothing."""
    rng = np.random.default_rng(seed)
    q, g = rng.normal(size=(5, 3)), rng.normal(size=(9, 3))
    idx, dist = knn(q, g, k=4, metric=metric, gallery_block_size=4)
    perm = rng.permutation(9)
    idx_p, dist_p = knn(q, g[perm], k=4, metric=metric, gallery_block_size=4)
    np.testing.assert_array_equal(perm[np.asarray(idx_p)], idx)
    np.testing.assert_allclose(dist_p, dist, rtol=1e-9, atol=1e-12)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    idx_r, dist_r = knn(q @ rot, g @ rot, k=4, metric=metric, gallery_block_size=4)
    np.testing.assert_array_equal(idx_r, idx)
    np.testing.assert_allclose(dist_r, dist, rtol=1e-7, atol=1e-9)


def _int_grid_points(seed, n, d, levels):
    """Points on a small integer grid: many exactly tied distances (exact in float64)."""
    return np.random.default_rng(seed).integers(0, levels, size=(n, d)).astype(np.float64)


@pytest.mark.parametrize("metric", ["squared_euclidean", "dot"])
def test_symmetric_tiles_and_two_stage_top_k_match_brute_force_with_ties(metric):
    # n = 150 in blocks of 40 (4 tiles per side, padded last block); width 40 = 5 chunks of 8 > k,
    # so the two-stage (chunk maxima) top-k runs on rows and columns of the off-diagonal tiles
    x = _int_grid_points(5, 150, 3, 3)
    idx, dist = knn(x, k=4, metric=metric, block_size=40)
    ref_idx, ref_dist = brute_force_knn(x, x, 4, metric, exclude_self=True)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-12)


def test_two_stage_cross_search_matches_brute_force_with_ties():
    q, g = _int_grid_points(6, 30, 2, 4), _int_grid_points(7, 130, 2, 4)
    idx, dist = knn(q, g, k=3, metric="squared_euclidean", block_size=16, gallery_block_size=48)
    ref_idx, ref_dist = brute_force_knn(q, g, 3, "squared_euclidean", exclude_self=False)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [4, 8])
def test_candidates_contain_the_stable_top_k(chunk):
    """Row and column candidates hold the exact top-k (score desc, index asc) of each row/column."""
    s = np.random.default_rng(8).integers(0, 5, size=(24, 32)).astype(np.float64)  # heavy ties
    k = 3
    for scores, cand_fn in ((s, knn_module._row_candidates), (s.T, None)):
        if cand_fn is None:
            cand, pos = knn_module._col_candidates(jnp.asarray(s), k, chunk)
        else:
            cand, pos = cand_fn(jnp.asarray(scores), k, chunk)
        assert cand.shape[1] == k * chunk
        np.testing.assert_array_equal(cand, np.take_along_axis(scores, np.asarray(pos), axis=1))
        assert np.all(np.diff(np.asarray(pos), axis=1) > 0)  # ascending positions
        ref = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top, p = jax.lax.top_k(cand, k)
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(pos), np.asarray(p), axis=1), ref)


def test_self_search_progress_equals_single_call():
    x = np.random.default_rng(9).normal(size=(70, 4))
    plain = knn(x, k=5, block_size=24)
    shown = knn(x, k=5, block_size=24, progress=True)
    np.testing.assert_array_equal(shown[0], plain[0])
    np.testing.assert_array_equal(shown[1], plain[1])


def test_self_search_memory_bounded_by_tiles():
    n, d, b = 2048, 8, 256
    x = np.random.default_rng(10).normal(size=(n, d)).astype(np.float32)
    xb = x.reshape(n // b, b, d)
    compiled = knn_module._self_search_all.lower(xb, (xb ** 2).sum(-1), k=5, metric="euclidean",
                                                  num_items=n).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 8 * b * b * 4, temp
    assert temp < n * n * 4 / 20


def test_bench_numpy_path_is_exact():
    """The benchmark's numpy argpartition path (compared against dmljax in experiments/results)."""
    from experiments.bench.knn import _numpy_knn

    x = np.random.default_rng(11).normal(size=(40, 3))
    ref_idx, _ = brute_force_knn(x, x, 4, "squared_euclidean", exclude_self=True)
    np.testing.assert_array_equal(_numpy_knn(x, 4, 16), ref_idx)


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    from experiments.bench.knn import main

    out = main(["--n", "300", "--dim", "8", "--methods", "dmljax", "numpy", "--json", str(tmp_path / "k.json")])
    rows = {r["method"]: r for r in out["rows"]}
    assert rows["numpy"]["agree_with_dmljax"] == 1.0 and rows["dmljax"]["seconds"] > 0
