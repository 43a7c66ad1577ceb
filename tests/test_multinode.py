"""artsim on a real multi-raylet Ray: download across nodes (job-wide politeness), a node lost mid-download, and the
embed actor pool across nodes.

The pytest session already holds a local Ray, so the cluster (``ray.cluster_utils.Cluster``: one head raylet with
1 CPU + 3 worker raylets with 2 CPUs, each with its own object store and worker processes) runs in a subprocess,
tests/multinode_job.py, which runs the real stages and prints a JSON result. The loopback HTTP servers run HERE,
in the test process, so that what politeness promises is measured where it matters (at the server), and so that
each request can be traced back to the Ray worker process, hence the node, that made it.

One subprocess runs the three scenarios in order on one cluster (starting raylets costs seconds on 2 cores):
  1. download, 3 worker raylets;  2. download while a worker raylet is removed (2 left);  3. embed of 1's images.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

from artsim.config import config_from_dict  # noqa: E402
from artsim.download.shards import read_committed  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.rundir.schema import empty_record, records_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MET_IMAGES = sorted((REPO / "data" / "met_sample" / "images").glob("*.jpg"))
JOB_TIMEOUT_S = 300

CAP = 3  # per-host connection cap under test
SPREAD_RECORDS = 48  # scenario 1
SPREAD_SHARD = 4
LOSS_RECORDS = 64  # scenario 2
LOSS_SHARD = 4
REMOVE_AFTER_SHARDS = 3
LIMITER_RECORDS = 48  # scenario 4
EMBED_SIZE = 64  # px: resnet18 at 64 px keeps the model part to seconds

pytestmark = [pytest.mark.slow]


# -- which process made a request: httpd.requester_pid (socket -> inode -> pid, Linux /proc) ------------------


# -- inputs -----------------------------------------------------------------------------------------------------------


def record(object_id: str, url: str) -> dict:
    r = empty_record()
    r.update(object_id=object_id, collection=object_id.split(":")[0], image_url=url, license="CC0")
    return r


def download_tree(root: str, shard_size: int) -> dict:
    # workers: null (the default) = one shard worker per CPU of the cluster, on every node.
    return {"run": {"root": root},
            "download": {"allow_hosts": ["127.0.0.1"], "shard_size": shard_size, "image_size": 128,
                         "per_host_connections": CAP, "per_host_requests_per_second": 200, "fetch_threads": 8,
                         "timeout_s": 10.0, "retries": 1, "backoff_base_s": 0.05}}


def embed_tree(root: str) -> dict:
    return {"run": {"root": root},
            "embed": {"model": "resnet18", "image_size": EMBED_SIZE, "batch_size": 4, "num_actors": 2,
                      "torch_threads": 1}}


def write_records(tree: dict, rows: list[dict]) -> RunContext:
    ctx = RunContext(config_from_dict(tree))
    ctx.storage.write_table(records_table(rows), ctx.paths.records)
    return ctx


def spread_inputs(srv: MisbehavingServer, requesters: list) -> tuple[list[dict], dict[str, str]]:
    """Real Met JPEGs, some 404s and an HTML page served as image/jpeg: statuses ok / not_found / not_image."""
    rows, want = [], {}
    for i in range(SPREAD_RECORDS):
        path = f"/spread/{i}.jpg"
        if i % 8 == 3:
            behaviour, status = httpd.status(404), "not_found"
        elif i == 10:
            behaviour, status = httpd.ok(b"<html>not an image</html>" * 20), "not_image"
        else:
            behaviour, status = httpd.ok(MET_IMAGES[i % len(MET_IMAGES)].read_bytes()), "ok"
        srv.add(path, httpd.traced(behaviour, requesters))
        rows.append(record(f"mn:{i}", srv.url(path)))
        want[f"mn:{i}"] = status
    return rows, want


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    """Run the three scenarios on a 4-raylet cluster in a subprocess; yield its JSON result and what we measured."""
    tmp = tmp_path_factory.mktemp("multinode")
    spread_requesters: list = []
    with MisbehavingServer(latency_s=0.2, count_connections=True) as spread_srv, \
            MisbehavingServer(latency_s=0.25, count_connections=True) as loss_srv, \
            MisbehavingServer(latency_s=0.25) as limiter_srv:
        spread_rows, spread_want = spread_inputs(spread_srv, spread_requesters)
        spread_ctx = write_records(download_tree(str(tmp / "spread"), SPREAD_SHARD), spread_rows)
        loss_rows = []
        for i in range(LOSS_RECORDS):
            loss_srv.add(f"/loss/{i}.jpg", httpd.ok(MET_IMAGES[i % len(MET_IMAGES)].read_bytes()))
            loss_rows.append(record(f"nl:{i}", loss_srv.url(f"/loss/{i}.jpg")))
        loss_ctx = write_records(download_tree(str(tmp / "loss"), LOSS_SHARD), loss_rows)
        limiter_rows = []
        for i in range(LIMITER_RECORDS):
            limiter_srv.add(f"/lim/{i}.jpg", httpd.ok(MET_IMAGES[i % len(MET_IMAGES)].read_bytes()))
            limiter_rows.append(record(f"lim:{i}", limiter_srv.url(f"/lim/{i}.jpg")))
        limiter_ctx = write_records(download_tree(str(tmp / "limiter"), LOSS_SHARD), limiter_rows)
        spec = {"worker_nodes": 3, "worker_cpus": 2, "scenarios": [
            {"name": "download", "kind": "download", "config": download_tree(str(tmp / "spread"), SPREAD_SHARD)},
            {"name": "node_loss", "kind": "download_node_loss", "remove_after_shards": REMOVE_AFTER_SHARDS,
             "config": download_tree(str(tmp / "loss"), LOSS_SHARD)},
            # Embeds what scenario 1 downloaded: download -> embed across raylets, as the pipeline chains them.
            {"name": "embed", "kind": "embed", "config": embed_tree(str(tmp / "spread"))},
            # Last: it may break the job's limiter for good. Removes the raylet that hosts the host limiter.
            {"name": "limiter_loss", "kind": "download_node_loss", "remove_after_shards": 2, "remove": "limiter",
             "rerun": True, "config": download_tree(str(tmp / "limiter"), LOSS_SHARD)},
        ]}
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "HF_HUB_OFFLINE": "1"}
        log_path = tmp / "job.log"
        started = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "multinode_job.py"), "--spec",
                                     str(spec_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log,
                                    text=True, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session: driver and every raylet it started
                proc.communicate()
                pytest.fail(f"multinode job did not finish in {JOB_TIMEOUT_S}s; log tail:\n"
                            f"{log_path.read_text()[-3000:]}")
        wall_s = time.perf_counter() - started
        leaked = _processes_left(proc.pid)
        lines = [line for line in stdout.splitlines() if line.startswith("MULTINODE_RESULT ")]
        assert lines, f"no result from the job (rc={proc.returncode}); stdout tail:\n{stdout[-2000:]}\n" \
                      f"log tail:\n{log_path.read_text()[-3000:]}"
        result = json.loads(lines[-1][len("MULTINODE_RESULT "):])
        assert "error" not in result, result.get("traceback")
        scenarios = {s["name"]: s for s in result["scenarios"]}
        (tmp / "result.json").write_text(json.dumps(result, indent=1))  # for a look after a failure
        print(f"\nmultinode: wall {wall_s:.1f}s, cluster start {result['cluster_start_s']}s, "
              + ", ".join(f"{s['name']} {s['elapsed_s']}s" for s in result["scenarios"]))
        yield {"result": result, "scenarios": scenarios, "wall_s": wall_s, "leaked": leaked,
               "spread": {"srv": spread_srv, "ctx": spread_ctx, "want": spread_want,
                          "requesters": list(spread_requesters)},
               "loss": {"srv": loss_srv, "ctx": loss_ctx, "rows": loss_rows},
               "limiter": {"srv": limiter_srv, "ctx": limiter_ctx, "rows": limiter_rows}}


def _processes_left(pgid: int, grace_s: float = 10.0) -> bool:
    """Whether any process of the job's session (its raylets, object stores, workers) is still alive."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)  # do not leak them into the rest of the session, but report it
            return True
        time.sleep(0.2)


