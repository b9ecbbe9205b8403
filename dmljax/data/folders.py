"""Image-folder datasets read from their own list files, decoded lazily in batches.

Only paths and labels are held in memory; images are decoded (PIL, a thread pool) when a batch
is requested, so Stanford Online Products (120k images) or In-shop (52k) never need to fit in RAM.

* :func:`load_sop` - Stanford Online Products (Song et al., CVPR 2016). ``Ebay_train.txt`` /
  ``Ebay_test.txt``: a header ``image_id class_id super_class_id path`` and one line per image,
  e.g. ``1 1 1 bicycle_final/111085122871_0.JPG``; paths are relative to the dataset root. The
  standard split is those two files (11318 train classes, 11316 test classes).
* :func:`load_inshop` - DeepFashion In-shop Clothes Retrieval (Liu et al., CVPR 2016).
  ``list_eval_partition.txt``: first line the number of images, second the header
  ``image_name item_id evaluation_status``, then e.g.
  ``img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg id_00000001 train`` with status
  ``train``, ``query`` or ``gallery``. Standard protocol: train on ``train`` (3997 items), retrieve
  each ``query`` image among the ``gallery`` images (3985 items shared by both).
* :func:`load_image_folder` - generic ``root/<class name>/<image>`` layout (classes sorted).

Labels are remapped to contiguous ints 0..C-1 per split (for In-shop, query and gallery share one
mapping so that equal labels mean the same item). The original ids are kept in ``class_ids``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import numbers
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

__all__ = ["ImageListDataset", "decode_image", "load_image_folder", "load_inshop", "load_sop"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_RESIZE_MODES = ("stretch", "center_crop")


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def decode_image(path: str | os.PathLike, *, image_size: int, resize: str = "stretch") -> np.ndarray:
    """Read one image as RGB uint8 [S, S, 3], resized with PIL's antialiased bilinear filter.

    ``resize="stretch"`` maps the whole image to S x S; ``"center_crop"`` resizes the shorter side
    to S and keeps the central square.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> from dmljax.data.folders import decode_image
      >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
      >>> Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(path)
      >>> image = decode_image(path, image_size=16, resize="center_crop")
      >>> print(image.shape, image.dtype)
      (16, 16, 3) uint8
    """
    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize == "center_crop":
            w, h = im.size
            ratio = image_size / min(w, h)
            nw, nh = max(image_size, round(w * ratio)), max(image_size, round(h * ratio))
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        else:
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class ImageListDataset:
    """Paths + labels; images are decoded on demand.

    Attributes:
      paths: list of N image file paths.
      labels: int32 [N], contiguous 0..C-1.
      class_ids: list of C original class ids / names, ``class_ids[labels[i]]``.
      super_labels: int32 [N] or None (SOP's 12 product categories, contiguous).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> from dmljax.data.folders import ImageListDataset
      >>> root = tempfile.mkdtemp()
      >>> paths = [os.path.join(root, f"{i}.png") for i in range(3)]
      >>> for p in paths:
      ...     Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p)
      >>> data = ImageListDataset(paths, np.array([0, 0, 1], np.int32), ["cat", "dog"])
      >>> images, labels = data.load([2, 0], image_size=4)
      >>> print(len(data), data.num_classes, images.shape, labels)
      3 2 (2, 4, 4, 3) [1 0]
    """

    paths: list[str]
    labels: np.ndarray
    class_ids: list[Any]
    super_labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def load(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        image_size: int,
        resize: str = "stretch",
        num_workers: int = 4,
        executor: concurrent.futures.Executor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode the images at ``indices`` (e.g. a sampler batch): (uint8 [b, S, S, 3], int32 [b])."""
        image_size = _check_positive_int(image_size, "image_size")
        num_workers = _check_positive_int(num_workers, "num_workers")
        if resize not in _RESIZE_MODES:
            raise ValueError(f"resize must be one of {_RESIZE_MODES}, got {resize!r}")
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self.paths)):
            raise ValueError(f"indices must lie in [0, {len(self.paths)}), got range "
                             f"[{indices.min()}, {indices.max()}]")
        out = np.empty((len(indices), image_size, image_size, 3), dtype=np.uint8)

        def work(slot: int) -> None:
            out[slot] = decode_image(self.paths[indices[slot]], image_size=image_size, resize=resize)

        if executor is not None:
            list(executor.map(work, range(len(indices))))
        else:
            with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
                list(pool.map(work, range(len(indices))))
        return out, self.labels[indices]

    def iterate(
        self,
        *,
        batch_size: int,
        image_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_remainder: bool = False,
        resize: str = "stretch",
        num_workers: int = 4,
        prefetch: int = 2,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (images, labels) batches in order (or a seeded permutation), decoding
        ``prefetch`` batches ahead in a thread pool; at most ``prefetch + 1`` batches in memory."""
        batch_size = _check_positive_int(batch_size, "batch_size")
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
        chunks = [order[s:min(s + batch_size, stop)] for s in range(0, stop, batch_size)]
        with concurrent.futures.ThreadPoolExecutor(_check_positive_int(num_workers, "num_workers")) as pool, \
                concurrent.futures.ThreadPoolExecutor(1) as batcher:
            load = lambda idx: self.load(idx, image_size=image_size, resize=resize, executor=pool)
            pending = [batcher.submit(load, c) for c in chunks[:prefetch + 1]]
            for i in range(len(chunks)):
                result = pending.pop(0).result()
                if i + prefetch + 1 < len(chunks):
                    pending.append(batcher.submit(load, chunks[i + prefetch + 1]))
                yield result


def _contiguous(ids: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    unique = sorted(set(ids))
    position = {c: i for i, c in enumerate(unique)}
    return np.array([position[c] for c in ids], dtype=np.int32), unique


def _read_sop_list(list_file: Path, root: Path) -> ImageListDataset:
    with open(list_file) as f:
        header = f.readline().split()
        if header != ["image_id", "class_id", "super_class_id", "path"]:
            raise ValueError(f"list_file {list_file} does not start with the SOP header "
                             f"'image_id class_id super_class_id path', got {header}")
        rows = [line.split() for line in f if line.strip()]
    for row in rows:
        if len(row) != 4:
            raise ValueError(f"list_file {list_file}: expected 4 fields per line, got {row}")
    labels, class_ids = _contiguous([int(r[1]) for r in rows])
    super_labels, _ = _contiguous([int(r[2]) for r in rows])
    return ImageListDataset(
        paths=[str(root / r[3]) for r in rows], labels=labels, class_ids=class_ids, super_labels=super_labels
    )


def load_sop(root: str | os.PathLike) -> dict[str, ImageListDataset]:
    """Stanford Online Products from ``root/Ebay_train.txt`` and ``root/Ebay_test.txt``.

    Returns ``{"train": ..., "test": ...}`` with per-split contiguous labels and super-class labels.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> from dmljax.data.folders import load_sop
      >>> root = tempfile.mkdtemp()
      >>> os.makedirs(os.path.join(root, "bicycle_final"))
      >>> for split, ids in (("train", (1, 1, 2)), ("test", (3, 3))):
      ...     lines = ["image_id class_id super_class_id path"]
      ...     for i, c in enumerate(ids):
      ...         rel = f"bicycle_final/{split}_{i}.JPG"
      ...         Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, rel), format="JPEG")
      ...         lines.append(f"{i + 1} {c} 1 {rel}")
      ...     with open(os.path.join(root, f"Ebay_{split}.txt"), "w") as f:
      ...         _ = f.write("\\n".join(lines) + "\\n")
      >>> sop = load_sop(root)
      >>> print(sop["train"].labels, sop["train"].class_ids, len(sop["test"]))
      [0 0 1] [1, 2] 2
    """
    root = Path(root)
    out = {}
    for split, filename in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        list_file = root / filename
        if not list_file.is_file():
            raise FileNotFoundError(f"{list_file} not found (root={root})")
        out[split] = _read_sop_list(list_file, root)
    return out


def load_inshop(
    root: str | os.PathLike,
    *,
    list_file: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, ImageListDataset]:
    """In-shop Clothes Retrieval from ``list_eval_partition.txt``.

    Args:
      root: dataset directory. ``list_file`` defaults to ``root/list_eval_partition.txt`` or
        ``root/Eval/list_eval_partition.txt``; ``image_root`` (the directory that ``img/...``
        paths are relative to) defaults to ``root`` or ``root/Img``, whichever holds ``img/``.

    Returns:
      ``{"train": ..., "query": ..., "gallery": ...}``; query and gallery labels share one
      contiguous mapping of item ids.

    Examples:
      >>> import os, tempfile
      >>> from dmljax.data.folders import load_inshop
      >>> root = tempfile.mkdtemp()
      >>> rows = [("img/a/1.jpg", "id_1", "train"), ("img/b/1.jpg", "id_2", "query"),
      ...         ("img/b/2.jpg", "id_2", "gallery"), ("img/c/1.jpg", "id_3", "gallery")]
      >>> with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
      ...     _ = f.write(f"{len(rows)}\\nimage_name item_id evaluation_status\\n")
      ...     _ = f.write("".join(" ".join(r) + "\\n" for r in rows))
      >>> inshop = load_inshop(root)  # paths only: images are decoded when loaded
      >>> print(sorted(inshop), inshop["query"].labels, inshop["gallery"].labels)
      ['gallery', 'query', 'train'] [0] [0 1]
    """
    root = Path(root)
    if list_file is None:
        candidates = [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"]
        list_file = next((c for c in candidates if c.is_file()), None)
        if list_file is None:
            raise FileNotFoundError(f"list_eval_partition.txt not found under {root}")
    list_file = Path(list_file)
    if image_root is None:
        image_root = next((c for c in (root, root / "Img") if (c / "img").is_dir()), root)
    image_root = Path(image_root)
    with open(list_file) as f:
        count_line = f.readline().strip()
        header = f.readline().split()
        if not count_line.isdigit() or header != ["image_name", "item_id", "evaluation_status"]:
            raise ValueError(f"list_file {list_file} must start with the image count and the header "
                             f"'image_name item_id evaluation_status'")
        rows = [line.split() for line in f if line.strip()]
    if len(rows) != int(count_line):
        raise ValueError(f"list_file {list_file} announces {count_line} images but lists {len(rows)}")
    for row in rows:
        if len(row) != 3 or row[2] not in ("train", "query", "gallery"):
            raise ValueError(f"list_file {list_file}: bad line {' '.join(row)!r}")
    out = {}
    train_rows = [r for r in rows if r[2] == "train"]
    labels, ids = _contiguous([r[1] for r in train_rows])
    out["train"] = ImageListDataset([str(image_root / r[0]) for r in train_rows], labels, ids)
    test_rows = [r for r in rows if r[2] != "train"]
    test_labels, test_ids = _contiguous([r[1] for r in test_rows])
    for status in ("query", "gallery"):
        keep = np.array([r[2] == status for r in test_rows], dtype=bool)
        out[status] = ImageListDataset(
            [str(image_root / r[0]) for r, k in zip(test_rows, keep) if k], test_labels[keep], test_ids
        )
    return out


def load_image_folder(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> ImageListDataset:
    """``root/<class>/<image>`` (torchvision ``ImageFolder`` layout): classes in sorted order,
    images sorted by path, nested sub-folders of a class included; ``class_ids`` are the folder names.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from PIL import Image
      >>> from dmljax.data.folders import load_image_folder
      >>> root = tempfile.mkdtemp()
      >>> for name in ("cat", "dog"):
      ...     os.makedirs(os.path.join(root, name))
      ...     for i in range(2):
      ...         Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, name, f"{i}.png"))
      >>> data = load_image_folder(root)
      >>> print(data.class_ids, data.labels)
      ['cat', 'dog'] [0 0 1 1]
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    extensions = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels, kept = [], [], []
    for name in classes:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        if not files:
            continue  # an empty folder is not a class (keeps labels contiguous)
        paths += [str(p) for p in files]
        labels += [len(kept)] * len(files)
        kept.append(name)
    if not paths:
        raise ValueError(f"root {root} holds no images in class sub-folders")
    return ImageListDataset(paths=paths, labels=np.array(labels, dtype=np.int32), class_ids=kept)
