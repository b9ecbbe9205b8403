"""dmljax.export: the embedder artefact runs in a fresh process without dmljax's model code."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from flax import nnx

from dmljax.export import export_embedder, load_embedder
from dmljax.models import ConvNet, EmbeddingHead, EmbeddingModel


def _model(seed=0):
    model = EmbeddingModel(ConvNet(1, (8, 16), rngs=nnx.Rngs(seed)),
                           EmbeddingHead(16, 12, normalize=False, rngs=nnx.Rngs(seed + 1)))
    # a few train-mode passes so that the BatchNorm running statistics differ from their init
    # (eval mode must use them; batch statistics would give other embeddings)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        model(rng.uniform(size=(16, 20, 20, 1)).astype(np.float32))
    model.eval()
    return model


def _images(n, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 20, 20, 1)).astype(np.uint8)


def test_artefact_round_trip_in_a_fresh_process_without_model_code(tmp_path):
    model = _model()
    path = tmp_path / "embedder.dmlemb"
    spec = export_embedder(model, path, input_shape=(20, 20, 1), input_dtype="uint8", metric="cosine",
                           metadata={"run": "unit test"})
    assert spec["embedding_dim"] == 12 and spec["metric"] == "cosine"
    assert sorted(os.listdir(tmp_path)) == ["embedder.dmlemb"]
    images = {n: _images(n, seed=n) for n in (3, 7)}  # two batch sizes, one artefact
    for n, x in images.items():
        np.save(tmp_path / f"x{n}.npy", x)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from dmljax.export import load_embedder
        e = load_embedder({str(path)!r})
        out = {{}}
        for n in (3, 7):
            out[n] = e(np.load({str(tmp_path)!r} + f"/x{{n}}.npy"), batch_size=4)
        np.savez({str(tmp_path / "out.npz")!r}, **{{str(n): v for n, v in out.items()}})
        leaked = sorted(m for m in sys.modules if m.startswith(("dmljax.models", "dmljax.train", "flax")))
        print(json.dumps({{"leaked": leaked, "dim": e.embedding_dim, "metric": e.metric}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"leaked": [], "dim": 12, "metric": "cosine"}
    got = np.load(tmp_path / "out.npz")
    for n, x in images.items():
        want = np.asarray(model(x.astype(np.float32) / 255.0))
        assert got[str(n)].shape == (n, 12)
        np.testing.assert_allclose(got[str(n)], want, rtol=1e-5, atol=1e-5)


def test_preprocessing_and_normalisation_inside_the_program(tmp_path):
    model = _model(3)
    mean, std = 0.25, 0.5
    path = tmp_path / "e.dmlemb"
    export_embedder(model, path, input_shape=(20, 20, 1), preprocessing={"mean": [mean], "std": [std]},
                    normalize=True, platforms=("cpu",))
    x = np.random.default_rng(0).uniform(size=(5, 20, 20, 1)).astype(np.float32)
    want = np.asarray(model((x - mean) / std))
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    e = load_embedder(path)
    np.testing.assert_allclose(e(x), want, rtol=1e-5, atol=1e-6)
    assert e.normalized and e(x[:0]).shape == (0, 12)


def test_bad_arguments_and_bad_files(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="^input_shape"):
        export_embedder(model, tmp_path / "a", input_shape=(20, 20))
    with pytest.raises(ValueError, match="^metric"):
        export_embedder(model, tmp_path / "a", input_shape=(20, 20, 1), metric="manhattan")
    with pytest.raises(ValueError, match="^preprocessing\\['std'\\]"):
        export_embedder(model, tmp_path / "a", input_shape=(20, 20, 1), preprocessing={"std": [0.0]})
    path = tmp_path / "e.dmlemb"
    export_embedder(model, path, input_shape=(20, 20, 1), platforms=("cpu",))
    e = load_embedder(path)
    with pytest.raises(ValueError, match="^images must have shape \\[N, 20, 20, 1\\]"):
        e(np.zeros((2, 21, 20, 1)))
    good = path.read_bytes()
    (tmp_path / "cut").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="cut: not a dmljax embedder artefact, or a truncated one"):
        load_embedder(tmp_path / "cut")
    with zipfile.ZipFile(tmp_path / "v2", "w") as z:  # a newer format version
        spec = json.loads(zipfile.ZipFile(path).read("embedder.json"))
        z.writestr("embedder.json", json.dumps(dict(spec, version=2)))
        z.writestr("exported.bin", b"")
    with pytest.raises(ValueError, match="v2: format version 2 is not supported"):
        load_embedder(tmp_path / "v2")