def scenario_ok(multinode, name: str) -> dict:
    s = multinode["scenarios"][name]
    assert s["ok"], s.get("traceback")
    return s


def nodes_of(actors: list[dict], fn_name: str) -> set[str]:
    return {a["node_id"] for a in actors if fn_name in a["class"]}


def committed_pairs(ctx: RunContext) -> list[tuple[str, str]]:
    table = read_committed(ctx.storage, ctx.paths.images)
    return list(zip(table.column("object_id").to_pylist(), table.column("status").to_pylist()))


# -- the tests --------------------------------------------------------------------------------------------------------


def test_cluster_had_four_raylets_and_none_leaked(multinode):
    nodes = multinode["result"]["nodes"]
    assert len(nodes) == 4 and all(n["alive"] for n in nodes)
    assert sorted(n["cpus"] for n in nodes) == [1, 2, 2, 2]
    assert not multinode["leaked"], "raylet/worker processes outlived the job (cluster not shut down)"


def test_download_across_raylets_exactly_once_and_capped_at_the_server(multinode):
    s = scenario_ok(multinode, "download")
    spread = multinode["spread"]
    report, srv, ctx = s["report"], spread["srv"], spread["ctx"]

    pairs = committed_pairs(ctx)
    assert len(pairs) == SPREAD_RECORDS and dict(pairs) == spread["want"]  # every record once, right status
    assert report["complete"] and ctx.storage.is_complete(ctx.paths.images)
    assert report["by_status"] == dict(Counter(spread["want"].values()))
    # Politeness is job-wide: every node's shard workers share one limiter, measured at the server.
    # Counted as live client connections (sockets whose client has not closed its end, httpd), not as
    # server handlers: a handler still busy for a client that gave up is not a connection of the job.
    assert srv.max_live_connections <= CAP, (srv.max_live_connections, srv.max_concurrent,
                                             report.get("by_status"), {p: n for p, n in srv.hits.items() if n > 1})
    assert srv.max_live_connections == CAP  # ... and the cap was actually reached (the load was enough to test it)
    for i in range(SPREAD_RECORDS):
        assert srv.hits[f"/spread/{i}.jpg"] == 1, i  # nothing fetched twice (no retries were needed)

    # Where the work ran: shard workers were placed on several raylets, and the requests really came from them.
    workers = [a for a in s["actors"] if "ShardWorker" in a["class"]]
    worker_nodes = {a["node_id"] for a in workers}
    assert len(worker_nodes) >= 3, workers
    node_of_pid = {a["pid"]: a["node_id"] for a in workers}
    requesters = spread["requesters"]
    assert len(requesters) == SPREAD_RECORDS
    request_nodes = Counter(node_of_pid.get(pid, f"unknown pid {pid}") for pid in requesters)
    assert all(node in worker_nodes for node in request_nodes), request_nodes  # only shard workers fetch
    assert len(request_nodes) >= 2, request_nodes  # tasks ran on >= 2 distinct nodes
    limiters = [a for a in s["actors"] if a["class"] == "HostLimiterActorImpl"]
    assert len(limiters) == 1  # the one job-wide limiter (download.limiter_actors = 1)


