"""A checkpoint written by the library (`train_and_evaluate`) restores in a user's own loop."""

import jax
import numpy as np

from dmljax.configs import get_config
from dmljax.data import MPerClassSampler, load_data_source
from dmljax.train import (Checkpointer, build_model, build_objective, build_optimizer, create_train_state,
                          train_and_evaluate, train_step)
from dmljax.train.cli import apply_overrides

TOY = ["data.name=toy", "data.image_size=8", "model.channels=(4,8)", "model.num_pools=2", "model.embedding_dim=8",
       "sampler.classes_per_batch=4", "sampler.samples_per_class=4", "sampler.name=m_per_class",
       "optim.num_steps=2", "optim.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=100",
       "train.log_every=1", "train.final_nmi=False", "train.progress=False", "eval.tta_shifts=((0,0),)",
       "eval.final_tta_shifts=()", "eval.precise_bn_batches=0", "loss.name=proxy_anchor"]


def test_library_checkpoint_restores_in_a_user_loop(tmp_path):
    config = apply_overrides(get_config("omniglot"), TOY)
    train_and_evaluate(config, str(tmp_path))

    # the user's loop: the library's parts, their own state and steps
    source = load_data_source(config)
    s = config.sampler
    sampler = MPerClassSampler(source.train_labels, classes_per_batch=s.classes_per_batch,
                               samples_per_class=s.samples_per_class, seed=0)
    objective = build_objective(config, num_classes=source.num_classes, num_train=len(source.train_labels),
                                dim=config.model.embedding_dim, batch_size=16, steps_per_epoch=sampler.steps_per_epoch,
                                key=jax.random.key(5))
    template = create_train_state(build_model(config, 7), build_optimizer(config), objective.loss_fn,
                                  objective.loss_params)
    checkpointer = Checkpointer(tmp_path / "checkpoints", best_metric=None)
    state = checkpointer.restore_latest(template)
    trees = checkpointer.restore_trees()
    checkpointer.close()

    assert int(state.step) == 2 and int(state.sampler_step) == 2
    assert set(trees) == {"step", "sampler_step", "params", "batch_stats", "opt_state", "key"}
    # saved as jax.Arrays, the run's key included (train_and_evaluate's loop key)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state.params))
    _, run_key = jax.random.split(jax.random.key(config.seed))
    np.testing.assert_array_equal(np.asarray(trees["key"]), np.asarray(jax.random.key_data(run_key)))
    # the trained proxies and weights, not the template's fresh ones
    proxies = np.asarray(state.params["loss"][0])
    np.testing.assert_array_equal(proxies, np.asarray(trees["params"]["loss"][0]))
    assert not np.array_equal(proxies, np.asarray(template.params["loss"][0]))
    # and the user's loop continues from it
    idx = sampler.batch_indices(int(state.sampler_step))
    state, metrics = jax.jit(train_step)(state, {"images": source.train_images[idx],
                                                 "labels": source.train_labels[idx]}, jax.random.key(0))
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
