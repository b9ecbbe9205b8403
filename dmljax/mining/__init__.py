"""dmljax.mining: miners over [B, M] distance matrices returning static-shape masks/weights."""

from dmljax.mining.miners import (
    batch_hard,
    hard_negatives,
    pair_margin,
    semihard_negatives,
    sort_negatives,
    triplet_margin_stats,
    window_hinge,
)
from dmljax.mining.weighting import (
    distance_weighted_probabilities,
    distance_weighted_sampling,
    multi_similarity_mining,
)
from dmljax.mining.extra import (
    angular_miner,
    batch_easy_hard,
    hard_cluster_miner,
    hdc_miner,
    n_hardest,
    uniform_histogram_miner,
)
from dmljax.mining.subset import MaximumLossSubset, maximum_loss_miner, random_subsets
from dmljax.mining.subsample import SampledTriplets, triplets_per_anchor, tuples_per_anchor
