"""Every method and trainer flag of experiments/train.py end to end, and the stateful train step.

End-to-end runs use the "toy" data source (8x8 synthetic images, 8 training / 4 unseen classes),
a 2-block conv-net and 2-3 steps: they check the wiring (finite metrics, the flag really acts),
not accuracy. The step-level tests compare against independent computations: a stateful
objective under data parallelism equals the single-device step, a resumed run ends with the
same ``loss_state`` as an uninterrupted one, distillation adds exactly RKD of the teacher's
embeddings, XBM equals `dmljax.memory.xbm_loss`, the global-local loss equals
`dmljax.models.attention.global_local_hybrid_loss`.
"""

from __future__ import annotations

import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmljax.data import sources
from dmljax.train import builders
from dmljax.train import cli
from dmljax.train import evaluation
from dmljax.train import loss_registry
from dmljax.train import objective
from dmljax.configs import get_config
from tests.utils import Interrupted, fit_with_interrupt, max_tree_diff

TOY = ["data.name=toy", "data.image_size=8", "model.channels=(4,8)", "model.num_pools=2",
       "model.embedding_dim=8", "sampler.classes_per_batch=4", "sampler.samples_per_class=4",
       "optim.num_steps=2", "optim.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=100",
       "train.log_every=1", "train.final_nmi=False", "train.progress=False", "eval.tta_shifts=((0,0),)",
       "eval.final_tta_shifts=()", "eval.precise_bn_batches=0", "sampler.name=m_per_class"]


def _main(workdir, *sets, resume=False):
    argv = ["--workdir", str(workdir)]
    for s in (*TOY, *sets):
        argv += ["--set", s]
    return cli.main(argv + (["--resume"] if resume else []))


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _check_finite_run(workdir, final, num_steps=2):
    for name in ("recall@1", "recall@2", "map_at_r", "r_precision"):
        assert np.isfinite(final[name]) and 0.0 <= final[name] <= 1.0, (name, final[name])
    losses = [r["loss"] for r in _records(workdir) if "loss" in r]
    assert len(losses) == num_steps and all(np.isfinite(losses)), losses


def _config(*sets):
    return cli.apply_overrides(get_config("omniglot"), list(TOY) + list(sets))


def _load_data(config):
    source = sources.load_data_source(config)
    return source.train_images, source.train_labels, source.num_classes, source, source.one_shot_runs


def _toy_state(config, teacher=None):
    images, labels, num_classes, _, _ = _load_data(config)
    sampler = builders.build_sampler(config, labels)
    state, objective = builders.build_train_state(config, num_classes=num_classes, num_train=len(labels),
                                           steps_per_epoch=sampler.steps_per_epoch, teacher=teacher)
    return state, objective, images, labels, sampler


_max_diff = max_tree_diff


# ----------------------------------------------------------------------------- methods end to end
METHOD_SETS = {
    "daml": ["method.options.margin=0.2"],
    "hard_sample_generation": [],
    "iaa": ["method.options.num_augment=2"],
    "das": [],
    "divide_conquer": ["method.options.num_learners=2", "method.options.recluster_every=1",
                       "loss.name=contrastive"],
    "alternating_projection": ["method.options.repeat=2", "method.options.representatives_per_class=2"],
    "bspml": ["data.label_noise=0.25"],
}


# divide_conquer (loop hooks + k-means) runs by default; the others are marked slow (-m slow)
@pytest.mark.parametrize("method", [m if m == "divide_conquer" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in sorted(METHOD_SETS)])
def test_method_trains_end_to_end(tmp_path, capsys, method):
    final = _main(tmp_path, f"method.name={method}", *METHOD_SETS[method])
    _check_finite_run(tmp_path, final)
    with open(tmp_path / "run_info.json") as f:
        info = json.load(f)
    assert info["method"] == method
    out = capsys.readouterr().out
    if method == "divide_conquer":  # re-clustered before each of the 2 steps, all 64 items assigned
        sizes = [line for line in out.splitlines() if "k-means re-clustering" in line]
        assert len(sizes) == 2 and all(sum(json.loads(s.split("sizes ")[1])) == 64 for s in sizes)
    if method == "bspml":
        assert info["label_noise_fraction"] == pytest.approx(0.25)


