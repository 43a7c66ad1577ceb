"""Runs artsim stages on a real multi-raylet Ray (``ray.cluster_utils.Cluster``) and prints what happened as JSON.

Used by tests/test_multinode.py, which runs it in a subprocess because the pytest session already holds a local
Ray (one Ray per process). Everything below is the real code path: one head raylet + N worker raylets on this
machine (separate raylet, object store and worker processes per node), ``ray.init(address=cluster.address)``, then
``run_download(ctx)`` / ``run_embed(ctx)`` exactly as the CLI calls them.

    python tests/multinode_job.py --spec SPEC.json

SPEC: {"worker_nodes": 3, "worker_cpus": 2, "scenarios": [{"name", "kind", "config", ...}, ...]} where kind is

* ``download`` — run_download(ctx);
* ``download_node_loss`` — run_download(ctx) while a watcher thread removes one worker raylet once
  ``remove_after_shards`` shard files are committed. ``remove`` picks the victim: ``"shard_worker"`` (default) = a
  node that hosts shard workers but not the host limiter; ``"limiter"`` = the node that hosts the host limiter
  actor. With ``"rerun": true`` the download is run a second time afterwards (what a user does after a failure),
  and the first run's outcome is recorded in ``first_run``;
* ``embed`` — run_embed(ctx).

Scenarios run in order on one cluster (starting raylets costs seconds on a 2-core machine); a scenario that raises
is recorded with its error and the next one still runs. The last stdout line is ``MULTINODE_RESULT <json>``.
The cluster is always shut down (try/finally), so no raylet outlives this process.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from pathlib import Path

RESULT_PREFIX = "MULTINODE_RESULT "


def actor_placements() -> dict[str, dict]:
    """Every actor this cluster has seen (GCS actor table, no dashboard needed): id -> class, node, state."""
    from ray._private.state import state

    return {actor_id: {"class": info["ActorClassName"], "node_id": info["Address"]["NodeID"],
                       "state": info["State"], "restarts": info["NumRestarts"], "pid": info["Pid"]}
            for actor_id, info in state.actor_table(None).items()}


def new_actors(before: dict[str, dict]) -> list[dict]:
    """Actors created since ``before`` (the actor table keeps dead actors, so a diff isolates one scenario)."""
    return [dict(info, actor_id=aid) for aid, info in actor_placements().items() if aid not in before]


def is_map_worker(actor: dict, fn_name: str) -> bool:
    # Ray Data names its pool actors after the operator, e.g. "MapWorker(Map(ShardWorker))".
    return fn_name in actor["class"]


def committed_ids(ctx) -> list[str]:
    from artsim.download.shards import read_committed

    return read_committed(ctx.storage, ctx.paths.images).column("object_id").to_pylist()


class NodeRemover(threading.Thread):
    """Waits until ``after_shards`` shard files are committed, then removes one worker raylet mid-job.

    target "shard_worker": the victim hosts at least one live shard worker (so in-flight work is really lost) and
    not the host limiter. target "limiter": the victim is the raylet that hosts the job's host limiter actor (the
    head cannot be removed while the driver is attached to it: then nothing is removed and ``limiter_on_head``
    says why).
    """

    def __init__(self, cluster, ctx, after_shards: int, target: str = "shard_worker", timeout_s: float = 120.0):
        super().__init__(daemon=True)
        self.cluster, self.ctx, self.after_shards, self.timeout_s = cluster, ctx, after_shards, timeout_s
        self.target = target
        self.info: dict = {"removed": False}

    def run(self) -> None:
        from artsim.rundir.images import shard_files

        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                if len(shard_files(self.ctx.storage, self.ctx.paths.images)) >= self.after_shards:
                    victim = self._pick_victim()
                    if self.info.get("limiter_on_head"):
                        return
                    if victim is not None:
                        self._remove(victim)
                        return
                time.sleep(0.05)
            self.info["error"] = "no shard committed on a removable node before the timeout"
        except Exception as exc:  # reported in the JSON; the test fails on it
            self.info["error"] = f"{type(exc).__name__}: {exc}"

    def _pick_victim(self):
        actors = [a for a in actor_placements().values() if a["state"] == "ALIVE"]
        limiter_nodes = {a["node_id"] for a in actors if a["class"] == "HostLimiterActorImpl"}
        if self.target == "limiter":
            if self.cluster.head_node.node_id in limiter_nodes:
                self.info["limiter_on_head"] = True
                return None
            return next((n for n in self.cluster.worker_nodes if n.node_id in limiter_nodes), None)
        # Most shard workers first: the removal then hurts the job the most.
        candidates = []
        for node in self.cluster.worker_nodes:
            workers = [a for a in actors if a["node_id"] == node.node_id and is_map_worker(a, "ShardWorker")]
            if workers and node.node_id not in limiter_nodes:
                candidates.append((len(workers), node))
        if not candidates:
            return None
        return max(candidates, key=lambda c: c[0])[1]

    def _remove(self, node) -> None:
        committed = committed_ids(self.ctx)  # read BEFORE removing: all of these are final
        on_node = [a for a in actor_placements().values()
                   if a["node_id"] == node.node_id and a["state"] == "ALIVE"]
        started = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL: like a machine that disappears
        self.info.update(removed=True, node_id=node.node_id, committed_before_removal=committed,
                         actors_on_node=on_node, remove_s=round(time.monotonic() - started, 2),
                         at_unix=time.time())


def first_run_outcome(run_download, ctx) -> dict:
    """Run the download once, tolerating failure; what it committed (statuses, a few errors) is the outcome."""
    from collections import Counter

    from artsim.download.shards import read_committed

    outcome: dict = {}
    try:
        report = run_download(ctx)
        outcome.update(ok=True, complete=report["complete"])
    except Exception as exc:
        outcome.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    table = read_committed(ctx.storage, ctx.paths.images, columns=("object_id", "status", "error"))
    outcome["committed_status"] = dict(Counter(table.column("status").to_pylist()))
    outcome["errors"] = sorted({e for e in table.column("error").to_pylist() if e})[:5]
    outcome["success_marker"] = ctx.storage.is_complete(ctx.paths.images)
    return outcome


def run_scenario(cluster, scenario: dict) -> dict:
    from artsim.config import config_from_dict
    from artsim.runtime import RunContext

    ctx = RunContext(config_from_dict(scenario["config"]))
    before = actor_placements()
    result: dict = {"name": scenario["name"], "kind": scenario["kind"],
                    "worker_node_ids": [n.node_id for n in cluster.worker_nodes],
                    "head_node_id": cluster.head_node.node_id}
    remover = None
    start = time.perf_counter()
    try:
        if scenario["kind"] == "download":
            from artsim.download.stage import run_download

            result["report"] = run_download(ctx)
        elif scenario["kind"] == "download_node_loss":
            from artsim.download.stage import run_download

            remover = NodeRemover(cluster, ctx, scenario["remove_after_shards"], scenario.get("remove", "shard_worker"))
            remover.start()
            if scenario.get("rerun"):
                result["first_run"] = first_run_outcome(run_download, ctx)
                remover.join(timeout=5)
            result["report"] = run_download(ctx)
        elif scenario["kind"] == "embed":
            from artsim.embed.stage import run_embed

            result["summary"] = run_embed(ctx)
        else:
            raise ValueError(f"unknown scenario kind {scenario['kind']!r}")
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    if remover is not None:
        remover.join(timeout=5)
        result["node_loss"] = remover.info
    result["actors"] = new_actors(before)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file: cluster shape and scenarios")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())

    import ray
    from ray.cluster_utils import Cluster

    out: dict = {"scenarios": []}
    started = time.perf_counter()
    cluster = None
    try:
        # Fast failure detection: a removed raylet is declared dead in ~2 s instead of Ray's default ~30 s.
        system_config = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                         "health_check_failure_threshold": 4}
        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "include_dashboard": False,
                                          "_system_config": system_config})
        for _ in range(spec.get("worker_nodes", 3)):
            cluster.add_node(num_cpus=spec.get("worker_cpus", 2))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        out["cluster_start_s"] = round(time.perf_counter() - started, 2)
        out["nodes"] = [{"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0)}
                        for n in ray.nodes()]
        for scenario in spec["scenarios"]:
            out["scenarios"].append(run_scenario(cluster, scenario))
            print(f"multinode: {scenario['name']}: ok={out['scenarios'][-1]['ok']} "
                  f"in {out['scenarios'][-1]['elapsed_s']}s", flush=True)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-4000:]
    finally:
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
    out["total_s"] = round(time.perf_counter() - started, 2)
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
