"""Multi-process launch: parameter resolution, bad launches, and a real 2-process collective."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dmljax.train.distributed import LaunchSpec, process_batch_share, resolve_launch, wait_for_coordinator

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(device_count: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert resolve_launch(environ=env) == LaunchSpec("10.0.0.1:1234", 4, 3)
    assert resolve_launch("127.0.0.1:99", 2, 1, environ=env) == LaunchSpec("127.0.0.1:99", 2, 1)
    assert resolve_launch(None, None, 0, environ=env) == LaunchSpec("10.0.0.1:1234", 4, 0)


def test_no_coordinator_means_cluster_detection():
    spec = resolve_launch(environ={})
    assert spec == LaunchSpec(None, None, None) and not spec.explicit


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1234", 2, 2), r"process_id must lie in \[0, 2\)"),
    (("127.0.0.1:1234", 2, -1), r"process_id must lie in \[0, 2\)"),
    (("127.0.0.1:1234", 0, 0), "num_processes must be a positive integer"),
    (("127.0.0.1:1234", "two", 0), "num_processes must be an integer"),
    (("127.0.0.1:1234", None, 0), "num_processes is missing"),
    (("127.0.0.1:1234", 2, None), "process_id is missing"),
    (("127.0.0.1", 2, 0), "host:port"),
    (("127.0.0.1:99999", 2, 0), "port must lie"),
    ((None, 2, 0), "without a coordinator"),
])
def test_bad_launch_parameters(args, message):
    with pytest.raises(ValueError, match=message):
        resolve_launch(*args, environ={})


def test_process_count_must_divide_the_global_batch():
    assert process_batch_share(128, process_count=4) == 32
    with pytest.raises(ValueError, match=r"global batch size \(128\) must be divisible by the number of processes \(3\)"):
        process_batch_share(128, process_count=3)


def test_unreachable_coordinator_times_out():
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port} did not answer within 1 s"):
        wait_for_coordinator(f"127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - start < 10


def test_unreachable_coordinator_is_a_clear_error_not_a_hang():
    port = free_port()
    code = (f"from dmljax.train.distributed import initialize\n"
            f"initialize('127.0.0.1:{port}', 2, 1, timeout_s=2)\n")
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env(1), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert f"coordinator 127.0.0.1:{port} did not answer within 2 s" in result.stderr


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from dmljax.train.distributed import global_batch, initialize, is_writer, process_batch_share
    initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), timeout_s=60)
    import jax
    from jax.sharding import PartitionSpec as P
    from dmljax.train.step import data_mesh
    mesh = data_mesh()
    share = process_batch_share(8)
    rows = np.arange(8, dtype=np.float32)[jax.process_index() * share:(jax.process_index() + 1) * share]
    batch = global_batch(mesh, {"x": rows[:, None]})
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), "data")[None], mesh=mesh,
                                  in_specs=P("data"), out_specs=P("data")))(batch["x"])
    print("RESULT", jax.process_count(), jax.device_count(), batch["x"].shape,
          float(np.asarray(total.addressable_shards[0].data)[0]), is_writer(), flush=True)
""")


def test_two_processes_assemble_one_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), address, "2", str(i)], env=subprocess_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
               for out, _ in outputs]
    for process_id, fields in enumerate(results):
        assert fields[:2] == ["2", "4"]
        assert float(fields[-2]) == sum(range(8))
        assert fields[-1] == str(process_id == 0)