def test_alternating_projection_uses_repeated_batches():
    c = _config("method.name=alternating_projection", "method.options.repeat=3",
                "method.options.representatives_per_class=2")
    _, labels, _, _, _ = _load_data(c)
    sampler = builders.build_sampler(c, labels)
    b = [sampler.batch_indices(s) for s in range(4)]
    reps = np.tile(np.arange(4) < 2, 4)  # first 2 of each class are the block's representatives
    assert np.array_equal(b[0][reps], b[2][reps]) and not np.array_equal(b[0][reps], b[3][reps])
    assert type(builders.build_sampler(_config(), labels)).__name__ == "MPerClassSampler"


def test_label_noise_corrupts_the_requested_fraction():
    c = _config("data.label_noise=0.25", "data.label_noise_kind=pairflip")
    _, labels, num_classes, _, _ = _load_data(c)
    noisy = sources.add_label_noise(c, labels, num_classes)
    flipped = noisy != labels
    assert flipped.sum() == 16  # round(0.25 * 64)
    assert np.array_equal(noisy[flipped], (labels[flipped] + 1) % num_classes)
    assert np.array_equal(sources.add_label_noise(_config(), labels, num_classes), labels)


# ----------------------------------------------------------------------------- loss registry
@pytest.mark.slow  # the registry's calls are checked by the cheap tests below
@pytest.mark.parametrize("sets", [
    ("loss.name=arcface", "loss.options.margin=0.3", "loss.options.scale=16.0"),  # learnable class weights
    ("loss.name=margin",),  # needs a PRNG key (distance-weighted sampling) and a learnable beta
    ("loss.name=center",),  # centers carried as loss_state, moved by the update rule
], ids=["arcface", "margin", "center"])
def test_registry_loss_trains_end_to_end(tmp_path, sets):
    _check_finite_run(tmp_path, _main(tmp_path, *sets))


def test_every_registered_loss_builds():
    names = loss_registry.available_losses()
    assert {"proxy_anchor", "multi_similarity", "triplet", "arcface", "soft_triple", "contrastive",
            "ensemble"} <= set(names)
    for name in names:
        if name == "ensemble":
            continue
        opts = {"k": 2} if name == "surrogate_precision_at_k" else {}
        spec = loss_registry.build_single_loss(name, opts, num_classes=4, dim=8, key=jax.random.key(0))
        assert callable(spec.call) and all(np.all(np.isfinite(np.asarray(p))) for p in spec.params)


@pytest.mark.parametrize("name", ["contrastive", "soft_triple", "margin", "center", "dynamic_soft_margin"])
def test_registry_loss_values_match_the_library(name):
    """The registry calls the library function with the configured options and arrays."""
    import dmljax.losses as L
    from dmljax.losses.classification import center_update
    from dmljax.losses.margin_family import dynamic_soft_margin_loss
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 8)))
    y = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)
    key = jax.random.key(1)
    opts = {"contrastive": {"neg_margin": 0.7}, "soft_triple": {"la": 10.0, "centers_per_class": 2},
            "margin": {"nu": 0.1}, "center": {"alpha": 0.3}, "dynamic_soft_margin": {"num_bins": 6}}[name]
    spec = loss_registry.build_single_loss(name, dict(opts), num_classes=4, dim=8, key=jax.random.key(0))
    value, state = spec.call(spec.params, spec.state, x, y, key)
    if name == "contrastive":
        want, want_state = L.contrastive_loss(x, y, neg_margin=0.7), ()
    elif name == "soft_triple":
        assert spec.params[0].shape == (4, 2, 8)
        want, want_state = L.soft_triple_loss(x, y, spec.params[0], la=10.0), ()
    elif name == "margin":
        assert spec.params[0].shape == (4,) and np.allclose(spec.params[0], 1.2)
        want, want_state = L.margin_loss(x, y, spec.params[0], nu=0.1, key=key), ()
    elif name == "center":
        want = L.center_loss(x, y, spec.state)
        want_state = center_update(spec.state, x, y, alpha=0.3)
    else:
        want, want_state = dynamic_soft_margin_loss(x, y, jnp.zeros(6), num_bins=6)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    assert _max_diff(state, want_state) < 1e-9 if jax.tree.leaves(want_state) else state == ()


