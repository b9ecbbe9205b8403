"""dmljax.losses: pure loss functions ``loss(embeddings, labels, [learnable arrays], *, config)``.

Families: grouped by WHAT THE LOSS COMPARES (module in brackets)
------------------------------------------------------------------
* Pairs against margins -- contrastive / lifted: `contrastive_loss`, `lifted_structured_loss`,
  `generalized_lifted_structured_loss` [pair]; `snr_contrastive_loss`,
  `intra_pair_variance_loss`, `threshold_consistent_margin_loss`, `dynamic_soft_margin_loss`
  [margin_family].
* Triplets and tuples -- one positive against negatives of the same anchor:
  `triplet_margin_loss`, `fraction_active_triplets` [triplet]; `quadruplet_loss`,
  `angular_loss`, `npair_loss`, `tuplet_loss` [pair]; `tuplet_margin_loss`, `manifold_loss`
  [margin_family]; `centroid_triplet_loss` [centroid]; `pn_loss` [contrastive_family];
  `eet_loss` [structured]; `multilabel_triplet_loss` (dmljax.losses.multilabel);
  `selectively_contrastive_triplet_loss` [selective_triplet].
* Pair weighting -- every pair weighted by its hardness: `multi_similarity_loss`,
  `circle_loss`, `margin_loss`, `log_ratio_loss` [weighted]; `ranked_list_loss` [pair];
  `cbml_loss`, `gaussian_mixture_structured_loss` [structured].
* Batch softmax -- a softmax over the batch (or a reference set): `supcon_loss`,
  `ntxent_loss`, `nca_loss`, `soft_nearest_neighbour_loss`, `multiple_negatives_ranking_loss`,
  `instance_loss`, `vicreg_loss` (self-supervised) [contrastive_family];
  `decoupled_contrastive_loss` (DCL / DCLW) [decoupled_contrastive]; `multi_supcon_loss`
  (multi-label SupCon) [multilabel_contrastive].
* Proxies -- embeddings against learnable class proxies: `proxy_nca_loss`,
  `proxy_anchor_loss`, `multi_proxy_anchor_loss`, `soft_triple_loss` [proxy]; `hier_loss`,
  `hier_regularized_loss` (hyperbolic) [hyperbolic]; `hybrid_pair_proxy_loss` [structured];
  `imprint_weights`, `nearest_proxy_predict` [imprinting].
* Classification margin -- logits of a normalised classifier with an angular/additive margin:
  `normalized_softmax_loss`, `cosface_loss`, `arcface_loss`, `subcenter_arcface_loss`,
  `sphereface_loss`, `large_margin_softmax_loss`, `center_loss` [classification];
  `p2sgrad_loss` [margin_family]; `dynamic_arcface_loss` (margins from class counts) [dynamic_margin].
* Ranking / AP -- a retrieval metric made differentiable: `fastap_loss`, `smooth_ap_loss`,
  `pnp_loss`, `surrogate_precision_at_k_loss`, `histogram_loss` [ranking].
* Distillation -- a student's geometry against a teacher's: `rkd_*` (dmljax.losses.distillation).
* Combinators: `combine_losses` [structured]; `make_loss_ensemble` (dmljax.losses.ensemble);
  `matryoshka_loss` (and the factory `dmljax.losses.matryoshka.matryoshka`: any loss on nested embedding prefixes) [matryoshka].

Common arguments of the pair-based losses (one core: `dmljax.losses._core.pair_set`)
------------------------------------------------------------------------------------
* ``valid`` [B] bool: padded rows take part in no pair (set to 0 before the matrix product:
  NaN in a padded row reaches neither the value nor the gradient).
* ``ref_embeddings`` [M, D], ``ref_labels`` [M], ``ref_valid`` [M]: pairs (query i,
  reference j) instead of the batch's own pairs (PML's ``ref_emb`` / ``ref_labels``). The
  self-pair (i, i) is excluded only when there is no reference set. Cross-batch memory
  (`dmljax.memory`) and query/gallery training use this form.
* ``pair_weights``: any miner's output from `dmljax.mining` -- a bool or real [B, M] array,
  a ``(positive, negative)`` pair of them (`pair_margin`, `multi_similarity_mining`), or a
  result with ``positive_weights`` / ``negative_weights`` (`batch_hard`). Weight 0 removes
  the pair; each loss's docstring says how real weights enter (they scale pair terms, or the
  terms inside a log-sum-exp; triplet losses use their support).
* ``sample_weights`` [B] (no gradient): the weight of each anchor; "mean" then divides by
  ``max(sum of the weights of the terms, 1)`` (PML's ClassWeightedReducer instead divides
  by the number of terms: use ``reduction="sum"`` / N for it).

Vocabulary (the same in every loss)
-----------------------------------
* ``reduction`` in {"mean", "sum", "mean_nonzero", "none"}: "mean_nonzero" is PML's
  AvgNonZeroReducer (mean over terms with a positive loss, the count carrying no gradient);
  "none" is ONE VALUE PER ANCHOR [B] for every loss that has anchors (the sum of its weighted
  terms). "threshold" is not a loss option (ValueError): apply
  `dmljax.reductions.reduce_loss(values, reduction="threshold", low=..., high=...)` to the
  output of ``reduction="none"``.
* mining names: "all", "batch_hard", "semihard" (FaceNet), "semihard_triplets" (PML's
  TripletMarginMiner window), "hard" / "easy" (one positive or negative per anchor); old
  spellings ("semi-hard", "hard" for batch-hard in `quadruplet_loss`) raise a ValueError naming
  the new one. Booleans ``mining=True/False`` switch a loss's own miner (multi-similarity).
* ``metric``: "euclidean", "squared_euclidean" (distances: smaller = closer) or "cosine",
  "dot" (similarities: larger = closer; hinges flip, as in PML). `dmljax.distances.is_similarity`
  says which.
"""

