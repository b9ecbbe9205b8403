"""Methods that change what the loss sees: hard-sample generation, augmentation in embedding
space, batch construction, and denoising of labels.

.. list-table::
   :header-rows: 1

   * - method
     - functions / modules
     - paper
     - config flag (proposed)
   * - DAML, adversarial hard-negative generator
     - `daml.HardNegativeGenerator`, `daml.daml_generator_loss`, `daml.daml_triplet_loss`, `daml.sample_triplets`
     - Duan et al., "Deep Adversarial Metric Learning", CVPR 2018
     - `method.name="daml"`
   * - two-stage hard sample generation
     - `hard_sample_generation.piecewise_linear_manipulation`, `piecewise_linear_schedule`, `ConditionalRefiner`, `ConditionalDiscriminator`, `cgan_losses`, `adaptive_reverse_metric_loss`
     - seed 003, abstract 8 (piecewise-linear manipulation + cGAN + adaptive reverse metric)
     - `method.name="hard_sample_generation"`
   * - IAA, intra-class adaptive augmentation
     - `iaa.iaa_init`, `iaa_update`, `iaa_neighbor_correction`, `iaa_synthesize`, `iaa_strength_schedule`
     - Fu et al., IEEE TMM 2022 (arXiv 2211.16264)
     - `method.name="iaa"`
   * - DAS, densely-anchored sampling
     - `das.das_init`, `das_update`, `das_generate`, `das_augment`
     - Liu et al., ECCV 2022
     - `method.name="das"`
   * - divide and conquer the embedding space
     - `divide_conquer.learner_slices`, `cluster_embeddings`, `cluster_masks`, `divide_and_conquer_loss`, `recluster_due`, `use_full_embedding`
     - Sanakoyeu et al., CVPR 2019 (arXiv 1906.05990)
     - `method.name="divide_conquer"`
   * - alternating projections onto feasible sets
     - `alternating_projection.alternating_projection_regularizer`, `projection_targets`, `representative_mask` (+ `dmljax.data.samplers.RepeatedCompositionSampler`)
     - Can et al., ICIP 2021 (arXiv 1907.07585)
     - `method.name="alternating_projection"`
   * - BSPML, balanced self-paced metric learning
     - `bspml.bspml_sample_weights`, `weighted_multi_similarity_loss`, `self_paced_age`
     - Zhang et al., AAAI 2023 (arXiv 2211.11751)
     - `method.name="bspml"`
   * - label-noise injection (experiments)
     - `label_noise.inject_label_noise`
     - symmetric / pair-flip noise (Han et al., NeurIPS 2018)
     - `data.label_noise`, `data.label_noise_kind`
   * - lifted-structured hard-negative batches
     - `lifted_sampling.lifted_hard_negative_batch`
     - Oh Song et al., CVPR 2016 (arXiv 1511.06452), Sec. 4
     - `sampler.name="lifted_hard_negative"` (`dmljax.train.lifted_pool.LiftedHardNegativeSampler`: a batch sampler, not a `plugin` method)

Trainer integration: `plugin.make_method(name, base_loss, num_classes=..., dim=..., total_steps=...,
**options)` returns ``Method(init, loss)``: every method as ONE scalar objective (adversarial
players separated by stop-gradients) with an explicit method state, so the existing train step
(one value_and_grad, one optax update) can run any of them; ``name`` in `plugin.METHODS` is the
proposed ``config.method.name``.

Every component is a pure function of arrays (static shapes, explicit PRNG keys, explicit state
pytrees such as `das.DASState` / `iaa.IAAState`) or a small Flax NNX module, usable with the
library's losses: generated embeddings and labels are appended to the batch, weights and masks
are passed to losses through their ``valid`` argument or their weights.
"""

from dmljax.methods.alternating_projection import (alternating_projection_regularizer, projection_targets,
                                                   representative_mask)
from dmljax.methods.bspml import bspml_sample_weights, self_paced_age, weighted_multi_similarity_loss
from dmljax.methods.daml import HardNegativeGenerator, daml_generator_loss, daml_triplet_loss, sample_triplets
from dmljax.methods.das import DASState, das_augment, das_generate, das_init, das_update
from dmljax.methods.divide_conquer import (cluster_embeddings, cluster_masks, divide_and_conquer_loss,
                                           learner_slices, recluster_due, use_full_embedding)
from dmljax.methods.hard_sample_generation import (ConditionalDiscriminator, ConditionalRefiner,
                                                   adaptive_reverse_margin, adaptive_reverse_metric_loss,
                                                   cgan_losses, piecewise_linear_manipulation,
                                                   piecewise_linear_schedule)
from dmljax.methods.iaa import (IAAState, iaa_init, iaa_neighbor_correction, iaa_strength_schedule,
                                iaa_synthesize, iaa_update)
from dmljax.methods.label_noise import inject_label_noise
from dmljax.methods.lifted_sampling import lifted_hard_negative_batch
from dmljax.methods.plugin import METHODS, Method, make_method

__all__ = [
    "METHODS", "Method", "make_method",
    "ConditionalDiscriminator", "ConditionalRefiner", "DASState", "HardNegativeGenerator", "IAAState",
    "adaptive_reverse_margin", "adaptive_reverse_metric_loss", "alternating_projection_regularizer",
    "bspml_sample_weights", "cgan_losses", "cluster_embeddings", "cluster_masks", "daml_generator_loss",
    "daml_triplet_loss", "das_augment", "das_generate", "das_init", "das_update", "divide_and_conquer_loss",
    "iaa_init", "iaa_neighbor_correction", "iaa_strength_schedule", "iaa_synthesize", "iaa_update",
    "inject_label_noise", "learner_slices", "lifted_hard_negative_batch", "piecewise_linear_manipulation",
    "piecewise_linear_schedule", "projection_targets", "recluster_due", "representative_mask", "sample_triplets",
    "self_paced_age", "use_full_embedding", "weighted_multi_similarity_loss",
]