def test_worker_raylet_removed_mid_download_still_completes_exactly_once(multinode):
    s = scenario_ok(multinode, "node_loss")
    loss = multinode["loss"]
    report, srv, ctx = s["report"], loss["srv"], loss["ctx"]
    info = s["node_loss"]
    assert info.get("removed"), info

    # The removed raylet really was doing work: it hosted live shard workers when it went.
    lost_workers = [a for a in info["actors_on_node"] if "ShardWorker" in a["class"]]
    assert lost_workers
    assert info["node_id"] in s["worker_node_ids"]
    committed_before = info["committed_before_removal"]
    assert REMOVE_AFTER_SHARDS * LOSS_SHARD <= len(committed_before) < LOSS_RECORDS  # removed mid-job

    # The job recovered on the remaining raylets: every record exactly once, all ok, complete.
    pairs = committed_pairs(ctx)
    ids = [oid for oid, _ in pairs]
    assert len(ids) == len(set(ids)) == LOSS_RECORDS
    assert {oid for oid, _ in pairs} == {r["object_id"] for r in loss["rows"]}
    assert all(status == "ok" for _, status in pairs)
    assert report["complete"] and ctx.storage.is_complete(ctx.paths.images)
    assert report["this_run"]["records"] >= LOSS_RECORDS  # summaries of re-run shards may count twice, never fewer
    # Committed work is never refetched; only the lost node's in-flight shards are fetched again.
    for oid in committed_before:
        assert srv.hits[f"/loss/{oid.split(':')[1]}.jpg"] == 1, oid
    refetched = sum(srv.hits[f"/loss/{i}.jpg"] for i in range(LOSS_RECORDS)) - LOSS_RECORDS
    assert 0 <= refetched <= LOSS_SHARD * len(lost_workers)
    # The cap held through the failure (a dead worker's leases come back once Ray reports it dead, never early).
    assert srv.max_live_connections <= CAP
    # Work after the loss ran on the surviving raylets only.
    survivors = [a for a in s["actors"] if "ShardWorker" in a["class"] and a["node_id"] != info["node_id"]]
    assert survivors


