"""Offline Omniglot: the background/evaluation sets, the small sets and the 20 one-shot runs.

Omniglot (Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic
program induction", Science 2015) holds 1623 hand-drawn characters from 50 alphabets, each drawn
once by 20 different people, as 105x105 binary PNGs. The archives shipped in
``dmljax/data/omniglot/`` (``images_background.tar.xz``, ``images_evaluation.tar.xz`` and
``all_runs.zip``; see its README.md for provenance and checksums) are read directly with
:mod:`tarfile` / :mod:`zipfile` and PIL; nothing is downloaded. A ``data_dir`` holding the upstream
``images_background.zip`` / ``images_evaluation.zip`` works too. The upstream small sets
(``images_background_small1/2``, every character of 5 background alphabets) are not shipped
twice: they are taken from the background archive with the character lists of
``small_sets.json`` (the same PNG bytes as the upstream small zips; a test checks their digest).

Image convention: **ink is high**. The PNGs store ink as black (0) on white (1); we invert them so
background is 0 and ink is 255 (uint8), i.e. ink = 1.0 after ``images / 255``. Zero padding (e.g.
from augmentation) is therefore background. Images are resized from 105 px to ``image_size`` with
PIL's antialiased bilinear filter (for a downscale PIL widens the filter support by the scale
factor, so this is area-aware, like torchvision's ``Resize(antialias=True)``).

Protocols (from the README):

* standard: train on ``"background"`` (964 characters), retrieval test on ``"evaluation"``
  (659 characters, 13180 images), one-shot test on the 20 official runs.
* minimal: train on ``"background_small1"`` (136 characters, 2720 images), retrieval test on
  ``"minimal_test"`` = the alphabets of small2 that are not in small1 (Japanese_(katakana),
  Sanskrit, Tagalog: 106 characters, 2120 images), one-shot test on the same 20 runs.

Decoded splits are cached as ``.npz`` under ``$DMLJAX_CACHE`` (default ``~/.cache/dmljax``), keyed
by split, image size and the source archive's size/mtime, so the second load takes a fraction of a second.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import json
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "OmniglotData",
    "OmniglotProtocol",
    "OneShotRun",
    "SPLITS",
    "default_cache_dir",
    "default_data_dir",
    "load_omniglot",
    "load_one_shot_runs",
    "load_protocol",
    "one_shot_error",
    "small_set_characters",
]

# Bump when the decoding changes so stale caches are not reused.
_CACHE_VERSION = 1

# The two image archives shipped (one copy of every image). The upstream small sets are subsets of
# the background set, derived at load time from the character lists in ``small_sets.json``.
_ARCHIVE_OF_SPLIT = {"background": "images_background", "evaluation": "images_evaluation"}
_SMALL_SETS = ("background_small1", "background_small2")
SPLITS = tuple(_ARCHIVE_OF_SPLIT) + _SMALL_SETS + ("minimal_test",)
SMALL_SETS_FILE = "small_sets.json"

_IMAGE_PATH = re.compile(r"^[^/]+/(?P<alphabet>[^/]+)/(?P<character>[^/]+)/(?P<id>\d+)_(?P<drawer>\d+)\.png$")


@dataclasses.dataclass(frozen=True)
class OmniglotData:
    """One Omniglot split, decoded.

    Attributes:
      images: uint8 [N, H, W, 1], ink = 255, background = 0.
      labels: int32 [N], character (class) ids, contiguous 0..C-1 in sorted (alphabet, character)
        order.
      alphabets: list of C alphabet names, ``alphabets[c]`` is the alphabet of class ``c``.
      characters: list of C names ``"<alphabet>/<characterNN>"``, one per class.
      drawers: int32 [N], the drawer (1..20) of each image.

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.omniglot import OmniglotData
      >>> data = OmniglotData(images=np.zeros((3, 28, 28, 1), np.uint8), labels=np.array([0, 1, 2], np.int32),
      ...                     alphabets=["Latin", "Greek", "Latin"],
      ...                     characters=["Latin/character01", "Greek/character01", "Latin/character02"],
      ...                     drawers=np.array([1, 1, 2], np.int32))
      >>> print(data.num_classes, data.class_alphabet_labels, data.alphabet_labels)
      3 [1 0 1] [1 0 1]
    """

    images: np.ndarray
    labels: np.ndarray
    alphabets: list[str]
    characters: list[str]
    drawers: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.characters)

    @property
    def class_alphabet_labels(self) -> np.ndarray:
        """int32 [C]: the alphabet id of each class (index into ``sorted(set(alphabets))``)."""
        names = sorted(set(self.alphabets))
        return np.array([names.index(a) for a in self.alphabets], dtype=np.int32)

    @property
    def alphabet_labels(self) -> np.ndarray:
        """int32 [N]: the alphabet id of each image (index into ``sorted(set(alphabets))``)."""
        return self.class_alphabet_labels[self.labels]


class OneShotRun(NamedTuple):
    """One official 20-way one-shot run (Lake et al. 2015).

    Attributes:
      train_images: uint8 [20, H, W, 1], ``training/class01..class20`` in that order.
      test_images: uint8 [20, H, W, 1], ``test/item01..item20`` in that order.
      test_to_train_index: int32 [20], the answer key: test item i shows the class of
        ``train_images[test_to_train_index[i]]``.

    Examples:
      >>> from dmljax.data.omniglot import load_one_shot_runs
      >>> run = load_one_shot_runs(image_size=28)[0]  # a OneShotRun
      >>> print(run.train_images.shape, run.test_images.shape, run.test_to_train_index[:5])
      (20, 28, 28, 1) (20, 28, 28, 1) [ 7  8  1 18  9]
    """

    train_images: np.ndarray
    test_images: np.ndarray
    test_to_train_index: np.ndarray


def default_data_dir() -> Path:
    """The directory of the zips shipped with the package.

    Examples:
      >>> from dmljax.data.omniglot import default_data_dir
      >>> (default_data_dir() / "all_runs.zip").is_file()
      True
    """
    return Path(__file__).resolve().parent / "omniglot"


def default_cache_dir() -> Path:
    """``$DMLJAX_CACHE`` if set, else ``~/.cache/dmljax``.

    Examples:
      >>> import os
      >>> from unittest import mock
      >>> from dmljax.data.omniglot import default_cache_dir
      >>> with mock.patch.dict(os.environ, {"DMLJAX_CACHE": "/tmp/dmljax-cache"}):
      ...     print(default_cache_dir())
      /tmp/dmljax-cache
    """
    env = os.environ.get("DMLJAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dmljax"


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return int(image_size)


def _decode_png(data: bytes, image_size: int) -> np.ndarray:
    """PNG bytes (binary, ink black) -> uint8 [image_size, image_size], ink = 255."""
    with Image.open(io.BytesIO(data)) as im:
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
    inverted = Image.fromarray(255 - gray, mode="L")
    if inverted.size != (image_size, image_size):
        inverted = inverted.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(inverted, dtype=np.uint8)


def _decode_many(blobs: Sequence[bytes], image_size: int) -> np.ndarray:
    """Decode in a thread pool (PIL releases the GIL while decoding/resampling)."""
    out = np.empty((len(blobs), image_size, image_size, 1), dtype=np.uint8)
    if not blobs:
        return out

    def work(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i, :, :, 0] = _decode_png(blobs[i], image_size)

    workers = max(1, min(8, os.cpu_count() or 1))
    chunk = -(-len(blobs) // (workers * 4))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work, s, min(s + chunk, len(blobs))) for s in range(0, len(blobs), chunk)]
        for f in futures:
            f.result()
    return out


def _zip_path(data_dir: Path, stem: str) -> Path:
    path = data_dir / f"{stem}.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (data_dir={data_dir})")
    return path


def _archive_path(data_dir: Path, stem: str) -> Path:
    """``<stem>.tar.xz`` (the repacked copy shipped) or, failing that, the upstream ``<stem>.zip``."""
    for suffix in (".tar.xz", ".zip"):
        path = data_dir / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise FileNotFoundError(f"neither {stem}.tar.xz nor {stem}.zip found in data_dir={data_dir}")


def _read_pngs(archive: Path) -> dict[str, bytes]:
    """Member name -> PNG bytes of every Omniglot image in a ``.tar.xz`` or ``.zip`` archive."""
    out = {}
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if _IMAGE_PATH.match(name):
                    out[name] = zf.read(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                if member.isfile() and _IMAGE_PATH.match(member.name):
                    out[member.name] = tf.extractfile(member).read()
    return out


def small_set_characters(name: str) -> dict[str, list[str]]:
    """The characters of an upstream small background set, ``{alphabet: [characterNN, ...]}``.

    Args:
      name: ``"background_small1"`` or ``"background_small2"`` (Lake et al. 2015's 5-alphabet
        background sets; every character of those alphabets).

    Returns:
      The lists recorded in ``dmljax/data/omniglot/small_sets.json``.

    Examples:
      >>> from dmljax.data.omniglot import small_set_characters
      >>> sorted(small_set_characters("background_small1"))
      ['Balinese', 'Early_Aramaic', 'Greek', 'Korean', 'Latin']
    """
    if name not in _SMALL_SETS:
        raise ValueError(f"name must be one of {_SMALL_SETS}, got {name!r}")
    return dict(_small_sets()[name]["characters"])


def _small_sets() -> dict[str, Any]:
    return json.loads((default_data_dir() / SMALL_SETS_FILE).read_text())["sets"]


def _source_stem(split: str) -> str:
    return _ARCHIVE_OF_SPLIT["evaluation" if split == "evaluation" else "background"]


def _split_members(split: str, pngs: dict[str, bytes]) -> list[tuple[str, str, str, int]]:
    """Sorted (member name, alphabet, character, drawer) of the images of ``split``."""
    entries = []
    for name in pngs:
        m = _IMAGE_PATH.match(name)
        entries.append((name, m["alphabet"], m["character"], int(m["drawer"])))
    if split in _SMALL_SETS or split == "minimal_test":
        sets = _small_sets()
        if split == "minimal_test":
            exclude = set(sets["background_small1"]["characters"])
            keep = {(a, c) for a, cs in sets["background_small2"]["characters"].items() if a not in exclude
                    for c in cs}
        else:
            keep = {(a, c) for a, cs in sets[split]["characters"].items() for c in cs}
        entries = [e for e in entries if (e[1], e[2]) in keep]
    entries.sort(key=lambda e: (e[1], e[2], e[3], e[0]))
    return entries


def _decode_split(split: str, image_size: int, data_dir: Path) -> OmniglotData:
    pngs = _read_pngs(_archive_path(data_dir, _source_stem(split)))
    entries = _split_members(split, pngs)
    class_keys = sorted({(e[1], e[2]) for e in entries})
    class_of = {key: i for i, key in enumerate(class_keys)}
    images = _decode_many([pngs[e[0]] for e in entries], image_size)
    return OmniglotData(
        images=images,
        labels=np.array([class_of[(e[1], e[2])] for e in entries], dtype=np.int32),
        alphabets=[a for a, _ in class_keys],
        characters=[f"{a}/{c}" for a, c in class_keys],
        drawers=np.array([e[3] for e in entries], dtype=np.int32),
    )


def _cache_file(split: str, image_size: int, data_dir: Path, cache_dir: Path) -> Path:
    # size + mtime of the source archive: a changed archive gives a new cache file.
    st = _archive_path(data_dir, _source_stem(split)).stat()
    stamp = f"{st.st_size:x}{int(st.st_mtime):x}"
    return cache_dir / f"omniglot_v{_CACHE_VERSION}_{split}_{image_size}px_{stamp}.npz"


def _save_npz_atomically(path: Path, data: OmniglotData) -> None:
    # Write to a temporary file and rename, so concurrent loaders never see a partial file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                images=data.images,
                labels=data.labels,
                drawers=data.drawers,
                alphabets=np.array(data.alphabets, dtype=str),
                characters=np.array(data.characters, dtype=str),
            )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_npz(path: Path) -> OmniglotData:
    with np.load(path, allow_pickle=False) as z:
        return OmniglotData(
            images=z["images"],
            labels=z["labels"],
            alphabets=[str(s) for s in z["alphabets"]],
            characters=[str(s) for s in z["characters"]],
            drawers=z["drawers"],
        )


def load_omniglot(
    split: str = "background",
    *,
    image_size: int = 28,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> OmniglotData:
    """Load one Omniglot split as uint8 images with ink = 255.

    Args:
      split: ``"background"`` (964 classes, 19280 images), ``"evaluation"`` (659 / 13180),
        ``"background_small1"`` (136 / 2720), ``"background_small2"`` (156 / 3120) or
        ``"minimal_test"`` (the alphabets of small2 not in small1: 106 / 2120).
      image_size: output side length in pixels (the originals are 105x105).
      data_dir: directory holding the archives; defaults to the copy shipped with the package.
      cache_dir: where decoded ``.npz`` files are kept; defaults to :func:`default_cache_dir`.
      use_cache: read/write the cache (False decodes every time and writes nothing).

    Returns:
      :class:`OmniglotData` with images uint8 [N, image_size, image_size, 1], labels int32 [N]
      (0..C-1), per-class ``alphabets``/``characters`` names and drawers int32 [N].

    Raises:
      ValueError: unknown ``split`` or a non-positive ``image_size``.
      FileNotFoundError: an archive is missing from ``data_dir``.

    Examples:
      >>> from dmljax.data.omniglot import load_omniglot
      >>> data = load_omniglot("background_small1", image_size=28, use_cache=False)
      >>> print(data.images.shape, data.images.dtype, data.num_classes, data.characters[0])
      (2720, 28, 28, 1) uint8 136 Balinese/character01
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    image_size = _check_image_size(image_size)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if not use_cache:
        return _decode_split(split, image_size, data_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_file(split, image_size, data_dir, cache_dir)
    if path.is_file():
        try:
            return _load_npz(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # corrupt cache file: decode again and overwrite it
    data = _decode_split(split, image_size, data_dir)
    try:
        _save_npz_atomically(path, data)
    except OSError:
        pass  # a read-only cache directory must not make loading fail
    return data


_RUN_LINE = re.compile(r"^(?P<run>run\d+)/test/(?P<test>item\d+)\.png\s+(?P=run)/training/(?P<train>class\d+)\.png$")


def load_one_shot_runs(
    *, image_size: int = 28, data_dir: str | os.PathLike | None = None
) -> list[OneShotRun]:
    """The 20 official 20-way one-shot runs of Lake et al. (2015), from ``all_runs.zip``.

    Each ``runNN/class_labels.txt`` has 20 lines ``runNN/test/itemXX.png runNN/training/classYY.png``:
    the test image on the left shows the same character as the training image on the right. We
    parse it by name (not by line order) into ``test_to_train_index``.

    Returns:
      A list of 20 :class:`OneShotRun` ordered run01..run20; images uint8 [20, H, W, 1], ink = 255.

    Examples:
      >>> from dmljax.data.omniglot import load_one_shot_runs
      >>> runs = load_one_shot_runs(image_size=28)
      >>> print(len(runs), runs[0].train_images.shape)
      20 (20, 28, 28, 1)
    """
    image_size = _check_image_size(image_size)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    runs = []
    with zipfile.ZipFile(_zip_path(data_dir, "all_runs")) as zf:
        names = set(zf.namelist())
        run_names = sorted({n.split("/")[0] for n in names if re.match(r"^run\d+/class_labels\.txt$", n)})
        for run in run_names:
            train_files = sorted(n for n in names if re.match(rf"^{run}/training/class\d+\.png$", n))
            test_files = sorted(n for n in names if re.match(rf"^{run}/test/item\d+\.png$", n))
            train_pos = {Path(n).stem: i for i, n in enumerate(train_files)}
            test_pos = {Path(n).stem: i for i, n in enumerate(test_files)}
            answer = np.full(len(test_files), -1, dtype=np.int32)
            for line in zf.read(f"{run}/class_labels.txt").decode().splitlines():
                line = line.strip()
                if not line:
                    continue
                m = _RUN_LINE.match(line)
                if m is None or m["run"] != run:
                    raise ValueError(f"{run}/class_labels.txt: cannot parse line {line!r}")
                answer[test_pos[m["test"]]] = train_pos[m["train"]]
            if (answer < 0).any():
                raise ValueError(f"{run}/class_labels.txt does not cover every test image")
            runs.append(
                OneShotRun(
                    train_images=_decode_many([zf.read(n) for n in train_files], image_size),
                    test_images=_decode_many([zf.read(n) for n in test_files], image_size),
                    test_to_train_index=answer,
                )
            )
    return runs


_METRICS = ("euclidean", "sqeuclidean", "cosine")


def one_shot_error(
    embed_fn: Callable[[np.ndarray], Any],
    runs: Sequence[OneShotRun],
    *,
    metric: str = "euclidean",
) -> tuple[float, np.ndarray]:
    """20-way one-shot classification error (Lake et al. 2015) by nearest training image.

    For each run, every test image is assigned the class of its nearest training image under
    ``metric``; the run's error is the fraction of test images assigned the wrong class. Chance
    level is 19/20 = 95%.

    Args:
      embed_fn: maps images exactly as stored in the runs (uint8 [n, H, W, 1], ink = 255; do any
        scaling inside) to embeddings [n, D]. Called once per run on the 20 training images
        followed by the 20 test images (a fixed shape, so a jitted model compiles once).
      runs: from :func:`load_one_shot_runs`.
      metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"`` (1 - cosine similarity).

    Returns:
      (mean error over runs, per-run errors float64 [num_runs]).

    Examples:
      >>> import numpy as np
      >>> from dmljax.data.omniglot import load_one_shot_runs, one_shot_error
      >>> runs = load_one_shot_runs(image_size=28)
      >>> pixels = lambda images: np.asarray(images, np.float32).reshape(len(images), -1) / 255
      >>> error, per_run = one_shot_error(pixels, runs)  # nearest neighbour on raw pixels
      >>> print(round(float(error), 4), per_run.shape)
      0.7725 (20,)
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if len(runs) == 0:
        raise ValueError("runs must be a non-empty sequence of OneShotRun")
    errors = np.empty(len(runs), dtype=np.float64)
    for r, run in enumerate(runs):
        n_train = run.train_images.shape[0]
        emb = np.asarray(embed_fn(np.concatenate([run.train_images, run.test_images])), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != n_train + run.test_images.shape[0]:
            raise ValueError(f"embed_fn must return [n, D] embeddings, got shape {emb.shape}")
        train, test = emb[:n_train], emb[n_train:]
        if metric == "cosine":
            tn = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
            qn = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
            dist = 1.0 - qn @ tn.T
        else:
            dist = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)  # sqrt is monotone
        predicted = np.argmin(dist, axis=1)
        errors[r] = float(np.mean(predicted != run.test_to_train_index))
    return float(errors.mean()), errors


class OmniglotProtocol(NamedTuple):
    """Everything one benchmark protocol needs: training classes, unseen test classes, runs.

    Examples:
      >>> from dmljax.data.omniglot import OmniglotProtocol, load_omniglot, load_one_shot_runs
      >>> train = load_omniglot("background_small1", image_size=28, use_cache=False)
      >>> protocol = OmniglotProtocol(train=train, test=train, one_shot_runs=load_one_shot_runs())
      >>> print(protocol.train.num_classes, len(protocol.one_shot_runs))
      136 20
    """

    train: OmniglotData
    test: OmniglotData
    one_shot_runs: list[OneShotRun]


_PROTOCOLS = {"standard": ("background", "evaluation"), "minimal": ("background_small1", "minimal_test")}


def load_protocol(
    name: str = "standard",
    *,
    image_size: int = 28,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> OmniglotProtocol:
    """Load a protocol of the README: ``"standard"`` (background 964 classes / evaluation 659
    classes) or ``"minimal"`` (background_small1 136 classes / minimal_test 106 classes); both use
    the 20 official one-shot runs.

    Examples:
      >>> import tempfile
      >>> from dmljax.data.omniglot import load_protocol
      >>> protocol = load_protocol("minimal", image_size=28, cache_dir=tempfile.mkdtemp())
      >>> print(protocol.train.images.shape, protocol.test.images.shape)
      (2720, 28, 28, 1) (2120, 28, 28, 1)
    """
    if name not in _PROTOCOLS:
        raise ValueError(f"name must be one of {tuple(_PROTOCOLS)}, got {name!r}")
    train_split, test_split = _PROTOCOLS[name]
    kwargs = dict(image_size=image_size, data_dir=data_dir, cache_dir=cache_dir)
    return OmniglotProtocol(
        train=load_omniglot(train_split, **kwargs),
        test=load_omniglot(test_split, **kwargs),
        one_shot_runs=load_one_shot_runs(image_size=image_size, data_dir=data_dir),
    )
