"""``sampler.name=hierarchical`` in the trainer: super-class labels of the data sources (Omniglot
alphabets per rotation, SOP categories, the toy pairs) and the batches built from them."""

from __future__ import annotations

import numpy as np
import pytest

from dmljax.data.folders import ImageListDataset
from dmljax.data.omniglot import load_omniglot
from dmljax.data import sources
from dmljax.train import builders
from dmljax.train import cli
from dmljax.configs import get_config
from tests.train.test_trainer import TOY, _check_finite_run, _main

OMNIGLOT_SMALL = ["data.train_split=background_small1", "data.test_split=minimal_test", "data.image_size=28",
                  "data.rotation_classes=2"]


def _config(*sets):
    return cli.apply_overrides(get_config("omniglot"), list(sets))


@pytest.fixture(scope="module")
def omniglot_source():
    return sources.load_data_source(_config(*OMNIGLOT_SMALL))


def test_omniglot_super_classes_are_alphabets_per_rotation(omniglot_source):
    raw = load_omniglot("background_small1", image_size=28)
    names = sorted(set(raw.alphabets))
    supers = omniglot_source.class_super_labels
    assert supers.shape == (2 * raw.num_classes,) and supers.dtype == np.int32
    for c in range(raw.num_classes):
        assert supers[c] == names.index(raw.alphabets[c])
        assert supers[c + raw.num_classes] == len(names) + names.index(raw.alphabets[c])  # the rotated copy


def test_hierarchical_batches_hold_whole_super_classes(omniglot_source):
    c = _config(*OMNIGLOT_SMALL, "sampler.name=hierarchical", "sampler.options.classes_per_super_class=4")
    labels = omniglot_source.train_labels
    sampler = builders.build_sampler(c, labels, class_super_labels=omniglot_source.class_super_labels)
    assert type(sampler).__name__ == "HierarchicalSampler" and sampler.batch_size == 128
    item_super = omniglot_source.class_super_labels[labels]
    for step in range(12):
        idx = sampler.batch_indices(step)
        classes, counts = np.unique(labels[idx], return_counts=True)
        assert len(classes) == 16 and np.all(counts == 8)
        supers, per_super = np.unique(item_super[idx], return_counts=True)
        assert len(supers) == 4 and np.all(per_super == 4 * 8)
    # a pure function of the step (what --resume relies on)
    again = builders.build_sampler(c, labels, class_super_labels=omniglot_source.class_super_labels)
    assert np.array_equal(again.batch_indices(7), sampler.batch_indices(7))


def test_sop_class_super_labels():
    split = ImageListDataset(paths=[f"{i}.jpg" for i in range(6)], labels=np.array([0, 0, 1, 2, 2, 3], np.int32),
                             class_ids=[10, 11, 12, 13], super_labels=np.array([1, 1, 0, 1, 1, 0], np.int32))
    np.testing.assert_array_equal(sources._class_super_labels(split), [1, 0, 1, 0])
    no_supers = ImageListDataset(paths=["a.jpg"], labels=np.array([0], np.int32), class_ids=[0])
    assert sources._class_super_labels(no_supers) is None


def test_hierarchical_run_trains_end_to_end(tmp_path):
    final = _main(tmp_path, "sampler.name=hierarchical", "sampler.options.classes_per_super_class=2")
    _check_finite_run(tmp_path, final)


@pytest.mark.parametrize("sets, match", [
    (["sampler.options.classes_per_super_class=3"], "classes_per_super_class"),  # 3 does not divide 4
    (["sampler.options.classes_per_super_class=0"], "classes_per_super_class"),
    (["sampler.options.pool_size=8"], r"sampler.options: \['pool_size'\]"),
    (["method.name=alternating_projection"], "alternating_projection"),
])
def test_hierarchical_bad_options(sets, match):
    c = cli.apply_overrides(get_config("omniglot"), list(TOY) + ["sampler.name=hierarchical"] + sets)
    labels = np.repeat(np.arange(8), 8)
    with pytest.raises(ValueError, match=match):
        builders.build_sampler(c, labels, class_super_labels=np.arange(8) // 2)


def test_hierarchical_needs_super_classes():
    c = cli.apply_overrides(get_config("omniglot"), list(TOY) + ["sampler.name=hierarchical"])
    with pytest.raises(ValueError, match="sampler.name='hierarchical' needs super-classes"):
        builders.build_sampler(c, np.repeat(np.arange(8), 8))
    plain = cli.apply_overrides(c, ["sampler.name=m_per_class", "sampler.options.classes_per_super_class=2"])
    with pytest.raises(ValueError, match=r"sampler.options \['classes_per_super_class'\] given with sampler.name='m_per_class'"):
        builders.lifted_sampler_options(plain, num_train=64, steps_per_epoch=2)
