"""Benchmark: EmbeddingIndex exact (blocked kNN on the device) vs the HNSW backend (usearch).

For each data set (random Gaussian or clustered embeddings, N x D, cosine metric, the index's
default) the script builds both indexes, searches ``--queries`` held-out queries for the
``--k`` nearest items and reports

* recall@k of HNSW against the exact neighbour lists (fraction of the true k found),
* build time (exact: ``add`` incl. the copy to the device; hnsw: ``add`` + graph construction),
* queries per second (the compiled exact search: a second, timed call; hnsw: one call),
* memory: the gallery's bytes (exact) / usearch's ``memory_usage`` (hnsw) and the process's
  peak RSS after the case (each case runs in its own subprocess, so the peak is its own).

    python -m experiments.bench.index                                   # every case below
    python -m experiments.bench.index --cases clustered:100000:128      # the acceptance case
    python -m experiments.bench.index --cases random:1000000:512 --ef 64,128,256

Data: "random": i.i.d. N(0, 1) (the hard case for graph search: no structure);
"clustered": N / 100 centres from N(0, 1), each item a centre plus N(0, 0.5^2) noise per
coordinate (retrieval-like data with ~100 items per class); queries are fresh draws from the
same distribution (never in the gallery). Prints a table and writes JSON (``--json``).
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

DEFAULT_CASES = ("random:100000:128", "random:100000:512", "random:1000000:128", "random:1000000:512",
                 "clustered:100000:128", "clustered:100000:512")
COLUMNS = ["data", "n", "dim", "method", "ef", "recall_at_k", "build_s", "queries_per_s", "index_mib",
           "peak_rss_mib"]


def make_data(kind: str, n: int, dim: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((n, dim), dtype=np.float32),
                rng.standard_normal((queries, dim), dtype=np.float32))
    if kind == "clustered":
        centres = rng.standard_normal((max(n // 100, 1), dim), dtype=np.float32)
        gallery = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        query = centres[rng.integers(0, len(centres), queries)] + 0.5 * rng.standard_normal(
            (queries, dim), dtype=np.float32)
        return gallery, query
    raise ValueError(f"data kind must be 'random' or 'clustered', got {kind!r}")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth)]))


def _worker(kind: str, n: int, dim: int, queries: int, k: int, efs: list[int], seed: int, out: str) -> None:
    from dmljax.index import HNSW_DEFAULTS, EmbeddingIndex

    gallery, query = make_data(kind, n, dim, queries, seed)
    rows = []
    t0 = time.perf_counter()
    exact = EmbeddingIndex(dim, metric="cosine")
    exact.add(gallery)
    exact.device_embeddings.block_until_ready()
    build = time.perf_counter() - t0
    exact.search(query, k=k)  # compile
    t0 = time.perf_counter()
    truth = exact.search(query, k=k).ids
    search = time.perf_counter() - t0
    rows.append({"method": "exact", "ef": None, "recall_at_k": 1.0, "build_s": build,
                 "queries_per_s": queries / search, "index_mib": gallery.nbytes / 2**20})
    del exact
    efs = efs or [HNSW_DEFAULTS["expansion_search"]]
    t0 = time.perf_counter()
    ann = EmbeddingIndex(dim, metric="cosine", backend="hnsw")
    ann.add(gallery)
    ann._hnsw()  # graph construction (otherwise done by the first search)
    build = time.perf_counter() - t0
    for ef in efs:
        ann._ann.expansion_search = int(ef)
        t0 = time.perf_counter()
        found = ann.search(query, k=k).ids
        search = time.perf_counter() - t0
        rows.append({"method": "hnsw", "ef": int(ef), "recall_at_k": recall_at_k(found, truth), "build_s": build,
                     "queries_per_s": queries / search,
                     "index_mib": (ann._ann.memory_usage + gallery.nbytes) / 2**20})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for r in rows:
        r.update(data=kind, n=n, dim=dim, k=k, queries=queries, peak_rss_mib=peak,
                 hnsw_options={**HNSW_DEFAULTS, "expansion_search": r["ef"]} if r["ef"] else None)
    with open(out, "w") as f:
        json.dump(rows, f)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated kind:n:dim (kind: random | clustered)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef", default="", help="comma-separated expansion_search values (default: the index's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="index_bench.json")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "N", "DIM"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    efs = [int(e) for e in args.ef.split(",") if e]
    if args.worker:
        kind, n, dim = args.worker
        _worker(kind, int(n), int(dim), args.queries, args.k, efs, args.seed, args.out)
        return []
    rows: list[dict] = []
    for case in args.cases.split(","):
        kind, n, dim = case.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "experiments.bench.index", "--worker", kind, n, dim, "--out", out,
                   "--queries", str(args.queries), "--k", str(args.k), "--seed", str(args.seed)]
            if efs:
                cmd += ["--ef", args.ef]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                rows.append({"data": kind, "n": int(n), "dim": int(dim), "method": "failed"})
                continue
            with open(out) as f:
                rows.extend(json.load(f))
        print(format_table(rows[-(1 + max(len(efs), 1)):], COLUMNS), flush=True)
    print()
    print(format_table(rows, COLUMNS))
    write_json(args.json, {"rows": rows, "machine": machine_info(), "k": args.k, "queries": args.queries})
    return rows


if __name__ == "__main__":
    main()
