"""A job submitted the way users submit it joins the cluster it was submitted to.

`ray start --head` (token authentication on, as Ray enables it by default: one RAY_AUTH_TOKEN for the cluster and
the client), then Ray's own job client: `ray job submit --working-dir . -- python jobs/pipeline.py -c CONFIG` with
`ray.address` left at null, for ingest -> download (a loopback image server in this process) -> embed -> index.
Asserts the job succeeded, that its tasks ran on THAT cluster (they are in that cluster's state API under the
job's id, and the first line of the Ray stages names that cluster), and that the outputs are complete.

Isolation on a shared machine: the head gets its own RAY_TMPDIR/--temp-dir (so its `ray_current_cluster` record is
invisible to every other Ray user here) and free ports. It is stopped by killing exactly the processes of this
session (their command lines name the private temp dir), never with `ray stop`, which would stop every Ray on the
machine.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, free_port

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
HEAD_RESOURCE = "artsim_submit_head"  # advertised only by this test's head


def _ray(*args, env, timeout=120, check=True):
    proc = subprocess.run([str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def _session_pids(temp_dir: str) -> list[int]:
    """Processes of this test's Ray: their command line or RAY_TMPDIR names its private temp dir (Linux /proc)."""
    pids, mine = [], _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if temp_dir in cmd or f"RAY_TMPDIR={temp_dir}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def _ancestors() -> set[int]:
    """This process and its parents (a command line that launched pytest may name the temp dir too)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _stop_session(temp_dir: str) -> list[int]:
    """Ends this test's Ray: SIGTERM, then SIGKILL after 20 s, to the processes of this session only."""
    pids = _session_pids(temp_dir)
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
    return [p for p in _session_pids(temp_dir) if _alive(p)]


@pytest.fixture
def ray_head():
    """A Ray head with token auth on loopback, private temp dir and free ports; yields (env, dashboard_url, gcs)."""
    temp_dir = tempfile.mkdtemp(prefix="arj-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the job must run from its working_dir package, not from this checkout
    gcs_port, dash_port = free_port(), free_port()
    try:
        _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={temp_dir}", "--num-cpus=4", "--num-gpus=0",
             f"--resources={json.dumps({HEAD_RESOURCE: 1000})}", "--disable-usage-stats", env=env, timeout=180)
        recorded = (Path(temp_dir) / "ray_current_cluster").read_text().strip()
        yield env, f"http://127.0.0.1:{dash_port}", recorded
    finally:
        left = _stop_session(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray survived: {left}"


def _job_tasks(env, dashboard: str, submission_id: str) -> list[dict]:
    """The job's tasks as that cluster's state API lists them (queried with the cluster's token)."""
    code = f"""
import json
from ray.util.state import list_jobs, list_tasks
job = [j for j in list_jobs(address={dashboard!r}) if j.submission_id == {submission_id!r}][0]
tasks = list_tasks(address={dashboard!r}, filters=[("job_id", "=", job.job_id)], limit=10000, detail=True,
                   raise_on_missing_output=False)
print(json.dumps([{{"name": t.name, "state": t.state, "node_id": t.node_id,
                   "resources": t.required_resources}} for t in tasks]))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_submitted_pipeline_joins_the_cluster_it_was_submitted_to(ray_head, met_image_server, tmp_path):
    env, dashboard, gcs_address = ray_head
    run_root = tmp_path / "run"
    config = tmp_path / "job.yaml"
    shutil.copy(REPO / "configs" / "demo.yaml", config)
    submission_id = f"artsim-test-{secrets.token_hex(4)}"
    overrides = [
        "ray.address=null",  # the default users have: join what the job was submitted to
        f"run.root={run_root}", "pipeline.stages=[ingest,download,embed,index]",
        "embed.model=resnet18", "embed.weights=null", "embed.batch_size=16", "embed.image_size=64",
        "index.embeddings=resnet18",
        f"sources.0.image_url_template={met_image_server}/met_{{local_id}}.jpg",
        f"sources.1.image_url_template={met_image_server}/met_{{local_id}}.jpg"]
    args = ["job", "submit", "--address", dashboard, "--submission-id", submission_id, "--working-dir", str(REPO),
            "--", "python", "jobs/pipeline.py", "-c", str(config)]
    for o in overrides:
        args += ["--set", o]
    t0 = time.monotonic()
    proc = _ray(*args, env=env, timeout=900, check=False)
    seconds = time.monotonic() - t0
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-5000:]
    status = _ray("job", "status", "--address", dashboard, submission_id, env=env)
    assert "succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr).lower()

    # 1. The Ray stages joined the submitted-to cluster (found through RAY_ADDRESS), not a private Ray.
    gcs_port = gcs_address.rsplit(":", 1)[1]
    joined = re.findall(r"stage (download|embed|index): Ray cluster at (\S+) \(RAY_ADDRESS\): (\d+) node", logs)
    assert {stage for stage, _, _ in joined} == {"download", "embed", "index"}, logs[-5000:]
    assert all(addr.endswith(f":{gcs_port}") and nodes == "1" for _, addr, nodes in joined), joined
    assert HEAD_RESOURCE in logs  # the line lists the cluster's own custom resource
    assert "private Ray" not in logs

    # 2. Its work is in THAT cluster's state API under this job: download shard workers, embed actors, index tasks.
    tasks = _job_tasks(env, dashboard, submission_id)
    names = " ".join(t["name"] for t in tasks)
    assert "ShardWorker" in names, names[:2000]
    assert "shard_task" in names and "train_task" in names and "tune_task" in names, names[:2000]
    # (Ray Data's actor pools are torn down at the end, so some actor lifecycle tasks read FAILED: not checked.)
    finished = [t["name"] for t in tasks if t["state"] == "FINISHED"]
    assert finished.count("train_task") == 1 and finished.count("tune_task") == 1
    assert finished.count("shard_task") == json.loads((run_root / "summaries" / "index.json").read_text())["shards"]
    assert len({t["node_id"] for t in tasks if t["node_id"]}) == 1  # the one node of that cluster

    # 3. Outputs complete: every record downloaded ok, embedded, indexed.
    records = pq.read_table(run_root / "records")
    images = pq.read_table(run_root / "images", columns=["object_id", "status"])
    assert records.num_rows == 80 and images.num_rows == 80
    assert images.column("status").to_pylist().count("ok") == 80
    assert (run_root / "images" / "_SUCCESS").exists()
    embed_summary = json.loads((run_root / "summaries" / "embed.json").read_text())
    assert embed_summary["embedded"] == 80
    manifest = json.loads((run_root / "index" / "resnet18" / "manifest.json").read_text())
    assert manifest["ntotal"] == 80
    print(f"\njob submit: ingest -> download -> embed -> index on a token-auth `ray start` head: {seconds:.1f} s, "
          f"{len(tasks)} tasks of the job in the cluster's state API")
