"""The training command line: ``dmljax-train`` / ``python -m experiments.train``.

    python -m experiments.train                                  # standard Omniglot protocol, CPU
    python -m experiments.train --config omniglot_small          # minimal protocol (fast)
    python -m experiments.train --set optim.num_steps=500 --set loss.name=proxy_anchor
    python -m experiments.train --resume                         # continue from the latest checkpoint

``--config NAME`` picks a config of `dmljax.configs` (default ``omniglot``); ``--set key=value``
(repeatable; values are Python literals, else strings) changes one of its keys: an unknown or
misspelt key is an error naming the closest valid key. Keys below an ``options`` node
(``loss.options.<kw>``, ``method.options.<kw>``, ``sampler.options.<kw>``) are free-form keyword
options of the configured loss / method / sampler. ``--workdir`` (default ``config.workdir``),
``--resume``.

Several processes (one per host, or several on one machine): ``--distributed`` connects them
before anything touches a device (`dmljax.train.distributed.initialize`): the coordinator
address, process count and process id come from ``--coordinator host:port``,
``--num-processes N``, ``--process-id i``, else from ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, else from JAX's cluster detection (Slurm, TPU pod
slices, Open MPI). ``--distributed-timeout`` (seconds, default 300) bounds the wait for the
coordinator and the other processes. A process id outside ``[0, N)``, a process count that does
not divide the global batch, or a coordinator that never answers is an error, not a hang.

Trainer flags (every key and its default: `dmljax.configs.base`):

* ``loss.name=<name>``: any training loss of `dmljax.losses` (`dmljax.train.available_losses`),
  ``loss.options.<kw>=...`` its keyword options (plus initialiser options such as
  ``proxies_per_class``, ``centers_per_class``, ``sub_centers``, ``num_proxies``, ``init_std``,
  ``beta_init``, ``class_specific``; center loss ``alpha``: `dmljax.train.loss_registry`).
  Learnable arrays are trained at ``optim.loss_lr_mult``.
* ``loss.name=ensemble loss.components="['multi_similarity','proxy_anchor']"``: learned loss
  weights (`dmljax.losses.ensemble`), logged as ``loss_weight/<i>_<name>``.
* ``method.name=<m>`` (daml, hard_sample_generation, iaa, das, divide_conquer,
  alternating_projection, bspml) with ``method.options.<kw>`` (`dmljax.methods.plugin`).
* ``data.label_noise=0.2`` (``data.label_noise_kind`` symmetric | pairflip).
* ``augment.elastic_alpha`` / ``elastic_sigma``, ``model.pool_padding``, ``model.stem``.
* ``sampler.name=hierarchical`` / ``lifted_hard_negative`` (``sampler.options``:
  `dmljax.train.builders.hierarchical_sampler_options` / `lifted_sampler_options`).
* ``memory.size=N`` (``memory.start_step``): cross-batch memory (XBM) for a pair loss.
* ``distill.teacher=<workdir> distill.weight=1.0``: RKD from the frozen model of an earlier run.
* ``train.embed_chunk_size=C`` (``train.embed_chunk_unroll``): gradient caching, chunks of C
  items per device (`dmljax.train.grad_cache`, `dmljax.train.builders.build_step_fn`).
* ``loss.matryoshka_dims=(256,128,64,32)`` (``loss.matryoshka_weights``, ``matryoshka_normalize``):
  Matryoshka loss; per-prefix metrics ``d<m>/...`` in the final table.
* ``model.backbone=global_local loss.name=hybrid_pair_proxy``: global + local embeddings.
* ``eval.precise_bn_batches=K``, ``eval.tta_shifts``, ``eval.final_tta_shifts``,
  ``eval.rerank="similarity"``; ``train.data_parallel=True`` (all local devices, global-batch
  mining); ``data.name="toy"`` (a tiny synthetic image set for smoke tests).

XLA:CPU: ``main`` adds ``--xla_cpu_experimental_ynn_fusion_type=`` to ``XLA_FLAGS`` before the
backend starts (`dmljax.train.xla_cpu.use_fast_cpu_flags`; opt out ``DMLJAX_DEFAULT_XLA_FLAGS=0``);
run from the command line (``argv=None``) it also makes glibc keep freed host memory mapped
(`dmljax.train.xla_cpu.keep_freed_host_memory`; opt out ``DMLJAX_KEEP_HOST_MEMORY=0``).
"""