def test_registry_covers_every_exported_training_loss():
    """Every ``*_loss`` export of dmljax.losses is a registry entry or listed as not trainable
    (a new loss must be added to one of the two explicitly)."""
    import dmljax.losses as L
    public = {n for n in dir(L) if not n.startswith("_") and callable(getattr(L, n))}
    exported = {n for n in public if n.endswith("_loss")}
    registered = set(loss_registry.LOSSES) | set(loss_registry.NOT_TRAINABLE_LOSSES)
    assert exported - registered == set(), "exported losses missing from dmljax.train.loss_registry.LOSSES"
    assert set(loss_registry.LOSSES) | set(loss_registry.NOT_TRAINABLE_LOSSES) <= public
    assert all(getattr(L, n) is e.fn for n, e in loss_registry.LOSSES.items())


def test_loss_options_come_from_loss_options_only():
    c = _config("loss.name=multi_similarity", "loss.options.beta=40.0", "loss.options.mining=False")
    loss_fn, params = loss_registry.build_loss(c, 4, jax.random.key(0))
    assert params == () and loss_fn.keywords == {"beta": 40.0, "mining": False}
    c = _config("loss.name=proxy_anchor", "loss.options.margin=0.2")
    loss_fn, (proxies,) = loss_registry.build_loss(c, 5, jax.random.key(0))
    assert loss_fn.keywords == {"margin": 0.2} and proxies.shape == (5, 8)
    c = _config("loss.name=triplet", "loss.options.mining=batch_hard")
    assert loss_registry.build_loss(c, 4, jax.random.key(0))[0].keywords == {"mining": "batch_hard"}
    # the default run stays on the plain loss_fn path of the train step
    obj = objective.build_objective(_config(), num_classes=4, num_train=64, dim=8, batch_size=16, steps_per_epoch=4,
                                    key=jax.random.key(0))
    assert obj.loss_fn is not None and obj.method_fn is None and obj.loss_state is None


def test_proxy_anchor_init_is_the_heads():
    """The trainer's proxies are ProxyAnchorHead's (kaiming normal, fan-out: N(0, 2 / C))."""
    from flax import nnx

    from dmljax.models.proxies import ProxyAnchorHead
    key = jax.random.key(3)
    spec = loss_registry.build_single_loss("proxy_anchor", {}, num_classes=50, dim=16, key=key)
    head = ProxyAnchorHead(50, 16, rngs=nnx.Rngs(params=key))
    np.testing.assert_array_equal(np.asarray(spec.params[0]), np.asarray(head.proxies[...], np.float32))
    assert abs(float(np.std(spec.params[0])) - np.sqrt(2.0 / 50)) < 0.02


