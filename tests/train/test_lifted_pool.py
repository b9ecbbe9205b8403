"""``sampler.name=lifted_hard_negative``: the trainer flag of the lifted-structured hard-negative
batches (Oh Song et al. CVPR 2016 Sec. 4, `dmljax.train.lifted_pool.LiftedHardNegativeSampler`).

Toy data (8 training classes x 8 images, batch 4 x 4 = 16 = 2 pairs x (2 + 6 negatives)): the
flag trains end to end; batches are static-size, deterministic, the plain batch before the first
refresh; after a refresh the negatives of each pair are the pool's nearest other-class items (a
numpy loop over the pool); a run killed and resumed equals an uninterrupted one; bad options raise.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dmljax.train.lifted_pool import POOL_KEY, LiftedHardNegativeSampler
from dmljax.train import builders
from dmljax.train import objective
from tests.train.test_trainer import _check_finite_run, _config, _main, _toy_state
from tests.utils import Interrupted, fit_with_interrupt, max_tree_diff as _max_diff

LIFTED = ("sampler.name=lifted_hard_negative",)


def _lifted(config, images, labels, seed_key=0):
    base = builders.build_sampler(config, labels)
    return builders.build_lifted_sampler(config, base, images, labels, key=jax.random.key(seed_key))


@pytest.mark.parametrize("sets", [pytest.param((), marks=pytest.mark.slow), pytest.param(("method.name=divide_conquer", "method.options.num_learners=2",
                                                    "method.options.recluster_every=1", "loss.name=contrastive"),
                                                   marks=pytest.mark.slow)], ids=["ms", "divide_conquer"])
def test_flag_trains_end_to_end(tmp_path, capsys, sets):
    final = _main(tmp_path, *LIFTED, "sampler.options.refresh_every=1", "optim.num_steps=3", *sets)
    _check_finite_run(tmp_path, final, num_steps=3)
    out = capsys.readouterr().out
    refreshes = [line for line in out.splitlines() if "lifted hard-negative pool" in line]
    assert [r.split("]")[0] for r in refreshes] == ["[step 1", "[step 2"]  # not at step 0


def test_batches_static_deterministic_and_plain_before_the_first_refresh():
    c = _config(*LIFTED, "sampler.options.refresh_every=2", "sampler.options.pool_size=40")
    state, _, images, labels, base = _toy_state(c)
    s1, s2 = _lifted(c, images, labels), _lifted(c, images, labels)
    assert (s1.num_pairs, s1.negatives_per_pair, s1.pool_size) == (2, 6, 40)
    for step in (0, 1):  # no pool yet: the class-balanced batch
        st = s1.before_step(state.replace(step=jax.numpy.asarray(step, jax.numpy.int32)))
        assert int(st.loss_state[POOL_KEY]["step"]) == -1
        np.testing.assert_array_equal(s1.batch_indices(step), base.batch_indices(step))
    refreshed = s1.before_step(state.replace(step=jax.numpy.asarray(2, jax.numpy.int32)))
    s2.before_step(state.replace(step=jax.numpy.asarray(2, jax.numpy.int32)))
    pool = refreshed.loss_state[POOL_KEY]
    assert int(pool["step"]) == 2 and len(set(np.asarray(pool["indices"]).tolist())) == 40
    for step in (2, 3):
        b = s1.batch_indices(step)
        assert b.shape == (16,) and b.dtype == np.int64
        np.testing.assert_array_equal(b, s1.batch_indices(step))  # same call, same batch
        np.testing.assert_array_equal(b, s2.batch_indices(step))  # another instance, same seed
        assert set(b.tolist()) <= set(np.asarray(pool["indices"]).tolist())  # drawn from the pool
        assert not np.array_equal(b, base.batch_indices(step))
    assert not np.array_equal(s1.batch_indices(2), s1.batch_indices(3))
    # the pool holds the current model's eval-mode embeddings of its items
    from dmljax.train.step import embed
    np.testing.assert_allclose(np.asarray(pool["embeddings"]), embed(state, images[np.asarray(pool["indices"])]),
                               rtol=1e-6, atol=1e-6)


def test_negatives_are_the_nearest_other_class_pool_items():
    c = _config(*LIFTED, "sampler.options.refresh_every=1", "sampler.options.pool_size=48",
                "sampler.options.num_pairs=4", "sampler.options.negatives_per_pair=2")
    state, _, images, labels, _ = _toy_state(c)
    sampler = _lifted(c, images, labels)
    state = sampler.before_step(state.replace(step=jax.numpy.asarray(1, jax.numpy.int32)))
    pool = state.loss_state[POOL_KEY]
    pidx, pemb = np.asarray(pool["indices"]), np.asarray(pool["embeddings"], np.float64)
    emb = {int(i): e for i, e in zip(pidx, pemb)}
    for step in (1, 2):
        batch = sampler.batch_indices(step).reshape(4, 4)
        for a, p, *negs in batch:
            assert a != p and labels[a] == labels[p]
            score = {}
            for j in pidx:  # the paper's hard negatives of the pair, by a plain loop over the pool
                if labels[j] != labels[a]:
                    score[int(j)] = min(np.sum((emb[a] - emb[j]) ** 2), np.sum((emb[p] - emb[j]) ** 2))
            assert all(labels[n] != labels[a] for n in negs) and len(set(negs)) == 2
            np.testing.assert_allclose(sorted(score[int(n)] for n in negs), sorted(score.values())[:2], rtol=1e-5)


def test_slots_without_negatives_fall_back_to_the_plain_batch():
    c = _config(*LIFTED)
    _, _, images, labels, base = _toy_state(c)
    sampler = _lifted(c, images, labels)
    one_class = np.flatnonzero(labels == labels[0])[:8]  # a pool with no other-class item
    pool = {"indices": jax.numpy.asarray(np.sort(one_class).astype(np.int32)),
            "embeddings": jax.numpy.zeros((8, 8), jax.numpy.float32), "step": jax.numpy.asarray(1)}
    sampler.pool_size = 8
    b, plain = sampler.batch_for(5, pool).reshape(2, 8), base.batch_indices(5).reshape(2, 8)
    assert set(b[:, :2].ravel()) <= set(one_class.tolist()) and np.all(b[:, 0] != b[:, 1])
    np.testing.assert_array_equal(b[:, 2:], plain[:, 2:])


def test_resumed_run_matches_uninterrupted(tmp_path):
    """Killed after step 5 (latest checkpoint: step 4, whose pool was embedded at step 3 with the
    step-3 model), resumed: same params and pool as an uninterrupted 6-step run."""
    from dmljax.train.step import train_step
    c = _config(*LIFTED, "sampler.options.refresh_every=3", "optim.num_steps=6", "sampler.options.pool_size=48")
    step_fn = jax.jit(train_step)
    fresh, _, images, labels, base = _toy_state(c)

    def run(directory, *, resume=False, stop_after=None):
        sampler = _lifted(c, images, labels, seed_key=7)  # a new process: nothing cached
        return fit_with_interrupt(directory, fresh, stop_after=stop_after, resume=resume, images=images,
                                  labels=labels, sampler=sampler, num_steps=6, key=jax.random.key(1),
                                  step_fn=step_fn, before_step=sampler.before_step)

    reference = run(tmp_path / "full")
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", stop_after=5)
    resumed = run(tmp_path / "cut", resume=True)
    assert int(resumed.step) == 6 and int(reference.loss_state[POOL_KEY]["step"]) == 3
    assert _max_diff(resumed.loss_state, reference.loss_state) < 1e-6
    assert _max_diff(resumed.params, reference.params) < 1e-6
    # teeth: the checkpointed pool decides steps 4-5 (a lost pool means the plain batches)
    probe = _lifted(c, images, labels, seed_key=7)
    assert not np.array_equal(probe.batch_for(4, reference.loss_state[POOL_KEY]), base.batch_indices(4))


def test_pool_rides_along_every_objective():
    """The pool sits next to the base / method / memory / cluster state and the step keeps it."""
    for sets, keys in [((), {"base"}), (("method.name=das",), {"base", "method"}),
                       (("memory.size=32",), {"base", "memory"}),
                       (("method.name=divide_conquer", "loss.name=contrastive"), {"base", "method", "clusters"})]:
        c = _config(*LIFTED, *sets)
        obj = objective.build_objective(c, num_classes=8, num_train=64, dim=8, batch_size=16, steps_per_epoch=2,
                                key=jax.random.key(0))
        assert set(obj.loss_state) == keys | {POOL_KEY}, sets
        assert obj.loss_state[POOL_KEY]["embeddings"].shape == (64, 8)  # pool_size 4096 capped at N
    state, _, images, labels, base = _toy_state(_config(*LIFTED))
    idx = base.batch_indices(0)
    from dmljax.train.step import train_step
    new, metrics = jax.jit(train_step)(state, {"images": images[idx], "labels": labels[idx]}, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    assert _max_diff(new.loss_state[POOL_KEY], state.loss_state[POOL_KEY]) == 0.0


def test_bad_options_raise_naming_the_option():
    def options(*sets):
        return builders.lifted_sampler_options(_config(*sets), num_train=64, steps_per_epoch=2)

    assert options() is None
    assert options(*LIFTED) == {"num_pairs": 2, "negatives_per_pair": 6, "pool_size": 64, "refresh_every": 2}
    assert options(*LIFTED, "sampler.options.num_pairs=4")["negatives_per_pair"] == 2
    assert options(*LIFTED, "sampler.options.negatives_per_pair=2")["num_pairs"] == 4
    cases = [(("sampler.name=hardest",), "^sampler.name"),
             (("sampler.options.pool_size=8",), r"^sampler.options \['pool_size'\] given with sampler.name='m_per_class'"),
             ((*LIFTED, "sampler.options.pool=8"), r"^sampler.options: \['pool'\]"),
             ((*LIFTED, "sampler.options.num_pairs=3"), "^sampler.options.num_pairs"),
             ((*LIFTED, "sampler.options.num_pairs=0"), "^sampler.options.num_pairs must be a positive"),
             ((*LIFTED, "sampler.options.negatives_per_pair=3"), "^sampler.options.negatives_per_pair"),
             ((*LIFTED, "sampler.options.num_pairs=2", "sampler.options.negatives_per_pair=2"),
              r"^sampler.options.num_pairs \* \(2 \+ negatives_per_pair\) = 8"),
             ((*LIFTED, "sampler.options.pool_size=0"), "^sampler.options.pool_size"),
             ((*LIFTED, "sampler.options.pool_size=4"), "^sampler.options.negatives_per_pair must be <= the pool"),
             ((*LIFTED, "sampler.options.refresh_every=-1"), "^sampler.options.refresh_every"),
             ((*LIFTED, "sampler.options.refresh_every=True"), "^sampler.options.refresh_every"),
             ((*LIFTED, "method.name=alternating_projection"), "^sampler.name='lifted_hard_negative' cannot")]
    for sets, match in cases:
        with pytest.raises(ValueError, match=match):
            options(*sets)
    c = _config()
    _, _, images, labels, base = _toy_state(c)
    kw = dict(base_sampler=base, pool_size=64, refresh_every=1, seed=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="^num_pairs \\* \\(2 \\+ negatives_per_pair\\) = 12"):
        LiftedHardNegativeSampler(images, labels, num_pairs=2, negatives_per_pair=4, **kw)
    with pytest.raises(ValueError, match="^pool_size must be <="):
        LiftedHardNegativeSampler(images, labels, num_pairs=2, negatives_per_pair=6, **{**kw, "pool_size": 65})
    with pytest.raises(ValueError, match="^refresh_every"):
        LiftedHardNegativeSampler(images, labels, num_pairs=2, negatives_per_pair=6, **{**kw, "refresh_every": 0})
