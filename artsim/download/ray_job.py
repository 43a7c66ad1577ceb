"""The thin Ray layer: a job-wide host limiter (actors) and a Ray Data pipeline of shard tasks.

Data flow: Ray tasks plan shards into shard-task files (download.planner) → ``ray.data.from_items`` of (file, row
group) references (one shard per block) → ``map(ShardWorker)`` on an actor pool (each reads its task; one Fetcher,
``fetch_threads`` concurrent fetches, commits its shard file) → small summary rows stream back to the driver for progress → report + ``_SUCCESS``.

Politeness across the cluster: every fetch, on every node, takes a lease from the :class:`HostLimiterActor` that owns
its host (hosts are spread over ``download.limiter_actors`` actors by a stable hash), so the per-host connection and
rate caps are job-wide. See docs/download.md for why this beats routing records to workers by host.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import uuid
from typing import Optional

from artsim.config import Config
from artsim.download.politeness import HostBook, LimiterUnavailable, Ticket


def actor_table_entry(actor_id: str) -> Optional[dict]:
    """Ray's actor table entry (GCS) of ``actor_id``: State, Pid, NumRestarts...; None when it cannot be read.

    Read through ``ray._private.state``: Ray's public state API needs the dashboard, which a cluster may not run."""
    try:
        from ray._private import state

        return state.actors(actor_id=actor_id) or None
    except Exception:  # GCS unreachable for a moment, or the API moved: nothing known
        return None


def holder_verdict(entry: Optional[dict], pid: int, base_restarts: Optional[int]) -> tuple[str, Optional[int]]:
    """Is the process ``pid`` that holds leases for an actor still there? ("alive" | "gone" | "unknown", the actor's
    restart count when the holder was first seen, to pass back in next time).

    Why the actor table and not a call on the actor: shard workers are Ray Data actors, which Ray restarts after a
    crash or a lost node. A call queues for the restarted actor (and waits forever when no node has room for it),
    so it never says that the process holding the leases is gone. The table does: the actor is DEAD, or has been
    restarted since the holder was first seen, or is ALIVE in another process. A holder registers while its own
    constructor runs, which for a restarted actor is while the table still says RESTARTING: that restart (the one
    that made this process) is the baseline, not a death. A busy but living holder stays "alive" however long it is
    stalled."""
    if entry is None:
        return "unknown", base_restarts
    status, now_pid, restarts = entry.get("State"), entry.get("Pid"), entry.get("NumRestarts") or 0
    if base_restarts is None:
        base_restarts = restarts
    if status == "DEAD" or restarts > base_restarts or (status == "ALIVE" and now_pid and now_pid != pid):
        return "gone", base_restarts
    return ("alive" if status == "ALIVE" else "unknown"), base_restarts