def test_bad_loss_and_method_configuration():
    with pytest.raises(ValueError, match="loss.name 'nope' .*contrastive.*triplet"):
        loss_registry.resolve_loss_name("nope")
    with pytest.raises(ValueError, match="log_ratio: takes continuous targets"):
        loss_registry.resolve_loss_name("log_ratio")
    with pytest.raises(ValueError, match=r"loss.options.marg is not an option of contrastive_loss"):
        loss_registry.build_loss(_config("loss.name=contrastive", "loss.options.marg=1"), 4, jax.random.key(0))
    with pytest.raises(ValueError, match="needs loss.options.k"):
        loss_registry.build_loss(_config("loss.name=surrogate_precision_at_k"), 4, jax.random.key(0))

    def build(*sets):
        return objective.build_objective(_config(*sets), num_classes=8, num_train=64, dim=8, batch_size=16,
                                         steps_per_epoch=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="method.name"):
        build("method.name=magic")
    with pytest.raises(ValueError, match="method.options"):
        build("method.options.margin=0.1")
    with pytest.raises(ValueError, match="options not used by method 'iaa'"):
        build("method.name=iaa", "method.options.margn=0.1")
    with pytest.raises(ValueError, match="divide_conquer.*learnable arrays"):
        build("method.name=divide_conquer", "loss.name=proxy_anchor")
    with pytest.raises(ValueError, match="memory.size"):
        build("memory.size=32", "method.name=iaa")
    with pytest.raises(ValueError, match="memory.size"):
        build("memory.size=32", "loss.name=proxy_anchor")
    with pytest.raises(ValueError, match="memory.size .* must be >= the batch size"):
        build("memory.size=8")
    with pytest.raises(ValueError, match="loss.components"):
        build("loss.name=ensemble")
    with pytest.raises(ValueError, match="unknown config key"):
        _config("method.magic=1")
    with pytest.raises(ValueError, match="unknown config key 'optim.num_step'; did you mean 'optim.num_steps'"):
        _config("optim.num_step=3")
    with pytest.raises(ValueError, match="did you mean 'multi_similarity'"):
        loss_registry.resolve_loss_name("multi_similarty")


# ----------------------------------------------------------------------------- ensemble
def test_ensemble_learns_and_logs_its_weights(tmp_path):
    final = _main(tmp_path, "loss.name=ensemble", "loss.components=['multi_similarity','contrastive']",
                  "optim.loss_lr_mult=100.0")
    _check_finite_run(tmp_path, final)
    logged = [r for r in _records(tmp_path) if "loss" in r]
    keys = ("loss_weight/0_multi_similarity", "loss_weight/1_contrastive")
    assert all(k in r for r in logged for k in keys)
    # uncertainty weights start at 0.5 exp(0) and move with training
    assert all(abs(final[k] - 0.5) > 1e-4 for k in keys)
    assert final[keys[0]] == pytest.approx(logged[-1][keys[0]])


def test_ensemble_value_is_the_weighted_sum():
    import dmljax.losses as L
    from dmljax.losses.ensemble import weighted_loss_ensemble
    c = _config("loss.name=ensemble",
                "loss.components=['triplet', {'name': 'proxy_nca', 'options': {'temperature': 0.2}}]",
                "loss.options.method=softmax", "loss.options.entropy_weight=0.5")
    spec = loss_registry.build_loss_spec(c, num_classes=4, dim=8, key=jax.random.key(0))
    raw, proxies = jnp.asarray([0.3, -0.2]), spec.params[1]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)))
    y = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)
    got = spec.plain(x, y, raw, proxies)
    parts = [L.triplet_margin_loss(x, y), L.proxy_nca_loss(x, y, proxies, temperature=0.2)]
    want, _ = weighted_loss_ensemble(parts, raw, method="softmax", entropy_weight=0.5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-9)


# ----------------------------------------------------------------------------- memory (XBM)
@pytest.mark.slow  # test_memory_objective_matches_xbm_... checks the objective itself
def test_memory_trains_end_to_end(tmp_path):
    _check_finite_run(tmp_path, _main(tmp_path, "memory.size=32", "loss.name=contrastive"))


