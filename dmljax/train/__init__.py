"""dmljax.train: train state, pure train step, data-parallel step, optimizers, checkpoints, loop."""

from dmljax.train.checkpoint import Checkpointer
from dmljax.train.lifted_pool import LiftedHardNegativeSampler
from dmljax.train.loop import KMeansReclustering, fit
from dmljax.train.optim import make_optimizer, param_labels, warmup_cosine
from dmljax.train.state import TrainState, create_train_state, merge_model
from dmljax.train.step import data_mesh, embed, embedding_metrics, make_parallel_train_step, train_step
