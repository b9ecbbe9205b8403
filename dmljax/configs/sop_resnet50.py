"""Stanford Online Products with ResNet-50 and Proxy-Anchor.

Protocol (Song et al., CVPR 2016): train on ``Ebay_train.txt`` (59551 images, 11318 products),
test on ``Ebay_test.txt`` (60502 images, 11316 products), every test image querying all others;
Recall@1/10/100/1000 and MAP@R. Set ``data.root`` to the directory holding the two list files
(``--set data.root=/data/Stanford_Online_Products``). Images are decoded per batch from disk
(`dmljax.data.sources.LazyImages`), never held in memory; evaluation embeds 60k images and
runs the blocked exact kNN of `dmljax.metrics.knn` (no 60k x 60k matrix).

Settings: the official Proxy-Anchor SOP command (Kim et al., CVPR 2020;
github.com/tjddus9597/Proxy-Anchor-CVPR2020: ``--embedding-size 512 --batch-size 180 --lr 6e-4
--warm 1 --bn-freeze 0 --lr-decay-step 20 --lr-decay-gamma 0.25``, 60 epochs, AdamW, weight decay
1e-4, alpha 32, margin 0.1, proxies at 100x the learning rate). That command is for BN-Inception;
the authors publish no ResNet-50 SOP command, so the same settings are used with ResNet-50.
Unlike CUB, BatchNorm is NOT frozen on SOP (``--bn-freeze 0``).

Differences from the official code: class-balanced 90 x 2 batches (SOP products have 2-12
images, median 5; Proxy-Anchor samples uniformly), warm-up + cosine schedule instead of 1 head-only
epoch + StepLR(20 epochs, x0.25), no gradient clipping, average pooling only. See
dmljax/configs/cub200_resnet50.py for the pretrained-weight and image-size notes.
"""

from dmljax.configs import cub200_resnet50

EPOCH_STEPS = 59551 // 180  # 330 batches per epoch


def get_config():
    c = cub200_resnet50.get_config()
    c.workdir = "runs/sop_resnet50"
    c.data.name = "sop"
    c.data.root = ""  # directory with Ebay_train.txt / Ebay_test.txt (required)
    c.data.num_workers = 16  # decoding threads for LazyImages
    c.data.eval_ks = (1, 10, 100, 1000)
    c.sampler.classes_per_batch = 90
    c.sampler.samples_per_class = 2
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = EPOCH_STEPS
    c.optim.num_steps = 60 * EPOCH_STEPS
    c.optim.freeze_batch_norm = False  # --bn-freeze 0
    c.train.eval_every = 5 * EPOCH_STEPS
    c.train.checkpoint_every = 5 * EPOCH_STEPS
    c.train.final_nmi = False  # k-means with 11316 clusters on 60k points is slow; opt in
    return c