from dmljax.losses.classification import (
    arcface_loss,
    center_loss,
    center_update,
    cosface_loss,
    large_margin_softmax_loss,
    normalized_softmax_loss,
    sphereface_loss,
    subcenter_arcface_loss,
)
from dmljax.losses.hyperbolic import hier_loss, hier_regularized_loss, pairwise_poincare_distance
from dmljax.losses.imprinting import imprint_weights, nearest_proxy_predict
from dmljax.losses.pair import (
    angular_loss,
    contrastive_loss,
    generalized_lifted_structured_loss,
    lifted_structured_loss,
    npair_loss,
    quadruplet_loss,
    ranked_list_loss,
    tuplet_loss,
)
from dmljax.losses.proxy import multi_proxy_anchor_loss, proxy_anchor_loss, proxy_nca_loss, soft_triple_loss
from dmljax.losses.structured import (
    cbml_loss,
    combine_losses,
    eet_loss,
    gaussian_mixture_structured_loss,
    hybrid_pair_proxy_loss,
)
from dmljax.losses.triplet import fraction_active_triplets, triplet_margin_loss
from dmljax.losses.weighted import circle_loss, log_ratio_loss, margin_loss, multi_similarity_loss
from dmljax.losses.contrastive_family import (
    instance_loss,
    multiple_negatives_ranking_loss,
    nca_loss,
    ntxent_loss,
    pn_loss,
    soft_nearest_neighbour_loss,
    supcon_loss,
    vicreg_loss,
)
from dmljax.losses.ranking import (
    PNP_VARIANTS,
    fastap_loss,
    histogram_loss,
    pnp_loss,
    smooth_ap_loss,
    surrogate_precision_at_k_loss,
)
from dmljax.losses.margin_family import (
    dynamic_soft_margin_loss,
    intra_pair_variance_loss,
    manifold_loss,
    p2sgrad_loss,
    snr_contrastive_loss,
    snr_distance,
    threshold_consistent_margin_loss,
    tuplet_margin_loss,
)
from dmljax.losses.centroid import centroid_triplet_loss
from dmljax.losses.decoupled_contrastive import decoupled_contrastive_loss, von_mises_fisher_weights
from dmljax.losses.dynamic_margin import dynamic_arcface_loss, dynamic_margins
from dmljax.losses.matryoshka import evaluate_prefixes, matryoshka_loss
from dmljax.losses.multilabel_contrastive import multi_supcon_loss
from dmljax.losses.selective_triplet import selectively_contrastive_triplet_loss
