"""dmljax.losses: pure loss functions ``loss(embeddings, labels, [learnable arrays], *, config)``.

Families: pair/tuple (`pair`, `triplet`, `weighted`), proxy (`proxy`, `hyperbolic`),
classification-margin (`classification`), seed families (`structured`), weight imprinting.
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
