"""HNSW recall@10 and throughput against exact inner-product search on random 64-d vectors.

The issue's target: on 1,000,000 random 64-d vectors, HNSW recall@10 >= 0.98 at >= 10x the queries
per second of exact search (``IndexFlatIP``). Both indexes get the same queries in one batched call
and the same number of OpenMP threads; QPS is the best of ``--repeats`` calls. Recall@10 is
|HNSW top-10 ∩ exact top-10| / 10, averaged over the queries (``measure_recall``).

The data are i.i.d. Gaussian vectors, L2-normalised by default (so inner product = cosine, the
usual case for trained embeddings; ``--raw`` keeps them unnormalised, a harder maximum-inner-product
problem). Queries are fresh Gaussian draws, not database vectors. This is the hard case for graph
indexes: i.i.d. Gaussian data in 64 dimensions has no low-dimensional structure to exploit, whereas
real item embeddings usually do, so recall here is a lower bound for what a trained model sees.

    python bench/index_recall.py --n 100000              # a quick look (2-3 minutes on 2 cores)
    python bench/index_recall.py --threads 1 --build-threads 2 --ef-search 64 128 256 384 512
    python bench/index_recall.py --m 32 48 --ef-search 256 512 1024
    python bench/index_recall.py --storage sq8 --m 48 --ef-construction 200 --threads 1 --build-threads 2 \
        --ef-search 256 384 512 768 1024

``--storage sq8`` builds the graph over 8-bit scalar codes inside ``IndexRefineFlat`` (the product's
``index.hnsw_storage: sq8``): a visited node costs a quarter of the memory traffic, and the best
``k * --refine-k-factor`` candidates are re-scored against the float vectors.

The second line is the recorded 1M run: building HNSW (M=32, efConstruction=128) over 1M vectors
took about 30 minutes on 2 busy shared cores. Searching uses one thread so that the CPU-time QPS,
printed beside wall-clock QPS, is exact even when other jobs share the machine.

Prints a table and writes ``bench/results/index_recall.json`` (including the command line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from towerline.config import IndexConfig
from towerline.serving.index import benchmark_index, build_index, set_search_params

log = logging.getLogger("bench.index_recall")

TARGET_RECALL = 0.98
TARGET_SPEEDUP = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="database vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=64, help="vector dimension (default 64)")
    p.add_argument("--queries", type=int, default=1000, help="query vectors (default 1000)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--m", type=int, nargs="+", default=[32], help="HNSW graph degrees to build (default 32)")
    p.add_argument("--ef-construction", type=int, default=128, help="HNSW efConstruction (default 128)")
    p.add_argument("--storage", nargs="+", choices=["flat", "sq8"], default=["flat"],
                   help="HNSW vector storage to build: flat floats, or 8-bit codes re-scored exactly (default flat)")
    p.add_argument("--refine-k-factor", type=int, default=2, help="sq8: candidates re-scored per result (default 2)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256], help="efSearch values to sweep")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="OpenMP threads for both indexes")
    p.add_argument("--build-threads", type=int, default=None, help="OpenMP threads for building (default: --threads)")
    p.add_argument("--repeats", type=int, default=3, help="timed search calls per setting; the best counts")
    p.add_argument("--raw", action="store_true", help="keep vectors unnormalised (default: L2-normalised)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "index_recall.json")
    return p.parse_args(argv)


def gaussian(n: int, dim: int, rng: np.random.Generator, normalise: bool) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rng = np.random.default_rng(args.seed)
    items = gaussian(args.n, args.dim, rng, normalise=not args.raw)  # (N, D)
    queries = gaussian(args.queries, args.dim, rng, normalise=not args.raw)  # (Q, D)
    log.info("%d x %d %s Gaussian vectors, %d queries, %d search threads", args.n, args.dim,
             "raw" if args.raw else "normalised", args.queries, args.threads)

    build_threads = args.build_threads or args.threads
    exact = build_index(items, IndexConfig(kind="flat"), threads=build_threads)
    rows = []
    for storage, m in [(st, m) for st in args.storage for m in args.m]:
        cfg = IndexConfig(kind="hnsw", hnsw_m=m, hnsw_ef_construction=args.ef_construction, hnsw_storage=storage,
                          hnsw_refine_k_factor=args.refine_k_factor)
        log.info("building HNSW %s M=%d efConstruction=%d ...", storage, m, args.ef_construction)
        t0 = time.perf_counter()
        hnsw = build_index(items, cfg, threads=build_threads)
        build_s = time.perf_counter() - t0
        log.info("built in %.0f s", build_s)
        for ef in args.ef_search:
            set_search_params(hnsw, {"efSearch": ef})
            r = benchmark_index(hnsw, exact, queries, k=args.k, threads=args.threads, repeats=args.repeats)
            rows.append({"storage": storage, "M": m, "efConstruction": args.ef_construction, "efSearch": ef, "build_s": round(build_s, 1),
                         "recall_at_k": r[f"recall_at_{args.k}"], "qps": r["qps"], "exact_qps": r["exact_qps"],
                         "speedup": r["speedup"], "cpu_qps": r["cpu_qps"], "exact_cpu_qps": r["exact_cpu_qps"],
                         "cpu_speedup": r["cpu_speedup"], "loadavg_1m": os.getloadavg()[0]})
            log.info("%s M=%d efSearch=%d: recall@%d %.4f, %.0f QPS (%.1fx exact), CPU-time %.0f QPS (%.1fx exact)",
                     storage, m, ef, args.k, rows[-1]["recall_at_k"], r["qps"], r["speedup"], r["cpu_qps"], r["cpu_speedup"])
        del hnsw

    # exact search is timed beside every setting; the table shows the median of those timings
    exact_qps = float(np.median([r["exact_qps"] for r in rows]))
    exact_cpu_qps = float(np.median([r["exact_cpu_qps"] for r in rows]))
    met = [r for r in rows if r["recall_at_k"] >= TARGET_RECALL and r["speedup"] >= TARGET_SPEEDUP]
    met_cpu = [r for r in rows if r["recall_at_k"] >= TARGET_RECALL and r["cpu_speedup"] >= TARGET_SPEEDUP]
    print(f"\n{args.n:,} x {args.dim} {'raw' if args.raw else 'normalised'} Gaussian vectors, "
          f"{args.queries} queries in one batch, {args.threads} search thread(s), FAISS {faiss.__version__}")
    print(f"{'index':<30}{'efSearch':>9}{'recall@' + str(args.k):>11}{'QPS':>9}{'vs exact':>10}{'CPU QPS':>9}{'vs exact':>10}")
    print(f"{'flat IP (exact)':<30}{'-':>9}{1.0:>11.4f}{exact_qps:>9.0f}{1.0:>9.1f}x{exact_cpu_qps:>9.0f}{1.0:>9.1f}x")
    for r in rows:
        name = f"HNSW{'-SQ8+refine' if r['storage'] == 'sq8' else ''} M={r['M']} efC={r['efConstruction']}"
        print(f"{name:<30}{r['efSearch']:>9}{r['recall_at_k']:>11.4f}{r['qps']:>9.0f}{r['speedup']:>9.1f}x"
              f"{r['cpu_qps']:>9.0f}{r['cpu_speedup']:>9.1f}x")
    print("QPS: wall clock; CPU QPS: queries per second of process CPU time (robust to a busy machine). "
          "vs exact: against exact search timed in the same setting.")
    print(f"target recall@{args.k} >= {TARGET_RECALL} at >= {TARGET_SPEEDUP:.0f}x exact QPS: "
          f"wall clock {'met' if met else 'not met'}, CPU time {'met' if met_cpu else 'not met'}")

    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "n": args.n, "dim": args.dim, "n_queries": args.queries, "k": args.k,
        "data": "i.i.d. Gaussian, " + ("raw (unnormalised)" if args.raw else "L2-normalised"),
        "metric": "inner_product", "refine_k_factor": args.refine_k_factor, "threads": args.threads, "build_threads": build_threads, "repeats": args.repeats, "seed": args.seed,
        "faiss_version": faiss.__version__, "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                                                       "platform": platform.platform()},
        "exact_qps": exact_qps, "exact_cpu_qps": exact_cpu_qps, "hnsw": rows,
        "target": {"recall_at_k": TARGET_RECALL, "speedup": TARGET_SPEEDUP},
        "target_met": {"wall_clock": bool(met), "cpu_time": bool(met_cpu)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
