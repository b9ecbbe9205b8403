"""The train-step benchmark runs end to end at a tiny size on 1 and 2 (fake CPU) devices, and its
data-parallel step equals its single-device step on the same global batch (no timing asserts)."""

import json

import jax
import numpy as np
import pytest

from experiments.bench import train_step as bench

TINY = ["--model", "convnet", "--image-size", "16", "--batch", "8", "--steps", "2", "--warmup", "1",
        "--dtype", "float32", "--classes", "10", "--dim", "16", "--convnet-channels", "8,16"]


@pytest.mark.slow  # > 9 s; the suite's 10-minute budget (run with -m slow)
def test_bench_writes_rows_for_one_and_two_devices(tmp_path, monkeypatch):
    # machine_info imports torch when installed: seconds of CPU that say nothing here
    monkeypatch.setattr(bench, "machine_info", lambda: {"stub": True})
    assert jax.device_count() >= 2, "tests/conftest.py must force several host devices"
    out = tmp_path / "train_step.json"
    payload = bench.main(TINY + ["--devices", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(payload["rows"]) == 4
    assert {(r["mode"], r["devices"]) for r in rows} == {(m, n) for m in ("softmax", "dml") for n in (1, 2)}
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, errors
    for r in rows:
        assert r["images_per_s"] > 0 and r["loss_finite"], r
        assert r["global_batch"] == 8 * r["devices"]
        assert ("dml_over_softmax" in r) == (r["mode"] == "dml")
        assert ("scaling_efficiency" in r) == (r["devices"] == 2)
    assert {r["loss"] for r in rows} == {"softmax_ce", "multi_similarity"}


def _one_step(mode, loss, num_devices, images, labels):
    args = bench.parse_args(TINY + ["--loss", loss, "--optimizer", "sgd", "--lr", "0.1"])
    tx = bench.make_optimizer(args.optimizer, args.lr)
    if mode == "softmax":
        fn, loss_params, gather = bench.softmax_cross_entropy, (), False
    else:
        fn, init = bench._loss_factory(args.loss, args.classes, args.dim)
        loss_params, gather = init(jax.random.key(1)), True
    graphdef, state = bench.init_state(bench.build_model(mode, args), tx, loss_params)
    step = bench.make_step(graphdef, tx, fn, gather=gather, axis_name=bench.AXIS if num_devices > 1 else None,
                           sync_batch_norm=True)
    step_fn, place = bench.compile_step(step, jax.devices()[:num_devices])
    new_state, value = step_fn(*place(state, images, labels))
    return jax.device_get(new_state), float(value)


# proxy anchor: gathered embeddings AND a learnable loss array (proxies) replicated over devices
@pytest.mark.slow  # 7-16 s; the suite's 10-minute budget (covered by faster unit tests): -m slow
@pytest.mark.parametrize("mode,loss", [("softmax", "multi_similarity"), ("dml", "proxy_anchor")])
def test_parallel_step_equals_single_device_step(mode, loss):
    # the gathered loss is scaled by 1/N and the per-device CE too: a missing or double
    # scaling of the gradient shows up as a factor-2 difference in the parameter update
    images, labels = bench.synthetic_batch(8, 16, np.float32, 10, 2, seed=3)
    single_state, single_loss = _one_step(mode, loss, 1, images, labels)
    parallel_state, parallel_loss = _one_step(mode, loss, 2, images, labels)
    np.testing.assert_allclose(parallel_loss, single_loss, rtol=1e-5)
    single_leaves = jax.tree.leaves(single_state["params"])
    parallel_leaves = jax.tree.leaves(parallel_state["params"])
    assert len(single_leaves) == len(parallel_leaves)
    for a, b in zip(single_leaves, parallel_leaves):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(single_state["batch_stats"]), jax.tree.leaves(parallel_state["batch_stats"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("extra", [["--devices", "4096"], ["--loss", "no_such_loss"], ["--batch", "0"]])
def test_bad_arguments_exit(extra):
    with pytest.raises(SystemExit):
        bench.parse_args(TINY + extra)
