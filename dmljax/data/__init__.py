"""dmljax.data: offline Omniglot, samplers, on-device augmentation, folder datasets, and the
trainer's data sources (`DataSource`, `load_data_source`: Omniglot, toy, TFDS, folders).

`dmljax.data.tfds` (TensorFlow Datasets loaders) is a submodule that is not imported
here, so TensorFlow is never imported implicitly. `dmljax.data.augment.augment` is not
re-exported, so the submodule name stays a module.
"""

from dmljax.data.augment import AugmentConfig
from dmljax.data.batching import iterate_padded, pad_batch
from dmljax.data.folders import ImageListDataset, load_image_folder, load_inshop, load_sop
from dmljax.data.omniglot import (
    OmniglotData,
    OmniglotProtocol,
    OneShotRun,
    load_omniglot,
    load_one_shot_runs,
    load_protocol,
    one_shot_error,
)
from dmljax.data.samplers import HierarchicalSampler, MPerClassSampler, RepeatedCompositionSampler
from dmljax.data.tuple_samplers import FixedSetOfTriplets, TuplesToWeightsSampler, tuple_counts, tuple_weights
from dmljax.data.sources import DataSource, EvalSet, LazyImages, add_label_noise, load_data_source
