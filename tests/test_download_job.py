"""The download stage on real local Ray: job-wide politeness, exactly-once output, incremental, retry, kill/resume."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

from artsim.config import config_from_dict  # noqa: E402
from artsim.download.stage import run_download  # noqa: E402
from artsim.download.shards import read_committed
from artsim.rundir.images import shard_files  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.rundir.schema import empty_record, records_table  # noqa: E402
from artsim.storage import SUCCESS, join  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def jpeg(width=900, height=600, shade=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def record(object_id: str, url: str) -> dict:
    r = empty_record()
    r.update(object_id=object_id, collection=object_id.split(":")[0], image_url=url, license="CC0")
    return r


def make_ctx(root: str, **download) -> RunContext:
    tree = {"run": {"root": root}, "download": {"allow_hosts": ["127.0.0.1"], "timeout_s": 2.0,
                                                 "backoff_base_s": 0.05, "retries": 1, **download}}
    return RunContext(config_from_dict(tree))


def committed_pairs(ctx) -> list[tuple[str, str]]:
    table = read_committed(ctx.storage, ctx.paths.images)
    return list(zip(table.column("object_id").to_pylist(), table.column("status").to_pylist()))


def test_job_exactly_once_politeness_incremental_and_retry(ray_session, tmp_path):
    image = jpeg()
    with MisbehavingServer(latency_s=0.05) as srv:
        rows, want = [], {}
        for i in range(30):
            kind = ("ok", "missing", "down", "noai", "ok", "ok")[i % 6]
            path = f"/{kind}/{i}.jpg"
            srv.add(path, {"ok": httpd.ok(image), "missing": httpd.status(404), "down": httpd.status(502),
                           "noai": httpd.ok(image, headers={"X-Robots-Tag": "noai"})}[kind])
            rows.append(record(f"t:{i}", srv.url(path)))
            want[f"t:{i}"] = {"ok": "ok", "missing": "not_found", "down": "http_error", "noai": "opted_out"}[kind]
        ctx = make_ctx(str(tmp_path / "run"), shard_size=6, workers=3, per_host_connections=2,
                       per_host_requests_per_second=200, fetch_threads=16)
        ctx.storage.write_table(records_table(rows), ctx.paths.records)

        report = run_download(ctx)

        pairs = committed_pairs(ctx)
        assert len(pairs) == 30 and dict(pairs) == want  # every record exactly once, right status
        assert srv.max_concurrent == 2  # three worker processes x 16 threads, one job-wide cap of 2
        assert report["max_concurrent_connections_per_host"]["127.0.0.1"] <= 2
        assert report["complete"] and ctx.storage.is_complete(ctx.paths.images)
        assert report["by_status"] == dict(Counter(want.values()))
        assert report["this_run"]["records"] == 30 and report["this_run"]["records_per_s"] > 0
        saved = ctx.storage.read_json(ctx.paths.images_report)
        assert saved["by_host"]["127.0.0.1"]["ok"] == 15
        assert saved["top_failing_hosts"][0]["host"] == "127.0.0.1"
        assert ctx.storage.read_table(ctx.paths.images).num_rows == 30  # readers accept it: _SUCCESS is there
        assert srv.hits.get("/robots.txt", 0) <= 3  # cached job-wide (at most one fetch per racing worker)
        hits_before = dict(srv.hits)
        files_before = {n: os.path.getmtime(join(ctx.paths.images, n))
                        for n in shard_files(ctx.storage, ctx.paths.images)}
        assert len(files_before) == 5

        # Incremental: records added later are fetched; old ones are not requested again, old shards untouched.
        for i in range(30, 36):
            srv.add(f"/ok/{i}.jpg", httpd.ok(image))
            rows.append(record(f"t:{i}", srv.url(f"/ok/{i}.jpg")))
            want[f"t:{i}"] = "ok"
        ctx.storage.write_table(records_table(rows), ctx.paths.records)
        report = run_download(ctx)
        assert report["this_run"]["records"] == 6
        pairs = committed_pairs(ctx)
        assert len(pairs) == 36 and dict(pairs) == want
        for path, n in hits_before.items():
            if path != "/robots.txt":
                assert srv.hits[path] == n, path
        files_after = {n: os.path.getmtime(join(ctx.paths.images, n))
                       for n in shard_files(ctx.storage, ctx.paths.images)}
        assert {n: files_after[n] for n in files_before} == files_before
        assert len(files_after) == 6

        # --retry-failed: the 502 host recovered; only the retryable records are requested again.
        for i in range(2, 30, 6):
            srv.add(f"/down/{i}.jpg", httpd.ok(image))
            want[f"t:{i}"] = "ok"
        hits_before = dict(srv.hits)
        report = run_download(ctx, retry_failed=True)
        assert report["this_run"]["records"] == 5
        pairs = committed_pairs(ctx)
        assert len(pairs) == 36 and dict(pairs) == want
        assert len(shard_files(ctx.storage, ctx.paths.images)) == 6
        for path, n in hits_before.items():
            if not path.startswith("/down/") and path != "/robots.txt":
                assert srv.hits[path] == n, path
        assert report["complete"]


def test_job_writes_to_s3(ray_session, s3_endpoint):
    image = jpeg(500, 500)
    with MisbehavingServer() as srv:
        srv.add("/a.jpg", httpd.ok(image))
        root = f"s3://artsim-test/download-{time.time_ns()}"
        tree = {"run": {"root": root}, "storage": {"s3_endpoint_url": s3_endpoint},
                "download": {"allow_hosts": ["127.0.0.1"], "workers": 1, "shard_size": 2}}
        ctx = RunContext(config_from_dict(tree))
        rows = [record("s:a", srv.url("/a.jpg")), record("s:b", srv.url("/b.jpg"))]
        ctx.storage.write_table(records_table(rows), ctx.paths.records)
        report = run_download(ctx)
        assert report["complete"] and ctx.storage.is_complete(ctx.paths.images)
        table = ctx.storage.read_table(ctx.paths.images)
        assert sorted(zip(table.column("object_id").to_pylist(), table.column("status").to_pylist())) == [
            ("s:a", "ok"), ("s:b", "not_found")]


def test_killed_job_resumes_without_loss_or_duplicates(ray_session, tmp_path):
    """Run the download as its own driver process, SIGKILL it after some shards committed, re-run, check."""
    import ray

    image = jpeg(600, 400)
    with MisbehavingServer(latency_s=0.25) as srv:
        rows = []
        for i in range(48):
            srv.add(f"/{i}.jpg", httpd.ok(image))
            rows.append(record(f"k:{i}", srv.url(f"/{i}.jpg")))
        root = str(tmp_path / "run")
        download = {"allow_hosts": ["127.0.0.1"], "shard_size": 4, "workers": 2, "per_host_connections": 2,
                    "per_host_requests_per_second": 100, "timeout_s": 5.0}
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump({"run": {"root": root}, "download": download,
                                               "ray": {"address": ray.get_runtime_context().gcs_address}}))
        ctx = make_ctx(root, **{k: v for k, v in download.items() if k != "allow_hosts"})
        ctx.storage.write_table(records_table(rows), ctx.paths.records)
        images = Path(ctx.paths.images)

        proc = subprocess.Popen([sys.executable, "-m", "artsim.cli", "download", "-c", str(config_path)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and len(list(images.glob("shard-*.parquet"))) < 2:
                assert proc.poll() is None, "the download finished before it could be killed"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        committed_at_kill = len(list(images.glob("shard-*.parquet")))
        assert 2 <= committed_at_kill < 12
        assert not (images / SUCCESS).exists()  # a killed run never looks complete
        with pytest.raises(Exception, match="incomplete"):
            ctx.storage.read_table(ctx.paths.images)
        time.sleep(1.0)  # let Ray reap the dead driver's workers

        before = read_committed(ctx.storage, ctx.paths.images).column("object_id").to_pylist()
        hits_before = dict(srv.hits)
        report = run_download(ctx)
        assert report["this_run"]["records"] <= 48 - len(before)
        pairs = committed_pairs(ctx)
        ids = [p[0] for p in pairs]
        assert len(ids) == len(set(ids)) == 48 and all(s == "ok" for _, s in pairs)
        assert report["complete"] and (images / SUCCESS).exists()
        for oid in before:  # committed before the kill: never requested again
            path = f"/{oid.split(':')[1]}.jpg"
            assert srv.hits[path] == hits_before[path]
        assert not [p for p in images.iterdir() if ".tmp-" in p.name]


def test_bad_config_exits_2_and_missing_records_is_a_clear_error(tmp_path):
    from artsim.errors import ArtsimError

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"root": str(tmp_path / "run")}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "artsim.cli", "download", "-c", str(config),
                          "--set", "download.per_host_connections=0"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "download.per_host_connections" in bad.stderr
    with pytest.raises(ArtsimError, match="records.*not found"):
        run_download(make_ctx(str(tmp_path / "run")))


def test_deferred_releases_reach_the_limiter_and_failures_go_at_once(ray_session):
    """The Ray limiter client defers successful releases (to ride along with the next acquire); they must still
    reach the actor on their own within the delay, and failures (circuit breaker input) must not wait."""
    import ray

    from artsim.download.ray_job import RayLimiterClient, start_limiters

    cfg = config_from_dict({"download": {"per_host_connections": 1, "per_host_requests_per_second": 1000,
                                         "circuit_breaker_failures": 1}})
    limiters = start_limiters(cfg)
    try:
        client = RayLimiterClient(limiters, release_delay_s=0.3)
        other = RayLimiterClient(limiters, release_delay_s=0.3)
        lease, _ = client.acquire("a.example", time.monotonic() + 5)
        assert lease is not None
        client.release("a.example", lease, "ok")
        # Held for the delay (stricter, never looser), then the flusher returns the slot without another acquire.
        assert other.acquire("a.example", time.monotonic() + 0.05) == (None, "queue_timeout")
        t0 = time.monotonic()
        lease2, _ = other.acquire("a.example", time.monotonic() + 5)
        assert lease2 is not None and time.monotonic() - t0 < 1.0
        # A deferred release rides along with the next acquire to the same actor: the slot is free at once.
        other.release("a.example", lease2, "ok")
        lease3, _ = other.acquire("a.example", time.monotonic() + 0.05)
        assert lease3 is not None
        # A failure is sent immediately: the breaker (1 failure) opens before any flush delay.
        other.release("a.example", lease3, "server_error")
        assert client.acquire("a.example", time.monotonic() + 0.05) == (None, "paused")
        snap = ray.get(limiters[0].snapshot.remote())["a.example"]
        assert snap["max_active"] == 1 and snap["times_paused"] == 1
    finally:
        for actor in limiters:
            ray.kill(actor)


def _crowd(waiters: int, connections: int, hold_s: float, wait_limit_s: float = 30.0):
    """``waiters`` concurrent acquires for one host on the limiter actor's class (plain asyncio, no Ray): each holds
    its lease for ``hold_s`` and releases it. Returns (grant order, results, the host's snapshot)."""
    import asyncio

    from artsim.download.ray_job import HostLimiterActorImpl

    limiter = HostLimiterActorImpl(connections, 100_000.0, breaker_failures=5, breaker_cooldown_s=60)
    order: list[int] = []

    async def one(i: int):
        await asyncio.sleep(i * 1e-4)  # arrive in index order
        lease, reason = await limiter.acquire("hot.example", wait_limit_s)
        if lease is None:
            return reason
        order.append(i)
        await asyncio.sleep(hold_s)
        await limiter.release("hot.example", lease, "ok")
        return "ok"

    async def main():
        return await asyncio.gather(*(one(i) for i in range(waiters)))

    results = asyncio.run(main())
    return order, results, asyncio.run(limiter.snapshot())["hot.example"]


def test_limiter_queue_timeout_and_pause_still_reach_queued_waiters():
    import asyncio

    from artsim.download.ray_job import HostLimiterActorImpl

    # Waiters that run out of time leave the queue with queue_timeout; the ones behind them still get served.
    order, results, snap = _crowd(waiters=20, connections=1, hold_s=0.05, wait_limit_s=0.3)
    assert "queue_timeout" in results and results[:3] == ["ok"] * 3
    assert snap["requests"] == results.count("ok") and snap["max_active"] == 1

    async def breaker():
        limiter = HostLimiterActorImpl(1, 100_000.0, breaker_failures=1, breaker_cooldown_s=60)
        lease, _ = await limiter.acquire("h", 5)
        queued = [asyncio.create_task(limiter.acquire("h", 5)) for _ in range(5)]
        await asyncio.sleep(0.05)
        await limiter.release("h", lease, "server_error")  # opens the breaker: every queued request gives up
        return await asyncio.wait_for(asyncio.gather(*queued), timeout=2)

    assert asyncio.run(breaker()) == [(None, "paused")] * 5


def test_limiter_wakes_waiters_one_at_a_time_in_arrival_order():
    """300 waiters on one host, cap 3: grants follow arrival order and the limiter looks at a waiter about once per
    grant (a wake-everyone design spent ~14,000 tries on this crowd)."""
    order, results, snap = _crowd(waiters=300, connections=3, hold_s=0.002)
    assert results == ["ok"] * 300 and order == list(range(300))
    assert snap["max_active"] == 3 and snap["requests"] == 300
    # Each arrival and each release looks at the head of the queue once: at most ~3 tries per request, whatever the
    # crowd (waking everyone would cost O(waiters) per release).
    assert snap["attempts"] <= 3 * 300, snap


def _holder_class():
    """Stands in for a shard worker: an actor that can be busy (a long call), killed or crash and be restarted.
    (Defined in a function so that Ray ships it by value: the workers cannot import this test module.)"""

    class Holder:
        def identity(self) -> tuple[str, int]:
            import os

            import ray

            return ray.get_runtime_context().get_actor_id(), os.getpid()

        def busy(self, seconds: float) -> bool:
            time.sleep(seconds)
            return True

    return Holder


def test_lease_outlives_a_busy_holder_and_returns_when_the_holder_dies(ray_session):
    """Leases have no expiry: a holder busy far longer than any request keeps its slot; once its actor is dead the
    limiter takes the slot back (seconds, not a fixed 30 s lease)."""
    import ray

    from artsim.download.ray_job import RayLimiterClient, start_limiters

    cfg = config_from_dict({"download": {"per_host_connections": 1, "per_host_requests_per_second": 1000}})
    limiters = start_limiters(cfg)
    holder_actor = ray.remote(num_cpus=0)(_holder_class()).remote()
    try:
        holder = RayLimiterClient(limiters, holder=ray.get(holder_actor.identity.remote()))
        other = RayLimiterClient(limiters)
        lease, _ = holder.acquire("a.example", time.monotonic() + 5)
        assert lease is not None
        busy = holder_actor.busy.remote(4.0)  # the holder is alive but not answering (a starved process)
        assert other.acquire("a.example", time.monotonic() + 3.0) == (None, "queue_timeout")
        assert ray.get(busy)
        assert ray.get(limiters[0].held_by.remote(holder.holder)) == 1
        ray.kill(holder_actor)  # now it is dead, holding the slot
        t0 = time.monotonic()
        lease2, reason = other.acquire("a.example", time.monotonic() + 20)
        assert lease2 is not None, reason
        assert time.monotonic() - t0 < 10
        snap = ray.get(limiters[0].snapshot.remote())["a.example"]
        assert snap["reclaimed"] == 1 and snap["max_active"] == 1
    finally:
        for actor in limiters:
            ray.kill(actor)


def test_lease_returns_when_the_holder_process_dies_and_ray_restarts_the_actor(ray_session):
    """Shard workers are Ray Data actors, which Ray restarts: the process holding the lease is gone although the
    actor lives on (or waits forever for room to restart, as after a lost node). The slot comes back all the same
    (a watcher that called the actor itself waited for the restart, and the multinode download hung)."""
    import ray

    from artsim.download.ray_job import RayLimiterClient, start_limiters

    cfg = config_from_dict({"download": {"per_host_connections": 1, "per_host_requests_per_second": 1000}})
    limiters = start_limiters(cfg)
    # restarted after a crash, calls retried: as Ray Data makes its actors
    holder_actor = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_holder_class()).remote()
    try:
        first = ray.get(holder_actor.identity.remote())
        holder = RayLimiterClient(limiters, holder=first)
        other = RayLimiterClient(limiters)
        lease, _ = holder.acquire("a.example", time.monotonic() + 5)
        assert lease is not None
        ray.kill(holder_actor, no_restart=False)  # the process dies; Ray restarts the actor in a new one
        lease2, reason = other.acquire("a.example", time.monotonic() + 20)
        assert lease2 is not None, reason
        again = ray.get(holder_actor.identity.remote())
        assert again[0] == first[0] and again[1] != first[1]  # the same actor, restarted in another process
        assert ray.get(limiters[0].snapshot.remote())["a.example"]["reclaimed"] == 1
    finally:
        ray.kill(holder_actor)
        for actor in limiters:
            ray.kill(actor)


