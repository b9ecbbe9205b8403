"""Benchmark: exact k-nearest-neighbour search, dmljax (blocked, on device) vs scikit-learn
NearestNeighbors(algorithm="brute") and faiss IndexFlatL2 (when importable).

Methods: "dmljax" (``knn(x, k=k)``: symmetric self search), "dmljax_scan" (``knn(x, x,
exclude_self=True)``: the query-by-gallery scan, every distance computed twice),
"numpy" (a plain numpy path: BLAS matmul per query block + ``argpartition`` + sort of
the k), "sklearn", "faiss".

    python -m experiments.bench.knn --n 10000            # CUB/Cars-sized
    python -m experiments.bench.knn --n 60000            # SOP-sized (heavy: run once)
    python -m experiments.bench.knn --n 2000 --dim 64    # smoke test

Every method runs in its own subprocess so its peak resident memory (ru_maxrss) is its
own; the search is the query-in-gallery protocol (N x N, self excluded), euclidean, on
random float32 data. The table reports wall time (dmljax: first call including
compilation, and a second, compiled call unless ``--calls 1``), the process CPU time of
the timed call (all threads; less sensitive than wall time to other load on the machine), peak RSS, the size a dense N x N float32
distance matrix would need, and the agreement of each method's neighbour lists with
dmljax's on the first queries. The JSON (``--json``) holds the same rows plus machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from experiments.bench.common import format_table, machine_info, write_json

METHODS = ("dmljax", "dmljax_scan", "numpy", "sklearn", "faiss")
CHECK_QUERIES = 1000


def _data(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024.0


def _worker(method: str, n: int, dim: int, k: int, seed: int, block: int, gallery_block: int, out: str,
            calls: int = 2) -> None:
    x = _data(n, dim, seed)
    row: dict = {"method": method, "n": n, "dim": dim, "k": k}
    if method in ("dmljax", "dmljax_scan"):
        import jax

        from dmljax.metrics.knn import knn

        row["device"] = str(jax.devices()[0])
        args = (x,) if method == "dmljax" else (x, x)
        kwargs = dict(k=k, block_size=block, gallery_block_size=gallery_block)
        if method == "dmljax_scan":
            kwargs["exclude_self"] = True
        t0, c0 = time.perf_counter(), time.process_time()
        idx, _ = knn(*args, **kwargs)
        idx = np.asarray(jax.block_until_ready(idx))
        row["first_call_s"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0
        if calls > 1:
            t0, c0 = time.perf_counter(), time.process_time()
            idx2, _ = knn(*args, **kwargs)
            jax.block_until_ready(idx2)
            row["seconds"] = time.perf_counter() - t0
            row["cpu_s"] = time.process_time() - c0
        else:  # compilation is a small share at N = 60k; one call keeps the machine free
            row["seconds"] = row["first_call_s"]
        row["block"] = f"{block}" if method == "dmljax" else f"{block}x{gallery_block}"
    elif method == "numpy":
        t0, c0 = time.perf_counter(), time.process_time()
        idx = _numpy_knn(x, k, block)
        row["seconds"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0
    elif method == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        t0, c0 = time.perf_counter(), time.process_time()
        nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="euclidean").fit(x)
        _, idx = nn.kneighbors(x)
        row["seconds"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0
        idx = _drop_self(idx, k)
    else:
        import faiss

        t0, c0 = time.perf_counter(), time.process_time()
        index = faiss.IndexFlatL2(dim)
        index.add(x)
        _, idx = index.search(x, k + 1)
        row["seconds"] = time.perf_counter() - t0
        row["cpu_s"] = time.process_time() - c0
        idx = _drop_self(idx, k)
    row["peak_rss_mib"] = _peak_rss_mib()
    np.save(out + ".npy", np.asarray(idx[:CHECK_QUERIES], np.int64))
    with open(out + ".json", "w") as f:
        json.dump(row, f)


def _numpy_knn(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """Self search in numpy: |q|^2 + |g|^2 - 2 q.g per query block (BLAS), self set to inf,
    ``argpartition`` for the k smallest, then a stable sort of those k."""
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty((x.shape[0], k), np.int64)
    for start in range(0, x.shape[0], block):
        q = x[start:start + block]
        d = sq[start:start + block, None] + sq[None, :] - 2.0 * (q @ x.T)
        d[np.arange(q.shape[0]), np.arange(start, start + q.shape[0])] = np.inf
        part = np.argpartition(d, k, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        out[start:start + block] = np.take_along_axis(part, order, axis=1)
    return out


def _drop_self(idx: np.ndarray, k: int) -> np.ndarray:
    """Remove each query from its own k+1 list (keep the first k others)."""
    rows = np.arange(idx.shape[0])[:, None]
    keep = idx != rows
    return np.stack([r[m][:k] for r, m in zip(idx, keep)])


def _available(method: str) -> bool:
    if method in ("dmljax", "dmljax_scan", "numpy"):
        return True
    try:
        __import__("faiss" if method == "faiss" else "sklearn")
        return True
    except ImportError:
        return False


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="exact kNN benchmark")
    p.add_argument("--n", type=int, default=10000, help="number of items (10000 or 60000 in the note)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=16, help="neighbours (SOP MAP@R needs 11; R@K up to 8 or 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block-size", type=int, default=1024, help="query rows per block (self search: tile side)")
    p.add_argument("--gallery-block-size", type=int, default=4096)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calls", type=int, default=2, choices=(1, 2),
                   help="dmljax calls: 2 = time a compiled second call, 1 = first call only (for N = 60k)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.n, args.dim, args.k, args.seed, args.block_size, args.gallery_block_size, args.out,
                args.calls)
        return {}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            if not _available(method):
                rows.append({"method": method, "note": "not installed"})
                continue
            out = os.path.join(tmp, method)
            cmd = [sys.executable, "-m", "experiments.bench.knn", "--worker", method, "--out", out,
                   "--n", str(args.n), "--dim", str(args.dim), "--k", str(args.k), "--seed", str(args.seed),
                   "--block-size", str(args.block_size), "--gallery-block-size", str(args.gallery_block_size),
                   "--calls", str(args.calls)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"method": method, "note": f"failed: {proc.stderr.strip().splitlines()[-1:]}"})
                continue
            with open(out + ".json") as f:
                row = json.load(f)
            row["_idx"] = np.load(out + ".npy")
            rows.append(row)
    reference = next((r["_idx"] for r in rows if r.get("method") == "dmljax" and "_idx" in r), None)
    dmljax_s = next((r["seconds"] for r in rows if r.get("method") == "dmljax" and "seconds" in r), None)
    for r in rows:
        idx = r.pop("_idx", None)
        if idx is not None and reference is not None:
            # fraction of neighbour ids shared with dmljax's lists (order-insensitive)
            r["agree_with_dmljax"] = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(idx, reference)]))
        if dmljax_s and "seconds" in r:
            r["time_vs_dmljax"] = r["seconds"] / dmljax_s
    dense_gib = args.n * args.n * 4 / 2**30
    print(f"exact kNN, N={args.n}, D={args.dim}, k={args.k}; a dense N x N float32 matrix would take "
          f"{dense_gib:.2f} GiB")
    columns = ["method", "seconds", "cpu_s", "first_call_s", "time_vs_dmljax", "peak_rss_mib", "agree_with_dmljax",
               "note"]
    print(format_table(rows, columns))
    payload = {"benchmark": "knn", "n": args.n, "dim": args.dim, "k": args.k, "dense_matrix_gib": dense_gib,
               "rows": rows, "machine": machine_info(), "cpu_count": os.cpu_count(),
               "load_average_after": os.getloadavg()}
    print(json.dumps(payload, default=str))
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
