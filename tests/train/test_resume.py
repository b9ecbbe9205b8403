"""A run interrupted mid-way and resumed from its orbax checkpoint ends with the same parameters
(and optimizer state) as an uninterrupted run; the best checkpoint follows the eval metric."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.data.samplers import MPerClassSampler
from dmljax.losses.weighted import multi_similarity_loss
from dmljax.train.checkpoint import Checkpointer
from dmljax.train.loop import fit
from dmljax.train.optim import make_optimizer
from dmljax.train.state import create_train_state
from dmljax.train.step import train_step
from dmljax.train.toy import tiny_model, toy_images

NUM_STEPS = 6


def _noisy_augment(images, key):
    # makes the result depend on the per-step key, so a wrong key after resuming is caught
    x = images.astype(jnp.float32) / 255.0
    return x + 0.1 * jax.random.normal(key, x.shape)


def _fresh_state():
    tx = make_optimizer(learning_rate=0.02, total_steps=NUM_STEPS, warmup_steps=2, optimizer="adamw")
    return create_train_state(tiny_model(0), tx, multi_similarity_loss, augment_fn=_noisy_augment)


@pytest.fixture(scope="module")
def setup():
    images, labels = toy_images(0, num_classes=6, per_class=4)
    # 2 classes x 2 per batch out of 6 classes: each step sees a different batch
    sampler = MPerClassSampler(labels, classes_per_batch=2, samples_per_class=2, seed=3)
    return images, labels, sampler, jax.jit(train_step)


class Interrupt(Exception):
    pass


def _run(setup, state, directory, *, resume=False, stop_after=None, eval_fn=None):
    images, labels, sampler, step_fn = setup

    def stopper(s, record):
        if stop_after is not None and int(s.step) == stop_after:
            raise Interrupt

    ckpt = Checkpointer(directory, save_every=2, best_metric="score")
    try:
        return fit(state, images=images, labels=labels, sampler=sampler, num_steps=NUM_STEPS,
                   key=jax.random.key(42), step_fn=step_fn, checkpointer=ckpt, resume=resume,
                   callbacks=[stopper], eval_fn=eval_fn, eval_every=2 if eval_fn else None, log_every=1)
    finally:
        ckpt.wait()
        ckpt.close()


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_resumed_run_matches_uninterrupted(setup, tmp_path):
    reference, _ = _run(setup, _fresh_state(), tmp_path / "full")
    assert int(reference.step) == NUM_STEPS

    with pytest.raises(Interrupt):  # killed after step 5; the latest checkpoint is step 4
        _run(setup, _fresh_state(), tmp_path / "interrupted", stop_after=5)
    ckpt = Checkpointer(tmp_path / "interrupted", save_every=2, best_metric=None)
    assert ckpt.latest_step() == 4
    ckpt.close()

    resumed, records = _run(setup, _fresh_state(), tmp_path / "interrupted", resume=True)
    assert [r["step"] for r in records] == [5, 6]  # only the missing steps were run
    assert int(resumed.step) == NUM_STEPS and int(resumed.sampler_step) == NUM_STEPS
    assert _max_diff(resumed.params, reference.params) < 1e-6
    assert _max_diff(resumed.opt_state, reference.opt_state) < 1e-6
    assert _max_diff(resumed.batch_stats, reference.batch_stats) < 1e-6
    # and the comparison has teeth: a run that skips the restore ends elsewhere
    assert _max_diff(_fresh_state().params, reference.params) > 1e-3


def test_resume_without_checkpoint_starts_fresh(setup, tmp_path):
    state, records = _run(setup, _fresh_state(), tmp_path / "empty", resume=True)
    assert int(state.step) == NUM_STEPS and len(records) == NUM_STEPS


def test_best_checkpoint_follows_metric(setup, tmp_path):
    scores = {2: 0.5, 4: 0.9, 6: 0.1}
    final, _ = _run(setup, _fresh_state(), tmp_path / "best",
                    eval_fn=lambda s: {"score": scores[int(s.step)]})
    ckpt = Checkpointer(tmp_path / "best", save_every=2, best_metric="score")
    best = ckpt.restore_best(_fresh_state())
    latest = ckpt.restore_latest(_fresh_state())
    ckpt.close()
    assert int(best.step) == 4 and int(latest.step) == NUM_STEPS
    assert _max_diff(latest.params, final.params) == 0.0


def test_checkpointer_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="^save_every"):
        Checkpointer(tmp_path / "a", save_every=0)
    with pytest.raises(ValueError, match="^best_mode"):
        Checkpointer(tmp_path / "b", best_mode="largest")