@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
def test_memory_objective_matches_xbm_and_the_concatenation_fallback():
    from dmljax.losses.contrastive_family import supcon_loss
    from dmljax.memory import xbm_enqueue, xbm_loss
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.normal(size=(16, 8))) for _ in range(3)]
    y = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)
    key = jax.random.key(0)

    def objective(*sets):
        return objective.build_objective(_config("memory.size=40", *sets), num_classes=8, num_train=64, dim=8,
                                 batch_size=16, steps_per_epoch=4, key=jax.random.key(0))
    obj = objective("loss.name=contrastive", "loss.options.neg_margin=0.8", "memory.start_step=1")
    state, ref = obj.loss_state, obj.loss_state["memory"]
    fn = jax.jit(obj.method_fn)
    for step, x in enumerate(xs):
        value, state = fn(obj.loss_params, state, x, y, key, jnp.int32(step))
        want, ref = xbm_loss("contrastive", x, y, ref, neg_margin=0.8, use_memory=step >= 1)
        np.testing.assert_allclose(float(value), float(want), rtol=1e-9)
    assert _max_diff(state["memory"], ref) == 0.0 and int(ref.pointer) == 8  # 48 items in 40 slots

    obj = objective("loss.name=supcon")  # no query x memory form: batch + previous memory as one set
    state, mem = obj.loss_state, obj.loss_state["memory"]
    fn = jax.jit(obj.method_fn)
    for step, x in enumerate(xs):
        value, state = fn(obj.loss_params, state, x, y, key, jnp.int32(step))
        filled = np.asarray(mem.valid)
        want = supcon_loss(jnp.concatenate([x, mem.embeddings[filled]]), jnp.concatenate([y, mem.labels[filled]]),
                           temperature=0.1)
        np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
        mem = xbm_enqueue(mem, x, y)
    assert _max_diff(state["memory"], mem) == 0.0


# ----------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    _main(d, "model.channels=(8,16)", "model.embedding_dim=16", "loss.name=proxy_anchor")
    return d


@pytest.mark.slow  # test_distillation_step_adds_rkd_of_the_teacher_embeddings checks the wiring cheaper
def test_distillation_trains_a_smaller_student(tmp_path, teacher_dir, capsys):
    final = _main(tmp_path, f"distill.teacher={teacher_dir}", "distill.weight=2.0", "model.channels=(2,4)",
                  "model.embedding_dim=4")
    _check_finite_run(tmp_path, final)
    assert f"teacher: {teacher_dir} (step 2)" in capsys.readouterr().out


@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
def test_distillation_step_adds_rkd_of_the_teacher_embeddings(teacher_dir):
    from dmljax.losses.distillation import rkd_angle_loss, rkd_distance_loss
    from dmljax.losses.weighted import multi_similarity_loss
    from dmljax.train.state import merge_model
    from dmljax.train.step import train_step
    c = _config(f"distill.teacher={teacher_dir}", "distill.weight=0.5", "distill.angle_weight=3.0",
                "augment.enabled=False")
    teacher, _ = builders.load_teacher(str(teacher_dir), num_classes=8, num_train=64)
    state, _, images, labels, sampler = _toy_state(c, teacher=teacher)
    idx = sampler.batch_indices(0)
    batch = {"images": jnp.asarray(images[idx]), "labels": jnp.asarray(labels[idx])}
    # independent forward passes: the teacher in eval mode, the student in train mode
    t_emb = teacher(batch["images"])
    s_emb = merge_model(state, train=True)(batch["images"])
    want = (multi_similarity_loss(s_emb, batch["labels"], alpha=2.0, beta=50.0, base=0.5, epsilon=0.1)
            + 0.5 * (rkd_distance_loss(s_emb, t_emb) + 3.0 * rkd_angle_loss(s_emb, t_emb)))
    _, metrics = jax.jit(train_step)(state, batch, jax.random.key(0))
    np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
    assert float(0.5 * rkd_distance_loss(s_emb, t_emb)) > 1e-3  # the teacher term is not negligible


# ----------------------------------------------------------------------------- global + local
@pytest.mark.slow
def test_global_local_backbone_trains_end_to_end(tmp_path):
    final = _main(tmp_path, "model.backbone=global_local", "loss.name=hybrid_pair_proxy",
                  "model.global_local.local_dim=4", "model.global_local.local_embedding_dim=6")
    _check_finite_run(tmp_path, final)


