"""experiments.synthetic: synthetic multi-label and zero-shot cross-modal tasks (tiny sizes)."""

import functools
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dmljax.configs import get_config
from experiments.synthetic import make_cross_modal_data, make_multilabel_data, map_at_all, run


def _tiny(task, **overrides):
    c = get_config("synthetic_multilabel" if task == "multilabel" else "synthetic_cross_modal")
    if task == "multilabel":
        c.data.num_classes, c.data.feature_dim, c.data.num_train, c.data.num_test = 6, 8, 96, 24
        c.data.nuisance_dim = 4
        c.model.hidden, c.model.embedding_dim = (16,), 8
        c.optim.num_steps, c.optim.batch_size, c.optim.warmup_steps = 20, 16, 2
    else:
        c.data.num_train_classes, c.data.num_test_classes = 10, 4
        c.data.per_class_train, c.data.per_class_test = 4, 3
        c.data.latent_dim, c.data.sketch_dim, c.data.photo_dim = 4, 6, 8
        c.model.hidden, c.model.embedding_dim = (16, 8), 8
        c.sampler.classes_per_batch, c.sampler.samples_per_class = 3, 2
        c.optim.num_steps, c.optim.warmup_steps = 20, 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


@functools.lru_cache(maxsize=None)
def _cached(task, *overrides):
    """One run per distinct tiny config in this module (each run compiles its train scan)."""
    return run(_tiny(task, **dict(overrides)), None)


def _without_time(metrics):
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def test_synthetic_configs_name_their_task():
    for name, task in (("synthetic_multilabel", "multilabel"), ("synthetic_cross_modal", "cross_modal")):
        c = get_config(name)
        assert c.task == task


def test_multilabel_data_is_deterministic_and_well_formed():
    a = make_multilabel_data(seed=3, num_classes=5, feature_dim=4, num_train=30, num_test=10, max_labels=2,
                             nuisance_dim=3)
    b = make_multilabel_data(seed=3, num_classes=5, feature_dim=4, num_train=30, num_test=10, max_labels=2,
                             nuisance_dim=3)
    c = make_multilabel_data(seed=4, num_classes=5, feature_dim=4, num_train=30, num_test=10, max_labels=2,
                             nuisance_dim=3)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["x_train"], c["x_train"])
    assert a["x_train"].shape == (30, 7) and a["x_train"].dtype == np.float32
    counts = a["y_train"].sum(1)
    assert counts.min() >= 1 and counts.max() <= 2 and (counts == 2).any()
    # the first label is one of the item's labels
    assert np.all(a["y_train"][np.arange(30), a["first_train"]] == 1)
    assert np.all(np.isfinite(a["x_test"]))


def test_cross_modal_data_has_unseen_test_classes():
    d = make_cross_modal_data(seed=0, num_train_classes=5, num_test_classes=3, latent_dim=4, sketch_dim=6,
                              photo_dim=7, per_class_train=4, per_class_test=2)
    assert d["sketch_train"].shape == (20, 6) and d["photo_train"].shape == (20, 7)
    assert d["sketch_test"].shape == (6, 6) and d["photo_test"].shape == (6, 7)
    assert set(d["sketch_train_labels"]) == set(range(5))
    assert set(d["photo_test_labels"]) == set(d["sketch_test_labels"]) == {5, 6, 7}
    again = make_cross_modal_data(seed=0, num_train_classes=5, num_test_classes=3, latent_dim=4, sketch_dim=6,
                                  photo_dim=7, per_class_train=4, per_class_test=2)
    for name in d:
        np.testing.assert_array_equal(d[name], again[name])
    # sketches and photos of one class are independent samples, not copies through two maps
    assert not np.allclose(d["sketch_train"][:4], d["sketch_train"][4:8])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"), ({"max_labels": 9, "num_classes": 4}, "max_labels"),
    ({"noise": -1.0}, "noise"), ({"nuisance_dim": -1}, "nuisance_dim")])
def test_multilabel_data_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_multilabel_data(seed=0, **kwargs)


def _np_average_precision(ranked_labels, query_label):
    hits, total = 0, 0.0
    for rank, label in enumerate(ranked_labels, start=1):
        if label == query_label:
            hits += 1
            total += hits / rank
    return total / hits if hits else None