def test_embed_across_raylets_matches_a_single_process_call(multinode):
    from artsim.models.embedder import build_embedder
    from artsim.rundir.names import model_key

    s = scenario_ok(multinode, "embed")
    summary = s["summary"]
    ctx = RunContext(config_from_dict(embed_tree(str(multinode["spread"]["ctx"].config.run.root))))
    # Two model replicas, on two different raylets.
    embed_workers = [a for a in s["actors"] if "EmbedWorker" in a["class"]]
    assert len(embed_workers) == 2, embed_workers
    assert len({a["node_id"] for a in embed_workers}) == 2, embed_workers

    images = ctx.storage.read_table(ctx.paths.images, columns=["object_id", "status", "image"])
    ok = [(oid, data) for oid, status, data in zip(images.column("object_id").to_pylist(),
                                                   images.column("status").to_pylist(),
                                                   images.column("image").to_pylist()) if status == "ok"]
    want_ok = sum(1 for status in multinode["spread"]["want"].values() if status == "ok")
    assert len(ok) == want_ok
    out = ctx.paths.embeddings(model_key(ctx.config.embed))
    assert summary["output"] == out and ctx.storage.is_complete(out)
    assert summary["embedded"] == want_ok and summary["decode_errors"] == 0
    assert summary["skipped_not_ok"] == SPREAD_RECORDS - want_ok
    table = ctx.storage.read_table(out)
    ids = table.column("object_id").to_pylist()
    assert sorted(ids) == sorted(oid for oid, _ in ok)  # one embedding per ok image, no duplicates
    vectors = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)

    # The same Embedder, called directly in this process, on the same stored bytes.
    embedder = build_embedder(ctx.config.embed, ctx.storage)
    reference = dict(zip((oid for oid, _ in ok), embedder.embed_pil([data for _, data in ok])))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for oid, vec in zip(ids, vectors):
        np.testing.assert_allclose(vec, reference[oid], atol=1e-4, err_msg=oid)
    # Sanity: the vectors differ between images (a constant output would also "match" a broken reference).
    assert len({tuple(np.round(v, 3)) for v in vectors}) > len(vectors) // 2



def test_host_limiter_lives_on_the_drivers_raylet(multinode):
    """The job-wide HostLimiterActor is pinned to the driver's raylet: losing that node ends the job anyway, so the
    limiter is no extra single point of failure. (Before the pin, Ray placed it on a worker raylet, and losing that
    raylet turned 32 of 48 records into `http_error` rows that no server had returned.) The scenario tries to
    remove the limiter's raylet mid-download; it must find it on the head, where it cannot be removed, and the run
    must end with every record committed exactly once as ok."""
    s = multinode["scenarios"]["limiter_loss"]
    info = s["node_loss"]
    assert info.get("limiter_on_head"), f"the limiter ran on a removable worker raylet: {info}"
    assert s["ok"], s.get("traceback")
    ctx = multinode["limiter"]["ctx"]
    pairs = committed_pairs(ctx)
    assert sorted(oid for oid, _ in pairs) == sorted(r["object_id"] for r in multinode["limiter"]["rows"])
    assert all(status == "ok" for _, status in pairs)
    assert ctx.storage.is_complete(ctx.paths.images)