def test_global_local_loss_is_the_hybrid_loss_of_both_parts():
    from dmljax.models.attention import global_local_hybrid_loss
    c = _config("model.backbone=global_local", "loss.name=hybrid_pair_proxy", "loss.options.pair_weight=0.5",
                "model.global_local.local_embedding_dim=6", "model.global_local.local_weight=0.7")
    obj = objective.build_objective(c, num_classes=4, num_train=64, dim=8, batch_size=16, steps_per_epoch=4,
                            key=jax.random.key(0))
    gp, lp = obj.loss_params
    assert gp.shape == (4, 8) and lp.shape == (4, 6)
    rng = np.random.default_rng(0)
    g, l = jnp.asarray(rng.normal(size=(16, 8))), jnp.asarray(rng.normal(size=(16, 6)))
    y = jnp.asarray(np.repeat(np.arange(4), 4), jnp.int32)
    got = obj.loss_fn(jnp.concatenate([g, l], 1), y, gp, lp)
    want = global_local_hybrid_loss(g, l, y, gp, lp, local_weight=0.7, hybrid_kwargs={"pair_weight": 0.5})
    np.testing.assert_allclose(float(got), float(want), rtol=1e-9)


# ----------------------------------------------------------------------------- re-ranking
@pytest.mark.slow  # > 9 s; the suite's 10-minute budget (run with -m slow)
def test_rerank_report_is_merged_into_the_final_table(tmp_path, monkeypatch):
    seen = {}

    def rerank_report(*, train_embeddings, train_labels, test_embeddings, test_labels, key, config):
        seen.update(train=np.shape(train_embeddings), train_labels=np.asarray(train_labels),
                    test=np.shape(test_embeddings), test_labels=np.asarray(test_labels), k=config.eval.rerank_k)
        return {"recall@1_rerank": 0.75, "map_at_r_rerank": 0.5}
    module = types.ModuleType("dmljax.train.rerank")
    module.rerank_report = rerank_report
    monkeypatch.setitem(sys.modules, "dmljax.train.rerank", module)
    final = _main(tmp_path, "eval.rerank=similarity", "eval.rerank_k=5", "data.label_noise=0.25")
    assert final["recall@1_rerank"] == 0.75 and final["map_at_r_rerank"] == 0.5
    assert seen["train"] == (64, 8) and seen["test"] == (32, 8) and seen["k"] == 5
    # the labels the model was trained on (noisy) and the clean test labels
    assert 0 < np.sum(seen["train_labels"] != np.repeat(np.arange(8), 8)) == 16
    assert np.array_equal(seen["test_labels"], np.repeat(np.arange(4), 8))
    with pytest.raises(ValueError, match="eval.rerank"):
        _main(tmp_path / "bad", "eval.rerank=magic")


@pytest.mark.slow
def test_real_entry_and_rerank_modules(tmp_path):
    """The synthetic task's entry point (same --set syntax) and the real re-ranking module."""
    from experiments import synthetic
    out = synthetic.main(["--config", "synthetic_multilabel", "--workdir", str(tmp_path / "syn"),
                          "--set", "optim.num_steps=20"])
    assert out and all(np.isfinite(v) for v in out.values())
    final = _main(tmp_path / "rr", "eval.rerank=similarity", "eval.rerank_steps=20", "eval.rerank_k=4")
    assert any(k.endswith("_rerank") for k in final)
    assert all(np.isfinite(v) for v in final.values() if np.ndim(v) == 0)


# ----------------------------------------------------------------------------- the stateful step
def test_parallel_stateful_step_equals_single_device():
    """IAA (class statistics in loss_state, random synthesis with the loss key) on 8 fake devices."""
    from dmljax.train.step import data_mesh, make_parallel_train_step, train_step
    assert jax.device_count() >= 8, "tests/conftest.py must force 8 host devices"
    c = _config("method.name=iaa", "method.options.num_augment=2", "optim.optimizer=sgd",
                "model.head_norm=batch", "augment.enabled=False")
    state, _, images, labels, sampler = _toy_state(c)
    parallel = make_parallel_train_step(data_mesh(jax.devices()[:8]))
    single = jax.jit(train_step)
    s1, s8 = state, state
    for step in range(2):
        idx = sampler.batch_indices(step)
        batch = {"images": jnp.asarray(images[idx]), "labels": jnp.asarray(labels[idx])}
        key = jax.random.key(step)
        s1, m1 = single(s1, batch, key)
        s8, m8 = parallel(s8, batch, key)
        np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
    change = _max_diff(s1.loss_state, state.loss_state)
    assert change > 1e-3  # the class statistics moved
    assert _max_diff(s8.loss_state, s1.loss_state) <= 1e-5 * change + 1e-7
    p_change = _max_diff(s1.params, state.params)
    assert _max_diff(s8.params, s1.params) <= 1e-4 * p_change + 1e-6


