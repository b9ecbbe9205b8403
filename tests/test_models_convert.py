"""Backbones and torch -> Flax weight conversion, checked for equal outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmljax.models.bn_inception import BNInception
from dmljax.models.convert import bn_inception_torch_name, load_state_dict_file, load_torch_state_dict
from dmljax.models.resnet import ResNet

torch = pytest.importorskip("torch")
tnn = torch.nn


class TorchBasicBlock(tnn.Module):
    """torchvision.models.resnet.BasicBlock, written out (torchvision is not a dependency)."""

    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, w, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(w)
        self.conv2 = tnn.Conv2d(w, w, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(w)
        self.downsample = None
        if stride != 1 or cin != w:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, w, 1, stride, bias=False), tnn.BatchNorm2d(w))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(tnn.Module):
    def __init__(self, cin, w, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, w, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(w)
        self.conv2 = tnn.Conv2d(w, w, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(w)
        self.conv3 = tnn.Conv2d(w, 4 * w, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(4 * w)
        self.downsample = None
        if stride != 1 or cin != 4 * w:
            self.downsample = tnn.Sequential(tnn.Conv2d(cin, 4 * w, 1, stride, bias=False), tnn.BatchNorm2d(4 * w))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(tnn.Module):
    def __init__(self, block, layers, width):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2**i, 2 if (j == 0 and i > 0) else 1))
                cin = width * 2**i * (4 if block is TorchBottleneck else 1)
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
        self.fc = tnn.Linear(cin, 10)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))


def _randomize_bn_stats(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("block,tblock", [pytest.param("basic", TorchBasicBlock, marks=pytest.mark.slow),  # ~28 s
                                          ("bottleneck", TorchBottleneck)])
def test_resnet_matches_torch_after_conversion(block, tblock, tmp_path):
    torch.manual_seed(0)
    tmodel = TorchResNet(tblock, (1, 1, 1, 1), 8).eval()
    _randomize_bn_stats(tmodel)
    x = np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.tensor(x)).numpy()
    # round trip through an .npz file as a user would (no torch needed to read it)
    path = str(tmp_path / "weights.npz")
    np.savez(path, **{k: v.numpy() for k, v in tmodel.state_dict().items()})
    model = ResNet(block=block, layers=(1, 1, 1, 1), width=8, rngs=nnx.Rngs(0))
    unused = load_torch_state_dict(model, load_state_dict_file(path))
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in unused)
    model.eval()
    # compiled forward: op-by-op eager dispatch of the ResNet cost more than one compilation
    out = nnx.jit(lambda m, images: m(images))(model, jnp.asarray(x.transpose(0, 2, 3, 1), dtype=jnp.float32))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)


def test_conversion_reports_missing_keys():
    model = ResNet(block="basic", layers=(1, 1, 1, 1), width=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="state_dict has no entry '[a-z0-9.]+' for model variable"):
        load_torch_state_dict(model, {})


def test_resnet_bf16_and_shapes():
    model = ResNet(block="basic", layers=(1, 1, 1, 1), width=4, small_input=True, in_channels=1,
                   dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, images: m(images))(model, jnp.zeros((2, 16, 16, 1)))
    assert out.shape == (2, 32) and out.dtype == jnp.float32 and model.feature_dim == 32


def test_bn_inception_shapes_and_names():
    model = nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(0)))  # abstract: no weights computed
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out.shape == (1, 1024)
    assert bn_inception_torch_name("conv1.conv") == "conv1_7x7_s2"
    assert bn_inception_torch_name("conv1.bn") == "conv1_7x7_s2_bn"
    assert bn_inception_torch_name("blocks.0.b3x3_reduce.bn") == "inception_3a_3x3_reduce_bn"
    assert bn_inception_torch_name("blocks.9.pool_proj.conv") == "inception_5b_pool_proj"
    # every variable maps to a distinct torch key, so a Caffe-converted state dict fills the model
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    prefixes = {bn_inception_torch_name(".".join(map(str, p[:-1]))) + "/" + str(p[-1]) for p, _ in flat}
    assert len(prefixes) == len(flat)
