"""Synthetic multi-label retrieval (`experiments.synthetic`, task "multilabel").

    python -m experiments.synthetic --config synthetic_multilabel                    # multi-label sampling
    python -m experiments.synthetic --config synthetic_multilabel --set loss.label_mode=first  # single-label baseline

Items are nonlinear views of sums of per-class prototype patterns (1-3 labels each, 12 classes);
test queries are retrieved from the training archive and scored with the multi-label retrieval
metrics. ``loss.label_mode`` compares multi-label triplet selection ("multi": positives share
>= 1 label) with the naive baseline that keeps only each item's first label ("first").
Sized for a few seconds on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "multilabel"
    c.seed = 0
    c.workdir = "runs/synthetic_multilabel"

    c.data = ml_collections.ConfigDict()
    c.data.num_classes = 20
    c.data.feature_dim = 32
    c.data.num_train = 1200
    c.data.num_test = 400
    c.data.max_labels = 3
    c.data.noise = 1.0
    c.data.nuisance_dim = 16  # class-free Gaussian features appended: they mislead raw-feature kNN
    c.data.nuisance_scale = 1.0

    c.model = ml_collections.ConfigDict()
    c.model.hidden = (64,)
    c.model.embedding_dim = 16

    c.loss = ml_collections.ConfigDict()
    c.loss.label_mode = "multi"  # or "first" (single-label baseline)
    c.loss.mining = "informative"  # Sumbul et al. 2021 selection, or "batch_hard"
    c.loss.margin = 0.2  # FaceNet's margin for unit-norm embeddings
    c.loss.num_anchors = 0  # 0: the loss default (batch // 2 diverse anchors)

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.num_steps = 800
    c.optim.batch_size = 64
    c.optim.weight_decay = 1e-4

    c.eval = ml_collections.ConfigDict()
    c.eval.ks = (1, 5, 10)
    return c
