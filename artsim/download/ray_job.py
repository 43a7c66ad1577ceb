"""The thin Ray layer: a job-wide host limiter (actors) and a Ray Data pipeline of shard tasks.

Data flow: driver plans shards (shards.plan_shards) → ``ray.data.from_items`` (one shard per block) →
``map(ShardWorker)`` on an actor pool (each actor: one Fetcher, ``fetch_threads`` concurrent fetches, commits its
shard file) → small summary rows stream back to the driver for progress → report + ``_SUCCESS``.

Politeness across the cluster: every fetch, on every node, takes a lease from the :class:`HostLimiterActor` that owns
its host (hosts are spread over ``download.limiter_actors`` actors by a stable hash), so the per-host connection and
rate caps are job-wide. See docs/download.md for why this beats routing records to workers by host.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Optional

from artsim.config import Config
from artsim.download.politeness import HostBook, LimiterUnavailable


class HostLimiterActorImpl:
    """Async actor: each pending acquire is a coroutine, so thousands of waiting fetches cost no threads."""

    def __init__(self, connections: int, requests_per_second: float, breaker_failures: int,
                 breaker_cooldown_s: float, lease_s: float):
        self.book = HostBook(connections, requests_per_second, breaker_failures, breaker_cooldown_s, lease_s)
        self.robots: dict[str, tuple[int, str]] = {}
        self._changed: dict[str, asyncio.Event] = {}

    async def acquire(self, host: str, wait_limit_s: float,
                      releases: tuple = ()) -> tuple[Optional[int], Optional[str]]:
        """Grant a lease for ``host``; ``releases`` (the caller's deferred releases) are applied first."""
        self._apply(releases)
        give_up = time.monotonic() + wait_limit_s
        while True:
            lease, reason, wait = self.book.poll(host, time.monotonic(), give_up)
            if not wait:
                return lease, reason
            event = self._changed.setdefault(host, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    async def release(self, host: str, lease: int, outcome: str, pause_s: float = 0.0) -> None:
        self._apply(((host, lease, outcome, pause_s),))

    async def release_many(self, releases: tuple) -> None:
        self._apply(releases)

    def _apply(self, releases) -> None:
        now = time.monotonic()
        for host, lease, outcome, pause_s in releases:
            self.book.release(host, lease, outcome, now, pause_s)
            event = self._changed.pop(host, None)
            if event is not None:
                event.set()  # wake every waiter of this host; one of them gets the slot, the others wait again

    async def get_robots(self, origin: str):
        return self.robots.get(origin)

    async def put_robots(self, origin: str, value) -> None:
        self.robots[origin] = tuple(value)

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

    def __init__(self, actors: list, release_delay_s: float = 0.02):
        self.actors = actors
        self.release_delay_s = release_delay_s
        self._pending: dict[int, list[tuple]] = {}  # actor index -> deferred (host, lease, outcome, pause_s)
        self._oldest: dict[int, float] = {}  # actor index -> monotonic time its oldest deferred release was made
        self._cond = threading.Condition()
        self._flusher: Optional[threading.Thread] = None

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
        return self._get(self.actors[index].acquire.remote(host, wait_limit, releases))

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
        return self._get(self._actor(origin).get_robots.remote(origin))

    def put_robots(self, origin: str, value) -> None:
        self._actor(origin).put_robots.remote(origin, value)

    def set_min_interval(self, host: str, seconds: float) -> None:
        self._actor(host).set_min_interval.remote(host, seconds)


class ShardWorker:
    """Ray Data callable class: one per actor; owns a Fetcher (threads, watchdog, robots cache) across shards."""

    def __init__(self, config: Config, limiter_actors: list):
        from artsim.download.fetch import Fetcher
        from artsim.storage import RunPaths, Storage

        self.config = config
        self.storage = Storage(config.storage)
        self.images_uri = RunPaths(config.run.root).images
        self.limiter = RayLimiterClient(limiter_actors)
        self.fetcher = Fetcher(config.download, self.limiter, config.storage)

    def __call__(self, row: dict) -> dict:
        import json

        from artsim.download.shards import ShardTask, process_shard

        task = ShardTask.from_json(row["task"])
        try:
            summary = process_shard(task, self.fetcher, self.storage, self.images_uri,
                                    self.config.download.fetch_threads)
        finally:
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
    lease_s = (d.timeout_s + 5.0) * 2  # a lease outlives any request; a dead worker's slot returns after this
    return [actor_cls.remote(d.per_host_connections, d.per_host_requests_per_second, d.circuit_breaker_failures,
                             d.circuit_breaker_cooldown_s, lease_s)
            for _ in range(d.limiter_actors)]


def run_shards(config: Config, tasks: list, limiters: list, on_summary) -> None:
    """Run shard tasks on a Ray Data actor pool; call ``on_summary(dict)`` as each shard commits."""
    import json

    import ray

    if not tasks:
        return
    workers = config.download.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = max(1, min(workers, len(tasks)))
    ds = ray.data.from_items([{"task": t.to_json()} for t in tasks], override_num_blocks=len(tasks))
    # One shard at a time per actor: a queued shard would sit behind a slow one instead of going to an idle actor.
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    ds = ds.map(ShardWorker, fn_constructor_kwargs={"config": config, "limiter_actors": limiters},
                compute=pool, num_cpus=1)
    for row in ds.iter_rows():
        on_summary(json.loads(row["summary"]))
