"""The autofaiss side of benchmarks/bench_index.py. Runs in benchmarks/.venv-autofaiss (autofaiss==2.18.0, never
in the project's requirements): builds an index over the prepared vectors with autofaiss' own choices under the same
memory budget, applies the search parameters it recommends, and measures recall@10 and queries/s on the same
held-out queries and ground truth as the artsim side. Prints one JSON object on the last line.

    benchmarks/.venv-autofaiss/bin/python benchmarks/index_autofaiss_build.py DATA_DIR OUT_DIR BUDGET_GB
"""
import json
import os
import sys
import time

import faiss
import numpy as np


def recall_at_10(found, truth):
    return float(np.mean([len(set(f[:10]) & set(t[:10])) / 10 for f, t in zip(found, truth)]))


def main(data_dir, out_dir, budget_gb):
    from autofaiss import build_index

    vectors = np.load(os.path.join(data_dir, "vectors.npy"), mmap_mode="r", allow_pickle=False)
    queries = np.load(os.path.join(data_dir, "queries.npy"), allow_pickle=False)
    truth = np.load(os.path.join(data_dir, "truth_ids.npy"), allow_pickle=False)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    index, infos = build_index(
        embeddings=np.ascontiguousarray(vectors, dtype=np.float32), index_path=os.path.join(out_dir, "af.index"),
        index_infos_path=os.path.join(out_dir, "af_infos.json"), metric_type="ip",
        max_index_memory_usage=f"{budget_gb}G", current_memory_available="16G", min_nearest_neighbors_to_retrieve=10,
        max_index_query_time_ms=10, save_on_disk=True, verbose=30)
    build_seconds = time.perf_counter() - start
    if infos and infos.get("index_param"):
        faiss.ParameterSpace().set_index_parameters(index, infos["index_param"])
    index.search(queries[:10], 10)  # warm-up
    t0 = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_seconds = time.perf_counter() - t0
    singles = []
    for q in queries[:200]:
        t1 = time.perf_counter()
        index.search(q[None, :], 10)
        singles.append(time.perf_counter() - t1)
    print(json.dumps({
        "tool": "autofaiss 2.18.0", "faiss": faiss.__version__, "index_key": (infos or {}).get("index_key"),
        "index_param": (infos or {}).get("index_param"), "build_seconds": round(build_seconds, 1),
        "recall_at_10": round(recall_at_10(found, truth), 4), "qps_batch": round(len(queries) / batch_seconds, 1),
        "p50_ms_single": round(1000 * float(np.median(singles)), 3),
        "index_bytes": os.path.getsize(os.path.join(out_dir, "af.index"))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