def test_map_at_all_matches_loop_and_sklearn():
    rng = np.random.default_rng(0)
    q_labels = np.array([0, 1, 2, 3], np.int32)  # class 3 absent from the gallery: excluded
    g_labels = rng.integers(0, 3, 15).astype(np.int32)
    ranking = np.stack([rng.permutation(15) for _ in range(4)]).astype(np.int32)
    got = map_at_all(ranking, q_labels, g_labels)
    ref, ref_sk = [], []
    for q in range(4):
        ap = _np_average_precision(g_labels[ranking[q]], q_labels[q])
        if ap is not None:
            ref.append(ap)
            score = np.empty(15)
            score[ranking[q]] = -np.arange(15)  # rank 1 gets the highest score
            ref_sk.append(average_precision_score(g_labels == q_labels[q], score))
    assert got == pytest.approx(np.mean(ref), abs=1e-12)
    assert got == pytest.approx(np.mean(ref_sk), abs=1e-12)
    # a perfect ranking has mAP 1
    perfect = np.stack([np.argsort(g_labels != c, kind="stable") for c in (0, 1, 2)]).astype(np.int32)
    assert map_at_all(perfect, np.array([0, 1, 2], np.int32), g_labels) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="neighbor_indices must rank the whole gallery"):
        map_at_all(ranking[:, :5], q_labels, g_labels)


@pytest.mark.slow  # > 9 s; the suite's 10-minute budget (run with -m slow)
@pytest.mark.parametrize("task", ["multilabel", "cross_modal"])
def test_run_is_deterministic_and_finite(task, tmp_path):
    a = run(_tiny(task), tmp_path)
    b = _cached(task)
    assert _without_time(a) == _without_time(b)
    assert all(np.isfinite(v) for v in a.values())
    keys = ({"precision@1", "map@10", "ndcg@10", "raw_ndcg@10", "positive_pair_fraction"} if task == "multilabel"
            else {"recall@1", "recall@10", "map_at_r", "map_at_all"})
    assert keys <= set(a)
    for k in keys:
        assert 0.0 <= a[k] <= 1.0
    assert json.loads((tmp_path / "final.json").read_text()) == pytest.approx(a)
    assert (tmp_path / "config.json").exists()


@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
def test_multilabel_sampling_sees_more_positive_pairs_than_first_label_baseline():
    multi = _cached("multilabel")
    first = _cached("multilabel", ("loss.label_mode", "first"))
    # same batches; items sharing a non-first label are positives only in the multi-label mode
    assert multi["positive_pair_fraction"] > first["positive_pair_fraction"] + 0.05
    assert multi["raw_ndcg@10"] == first["raw_ndcg@10"]  # same data
    assert multi["final_loss"] != first["final_loss"]


def test_single_label_data_makes_both_modes_identical():
    # with one label per item the first label is the label set: the modes must coincide exactly
    multi = _cached("multilabel", ("data.max_labels", 1))
    first = _cached("multilabel", ("data.max_labels", 1), ("loss.label_mode", "first"))
    assert _without_time(multi) == _without_time(first)
    assert multi["positive_pair_fraction"] < _cached("multilabel")["positive_pair_fraction"]


def test_cross_modal_minings_differ():
    aware = _cached("cross_modal")
    plain = _cached("cross_modal", ("loss.mining", "batch_hard"))
    assert aware["final_loss"] != plain["final_loss"]
    assert aware["map_at_all"] != plain["map_at_all"]


@pytest.mark.parametrize("task,key,value,match", [
    ("multilabel", "task", "segmentation", "config.task"),
    ("multilabel", "loss.label_mode", "all", "config.loss.label_mode"),
    ("multilabel", "loss.mining", "semihard", "config.loss.mining"),
    ("multilabel", "optim.batch_size", 1000, "config.optim.batch_size"),
    ("multilabel", "loss.margin", -0.1, "config.loss.margin"),
    ("cross_modal", "loss.mining", "informative", "config.loss.mining"),
    ("cross_modal", "sampler.classes_per_batch", 50, "config.sampler"),
    ("cross_modal", "optim.num_steps", 0, "config.optim.num_steps"),
    ("cross_modal", "seed", -1, "config.seed"),
])
def test_bad_config_raises(task, key, value, match):
    config = _tiny(task)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        run(config, None)


@pytest.mark.slow
def test_default_configs_show_the_expected_effects():
    """Full default configs (~10 s each): multi-label selection beats the first-label baseline,
    and the learned embeddings beat the raw features that the nuisance dims mislead."""
    multi = run(get_config("synthetic_multilabel"), None)
    baseline = get_config("synthetic_multilabel")
    baseline.loss.label_mode = "first"
    first = run(baseline, None)
    assert multi["ndcg@10"] > first["ndcg@10"] + 0.05
    assert multi["precision@10"] > multi["raw_precision@10"]

