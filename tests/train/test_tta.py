"""Test-time augmentation of embeddings (dmljax.train.tta) against numpy-warped references."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmljax.train.optim import make_optimizer
from dmljax.train.state import create_train_state, merge_model
from dmljax.train.step import embed
from dmljax.train.toy import tiny_model, toy_images
from dmljax.train.tta import embed_tta, view_matrices

SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


@pytest.fixture(scope="module")
def state():
    # head_norm "batch": eval mode must use running statistics (a batch-dependent result would fail
    # the chunking / permutation tests below)
    tx = make_optimizer(learning_rate=0.01, total_steps=10)
    return create_train_state(tiny_model(3, embedding_dim=4, head_norm="batch"), tx, lambda e, y: e.sum())


@pytest.fixture(scope="module")
def images():
    return toy_images(1, num_classes=3, per_class=3, size=8)[0]


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _shift_numpy(image, dr, dc):
    """Content moved down by dr rows and right by dc columns, zero fill (plain loops)."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    for r in range(h):
        for c in range(w):
            if 0 <= r - dr < h and 0 <= c - dc < w:
                out[r, c] = image[r - dr, c - dc]
    return out


def test_identity_view_is_the_plain_embedding(state, images):
    got = embed_tta(state, images)
    want = _normalize(np.asarray(embed(state, images), np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_shift_views_match_numpy_reference(state, images):
    got = embed_tta(state, images, shifts=SHIFTS)
    floats = images.astype(np.float64) / 255.0
    total = np.zeros((len(images), 4))
    for dr, dc in SHIFTS:
        shifted = np.stack([_shift_numpy(im, dr, dc) for im in floats]).astype(np.float32)
        total += _normalize(np.asarray(embed(state, shifted), np.float64))
    np.testing.assert_allclose(got, _normalize(total), rtol=1e-5, atol=1e-6)


def test_feature_concatenation_matches_reference(state, images):
    weight = 0.7
    got = embed_tta(state, images, feature_weight=weight)
    model = merge_model(state, train=False)
    feats = np.asarray(model.backbone(images), np.float64)
    emb = np.asarray(model.head(model.backbone(images)), np.float64)
    want = _normalize(np.concatenate([_normalize(emb), weight * _normalize(feats)], axis=1))
    assert got.shape == (len(images), 4 + feats.shape[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift, zoom, source, target", [
    ((1, 0), 1.0, (4, 4), (5, 4)),   # shift (rows, cols) moves content down
    ((0, -2), 1.0, (4, 4), (4, 2)),  # ... and left
    ((0, 0), 2.0, (4, 5), (4, 6)),   # zoom 2 doubles the offset from the centre (4, 4)
])
def test_view_matrices_move_content_as_documented(shift, zoom, source, target):
    from dmljax.data.augment import affine_transform
    image = np.zeros((1, 9, 9, 1), np.float32)
    image[0, source[0], source[1], 0] = 1.0
    mats = view_matrices(shifts=(shift,), zooms=(zoom,))
    assert mats.shape == (2, 2, 3)
    np.testing.assert_allclose(mats[0], [[1, 0, 0], [0, 1, 0]])  # identity first
    warped = np.asarray(affine_transform(image, mats[1]))[0, :, :, 0]
    assert warped[target] == pytest.approx(1.0)
    assert warped.sum() >= 1.0 - 1e-6


def test_views_are_deduplicated():
    assert len(view_matrices(shifts=((0, 0), (1, 0), (1, 0)), zooms=(1.0,))) == 2
    assert len(view_matrices(shifts=SHIFTS, zooms=(0.9, 1.0))) == 10


def test_chunking_does_not_change_the_result(state, images):
    full = embed_tta(state, images, shifts=SHIFTS, batch_size=64)
    chunked = embed_tta(state, images, shifts=SHIFTS, batch_size=4)  # 9 images: padded last chunk
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)


def test_blank_images_give_finite_embeddings(state):
    blank = np.zeros((3, 8, 8, 1), np.uint8)
    out = embed_tta(state, blank, shifts=SHIFTS, zooms=(0.9, 1.0), feature_weight=1.0)
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("kwargs, name", [
    (dict(shifts=()), "shifts"),
    (dict(shifts=((1, 2, 3),)), "shifts"),
    (dict(zooms=(0.0,)), "zooms"),
    (dict(zooms=()), "zooms"),
    (dict(feature_weight=-1.0), "feature_weight"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_raise(state, images, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        embed_tta(state, images, **kwargs)


def test_bad_image_rank_raises(state, images):
    with pytest.raises(ValueError, match="^images"):
        embed_tta(state, images[..., 0])


@settings(max_examples=5)
@given(st.permutations(list(range(9))))
def test_permuting_the_images_permutes_the_embeddings(state, images, perm):
    perm = np.asarray(perm)
    base = embed_tta(state, images, shifts=SHIFTS[:3])
    np.testing.assert_allclose(embed_tta(state, images[perm], shifts=SHIFTS[:3]), base[perm],
                               rtol=1e-5, atol=1e-6)


def test_final_evaluation_views_come_from_final_tta_shifts(state, images):
    from dmljax.train import cli
    from dmljax.train import evaluation
    from dmljax.configs import get_config

    config = cli.apply_overrides(get_config("omniglot"), ["eval.tta_shifts=((0, 0),)",
                                                        "eval.final_tta_shifts=((0, 0), (1, 0), (0, 1))"])
    every, final = evaluation.make_embed_fn(config), evaluation.make_embed_fn(config, final=True)
    np.testing.assert_allclose(every(state, images, 4), _normalize(np.asarray(embed(state, images))), atol=1e-5)
    expected = embed_tta(state, images, shifts=((0, 0), (1, 0), (0, 1)), batch_size=4)
    np.testing.assert_allclose(final(state, images, 4), expected, atol=1e-6)
    # an empty final_tta_shifts falls back to the views of every evaluation
    config = cli.apply_overrides(config, ["eval.final_tta_shifts=()"])
    np.testing.assert_allclose(evaluation.make_embed_fn(config, final=True)(state, images, 4),
                               every(state, images, 4), atol=1e-6)
