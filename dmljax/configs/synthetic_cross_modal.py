"""Synthetic zero-shot cross-modal retrieval (`experiments.synthetic`, task "cross_modal").

    python -m experiments.synthetic --config synthetic_cross_modal                     # MATHM mining
    python -m experiments.synthetic --config synthetic_cross_modal --set loss.mining=batch_hard  # plain batch-hard

"Sketches" and "photos" are two different random nonlinear views of noisy class latents; 200
classes train (8 items per modality), 50 unseen classes test (10 per modality) (sketch queries vs photo gallery: R@1, MAP@R, mAP@all).
``loss.mining`` compares modality-aware triplet hard mining (Huang et al. 2021: cross, intra and
mixed batch-hard terms) with plain batch-hard mining on the union of both modalities.
Sized for a few seconds on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "cross_modal"
    c.seed = 0
    c.workdir = "runs/synthetic_cross_modal"

    c.data = ml_collections.ConfigDict()
    c.data.num_train_classes = 200
    c.data.num_test_classes = 50
    c.data.latent_dim = 16
    c.data.sketch_dim = 24
    c.data.photo_dim = 48
    c.data.per_class_train = 8
    c.data.per_class_test = 10
    c.data.intra_noise = 0.5
    c.data.view_noise = 0.1

    c.model = ml_collections.ConfigDict()
    c.model.hidden = (128, 64)  # branch MLPs 128 -> 64, then a shared projection to the embedding
    c.model.embedding_dim = 32

    c.loss = ml_collections.ConfigDict()
    c.loss.mining = "modality_aware"  # or "batch_hard" (plain, modality ignored)
    c.loss.margin = 0.3
    c.loss.cross_weight = 1.0
    c.loss.intra_weight = 1.0
    c.loss.mixed_weight = 1.0

    c.sampler = ml_collections.ConfigDict()
    c.sampler.classes_per_batch = 8
    c.sampler.samples_per_class = 4  # per modality

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 20
    c.optim.num_steps = 600
    c.optim.weight_decay = 1e-4
    return c
