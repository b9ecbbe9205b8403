"""experiments/frozen_features.py helpers (the full run needs the ImageNet weights: see the script)."""

import numpy as np
from flax import nnx

from experiments.frozen_features import frozen_features, omniglot_as_rgb


class _MeanColour(nnx.Module):
    """features = per-channel mean (a stand-in backbone with ``features`` and eval mode)."""

    def __init__(self):
        self.w = nnx.Param(np.ones((3,), np.float32))

    def features(self, x):
        return (x.astype(np.float32) * self.w[...]).mean(axis=(1, 2))


def test_omniglot_as_rgb_inverts_and_replicates():
    x = np.array([[[[0], [255]], [[10], [200]]]], np.uint8)
    y = omniglot_as_rgb(x)
    assert y.shape == (1, 2, 2, 3) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[..., 1], 255 - x[..., 0])
    np.testing.assert_array_equal(omniglot_as_rgb(x, invert=False)[..., 2], x[..., 0])


def test_frozen_features_pads_the_last_batch_and_keeps_the_order():
    images = np.random.default_rng(0).integers(0, 256, size=(7, 4, 4, 3)).astype(np.uint8)
    got = frozen_features(_MeanColour(), images, batch_size=3)
    np.testing.assert_allclose(got, images.astype(np.float32).mean(axis=(1, 2)), rtol=1e-6)