def test_holder_verdict_follows_the_actor_table_through_a_restart():
    """The actor table as Ray showed it around a restart (measured: kill -> RESTARTING with the count already
    raised, the new pid while its constructor runs -> ALIVE). The old process is gone from the first RESTARTING
    entry on; the new process, which registers during its constructor, is not mistaken for a dead one."""
    from artsim.download.ray_job import holder_verdict

    table = [{"State": "ALIVE", "NumRestarts": 0, "Pid": 100},
             {"State": "RESTARTING", "NumRestarts": 1, "Pid": 100},
             {"State": "RESTARTING", "NumRestarts": 1, "Pid": 200},
             {"State": "ALIVE", "NumRestarts": 1, "Pid": 200}]
    verdicts, base = [], None
    for entry in table:
        verdict, base = holder_verdict(entry, 100, base)
        verdicts.append(verdict)
    assert verdicts == ["alive", "gone", "gone", "gone"]
    verdicts, base = [], None
    for entry in table[2:]:  # the restarted process registers during its constructor
        verdict, base = holder_verdict(entry, 200, base)
        verdicts.append(verdict)
    assert verdicts == ["unknown", "alive"]
    assert holder_verdict({"State": "DEAD", "NumRestarts": 1, "Pid": 200}, 200, 1)[0] == "gone"
    assert holder_verdict(None, 200, 1) == ("unknown", 1)  # the table could not be read: not known dead
