"""Multi-process (multi-host) launch and data helpers on JAX's multi-controller runtime.

One Python process runs per host (or, on one machine, several processes with a few devices
each); every process runs the same program. The pieces here are what a training script needs on
top of a single-process one:

- `initialize`: connect the processes. The coordinator address, process count and process id
  come from the arguments, else from the environment variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (JAX itself reads only the address), else from
  ``jax.distributed.initialize()``'s own cluster detection (Slurm, TPU pod slices, Open MPI).
  On CPU it selects the gloo collectives, so the same command runs several processes on one
  machine. The launch is validated before JAX is contacted: a process id outside
  ``[0, num_processes)`` or a coordinator that does not answer within ``timeout_s`` seconds is a
  clear error, never a hang.
- `process_batch_share` / `global_batch`: each process loads and augments only its rows of the
  global batch (``sampler.local_batch_indices``) and the global ``jax.Array`` sharded over the
  "data" mesh axis is assembled with ``jax.make_array_from_process_local_data``.
- `is_writer`: only process 0 prints and writes logs (checkpoints are written by all processes
  together, through Orbax's multi-process path).

Launch, N processes on one machine (each with ``--xla_force_host_platform_device_count=K``
fake CPU devices, or one GPU each)::

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \\
        python -m experiments.train --distributed --config omniglot_small
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import socket
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "LaunchSpec",
    "resolve_launch",
    "initialize",
    "wait_for_coordinator",
    "process_batch_share",
    "global_batch",
    "is_writer",
    "is_multiprocess",
    "local_copy",
    "replicate",
    "process_rows",
    "sharded_embed_fn",
    "barrier",
]

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """Where a process finds its peers. ``None`` fields: left to JAX's cluster detection."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None


def _parse_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, numbers.Integral):
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"coordinator address must be host:port, got {address!r}")
    port_number = _parse_int(port, "coordinator port")
    if not 0 < port_number < 65536:
        raise ValueError(f"coordinator port must lie in [1, 65535], got {port_number}")
    return host.strip("[]"), port_number


