"""Class-balanced samplers: balance, determinism, restart, repetition, hierarchy."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmljax.data.samplers import HierarchicalSampler, MPerClassSampler, RepeatedCompositionSampler


def _labels(num_classes=10, per_class=6, seed=0):
    labels = np.repeat(np.arange(num_classes) * 7 + 3, per_class)  # non-contiguous class ids
    return np.random.default_rng(seed).permutation(labels)


def _class_counts(labels, indices):
    return collections.Counter(labels[indices].tolist())


def test_balance_and_grouping():
    labels = _labels()
    sampler = MPerClassSampler(labels, classes_per_batch=4, samples_per_class=3, seed=1)
    assert sampler.batch_size == 12 and sampler.steps_per_epoch == 2
    for step in range(10):
        idx = sampler.batch_indices(step)
        assert idx.shape == (12,) and idx.dtype == np.int64
        counts = _class_counts(labels, idx)
        assert len(counts) == 4 and set(counts.values()) == {3}
        # enough items per class: no duplicates
        assert len(set(idx.tolist())) == 12
        # grouped by class
        np.testing.assert_array_equal(labels[idx].reshape(4, 3), np.repeat(labels[idx][::3, None], 3, axis=1))


def test_each_class_once_per_epoch():
    labels = _labels(num_classes=12)
    sampler = MPerClassSampler(labels, classes_per_batch=4, samples_per_class=2, seed=5)
    for epoch in range(3):
        seen = [c for s in range(epoch * 3, epoch * 3 + 3) for c in set(labels[sampler.batch_indices(s)].tolist())]
        assert sorted(seen) == sorted(set(labels.tolist()))
    # different epochs visit classes in different orders
    first = [sampler.batch_classes(s).tolist() for s in range(3)]
    second = [sampler.batch_classes(s).tolist() for s in range(3, 6)]
    assert first != second


def test_determinism_and_seed_dependence():
    labels = _labels()
    a = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=7)
    b = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=7)
    c = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=8)
    batches_a = [a.batch_indices(s) for s in range(6)]
    for s, batch in enumerate(batches_a):
        np.testing.assert_array_equal(batch, b.batch_indices(s))
    assert any(not np.array_equal(x, c.batch_indices(s)) for s, x in enumerate(batches_a))
    # steps of one sampler differ from each other
    assert not np.array_equal(batches_a[0], batches_a[1])


def test_restart_equals_uninterrupted():
    labels = _labels()
    sampler = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=3)
    uninterrupted = list(sampler.iterate(0, num_steps=10))
    # "crash" after 4 steps, build a fresh sampler from the checkpointed state, continue
    state = sampler.state_dict(4)
    resumed_sampler = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=2, seed=state["seed"])
    resumed = list(sampler.iterate(0, num_steps=4)) + list(resumed_sampler.iterate(state["step"], num_steps=6))
    for x, y in zip(uninterrupted, resumed, strict=True):
        np.testing.assert_array_equal(x, y)
    # random access in reverse order gives the same batches (no hidden state)
    for s in reversed(range(10)):
        np.testing.assert_array_equal(sampler.batch_indices(s), uninterrupted[s])


def test_local_batch_indices_partition_the_global_batch():
    sampler = MPerClassSampler(_labels(), classes_per_batch=4, samples_per_class=3, seed=2)
    shares = [sampler.local_batch_indices(5, process_index=i, process_count=3) for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(shares), sampler.batch_indices(5))
    with pytest.raises(ValueError, match="^process_count"):
        sampler.local_batch_indices(0, process_index=0, process_count=5)
    with pytest.raises(ValueError, match="^process_index"):
        sampler.local_batch_indices(0, process_index=3, process_count=3)


def test_small_classes_sampled_with_replacement():
    labels = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    sampler = MPerClassSampler(labels, classes_per_batch=3, samples_per_class=4, seed=0)
    idx = sampler.batch_indices(0)
    counts = _class_counts(labels, idx)
    assert counts == {0: 4, 1: 4, 2: 4}
    # class 2 has 2 items: both appear (all members first, then repeats)
    assert set(idx[labels[idx] == 2].tolist()) == {6, 7}
    assert set(idx[labels[idx] == 1].tolist()) == {5}


def test_repeated_composition():
    labels = _labels(num_classes=8, per_class=6)
    sampler = RepeatedCompositionSampler(labels, classes_per_batch=2, samples_per_class=3, repeat=3, seed=0)
    assert sampler.steps_per_epoch == 12
    batches = [sampler.batch_indices(s) for s in range(9)]
    for block in range(3):
        for t in range(1, 3):
            np.testing.assert_array_equal(batches[3 * block], batches[3 * block + t])
    assert not np.array_equal(batches[0], batches[3])
    # classes advance one chunk per block: a full epoch (12 steps) covers every class once per block
    seen = [c for s in range(0, 12, 3) for c in set(labels[sampler.batch_indices(s)].tolist())]
    assert sorted(seen) == sorted(set(labels.tolist()))


def test_repeated_composition_past_one_epoch():
    # regression: the class order of a block used the repeated step count as blocks per epoch,
    # so the second half of every epoch drew empty class chunks
    labels = _labels(num_classes=8, per_class=6)
    sampler = RepeatedCompositionSampler(labels, classes_per_batch=2, samples_per_class=3, repeat=3, seed=0)
    for epoch in range(3):
        start = epoch * sampler.steps_per_epoch
        blocks = [sampler.batch_indices(s) for s in range(start, start + sampler.steps_per_epoch, 3)]
        assert all(len(b) == 6 for b in blocks)
        seen = sorted(c for b in blocks for c in set(labels[b].tolist()))
        assert seen == sorted(set(labels.tolist()))


def test_repeated_composition_representatives():
    labels = _labels(num_classes=6, per_class=10)
    sampler = RepeatedCompositionSampler(
        labels, classes_per_batch=2, samples_per_class=4, repeat=4, representatives_per_class=1, seed=2
    )
    batches = np.stack([sampler.batch_indices(s) for s in range(4)]).reshape(4, 2, 4)
    # the first item of each class (the representative) is fixed across the block ...
    assert (batches[:, :, 0] == batches[0, :, 0]).all()
    # ... the other items change and never duplicate the representative
    assert not (batches[:, :, 1:] == batches[0, :, 1:]).all()
    for row in batches.reshape(-1, 4):
        assert len(set(row.tolist())) == 4
    for s in range(4):
        assert _class_counts(labels, sampler.batch_indices(s)) == _class_counts(labels, sampler.batch_indices(0))


def test_hierarchical_sampler():
    classes = np.repeat(np.arange(12), 4)
    supers = classes // 4  # 3 super-classes of 4 classes each
    perm = np.random.default_rng(0).permutation(len(classes))
    labels, super_labels = classes[perm], supers[perm]
    sampler = HierarchicalSampler(
        labels, super_labels, super_classes_per_batch=2, classes_per_super_class=2, samples_per_class=2, seed=0
    )
    assert sampler.batch_size == 8 and sampler.steps_per_epoch == 1
    for step in range(5):
        idx = sampler.batch_indices(step)
        assert idx.shape == (8,)
        supers_in_batch = collections.Counter(super_labels[idx].tolist())
        assert len(supers_in_batch) == 2 and set(supers_in_batch.values()) == {4}
        assert set(_class_counts(labels, idx).values()) == {2}
        np.testing.assert_array_equal(idx, sampler.batch_indices(step))
    with pytest.raises(ValueError, match="^super_labels"):
        HierarchicalSampler(labels, np.arange(len(labels)) % 2, super_classes_per_batch=1,
                            classes_per_super_class=1, samples_per_class=1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"labels": np.zeros((4, 2), int)}, "labels"),
        ({"labels": np.array([0.0, 1.0])}, "labels"),
        ({"labels": np.array([], int)}, "labels"),
        ({"classes_per_batch": 0}, "classes_per_batch"),
        ({"classes_per_batch": 11}, "classes_per_batch"),
        ({"samples_per_class": 2.0}, "samples_per_class"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {"labels": _labels(), "classes_per_batch": 2, "samples_per_class": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        MPerClassSampler(args.pop("labels"), **args)


def test_bad_step_and_repeat():
    sampler = MPerClassSampler(_labels(), classes_per_batch=2, samples_per_class=2)
    with pytest.raises(ValueError, match="^step"):
        sampler.batch_indices(-1)
    with pytest.raises(ValueError, match="^repeat"):
        RepeatedCompositionSampler(_labels(), classes_per_batch=2, samples_per_class=2, repeat=0)
    with pytest.raises(ValueError, match="^representatives_per_class"):
        RepeatedCompositionSampler(_labels(), classes_per_batch=2, samples_per_class=2, repeat=2,
                                   representatives_per_class=3)


@given(
    sizes=st.lists(st.integers(1, 7), min_size=2, max_size=9),
    p=st.integers(1, 4),
    m=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    step=st.integers(0, 1000),
)
def test_property_balance_and_label_renaming(sizes, p, m, seed, step):
    p = min(p, len(sizes))
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    sampler = MPerClassSampler(labels, classes_per_batch=p, samples_per_class=m, seed=seed)
    idx = sampler.batch_indices(step)
    counts = _class_counts(labels, idx)
    assert len(counts) == p and set(counts.values()) == {m}
    for c in counts:  # duplicates only when the class is smaller than M
        picked = idx[labels[idx] == c]
        assert len(set(picked.tolist())) == min(m, sizes[c])
    # renaming classes by an order-preserving map gives exactly the same batch
    renamed = MPerClassSampler(labels * 3 + 11, classes_per_batch=p, samples_per_class=m, seed=seed)
    np.testing.assert_array_equal(renamed.batch_indices(step), idx)
