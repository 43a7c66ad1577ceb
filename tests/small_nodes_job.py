"""Runs the index stage on a Ray cluster of 1-CPU nodes (``ray.cluster_utils.Cluster``: a head raylet and a worker
raylet, 1 CPU each) and prints what happened as one ``SMALL_NODES_RESULT <json>`` line.

Used by tests/test_task_sizing.py in a subprocess (the pytest session may hold a local Ray; one Ray per process).
Run it with a private RAY_TMPDIR: the Cluster records its address in RAY_TMPDIR/ray/ray_current_cluster, which
`ray.address: null` elsewhere on the machine would otherwise find and join.

    RAY_TMPDIR=$(mktemp -d) python tests/small_nodes_job.py --root RUN_ROOT
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

PREFIX = "SMALL_NODES_RESULT "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from artsim.config import config_from_dict
    from artsim.errors import ConfigError
    from artsim.index.stage import run_index
    from artsim.runtime import RunContext, fit_task, largest_node, node_shapes
    from artsim.testing.index_data import clustered_vectors, object_ids_for, records_for, write_run

    result: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        result["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
        result["cluster_cpus"] = ray.cluster_resources().get("CPU")
        result["largest_node"] = list(largest_node(node_shapes()))
        result["fit_8"] = fit_task(want_cpus=8, what="a test task", key="test")
        t0 = time.monotonic()
        try:
            fit_task(want_cpus=2, min_cpus=2, what="a 2-CPU task", key="train.cpus_per_worker")
            result["fit_2_strict"] = "no error"
        except ConfigError as exc:
            result["fit_2_strict"] = str(exc)
        result["fit_2_strict_s"] = time.monotonic() - t0

        ctx = RunContext(config_from_dict({"run": {"root": args.root},
                                           "index": {"embeddings": "test-model", "num_shards": 2}}))
        object_ids = object_ids_for(3000)
        write_run(ctx.storage, ctx.paths, object_ids, clustered_vectors(3000, 32, n_clusters=30, seed=1),
                  records=records_for(object_ids, seed=1))
        t0 = time.monotonic()
        try:
            summary = run_index(ctx)
            result["index"] = {"vectors": summary["vectors"], "shards": summary["shards"],
                               "recall_at_10": summary["recall_at_10"]}
        except Exception as exc:  # recorded, so the test shows it
            result["index_error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        result["index_s"] = time.monotonic() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
