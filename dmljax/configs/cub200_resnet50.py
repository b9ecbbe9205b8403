"""CUB-200-2011 with ResNet-50 and Proxy-Anchor: the standard DML setting.

Protocol (Song et al. 2016, followed by every DML paper): train on the images of the first 100
classes (5864 images), test on the remaining 100 (5924): every test image queries all the others;
Recall@1/2/4/8, MAP@R, NMI. Data: TFDS ``caltech_birds2011`` (``python -c "import
tensorflow_datasets as tfds; tfds.load('caltech_birds2011', download=True)"`` once, or
``--set data.download=True``), resized to 256 x 256 and held in memory (~2.3 GB for both splits;
lower ``data.image_size`` / ``data.crop_size`` on small machines).

Settings of the official Proxy-Anchor ResNet-50 CUB command (Kim et al., "Proxy Anchor Loss for
Deep Metric Learning", CVPR 2020; github.com/tjddus9597/Proxy-Anchor-CVPR2020 README:
``--model resnet50 --embedding-size 512 --batch-size 120 --lr 1e-4 --warm 5 --bn-freeze 1
--lr-decay-step 5``, defaults ``--epochs 60 --weight-decay 1e-4 --alpha 32 --mrg 0.1``, AdamW,
proxies at 100x the learning rate, i.e. 1e-2): ImageNet-pretrained ResNet-50 with BatchNorm frozen
(running statistics from ImageNet), 512-d L2-normalised embedding, margin 0.1, alpha 32, random
resized crop 224 (torchvision default scale 0.08-1) + flip for training, resize 256 / centre
crop 224 for testing. The paper reports 180-image batches for its BN-Inception runs; the
ResNet-50 command uses 120, which is what we use (30 classes x 4 images).

Differences from the official code (say so when comparing numbers):

* batches are class-balanced 30 x 4 (`MPerClassSampler`) rather than uniformly random;
  Proxy-Anchor does not need positive pairs in the batch, so this only changes the sampling noise;
* learning-rate schedule: linear warm-up for 5 epochs (240 steps) then cosine decay, instead of
  5 "warm" epochs that train only the head + proxies followed by StepLR(5 epochs, x0.5);
* no gradient value clipping (the official code clips at 10);
* the official ResNet-50 head pools avg + max; `dmljax.models.resnet` pools avg only;
* training images are stored stretched to 256 x 256 (``data.resize``), so the random crop sees
  the whole image but with its aspect ratio changed, and the test centre crop is 224/256 of the
  stretched image (torchvision: shorter side to 256, central 224 square).

Pretrained weights: set ``model.pretrained_path`` to a torchvision ResNet-50 state dict
(``torch.save(torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict(), "r50.pth")`` or the
same as ``.npz``). Without it the backbone starts from random initialisation and CUB numbers are
far below the paper's (R@1 69.9 / 79.6 / 86.6 / 91.4 for Proxy-Anchor-512 with ResNet-50).

Multi-similarity alternative (Wang et al., CVPR 2019): ``--set loss.name=multi_similarity``
(``loss.options`` alpha 2, beta 50, base 0.5, epsilon 0.1: the loss's defaults; keep the 30 x 4 batches and
``optim.loss_lr_mult`` is then unused).
"""

import ml_collections

from dmljax.configs import base

EPOCH_STEPS = 5864 // 120  # 48 full batches per epoch over the 100 training classes


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workdir = "runs/cub200_resnet50"
    c.data.name = "tfds:caltech_birds2011"
    c.data.train_split = "train"  # the DML class split (classes 0..99 / 100..199)
    c.data.test_split = "test"
    c.data.image_size = 256  # stored size ("resize 256")
    c.data.crop_size = 224  # training crop / test centre crop

    c.model.backbone = "resnet50"
    c.model.embedding_dim = 512

    c.loss.name = "proxy_anchor"
    c.loss.options.margin = 0.1  # Kim et al. 2020
    c.loss.options.alpha = 32.0

    c.sampler.classes_per_batch = 30
    c.sampler.samples_per_class = 4

    c.augment.preset = "imagenet"  # random resized crop + flip (dmljax.data.augment.imagenet_style)
    c.augment.crop_scale = (0.08, 1.0)  # torchvision RandomResizedCrop default, as Proxy-Anchor

    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 5 * EPOCH_STEPS
    c.optim.num_steps = 60 * EPOCH_STEPS  # 60 epochs (official default)
    c.optim.loss_lr_mult = 100.0  # proxies at 1e-2
    c.optim.freeze_batch_norm = True  # --bn-freeze 1

    c.eval.batch_size = 256
    c.train.eval_every = 5 * EPOCH_STEPS
    c.train.checkpoint_every = 5 * EPOCH_STEPS
    return c
