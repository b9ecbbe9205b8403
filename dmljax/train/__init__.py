"""dmljax.train: train state, pure train step, data-parallel step, optimizers, checkpoints, loop,
and the trainer as a library (`train_and_evaluate`, its loss registry, objective, builders,
evaluation, weight averaging, logging)."""

from dmljax.train.averaging import WeightAverage
from dmljax.train.builders import (build_augment, build_lifted_sampler, build_optimizer, build_sampler,
                                   build_train_state, load_teacher)
from dmljax.train.checkpoint import Checkpointer
from dmljax.train.evaluation import evaluate, format_results, make_embed_fn, make_eval_state_fn
from dmljax.train.lifted_pool import LiftedHardNegativeSampler
from dmljax.train.loop import KMeansReclustering, fit
from dmljax.train.loss_registry import LOSSES, LossSpec, available_losses, build_loss_spec, resolve_loss_name
from dmljax.train.metrics_log import LossWeightLog, MetricsLog
from dmljax.train.models import build_model
from dmljax.train.objective import Objective, build_objective
from dmljax.train.optim import make_optimizer, param_labels, warmup_cosine
from dmljax.train.state import TrainState, create_train_state, merge_model
from dmljax.train.step import data_mesh, embed, embedding_metrics, make_parallel_train_step, train_step
from dmljax.train.trainer import train_and_evaluate
