"""Default config: the standard Omniglot DML protocol on CPU.

Train on images_background (964 characters x 4 rotations = 3856 classes); test on the 659 unseen
images_evaluation characters (every image a query against all others: R@K, MAP@R, NMI) and on
the 20 official 20-way one-shot runs. Sized to finish in < 15 minutes on 2 CPU cores: 36 px
input, elastic + affine distortions, hierarchical batches (4 alphabets x 4 characters x 8
images), 3500 steps of batch 128 with the multi-similarity loss, a plain evaluation at step 1750
and, at the end, a 25-view evaluation with PreciseBN statistics. Measured results and the
variants tried: experiments/results/README.md.
"""

import ml_collections

from dmljax.configs import base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.workdir = "runs/omniglot"
    c.data.image_size = 36  # more stroke detail than 28 / 32 px (results log)
    # rotate every training character by 90/180/270 degrees to make new classes (x4 classes),
    # the standard Omniglot trick of Santoro et al. 2016 / Vinyals et al. 2016.
    c.data.rotation_classes = 4
    c.model.embedding_dim = 256
    # 4 alphabets (per rotation) x 4 of their characters per batch: the negatives are mostly
    # same-alphabet characters, the confusions of the test
    c.sampler.name = "hierarchical"
    # elastic distortion (Simard et al. 2003; dmljax.data.augment.elastic_displacement), alpha px
    # scale of a sigma-px-smooth random field
    c.augment.elastic_alpha = 30.0
    c.augment.elastic_sigma = 4.0
    c.optim.num_steps = 3500
    # the intermediate evaluation (the curve): the plain embedding; the last one: the 5x5 grid of
    # shifts up to 2 px (dmljax.train.tta) with PreciseBN statistics (Wu & Johnson 2021) of
    # 64 x 256 un-augmented training images
    c.eval.final_tta_shifts = tuple((dr, dc) for dr in range(-2, 3) for dc in range(-2, 3))
    c.eval.precise_bn_batches = 64
    c.train.eval_every = 1750
    return c