@pytest.mark.parametrize("sets", [pytest.param(("method.name=das",), marks=pytest.mark.slow),
                                  ("method.name=divide_conquer", "method.options.num_learners=2",
                                   "method.options.recluster_every=3", "loss.name=contrastive")],
                         ids=["das", "divide_conquer"])
def test_loss_state_survives_resume(tmp_path, sets):
    """Killed after step 5 (latest checkpoint: step 4), resumed: same params and loss_state as an
    uninterrupted 6-step run (divide and conquer: the step-3 clusters come from the checkpoint)."""
    from dmljax.train.loop import KMeansReclustering
    from dmljax.train.step import train_step
    c = _config(*sets, "optim.num_steps=6")
    step_fn = jax.jit(train_step)
    fresh, obj, images, labels, sampler = _toy_state(c)  # one template: the step compiles once

    def run(directory, *, resume=False, stop_after=None):
        hooks = {}
        if obj.method == "divide_conquer":
            rc = KMeansReclustering(images, num_clusters=2, every=obj.recluster_every, key=jax.random.key(5))
            hooks = {"before_step": rc.before_step, "batch_extras": rc.batch_extras}
        return fit_with_interrupt(directory, fresh, stop_after=stop_after, resume=resume, images=images,
                                  labels=labels, sampler=sampler, num_steps=6, key=jax.random.key(1),
                                  step_fn=step_fn, **hooks)

    reference = run(tmp_path / "full")
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", stop_after=5)
    resumed = run(tmp_path / "cut", resume=True)
    assert int(resumed.step) == 6
    assert _max_diff(resumed.loss_state, reference.loss_state) < 1e-6
    assert _max_diff(resumed.params, reference.params) < 1e-6
    assert _max_diff(fresh.loss_state, reference.loss_state) > 1e-3 or \
        not np.array_equal(fresh.loss_state["clusters"], reference.loss_state["clusters"])


def test_apply_overrides_options_are_free_form():
    c = _config("method.options.margin=0.3", "loss.options.mining=False")
    assert c.method.options.margin == 0.3 and c.loss.options.mining is False
    with pytest.raises(ValueError, match="unknown config key 'loss.magic'"):
        _config("loss.magic=1")


# ----------------------------------------------------------------------------- PreciseBN flag
def test_precise_bn_flag_evaluates_with_recomputed_statistics(tmp_path):
    from dmljax.train.precise_bn import precise_batch_norm

    sets = ("eval.precise_bn_batches=2", "eval.precise_bn_batch_size=8")
    config = _config(*sets)
    state, _, images, _, _ = _toy_state(config)
    key = jax.random.key(5)
    for_eval = evaluation.make_eval_state_fn(config, images, key=key)
    expected = precise_batch_norm(state, images, key=key, num_batches=2, batch_size=8)
    assert _max_diff(for_eval(state).batch_stats, expected.batch_stats) == 0
    assert _max_diff(for_eval(state).batch_stats, state.batch_stats) > 0
    assert for_eval(state) is for_eval(state)  # the last state's statistics are computed once
    off = evaluation.make_eval_state_fn(_config("eval.precise_bn_batches=0"), images, key=key)
    assert off(state) is state
    with pytest.raises(ValueError, match="^eval.precise_bn_batches"):
        evaluation.make_eval_state_fn(_config("eval.precise_bn_batches=-1"), images, key=key)
    final = _main(tmp_path, *sets)
    _check_finite_run(tmp_path, final)
