"""Measure faiss-cpu search QPS and recall@k on the data set that the
index-svc benchmark (`index-svc/src/bin/index-bench.rs`) writes, so that the
shard over gRPC and FAISS in-process are compared on the same vectors, index
string, query parameters and thread count.

The data directory contains `base.f32` and `queries.f32` (row-major
little-endian float32) and `ground_truth.i64` (exact top-k row indices of
each query). Prints one JSON object with a result per factory string.
"""

import argparse
import json
import threading
import time

import faiss
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="directory written by index-bench")
    parser.add_argument("--dimension", type=int, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metric", choices=["inner_product", "l2"], default="inner_product")
    parser.add_argument("--factory", action="append", required=True,
                        help="FAISS factory string; repeat for several")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2,
                        help="client threads, and OpenMP threads of the batched run")
    parser.add_argument("--searches", type=int, default=4000,
                        help="single-query searches of the threaded run")
    return parser.parse_args()


def load(path: str, dtype, dimension: int) -> np.ndarray:
    return np.fromfile(path, dtype=dtype).reshape(-1, dimension)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(row_found) & set(row_truth)) for row_found, row_truth in zip(found, truth))
    return hits / truth.size


def threaded_qps(index, queries: np.ndarray, k: int, threads: int, searches: int) -> float:
    """Single-query searches from `threads` Python threads, one OpenMP thread
    each; FAISS releases the GIL while it searches."""
    per_thread = searches // threads
    barrier = threading.Barrier(threads + 1)

    def worker(offset: int) -> None:
        # libgomp keeps the team size per thread, so each worker sets its own;
        # teams of all cores from concurrent threads oversubscribe the CPU.
        faiss.omp_set_num_threads(1)
        barrier.wait()
        for i in range(per_thread):
            row = (offset + i) % len(queries)
            index.search(queries[row:row + 1], k)

    workers = [threading.Thread(target=worker, args=(t * per_thread,)) for t in range(threads)]
    for thread in workers:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in workers:
        thread.join()
    return per_thread * threads / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    base = load(f"{args.data}/base.f32", np.float32, args.dimension)
    queries = load(f"{args.data}/queries.f32", np.float32, args.dimension)
    truth = load(f"{args.data}/ground_truth.i64", np.int64, args.k)
    metric = faiss.METRIC_INNER_PRODUCT if args.metric == "inner_product" else faiss.METRIC_L2

    results = {}
    for factory in args.factory:
        faiss.omp_set_num_threads(args.threads)
        index = faiss.index_factory(args.dimension, factory, metric)
        started = time.perf_counter()
        if not index.is_trained:
            index.train(base)
        index.add(base)
        build_seconds = time.perf_counter() - started
        space = faiss.ParameterSpace()
        if "IVF" in factory:
            space.set_index_parameter(index, "nprobe", args.nprobe)
        if "HNSW" in factory:
            space.set_index_parameter(index, "efSearch", args.ef_search)

        started = time.perf_counter()
        _, found = index.search(queries, args.k)
        batched_qps = len(queries) / (time.perf_counter() - started)
        single_qps = threaded_qps(index, queries, args.k, args.threads, args.searches)
        results[factory] = {
            "recall": recall_at_k(found, truth),
            "batched_qps": batched_qps,
            "threaded_qps": single_qps,
            "build_seconds": build_seconds,
        }
    print(json.dumps({"faiss_version": faiss.__version__, "results": results}))


if __name__ == "__main__":
    main()
