"""On-device augmentation: references, invariances, determinism, jit, validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.data import augment as A

KEY = jax.random.PRNGKey(0)


def _images(b=3, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).uniform(size=(b, h, w, c))


def test_to_float_and_normalize():
    raw = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    x = A.to_float(raw)
    assert x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x), raw / 255.0, rtol=1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = A.normalize(raw / 255.0, mean, std)
    expected = np.empty_like(raw, dtype=np.float64)
    for ch in range(3):
        expected[..., ch] = (raw[..., ch] / 255.0 - mean[ch]) / std[ch]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5)


def test_crop_full_box_is_identity():
    images = _images()
    out = A.random_resized_crop(KEY, images, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_allclose(np.asarray(out), images, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_of_ramp_recovers_a_valid_box(seed):
    """Upscaled crop of the coordinate ramps (row, col) is again a ramp that reveals the box.

    Bilinear interpolation reproduces linear functions exactly, so away from the borders output
    pixel (i, j) holds input position (top + (i + 0.5) * crop_h / out_h - 0.5, likewise for col).
    """
    h, w = 8, 10
    out_h, out_w = 20, 24
    rows, cols = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    images = np.repeat(np.stack([rows, cols], axis=-1)[None], 3, axis=0)
    out = np.asarray(A.random_resized_crop(jax.random.PRNGKey(seed), images, size=(out_h, out_w),
                                           scale=(0.1, 0.5), ratio=(0.8, 1.25)))
    boxes = []
    for b in range(3):
        row_part = out[b, 2:-2, 2:-2, 0]
        col_part = out[b, 2:-2, 2:-2, 1]
        np.testing.assert_allclose(row_part, row_part[:, :1] * np.ones_like(row_part), atol=1e-9)
        np.testing.assert_allclose(col_part, col_part[:1, :] * np.ones_like(col_part), atol=1e-9)
        d_row, d_col = np.diff(row_part[:, 0]), np.diff(col_part[0, :])
        np.testing.assert_allclose(d_row, d_row[0], atol=1e-9)
        np.testing.assert_allclose(d_col, d_col[0], atol=1e-9)
        crop_h, crop_w = d_row[0] * out_h, d_col[0] * out_w
        top = row_part[0, 0] - (2 + 0.5) * crop_h / out_h + 0.5
        left = col_part[0, 0] - (2 + 0.5) * crop_w / out_w + 0.5
        assert 0.1 - 1e-9 <= crop_h * crop_w / (h * w) <= 0.5 + 1e-9
        assert 0.8 - 1e-9 <= crop_w / crop_h <= 1.25 + 1e-9
        assert -1e-9 <= top and top + crop_h <= h + 1e-9
        assert -1e-9 <= left and left + crop_w <= w + 1e-9
        boxes.append((top, left, crop_h, crop_w))
    # each image of the batch gets its own box
    assert len({tuple(np.round(bx, 6)) for bx in boxes}) == 3


def test_crop_matches_resize_for_full_box():
    images = _images(h=12, w=12)
    out = A.random_resized_crop(KEY, images, size=5, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    expected = jax.image.resize(images, (3, 5, 5, 3), "linear", antialias=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
    centre = A.center_crop_resize(images, size=5)
    np.testing.assert_allclose(np.asarray(centre), np.asarray(expected), atol=1e-6)


def test_flip():
    images = _images()
    np.testing.assert_array_equal(np.asarray(A.random_flip_left_right(KEY, images, probability=1.0)),
                                  images[:, :, ::-1])
    np.testing.assert_array_equal(np.asarray(A.random_flip_left_right(KEY, images, probability=0.0)), images)
    many = _images(b=400, h=2, w=2, c=1)
    flipped = np.asarray(A.random_flip_left_right(KEY, many)) != many
    assert 0.4 < flipped.any(axis=(1, 2, 3)).mean() < 0.6


def test_affine_transform_references():
    images = _images(h=7, w=7)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, identity)), images, atol=1e-12)
    # input = A (p - c) + c with A = [[0, 1], [-1, 0]] is numpy's counter-clockwise rot90
    rot = np.array([[0.0, 1, 0], [-1, 0, 0]])
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, rot)), np.rot90(images, axes=(1, 2)),
                               atol=1e-12)
    # shift by one row: out[i] = in[i + 1], last row filled
    shift = np.array([[1.0, 0, 1.0], [0, 1.0, 0]])
    expected = np.full_like(images, 0.25)
    expected[:, :-1] = images[:, 1:]
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, shift, fill=0.25)), expected, atol=1e-12)
    # half-pixel shift is the bilinear average of neighbours
    half = np.array([[1.0, 0, 0], [0, 1.0, 0.5]])
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, half))[:, :, :-1],
                               (images[:, :, :-1] + images[:, :, 1:]) / 2, atol=1e-12)


def test_random_affine():
    images = _images(h=9, w=9, c=1)
    np.testing.assert_allclose(np.asarray(A.random_affine(KEY, images)), images, atol=1e-12)
    # a centred radially symmetric blob is (nearly) invariant to rotation
    r2 = ((np.arange(21) - 10.0)[:, None] ** 2 + (np.arange(21) - 10.0)[None, :] ** 2)
    blob = np.exp(-r2 / 18.0)[None, :, :, None].repeat(4, 0)
    # jit: one compilation instead of op-by-op eager compilation
    affine = lambda key, x, **kw: jax.jit(functools.partial(A.random_affine, **kw))(key, x)
    rotated = np.asarray(affine(KEY, blob, rotation=45.0))
    assert np.abs(rotated - blob).max() < 0.03
    # ... but not to translation, and the distortion depends on the key
    moved = np.asarray(affine(KEY, blob, translation=0.2))
    assert np.abs(moved - blob).max() > 0.1
    other = np.asarray(affine(jax.random.PRNGKey(1), blob, translation=0.2))
    assert np.abs(moved - other).max() > 1e-3
    # images of one batch get different distortions
    assert np.abs(moved[0] - moved[1]).max() > 1e-3


def test_affine_transform_with_a_displacement_field():
    images = _images(h=7, w=7)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    # a constant displacement of +1 row is the one-row shift of the matrix form
    down = np.zeros((images.shape[0], 2, 7, 7))
    down[:, 0] = 1.0
    shift = np.array([[1.0, 0, 1.0], [0, 1.0, 0]])
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, identity, displacement=down, fill=0.5)),
                               np.asarray(A.affine_transform(images, shift, fill=0.5)), atol=1e-12)
    # per-pixel: displacing only pixel (2, 3) by +1 column reads its right neighbour there
    one = np.zeros((images.shape[0], 2, 7, 7))
    one[:, 1, 2, 3] = 1.0
    expected = images.copy()
    expected[:, 2, 3] = images[:, 2, 4]
    np.testing.assert_allclose(np.asarray(A.affine_transform(images, identity, displacement=one)), expected,
                               atol=1e-12)


def test_gaussian_smooth_matches_scipy():
    from scipy import ndimage

    fields = np.random.default_rng(0).uniform(-1, 1, (3, 12, 9))
    for sigma in (0.7, 2.0, 4.0):
        expected = np.stack([ndimage.gaussian_filter(f, sigma, mode="constant", truncate=3.0) for f in fields])
        np.testing.assert_allclose(np.asarray(A.gaussian_smooth(fields, sigma=sigma)), expected, atol=1e-12)


def test_elastic_displacement_scale_smoothness_and_keys():
    make = jax.jit(functools.partial(A.elastic_displacement, batch=64, height=28, width=28, sigma=4.0,
                                     dtype=jnp.float64), static_argnames="alpha")
    unit = np.asarray(make(KEY, alpha=1.0))
    assert unit.shape == (64, 2, 28, 28)
    np.testing.assert_allclose(np.asarray(make(KEY, alpha=34.0)), 34.0 * unit, rtol=1e-12)
    assert np.abs(unit.mean()) < 0.01
    # smooth: neighbouring offsets are strongly correlated (independent pixels would give ~0)
    inner = unit[:, :, 8:20, 8:20]
    corr = np.corrcoef(inner[..., :-1].ravel(), inner[..., 1:].ravel())[0, 1]
    assert corr > 0.9
    assert np.abs(np.asarray(make(jax.random.PRNGKey(1), alpha=1.0)) - unit).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(make(KEY, alpha=0.0)), 0.0)


def test_random_affine_elastic_option():
    images = _images(b=4, h=16, w=16, c=1)
    affine = lambda **kw: np.asarray(jax.jit(functools.partial(A.random_affine, **kw))(KEY, images))
    plain = affine(rotation=5.0)
    np.testing.assert_allclose(affine(rotation=5.0, elastic_alpha=0.0), plain, atol=1e-12)
    bent = affine(rotation=5.0, elastic_alpha=30.0)
    assert np.abs(bent - plain).max() > 0.05
    assert np.all((bent >= -1e-12) & (bent <= 1 + 1e-12))  # bilinear: a convex mix of pixels and fill 0
    cfg = A.AugmentConfig(size=(16, 16), elastic_alpha=30.0)
    out = np.asarray(jax.jit(A.augment, static_argnames="config")(KEY, images, cfg))
    assert np.abs(out - images).max() > 0.05


def test_color_jitter():
    images = _images(b=4) * 0.5  # in [0, 0.5]: no clipping for factors <= 2
    np.testing.assert_array_equal(np.asarray(A.color_jitter(KEY, images)), images)
    bright = np.asarray(A.color_jitter(KEY, images, brightness=0.5))
    ratio = bright / images
    for b in range(4):
        np.testing.assert_allclose(ratio[b], ratio[b].mean(), rtol=1e-9)
        assert 0.5 <= ratio[b].mean() <= 1.5
    assert np.ptp(ratio.mean(axis=(1, 2, 3))) > 1e-3
    mid = 0.4 + 0.2 * _images(b=4)
    contrasted = np.asarray(A.color_jitter(KEY, mid, contrast=0.5))
    gray = lambda x: x @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray(contrasted).mean(axis=(1, 2)), gray(mid).mean(axis=(1, 2)), rtol=1e-9)
    # saturation leaves grey images alone and keeps the luma of colour images
    grey = np.repeat(_images(c=1), 3, axis=-1)
    np.testing.assert_allclose(np.asarray(A.color_jitter(KEY, grey, saturation=0.8)), grey, atol=1e-12)
    saturated = np.asarray(A.color_jitter(KEY, mid, saturation=0.5))
    np.testing.assert_allclose(gray(saturated), gray(mid), atol=1e-9)
    assert np.abs(saturated - mid).max() > 1e-3


@pytest.mark.parametrize(
    "config", [A.AugmentConfig.omniglot(20), A.AugmentConfig.imagenet_style(16),
               A.AugmentConfig(size=(10, 12), brightness=0.3, contrast=0.3, saturation=0.3)],
    ids=["omniglot", "imagenet", "colour"],
)
def test_augment_jit_determinism(config):
    channels = 1 if config.rotation else 3
    raw = np.random.default_rng(0).integers(0, 256, size=(4, 16, 16, channels), dtype=np.uint8)
    jitted = jax.jit(A.augment, static_argnames="config")
    out = jitted(KEY, raw, config)
    assert out.shape == (4, *config.size, channels) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    if config.rotation:  # eager execution compiles op by op: check jit == no-jit once
        np.testing.assert_allclose(np.asarray(A.augment(KEY, raw, config)), np.asarray(out), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jitted(KEY, raw, config)), np.asarray(out))
    different = jitted(jax.random.PRNGKey(7), raw, config)
    assert np.abs(np.asarray(different) - np.asarray(out)).max() > 1e-3


def test_augment_default_config_is_identity_on_floats():
    images = _images()
    np.testing.assert_allclose(np.asarray(A.augment(KEY, images, A.AugmentConfig())), images, atol=1e-12)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: A.random_flip_left_right(KEY, np.zeros((4, 4, 3))), "images"),
        (lambda: A.random_resized_crop(KEY, np.zeros((1, 4, 4, 3), np.uint8), size=2), "images"),
        (lambda: A.random_resized_crop(KEY, _images(), size=0), "size"),
        (lambda: A.random_resized_crop(KEY, _images(), size=4, scale=(0.5, 0.2)), "scale"),
        (lambda: A.random_resized_crop(KEY, _images(), size=4, scale=(0.5, 1.5)), "scale"),
        (lambda: A.random_resized_crop(KEY, _images(), size=4, ratio=(0.0, 1.0)), "ratio"),
        (lambda: A.random_flip_left_right(KEY, _images(), probability=1.5), "probability"),
        (lambda: A.random_affine(KEY, _images(), rotation=-1.0), "rotation"),
        (lambda: A.random_affine(KEY, _images(), translation=2.0), "translation"),
        (lambda: A.affine_transform(_images(), np.eye(3)), "matrix"),
        (lambda: A.affine_transform(_images(), np.eye(2, 3), displacement=np.zeros((1, 2, 3, 3))), "displacement"),
        (lambda: A.random_affine(KEY, _images(), elastic_alpha=-1.0), "elastic_alpha"),
        (lambda: A.elastic_displacement(KEY, batch=2, height=4, width=4, alpha=1.0, sigma=0.0), "sigma"),
        (lambda: A.elastic_displacement(KEY, batch=0, height=4, width=4, alpha=1.0), "batch"),
        (lambda: A.gaussian_smooth(np.zeros((4, 4)), sigma=1.0), "fields"),
        (lambda: A.color_jitter(KEY, _images(), brightness=-0.1), "brightness"),
        (lambda: A.normalize(_images(), (0.5, 0.5), 1.0), "mean"),
        (lambda: A.normalize(_images(), 0.5, 0.0), "std"),
        (lambda: A.center_crop_resize(_images(), size=4, crop_fraction=0.0), "crop_fraction"),
        (lambda: A.augment(KEY, _images(), {"size": 4}), "config"),
    ],
)
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()


@given(
    scale=st.tuples(st.floats(0.05, 1.0), st.floats(0.05, 1.0)).map(sorted),
    ratio=st.tuples(st.floats(0.3, 3.0), st.floats(0.3, 3.0)).map(sorted),
    seed=st.integers(0, 1000), value=st.floats(0.0, 1.0),
)
def test_property_constant_images_and_double_flip(scale, ratio, seed, value):
    # fixed shapes so that the examples share compiled kernels; values and boxes vary
    h, w, c, size = 5, 7, 2, 6
    key = jax.random.PRNGKey(seed)
    constant = np.full((2, h, w, c), value)
    out = np.asarray(A.random_resized_crop(key, constant, size=size, scale=tuple(scale), ratio=tuple(ratio)))
    assert out.shape == (2, size, size, c)
    np.testing.assert_allclose(out, value, atol=1e-9)
    images = _images(b=2, h=h, w=w, c=c, seed=seed)
    twice = A.random_flip_left_right(key, A.random_flip_left_right(key, images))
    np.testing.assert_array_equal(np.asarray(twice), images)