class HostLimiterActorImpl:
    """Async actor: each pending acquire is a future in its host's FIFO queue, so thousands of waiting fetches cost
    no threads, and a release wakes exactly the one waiter it can serve (no thundering herd).

    Holders (one per shard-worker process) register with their actor id and process id; a watcher per holder reads
    Ray's actor table (``holder_verdict``) and takes the holder's leases back once that process is gone (its
    node lost, its process killed or crashed, whether or not Ray restarts the actor elsewhere) — then, and only then.
    A starved but living holder keeps its slots however long it is stalled.
    """

    def __init__(self, connections: int, requests_per_second: float, breaker_failures: int,
                 breaker_cooldown_s: float, liveness_interval_s: float = 1.0):
        self.book = HostBook(connections, requests_per_second, breaker_failures, breaker_cooldown_s)
        self.robots: dict[str, tuple[int, str]] = {}
        self._robots_pending: dict[str, asyncio.Event] = {}  # origin -> set when its one fetch is over
        self.liveness_interval_s = liveness_interval_s
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._watchers: dict[str, asyncio.Task] = {}
        self._news_version = 0
        self._news = asyncio.Event()
        self._last_blocked: dict[str, float] = {}

    async def register(self, holder: str, actor_id: str, pid: int) -> None:
        """Watch the holder's process (``pid`` of actor ``actor_id``); its leases are reclaimed once it is gone."""
        if holder not in self._watchers:
            self._watchers[holder] = asyncio.get_running_loop().create_task(self._watch(holder, actor_id, pid))

    async def _watch(self, holder: str, actor_id: str, pid: int) -> None:
        loop = asyncio.get_running_loop()
        base_restarts = None
        while True:
            entry = await loop.run_in_executor(None, actor_table_entry, actor_id)
            state, base_restarts = holder_verdict(entry, pid, base_restarts)
            if state == "gone":
                self.holder_died(holder)
                return
            await asyncio.sleep(self.liveness_interval_s)

    def holder_died(self, holder: str) -> None:
        import logging

        held = self.book.held_by(holder)
        hosts, dropped = self.book.drop_holder(holder)
        for ticket in dropped:  # nobody is waiting on these any more
            if not ticket.waiter.done():
                ticket.waiter.set_result((None, "holder_gone"))
        for host in hosts:
            self._settle(host)
        if held or dropped:  # workers that end with the job hold nothing: no line for them
            logging.getLogger("artsim.download").warning(
                "host limiter: shard worker %s is gone; took back its %d connection slot(s) and dropped its %d "
                "waiting request(s)", holder[:8], held, len(dropped))

    async def acquire(self, host: str, wait_limit_s: float, releases: tuple = (),
                      holder: Optional[str] = None) -> tuple[Optional[int], Optional[str]]:
        """Grant a lease for ``host``; ``releases`` (the caller's deferred releases) are applied first."""
        self._apply(releases)
        future = asyncio.get_running_loop().create_future()
        if not self.book.submit(host, Ticket(holder, time.monotonic() + wait_limit_s, future)):
            return None, "holder_gone"
        self._settle(host)
        return await future

    async def start(self, host: str, lease: int, wait_limit_s: float, releases: tuple = (),
                    holder: Optional[str] = None) -> tuple[Optional[int], Optional[str]]:
        """A kept-alive connection (holding ``lease``) asks to start its next request: rate cap and pauses only."""
        self._apply(releases)
        future = asyncio.get_running_loop().create_future()
        if not self.book.submit(host, Ticket(holder, time.monotonic() + wait_limit_s, future, lease)):
            return None, "holder_gone"
        self._settle(host)
        return await future

    async def record(self, host: str, outcome: str, pause_s: float = 0.0) -> None:
        self.book.record(host, outcome, time.monotonic(), pause_s)
        self._settle(host)
        self._publish()

    def _publish(self) -> None:
        """Tell holders waiting in ``news`` when the set of paused hosts (Retry-After, circuit breaker) changed."""
        now = time.monotonic()
        blocked = {h: now + s for h, s in self.book.blocked_hosts(now).items()}
        if blocked.keys() != self._last_blocked.keys() or any(
                blocked[h] > self._last_blocked[h] + 0.05 for h in blocked):
            self._news_version += 1
            self._last_blocked = blocked
            self._news.set()
            self._news = asyncio.Event()

    async def news(self, since: int, timeout_s: float = 10.0) -> tuple[int, dict]:
        """Long poll: returns (version, {host: seconds it stays paused}) once the version passes ``since`` (or
        after ``timeout_s``). Holders whose kept-alive connections start requests without asking (no rate cap)
        learn of pauses this way, within one message of the release that caused them."""
        if self._news_version <= since:
            try:
                await asyncio.wait_for(self._news.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
        return self._news_version, self.book.blocked_hosts(time.monotonic())

    def _settle(self, host: str) -> None:
        now = time.monotonic()
        done, wake = self.book.settle(host, now)
        for ticket, lease, reason in done:
            if not ticket.waiter.done():
                ticket.waiter.set_result((lease, reason))
            elif lease is not None:  # the caller went away (cancelled): the slot goes straight back
                self.book.release(host, lease, "abandoned", now)
                self._settle(host)
                return
        old = self._timers.pop(host, None)
        if old is not None:
            old.cancel()
        if wake is not None:
            self._timers[host] = asyncio.get_running_loop().call_later(max(0.0, wake - now), self._settle, host)

    async def release(self, host: str, lease: int, outcome: str, pause_s: float = 0.0) -> None:
        self._apply(((host, lease, outcome, pause_s),))

    async def release_many(self, releases: tuple) -> None:
        self._apply(releases)

    def _apply(self, releases) -> None:
        now = time.monotonic()
        hosts = []
        for host, lease, outcome, pause_s in releases:
            self.book.release(host, lease, outcome, now, pause_s)
            if host not in hosts:
                hosts.append(host)
        for host in hosts:
            self._settle(host)
        if any(outcome != "ok" or pause_s > 0 for _h, _l, outcome, pause_s in releases):
            self._publish()

    async def get_robots(self, origin: str, wait_s: float = 60.0):
        """The cached robots.txt of ``origin``; or None, which makes the caller the one that fetches it.

        One fetch per job: while a caller is fetching, others for the same origin wait for its ``put_robots``
        (up to ``wait_s``; then the next one in line is told to fetch, e.g. after a 5xx that is not cached).
        """
        while True:
            if origin in self.robots:
                return self.robots[origin]
            pending = self._robots_pending.get(origin)
            if pending is None or pending.is_set():
                self._robots_pending[origin] = asyncio.Event()
                return None
            try:
                await asyncio.wait_for(asyncio.shield(pending.wait()), timeout=wait_s)
            except asyncio.TimeoutError:
                if not pending.is_set():
                    pending.set()  # the fetcher is gone or gave up without a cacheable answer: next one fetches

    async def put_robots(self, origin: str, value) -> None:
        self.robots[origin] = tuple(value)
        pending = self._robots_pending.pop(origin, None)
        if pending is not None:
            pending.set()

    async def held_by(self, holder: str) -> int:
        return self.book.held_by(holder)

    async def set_min_interval(self, host: str, seconds: float) -> None:
        self.book.set_min_interval(host, seconds)

    async def snapshot(self) -> dict:
        return self.book.snapshot()


class RayLimiterClient:
    """The limiter interface Fetcher expects, backed by the job's limiter actors.

    Each actor call costs the limiter actor ~1 ms of CPU and the caller about as much (measured: ~15 % of the job's
    CPU on 2 cores with one acquire and one release per request). So successful releases are *deferred* for up to
    ``release_delay_s`` and ride along with the next acquire this process sends to the same actor, or go in one
    ``release_many`` call when none comes. A late release only makes the connection cap stricter for those
    milliseconds, never looser, and the actor applies the releases before the acquire they ride with. Releases
    that carry news (failures for the circuit breaker, a Retry-After pause) are sent at once, together with
    whatever is deferred, so they are never reordered behind them.
    """

    def __init__(self, actors: list, release_delay_s: float = 0.02, holder: Optional[tuple[str, int]] = None,
                 robots_wait_s: float = 60.0,
                 watch_pauses: bool = False):
        self.actors = actors
        self.robots_wait_s = robots_wait_s  # how long to wait for another worker's robots.txt fetch
        # Every lease this process takes is owned by this holder id; the limiter takes them back only when the
        # holder's process (``holder``: (actor id, pid)) is gone. Without one (a driver, a test) leases live until
        # released.
        self.holder = uuid.uuid4().hex
        if holder is not None:
            for actor in actors:
                self._get(actor.register.remote(self.holder, *holder))
        self.release_delay_s = release_delay_s
        self._pending: dict[int, list[tuple]] = {}  # actor index -> deferred (host, lease, outcome, pause_s)
        self._oldest: dict[int, float] = {}  # actor index -> monotonic time its oldest deferred release was made
        self._cond = threading.Condition()
        self._flusher: Optional[threading.Thread] = None
        # Pauses (Retry-After, circuit breaker) as the limiters last told us: host -> monotonic time they end.
        # Only needed when kept-alive connections start requests without asking (no requests-per-second cap).
        self._blocked: dict[str, float] = {}
        if watch_pauses:
            threading.Thread(target=self._news_loop, name="artsim-limiter-news", daemon=True).start()

    def start(self, host: str, lease: int, deadline: float):
        """The next request on a kept-alive connection holding ``lease``: waits for a rate slot and any pause."""
        wait_limit = max(0.0, deadline - time.monotonic())
        index = self._index(host)
        with self._cond:
            releases = self._take(index)
        return self._get(self.actors[index].start.remote(host, lease, wait_limit, releases, self.holder))

    def record(self, host: str, outcome: str, pause_s: float = 0.0) -> None:
        """An outcome on a connection that stays open (the circuit breaker's count of consecutive failures)."""
        index = self._index(host)
        with self._cond:
            releases = self._take(index)
            if releases:
                self.actors[index].release_many.remote(releases)
            self.actors[index].record.remote(host, outcome, pause_s)

    def blocked_s(self, host: str) -> float:
        until = self._blocked.get(host)
        return max(0.0, until - time.monotonic()) if until else 0.0

    def _news_loop(self) -> None:
        import ray

        versions = [0] * len(self.actors)
        pending = {self.actors[i].news.remote(0): i for i in range(len(self.actors))}
        blocked_by_actor: list[dict] = [{} for _ in self.actors]
        while True:
            try:
                ready, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(ready[0])
                versions[index], blocked = ray.get(ready[0])
            except ray.exceptions.RayError:
                return  # the limiter is gone: acquires fail with LimiterUnavailable, which ends the shard
            now = time.monotonic()
            blocked_by_actor[index] = {h: now + s for h, s in blocked.items()}
            merged: dict[str, float] = {}
            for part in blocked_by_actor:
                merged.update(part)
            self._blocked = merged
            pending[self.actors[index].news.remote(versions[index])] = index

    def _index(self, host: str) -> int:
        digest = hashlib.blake2b(host.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % len(self.actors)

    def _actor(self, host: str):
        return self.actors[self._index(host)]

    def _take(self, index: int) -> tuple:
        """Deferred releases for one actor, removed from the queue (caller holds the lock)."""
        self._oldest.pop(index, None)
        return tuple(self._pending.pop(index, ()))

    def acquire(self, host: str, deadline: float):
        wait_limit = max(0.0, deadline - time.monotonic())  # relative: clocks differ between nodes
        index = self._index(host)
        with self._cond:
            releases = self._take(index)
        return self._get(self.actors[index].acquire.remote(host, wait_limit, releases, self.holder))

    @staticmethod
    def _get(ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise LimiterUnavailable(f"host limiter unavailable: {type(exc).__name__}") from exc

    def release(self, host: str, lease: int, outcome: str, pause_s: float = 0.0) -> None:
        index = self._index(host)
        item = (host, lease, outcome, pause_s)
        with self._cond:
            if outcome != "ok" or pause_s > 0 or self.release_delay_s <= 0:
                # Fire and forget: calls from one process to one actor arrive in order.
                self.actors[index].release_many.remote(self._take(index) + (item,))
                return
            self._pending.setdefault(index, []).append(item)
            self._oldest.setdefault(index, time.monotonic())
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="artsim-limiter-release-flusher",
                                                 daemon=True)
                self._flusher.start()
            self._cond.notify()

    def _flush_loop(self) -> None:
        """Send deferred releases that no acquire picked up within ``release_delay_s``."""
        with self._cond:
            while True:
                if not self._oldest:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                index, oldest = min(self._oldest.items(), key=lambda kv: kv[1])
                due = oldest + self.release_delay_s
                if due > now:
                    self._cond.wait(due - now)
                    continue
                self.actors[index].release_many.remote(self._take(index))

    def flush(self) -> None:
        """Send every deferred release now (end of a shard: nothing may stay held while the worker is idle)."""
        with self._cond:
            for index in list(self._pending):
                self.actors[index].release_many.remote(self._take(index))

    def get_robots(self, origin: str):
        return self._get(self._actor(origin).get_robots.remote(origin, self.robots_wait_s))

    def put_robots(self, origin: str, value) -> None:
        self._actor(origin).put_robots.remote(origin, value)

    def set_min_interval(self, host: str, seconds: float) -> None:
        self._actor(host).set_min_interval.remote(host, seconds)


class ShardWorker:
    """Ray Data callable class: one per actor; owns a Fetcher (threads, watchdog, robots cache) across shards."""

    def __init__(self, config: Config, limiter_actors: list):
        from artsim.download.fetch import Fetcher
        from artsim.rundir.paths import RunPaths
        from artsim.storage import Storage

        self.config = config
        self.storage = Storage(config.storage)
        self.images_uri = RunPaths(config.run.root).images
        import ray

        d = config.download
        self.limiter = RayLimiterClient(limiter_actors, holder=(ray.get_runtime_context().get_actor_id(), os.getpid()),
                                        robots_wait_s=d.timeout_s * (d.max_redirects + 1) + 5.0,
                                        watch_pauses=d.keep_alive and not d.per_host_requests_per_second)
        self.fetcher = Fetcher(config.download, self.limiter, config.storage)

    def __call__(self, row: dict) -> dict:
        import json

        from artsim.download.planner import read_task
        from artsim.download.shards import ShardTask, process_shard

        task = ShardTask.from_json(read_task(self.storage, row["task_file"], row["row_group"]))
        try:
            summary = process_shard(task, self.fetcher, self.storage, self.images_uri,
                                    self.config.download.fetch_threads)
        finally:
            self.fetcher.release_connections()  # idle kept-alive connections closed, their slots returned
            self.limiter.flush()
        return {"summary": json.dumps(summary)}


def start_limiters(config: Config) -> list:
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    d = config.download
    # Pinned to the driver's node: losing that node ends the job anyway, so the limiter adds no single point of
    # failure of its own (on any other node, losing it would stall every worker). No restarts: a restarted
    # limiter would forget the leases it handed out and could briefly exceed the per-host caps.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_cls = ray.remote(num_cpus=0, max_concurrency=10_000, scheduling_strategy=here)(HostLimiterActorImpl)
    return [actor_cls.remote(d.per_host_connections, d.per_host_requests_per_second, d.circuit_breaker_failures,
                             d.circuit_breaker_cooldown_s)
            for _ in range(d.limiter_actors)]


def run_shards(config: Config, task_files: list[tuple[str, int]], shards: int, limiters: list, on_summary) -> None:
    """Run the shard tasks of ``task_files`` ((Parquet file, number of shards): one row group per shard, written by
    download.planner) on a Ray Data actor pool; call ``on_summary(dict)`` as each shard commits.

    Each worker gets a (file, row group) reference and reads its task itself: the driver never holds the records
    of a task. (Reading the files with ``ray.data.read_parquet`` instead adds read tasks that, when the actor pool
    holds every CPU of the cluster, never get one: measured, the stage hung on a 2-CPU Ray with 2 workers.)"""
    import json

    import ray

    if not task_files or not shards:
        return
    workers = config.download.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = max(1, min(workers, shards))
    refs = [{"task_file": uri, "row_group": i} for uri, n in task_files for i in range(n)]
    ds = ray.data.from_items(refs, override_num_blocks=len(refs))  # one shard per block: it goes to an idle actor
    # One shard at a time per actor: a queued shard would sit behind a slow one instead of going to an idle actor.
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    ds = ds.map(ShardWorker, fn_constructor_kwargs={"config": config, "limiter_actors": limiters},
                compute=pool, num_cpus=1)
    for row in ds.iter_rows():
        on_summary(json.loads(row["summary"]))