def resolve_launch(coordinator: str | None = None, num_processes: Any = None, process_id: Any = None,
                   *, environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """Launch parameters from the arguments, else the environment; validated.

    Each of the three values is taken from its argument when given, else from its environment
    variable (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). With no
    coordinator anywhere the result is all ``None`` (cluster auto-detection); a coordinator
    without a process count or id is an error naming the missing value.

    Raises:
      ValueError: malformed address, non-integer or non-positive count, id outside
        ``[0, num_processes)``, or a partial specification.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator if coordinator is not None else env.get(COORDINATOR_ENV) or None
    num_processes = num_processes if num_processes is not None else env.get(NUM_PROCESSES_ENV) or None
    process_id = process_id if process_id is not None else env.get(PROCESS_ID_ENV) or None
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError(f"a process count / id was given without a coordinator address: pass "
                             f"--coordinator host:port or set {COORDINATOR_ENV}")
        return LaunchSpec(None, None, None)
    _split_address(str(coordinator))
    if num_processes is None:
        raise ValueError(f"num_processes is missing: pass --num-processes N or set {NUM_PROCESSES_ENV}")
    if process_id is None:
        raise ValueError(f"process_id is missing: pass --process-id i or set {PROCESS_ID_ENV}")
    count = _parse_int(num_processes, "num_processes")
    index = _parse_int(process_id, "process_id")
    if count < 1:
        raise ValueError(f"num_processes must be a positive integer, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"process_id must lie in [0, {count}) for num_processes={count}, got {index}")
    return LaunchSpec(str(coordinator), count, index)


def wait_for_coordinator(address: str, *, timeout_s: float) -> None:
    """Block until a TCP connection to ``address`` succeeds; ``TimeoutError`` after ``timeout_s``.

    JAX's own client aborts the whole process (SIGABRT, no Python exception) when the coordinator
    never answers, so non-zero processes check reachability first.
    """
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as error:
            last_error = error
        if time.monotonic() >= deadline:
            raise TimeoutError(f"coordinator {address} did not answer within {timeout_s:g} s "
                               f"({last_error}); is process 0 running and the address right?")
        time.sleep(0.2)


def _warn_before_abort(timeout_s: float, done: threading.Event) -> None:
    # JAX terminates the process when peers never register; say why before it does.
    if not done.wait(timeout_s * 0.95):
        print(f"dmljax: not every process connected within {timeout_s:g} s; JAX will stop this "
              "process. Check that all processes were started with the same coordinator and "
              "num_processes.", flush=True)


def initialize(coordinator: str | None = None, num_processes: Any = None, process_id: Any = None, *,
               timeout_s: float = 300.0, environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """Connect this process to the others (call before any other JAX call touches devices).

    Args:
      coordinator: ``host:port`` of process 0's coordination service, or None (environment, then
        cluster auto-detection).
      num_processes, process_id: as ``jax.distributed.initialize``; None -> environment.
      timeout_s: seconds to wait for the coordinator and for all processes to register.

    Returns:
      The resolved `LaunchSpec` (all None when JAX's cluster detection was used).
    """
    spec = resolve_launch(coordinator, num_processes, process_id, environ=environ)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    # Only the CPU client reads this option (accelerators keep NCCL / ICI): always safe to set.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not spec.explicit:
        jax.distributed.initialize()
        return spec
    if spec.process_id != 0:
        wait_for_coordinator(spec.coordinator, timeout_s=timeout_s)
    done = threading.Event()
    threading.Thread(target=_warn_before_abort, args=(timeout_s, done), daemon=True).start()
    try:
        jax.distributed.initialize(coordinator_address=spec.coordinator, num_processes=spec.num_processes,
                                   process_id=spec.process_id, initialization_timeout=int(max(timeout_s, 1)))
    finally:
        done.set()
    return spec


def process_batch_share(global_batch_size: int, *, process_count: int | None = None) -> int:
    """Rows of the global batch each process loads; error when the count does not divide it."""
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"the global batch size ({global_batch_size}) must be divisible by the number "
                         f"of processes ({count})")
    share = global_batch_size // count
    local_devices = max(jax.local_device_count(), 1) if process_count is None else 1
    if share % local_devices:
        raise ValueError(f"each process's share of the batch ({share}) must be divisible by its "
                         f"local device count ({local_devices})")
    return share


def global_batch(mesh: Mesh, local_batch: Mapping[str, Any], *, axis_name: str = "data") -> dict:
    """Global ``jax.Array``s sharded over ``axis_name`` from this process's rows of every entry.

    Args:
      mesh: a mesh over ``jax.devices()`` (all processes).
      local_batch: entry name -> host array whose leading dimension is this process's share
        (process ``p`` holds rows ``[p * share, (p + 1) * share)`` of the global batch).

    Returns:
      Same keys, arrays of global leading dimension ``share * process_count``.
    """
    sharding = NamedSharding(mesh, P(axis_name))
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


def is_writer() -> bool:
    """True in the one process that prints and writes logs (process 0)."""
    return jax.process_index() == 0


def is_multiprocess() -> bool:
    """True when more than one process takes part (``jax.process_count() > 1``)."""
    return jax.process_count() > 1


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` as a global ``jax.Array`` replicated over all devices of ``mesh``.

    Every process must hold the same values (e.g. a state built from the same seed); each one
    only places its copy on its own devices (``jax.make_array_from_callback``), nothing is sent.
    Typed PRNG keys are replicated through their key data."""
    sharding = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def local_copy(tree: Any) -> Any:
    """Replicated global arrays -> this process's copy on its first local device (unchanged
    leaves otherwise), so host-side code (evaluation, embedding the training set) can run
    single-device programs on a state the multi-process step produced."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"local_copy needs replicated arrays, got sharding {x.sharding}")
            return x.addressable_data(0)
        return x

    return jax.tree.map(one, tree)


def process_rows(num_rows: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[int, int]:
    """``(start, stop)``: this process's contiguous share of ``num_rows`` rows (the first
    processes take ``ceil(num_rows / process_count)`` rows, the last ones what is left)."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    per = -(-num_rows // count)
    start = min(index * per, num_rows)
    return start, min(start + per, num_rows)


def sharded_embed_fn(embed_fn):
    """``embed_fn(state, images, batch_size) -> [N, D]`` run by every process on its share of
    ``images`` only (`process_rows`), the rows all-gathered (``process_allgather``), so every
    process returns the embeddings of all ``N`` images, in order. ``state`` is used through
    `local_copy`. Single-process: ``embed_fn`` itself. Every process must call it together."""
    if not is_multiprocess():
        return embed_fn
    from jax.experimental.multihost_utils import process_allgather

    def sharded(state, images, batch_size):
        n, count = len(images), jax.process_count()
        start, stop = process_rows(n)
        per = -(-n // count)
        # an empty share still embeds one row (same program, same output width), then drops it
        if n == 0:
            return np.asarray(embed_fn(local_copy(state), images, batch_size))
        rows = images[start:stop] if stop > start else images[:1]
        local = np.asarray(embed_fn(local_copy(state), rows, batch_size))[:stop - start]
        padded = np.zeros((per,) + local.shape[1:], local.dtype)
        padded[:len(local)] = local
        gathered = np.asarray(process_allgather(padded))  # [process_count, per, ...]
        sizes = [np.subtract(*process_rows(n, process_index=p)[::-1]) for p in range(count)]
        return np.concatenate([gathered[p, :size] for p, size in enumerate(sizes)])

    return sharded


def barrier(name: str) -> None:
    """All processes wait here (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental.multihost_utils import sync_global_devices
        sync_global_devices(name)
