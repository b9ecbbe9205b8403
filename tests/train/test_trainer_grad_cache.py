"""``train.embed_chunk_size``: the trainer's gradient-caching step (`dmljax.train.grad_cache`).

End to end on the toy source (batch 16, 2-block conv-net): a chunked run logs the same losses
as the unchunked one when the chunked forward pass computes the same embeddings (frozen BN, or
one chunk per device under data parallelism), and the bad values / combinations raise.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from dmljax.train import builders
from tests.train.test_trainer import _config, _main, _records, _toy_state

STEPS = ["optim.num_steps=3", "train.eval_every=0"]


def _losses(workdir):
    return np.array([r["loss"] for r in _records(workdir) if "loss" in r])


def _run(tmp_path, name, *sets):
    workdir = tmp_path / name
    final = _main(workdir, *STEPS, *sets)
    return _losses(workdir), final, workdir


def test_chunked_run_equals_unchunked_with_frozen_batch_norm(tmp_path):
    plain, final_plain, _ = _run(tmp_path, "plain", "optim.freeze_batch_norm=True")
    chunked, final_chunked, workdir = _run(tmp_path, "chunked", "optim.freeze_batch_norm=True",
                                           "train.embed_chunk_size=4", "train.embed_chunk_unroll=True")
    assert len(plain) == 3 and np.all(np.isfinite(plain))
    np.testing.assert_allclose(chunked, plain, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(final_chunked["recall@1"], final_plain["recall@1"], atol=1e-6)
    with open(workdir / "run_info.json") as f:
        info = json.load(f)
    assert info["embed_chunk_size"] == 4 and info["embed_chunks_per_step"] == 4


@pytest.mark.slow  # ~17 s; chunked == unchunked is covered by the frozen-BN and data-parallel tests
def test_chunked_batch_norm_differs_per_chunk_but_one_chunk_matches(tmp_path):
    """BN in train mode: chunks of 4 normalise with their own statistics (different losses after
    the first update), a single chunk of the whole batch is the plain step."""
    plain, _, _ = _run(tmp_path, "plain")
    whole, _, _ = _run(tmp_path, "whole", "train.embed_chunk_size=16")
    np.testing.assert_allclose(whole, plain, rtol=1e-4, atol=1e-6)
    chunked, _, _ = _run(tmp_path, "chunked", "train.embed_chunk_size=4", "train.embed_chunk_unroll=True")
    assert np.all(np.isfinite(chunked))
    assert not np.allclose(chunked, plain, rtol=1e-4, atol=1e-6)


def test_data_parallel_one_chunk_per_device_equals_parallel_step(tmp_path):
    if jax.local_device_count() < 2:
        pytest.skip("needs the suite's forced host devices")
    devices = jax.local_devices()[:4]
    config = _config("train.data_parallel=True", "train.embed_chunk_size=4")
    state, _, images, labels, sampler = _toy_state(config)
    batch = {"images": images[:16], "labels": np.asarray(labels[:16], np.int32)}
    key = jax.random.key(3)
    cached = builders.build_step_fn(config, state, devices=devices)
    reference = builders.build_step_fn(_config("train.data_parallel=True"), state, devices=devices)
    (s1, m1), (s2, m2) = cached(state, batch, key), reference(state, batch, key)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value, match", [
    (0, "train.embed_chunk_size must be a positive integer"),
    (2.0, "train.embed_chunk_size must be a positive integer"),
    (True, "train.embed_chunk_size must be a positive integer"),
    (5, r"train.embed_chunk_size \(5\) must divide the per-device batch size 16"),
])
def test_bad_chunk_size_raises(value, match):
    config = _config()
    with config.unlocked():
        config.train.embed_chunk_size = value
    with pytest.raises(ValueError, match=match):
        builders.embed_chunk_options(config)


def test_chunk_must_divide_the_per_device_batch():
    config = _config("train.embed_chunk_size=8")
    assert builders.embed_chunk_options(config)["num_chunks"] == 2
    with pytest.raises(ValueError, match=r"per-device batch size 4 .*4 devices"):
        builders.embed_chunk_options(config, num_devices=4)


@pytest.mark.parametrize("sets", [["method.name=daml", "method.options.margin=0.2"], ["memory.size=64"]])
def test_stateful_objective_raises(sets):
    config = _config("train.embed_chunk_size=4", *sets)
    state, _, _, _, _ = _toy_state(config)
    with pytest.raises(ValueError, match="train.embed_chunk_size .*needs a plain loss"):
        builders.build_step_fn(config, state)
