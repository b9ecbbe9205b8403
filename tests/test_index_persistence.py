"""EmbeddingIndex add / remove / device gallery / save / load: one atomic, validated file."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import dmljax.index as index_module
from dmljax.index import INDEX_FORMAT_VERSION, EmbeddingIndex

from tests.test_index import np_search


def _index(seed=0, n=12, dim=4, metric="euclidean"):
    rng = np.random.default_rng(seed)
    index = EmbeddingIndex(dim, metric=metric)
    index.add(rng.normal(size=(n, dim)), np.arange(n) % 3, [{"row": i} for i in range(n)])
    return index


def _same(a: EmbeddingIndex, b: EmbeddingIndex):
    assert (a.dim, a.metric, a.dtype, a.backend) == (b.dim, b.metric, b.dtype, b.backend)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert a.metadata == b.metadata


def test_add_remove_search_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(10, 4))
    q = rng.normal(size=(3, 4))
    index = EmbeddingIndex(4, metric="cosine", dtype=np.float64)
    ids = index.add(g[:6], np.arange(6), [{"n": i} for i in range(6)])
    ids = np.concatenate([ids, index.add(g[6:], np.arange(6, 10), [{"n": i} for i in range(6, 10)])])
    np.testing.assert_array_equal(ids, np.arange(10))
    index.remove([1, 7])
    kept = np.array([0, 2, 3, 4, 5, 6, 8, 9])
    res = index.search(q, k=3)
    want_rows, want_dist = np_search(q, g[kept], 3, "cosine")
    np.testing.assert_array_equal(res.indices, want_rows)
    np.testing.assert_array_equal(res.ids, kept[want_rows])
    np.testing.assert_array_equal(res.labels, kept[want_rows])
    np.testing.assert_allclose(res.distances, want_dist, rtol=1e-9, atol=1e-12)
    assert [[m["n"] for m in row] for row in res.metadata] == kept[want_rows].tolist()
    # ids stay stable and are never reused after a removal
    assert index.add(g[:1]).tolist() == [10]
    path = tmp_path / "gallery.dmlidx"
    index.save(path)
    assert sorted(os.listdir(tmp_path)) == ["gallery.dmlidx"]  # one file, no temporary left
    loaded = EmbeddingIndex.load(path)
    _same(index, loaded)
    assert loaded.add(g[:1]).tolist() == [11]
    loaded.remove([11])
    b = loaded.search(q, k=3)
    np.testing.assert_array_equal(index.search(q, k=3).ids, b.ids)


def test_gallery_stays_on_device_between_searches(monkeypatch):
    index = _index()
    q = np.ones((2, 4))
    index.search(q, k=2)
    gallery = index.device_embeddings
    assert isinstance(gallery, jax.Array)
    copies = []
    real = index_module.jnp.asarray
    monkeypatch.setattr(index_module.jnp, "asarray",
                        lambda x, *a, **k: (isinstance(x, np.ndarray) and copies.append(x.shape)) or real(x, *a, **k))
    index.search(q, k=2)
    index.search(q, k=3)
    assert index.device_embeddings is gallery and (12, 4) not in copies
    index.add(np.zeros((5, 4)))  # only the new rows travel
    assert copies.count((5, 4)) == 1 and set(copies) <= {(2, 4), (5, 4)}
    np.testing.assert_array_equal(np.asarray(index.device_embeddings), index.embeddings)
    index.remove([0, 13])
    assert set(copies) <= {(2, 4), (5, 4), (15,)}  # the kept row numbers, not the gallery
    np.testing.assert_array_equal(np.asarray(index.device_embeddings), index.embeddings)


def test_remove_is_all_or_nothing():
    index = _index()
    with pytest.raises(ValueError, match="^ids not in the index: \\[99\\]"):
        index.remove([3, 99])
    assert len(index) == 12
    with pytest.raises(ValueError, match="^ids already in the index"):
        index.add(np.zeros((1, 4)), ids=[3])
    with pytest.raises(ValueError, match="^ids must be unique"):
        index.add(np.zeros((2, 4)), ids=[20, 20])
    with pytest.raises(ValueError, match="^ids must be"):
        index.add(np.zeros((2, 4)), ids=[1.5, 2.5])
    assert len(index) == 12
    with pytest.raises(ValueError, match="^ids not in the index: \\[5\\]"):
        EmbeddingIndex(4).remove([5])


def test_search_on_an_empty_index_and_dimension_mismatch(tmp_path):
    index = EmbeddingIndex(4)
    with pytest.raises(ValueError, match="^index is empty"):
        index.search(np.ones((1, 4)))
    index.save(tmp_path / "empty")
    loaded = EmbeddingIndex.load(tmp_path / "empty")
    assert len(loaded) == 0
    with pytest.raises(ValueError, match="^index is empty"):
        loaded.search(np.ones((1, 4)))
    full = _index()
    full.remove(full.ids)
    with pytest.raises(ValueError, match="^index is empty"):
        full.search(np.ones((1, 4)))
    with pytest.raises(ValueError, match="^embeddings must have dim 4"):
        full.add(np.ones((2, 5)))
    full.add(np.ones((2, 4)))
    with pytest.raises(ValueError, match="^queries must have dim 4"):
        full.search(np.ones((1, 3)))


# ----------------------------------------------------------------------------- bad files


def _rewrite(path, mutate_header=None, mutate_arrays=None):
    """Rewrite a saved file with a changed header / arrays and a VALID checksum (so that the
    semantic checks, not the checksum, must catch the problem)."""
    data = open(path, "rb").read()
    magic, fixed = index_module._MAGIC, len(index_module._MAGIC) + 8
    head_len = int.from_bytes(data[len(magic):fixed], "little")
    header = json.loads(data[fixed:fixed + head_len])
    base = fixed + head_len
    arrays = {name: np.frombuffer(data, np.dtype(s["dtype"]), count=int(np.prod(s["shape"])),
                                  offset=base + s["offset"]).reshape(s["shape"]).copy()
              for name, s in header["arrays"].items()}
    if mutate_arrays:
        mutate_arrays(arrays)
    offset, header["arrays"] = 0, {}
    for name, a in arrays.items():
        header["arrays"][name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
        offset += a.nbytes
    if mutate_header:
        mutate_header(header)
    head = json.dumps(header).encode()
    body = magic + len(head).to_bytes(8, "little") + head + b"".join(a.tobytes() for a in arrays.values())
    open(path, "wb").write(body + hashlib.sha256(body).digest())


def _drop_last_label(arrays):
    arrays["labels"] = arrays["labels"][:-1]


def _nan_embedding(arrays):
    arrays["embeddings"][0, 0] = np.nan


def _float_labels(arrays):
    arrays["labels"] = arrays["labels"].astype(np.float64)


def _duplicate_ids(arrays):
    arrays["ids"][1] = arrays["ids"][0]


SEMANTIC_CASES = [
    (None, _drop_last_label, "labels has shape \\(11,\\), expected one label per embedding \\(12\\)"),
    (None, _nan_embedding, "embeddings contain NaN or inf"),
    (None, _float_labels, "labels has dtype float64, expected int64"),
    (None, _duplicate_ids, "ids must be unique"),
    (lambda h: h.update(metric="manhattan"), None, "metric must be one of"),
    (lambda h: h.update(version=INDEX_FORMAT_VERSION + 1), None, "format version 3 is not supported"),
    (lambda h: h.update(dim=5), None, "embeddings has shape \\(12, 4\\), expected \\[size=12, dim=5\\]"),
    (lambda h: h.update(metadata=h["metadata"][:-1]), None, "metadata must be a list of 12 entries"),
    (lambda h: h.update(dtype="int32"), None, "dtype must be floating"),
    (None, lambda a: a.pop("ids"), "array 'ids' is missing"),
]


@pytest.mark.parametrize("mutate_header,mutate_arrays,message", SEMANTIC_CASES)
def test_load_validates_the_content(tmp_path, mutate_header, mutate_arrays, message):
    path = tmp_path / "idx"
    _index().save(path)
    _rewrite(path, mutate_header, mutate_arrays)
    with pytest.raises(ValueError, match=f"^{path}: .*({message})"):
        EmbeddingIndex.load(path)


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    path = tmp_path / "idx"
    _index().save(path)
    good = open(path, "rb").read()
    for cut in [0, 5, 16, 20, 30, len(good) // 2, len(good) - 1]:
        open(path, "wb").write(good[:cut])
        with pytest.raises(ValueError, match=f"^{path}: (truncated|not a dmljax)"):
            EmbeddingIndex.load(path)
    for position in [40, len(good) // 2, len(good) - 40, len(good) - 1]:  # header, payload, digest
        flipped = bytearray(good)
        flipped[position] ^= 0xFF
        open(path, "wb").write(bytes(flipped))
        with pytest.raises(ValueError, match=f"^{path}: (corrupt|truncated)"):
            EmbeddingIndex.load(path)
    open(path, "wb").write(good + b"\0")
    with pytest.raises(ValueError, match=f"^{path}: corrupt file: 1 bytes after"):
        EmbeddingIndex.load(path)
    open(path, "wb").write(b"PK\x03\x04 an npz, not an index")
    with pytest.raises(ValueError, match=f"^{path}: not a dmljax embedding index"):
        EmbeddingIndex.load(path)
    # the version-1 pair of files is named as such
    np.savez(tmp_path / "old.npz", embeddings=np.zeros((1, 4)))
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(ValueError, match="version-1 index format"):
        EmbeddingIndex.load(tmp_path / "old")


# ----------------------------------------------------------------------------- interrupted overwrites


class _Crash(Exception):
    pass


def _partial_writer(stop_after_bytes):
    def write(f, chunks):
        data = b"".join(chunks)
        f.write(data[:stop_after_bytes])
        raise _Crash("interrupted")
    return write


@pytest.mark.parametrize("where", ["first_byte", "header", "middle", "last_byte", "fsync", "replace"])
def test_interrupted_overwrite_keeps_the_old_index(tmp_path, monkeypatch, where):
    path = tmp_path / "idx"
    old = _index(seed=0)
    old.save(path)
    new = _index(seed=1, n=30)
    size = len(b"".join(new._file_chunks()))
    if where == "fsync":
        monkeypatch.setattr(index_module.os, "fsync", lambda fd: (_ for _ in ()).throw(_Crash("fsync")))
    elif where == "replace":
        monkeypatch.setattr(index_module.os, "replace", lambda a, b: (_ for _ in ()).throw(_Crash("rename")))
    else:
        stop = {"first_byte": 1, "header": 40, "middle": size // 2, "last_byte": size - 1}[where]
        monkeypatch.setattr(index_module, "_write_chunks", _partial_writer(stop))
    with pytest.raises(_Crash):
        new.save(path)
    monkeypatch.undo()
    _same(EmbeddingIndex.load(path), old)
    assert os.listdir(tmp_path) == ["idx"]  # the temporary file was removed
    new.save(path)
    _same(EmbeddingIndex.load(path), new)


def test_killed_process_during_overwrite_leaves_old_or_new(tmp_path):
    """A process killed (os._exit, no clean-up) half-way through the second save."""
    path = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import os, numpy as np
        import dmljax.index as m
        a = m.EmbeddingIndex(4); a.add(np.ones((3, 4)), [0, 1, 2]); a.save({str(path)!r})
        b = m.EmbeddingIndex(4); b.add(np.full((50, 4), 2.0))
        def write(f, chunks):
            data = b"".join(chunks); f.write(data[: len(data) // 2]); f.flush(); os._exit(3)
        m._write_chunks = write
        b.save({str(path)!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    loaded = EmbeddingIndex.load(path)  # the old index; the stray temporary file does not matter
    assert len(loaded) == 3 and loaded.labels.tolist() == [0, 1, 2]
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))