from __future__ import annotations

import argparse
import ast
import difflib


from dmljax.configs import get_config
from dmljax.train.xla_cpu import keep_freed_host_memory, use_fast_cpu_flags

__all__ = ["apply_overrides", "build_parser", "config_keys", "main", "parse_config"]


def config_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of ``config`` (nodes and leaves)."""
    out = []
    for k in config.keys():
        v = config[k]
        out.append(prefix + k)
        if hasattr(v, "keys"):
            out += config_keys(v, prefix + k + ".")
    return out


def _unknown_key(config, key: str) -> ValueError:
    close = difflib.get_close_matches(key, config_keys(config), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"--set: unknown config key {key!r}{hint}")


def apply_overrides(config, overrides):
    """``key.sub=value`` strings -> ``config`` (values parsed as Python literals, else strings).

    Keys must exist (ValueError naming the closest valid key), except below an ``options``
    node, whose entries are free-form keyword options. Ints given for float keys become floats,
    lists for tuple keys tuples."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            if p not in node or not hasattr(node[p], "keys"):
                raise _unknown_key(config, key)
            node = node[p]
        if leaf not in node:
            if parents and parents[-1] == "options":
                with node.unlocked() if hasattr(node, "unlocked") else _nothing():
                    node[leaf] = value
                continue
            raise _unknown_key(config, key)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return config


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_parser(description: str = "Train an embedding model and report DML metrics on unseen classes.",
                 default_config: str = "omniglot") -> argparse.ArgumentParser:
    """``--config`` / ``--set`` / ``--workdir`` / ``--resume`` / ``--distributed`` (module docstring)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="a config of dmljax.configs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set optim.num_steps=500")
    parser.add_argument("--workdir", default=None, help="output directory (default: config.workdir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--distributed", action="store_true",
                        help="multi-process run: connect to the other processes first")
    parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                        help="--distributed: process 0's address (else $JAX_COORDINATOR_ADDRESS, else cluster detection)")
    parser.add_argument("--num-processes", default=None, type=int, metavar="N",
                        help="--distributed: number of processes (else $JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", default=None, type=int, metavar="I",
                        help="--distributed: this process's index in [0, N) (else $JAX_PROCESS_ID)")
    parser.add_argument("--distributed-timeout", default=300.0, type=float, metavar="SECONDS",
                        help="--distributed: seconds to wait for the coordinator and the other processes")
    return parser


def _check_launch_flags(args) -> None:
    given = [flag for flag, value in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                                      ("--process-id", args.process_id)) if value is not None]
    if given and not args.distributed:
        raise ValueError(f"{', '.join(given)} need --distributed")
    if not args.distributed_timeout > 0:
        raise ValueError(f"--distributed-timeout must be positive, got {args.distributed_timeout!r}")


def parse_config(args):
    """The locked config of parsed ``args`` with its ``--set`` overrides."""
    return apply_overrides(get_config(args.config), args.set)


def main(argv=None) -> dict[str, float]:
    """Parse ``argv`` (None: the process's command line), train, evaluate; returns the final metrics."""
    if argv is None:
        # the command-line process only (not a notebook or a test calling main): glibc keeps the
        # per-step XLA:CPU buffers mapped
        keep_freed_host_memory()
    args = build_parser().parse_args(argv)
    _check_launch_flags(args)
    config = parse_config(args)  # a bad --set fails before any process waits for the others
    # before anything starts a backend (XLA reads its flags once)
    use_fast_cpu_flags()
    if args.distributed:
        from dmljax.train.distributed import initialize
        initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.distributed_timeout)
    from dmljax.train.trainer import train_and_evaluate
    return train_and_evaluate(config, args.workdir or config.workdir, resume=args.resume)
