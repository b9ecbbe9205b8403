"""Training configurations as code (ml_collections ConfigDicts, locked).

``get_config(name)`` returns ``dmljax.configs.<name>.get_config()`` locked: the keys are fixed
(an unknown key is an error), values may change. `base` holds every key of the trainer with its
default; ``omniglot`` (the default run), ``omniglot_small``, ``cub200_resnet50`` and
``sop_resnet50`` start from it. ``synthetic_multilabel`` / ``synthetic_cross_modal`` configure the
synthetic tasks (`dmljax.train.synthetic`).
"""

from __future__ import annotations

import importlib

import ml_collections

__all__ = ["get_config", "CONFIGS"]

CONFIGS = ("base", "omniglot", "omniglot_small", "cub200_resnet50", "sop_resnet50",
           "synthetic_multilabel", "synthetic_cross_modal")


def get_config(name: str) -> ml_collections.ConfigDict:
    """The locked config ``name`` (one of `CONFIGS`); ValueError naming the closest otherwise."""
    if name not in CONFIGS:
        import difflib
        close = difflib.get_close_matches(str(name), CONFIGS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"name {name!r} is not a config of dmljax.configs ({', '.join(CONFIGS)}){hint}")
    config = importlib.import_module(f"dmljax.configs.{name}").get_config()
    config.lock()
    return config
