"""What every stage receives: the validated config, storage, the run directory's paths, and a Ray connection.

Ray wiring lives here: which cluster a stage joins (`ensure_ray`), the one line that says so, and the one rule
that sizes tasks to the nodes that exist (`fit_task`)."""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from artsim.config import Config
from artsim.errors import ConfigError
from artsim.rundir.paths import RunPaths
from artsim.storage import Storage

log = logging.getLogger("artsim")

# How long a reachable address may take to answer as a Ray cluster before the process gives up (ray.init itself
# retries for minutes and cannot be interrupted). The TCP probe before it fails a dead address in seconds.
PROBE_TIMEOUT_S = 5.0


@dataclass
class RunContext:
    config: Config
    storage: Storage = field(init=False)
    paths: RunPaths = field(init=False)

    def __post_init__(self):
        self.storage = Storage(self.config.storage)
        self.paths = RunPaths(self.config.run.root)

    def check_run_root(self) -> None:
        """Create a local run directory now, so that a bad ``run.root`` is one line naming the key, not a traceback
        from the first write deep inside a stage. (An S3 prefix needs no directory; its errors come from S3.)"""
        from artsim.errors import ConfigError
        from artsim.storage import is_s3, strip_scheme

        root = self.config.run.root
        if is_s3(root):
            return
        path = os.path.abspath(strip_scheme(root))
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError("run.root", f"{path} exists and is not a directory")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise ConfigError("run.root", f"cannot create directory {path}: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError("run.root", f"directory {path} is not writable")

    def save_config(self) -> None:
        """Record the effective config (after --set overrides) in the run directory."""
        self.storage.write_text(self.paths.config, self.config.to_yaml())


# -- which cluster ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayTarget:
    """Where `ensure_ray` connects: ``address`` None means "start a private Ray in this process"."""

    address: Optional[str]
    how: str  # why this one, for the first line of a stage ("RAY_ADDRESS", "ray.address", ...)


RECORDED = "the running `ray start` on this node"


def resolve_ray_target(configured: Optional[str], environ=None, current_cluster=None, reachable=None) -> RayTarget:
    """The cluster `ray.address` means, decided the way Ray itself decides for `ray.init()`.

    null: RAY_ADDRESS (what `ray job submit` sets for the job's driver), else the cluster that the last `ray start`
    on this node recorded, else a private Ray. "local": always a private Ray. Anything else ("auto", host:port,
    ray://host:port): exactly that. A recorded address that nothing answers at (a `ray start` that was killed
    leaves its record behind) counts as no cluster. ``current_cluster`` (returns the recorded address) and
    ``reachable`` (address -> bool) are for tests.
    """
    environ = os.environ if environ is None else environ
    if configured == "local":
        return RayTarget(None, "ray.address: local")
    if configured is None:
        env_address = environ.get("RAY_ADDRESS", "").strip()
        if env_address and env_address != "local":
            return RayTarget(env_address, "RAY_ADDRESS")
        if env_address == "local":
            return RayTarget(None, "RAY_ADDRESS=local")
        if current_cluster is None:
            from ray._private.utils import read_ray_address as current_cluster
        found = current_cluster()
        if found:
            if (reachable or _reachable)(found):
                return RayTarget(found, RECORDED)
            return RayTarget(None, f"the Ray that `ray start` recorded at {found} is gone")
        return RayTarget(None, "no running Ray found")
    return RayTarget(configured, "ray.address")


def _host_port(address: str) -> Optional[tuple[str, int]]:
    """host and port of a GCS or Ray Client address; None for "auto" and other forms Ray resolves itself."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _reachable(address: str) -> bool:
    try:
        probe(address, "")
        return True
    except ConfigError:
        return False


def probe(address: str, how: str) -> None:
    """Fail in seconds, naming ray.address, when nothing listens at the address (ray.init would retry for minutes)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        source = "" if how == "ray.address" else f" (found through {how})"
        raise ConfigError("ray.address", f"no Ray cluster answers at {address}{source}: {exc.strerror or exc}; "
                                         "check the address, or set ray.address: local for a private Ray") from None


_joined: Optional[RayTarget] = None  # what ensure_ray connected to, for cluster_line()


def ensure_ray(config: Config) -> None:
    """Connect to Ray as the config says (see resolve_ray_target); reuse a connection that already exists (tests
    share one Ray). Dead addresses end in ConfigError("ray.address") within seconds, never in a hang."""
    import ray

    global _joined
    if ray.is_initialized():
        return
    # Ray's own progress bars are noisy in logs of batch jobs; artsim prints its own progress and summaries.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    target = resolve_ray_target(config.ray.address)
    kwargs = dict(ignore_reinit_error=True, log_to_driver=True)
    if target.address is None:
        # A private Ray: never attach to another process's Ray on this machine.
        # logging_level: Ray's own "Started a local Ray instance" INFO line is not for users; artsim prints which
        # cluster it joined (cluster_line), and a user error stays the only line on stderr. Likewise the notice that
        # token authentication is on: for a private Ray the token never leaves this machine.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": "artsim.runtime.quiet_local_worker"}, **kwargs)
    else:
        probe(target.address, target.how)
        env = {}
        if config.storage.s3_endpoint_url:
            env["AWS_ENDPOINT_URL"] = config.storage.s3_endpoint_url
        # Ray merges this with a submitted job's runtime_env (the job's working_dir stays).
        try:
            with _give_up_after(config.ray.connect_timeout_s, target):
                ray.init(address=target.address, runtime_env={"env_vars": env} if env else None, **kwargs)
        except ConnectionError as exc:  # e.g. "auto" with no Ray on this node
            source = "" if target.how == "ray.address" else f" (found through {target.how})"
            raise ConfigError("ray.address", f"{target.address}{source}: {exc}") from None
    _joined = target
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("ARTSIM_RAY_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False


class _give_up_after:
    """ray.init to an address that accepts TCP but is no Ray (a dashboard port, a stale record) retries for minutes
    and cannot be interrupted from Python: after ``seconds`` this ends the process with exit status 2 and one line
    naming ray.address, which is what the CLI would print for any other bad config value."""

    def __init__(self, seconds: float, target: RayTarget):
        self.seconds, self.target = seconds, target
        self.done = threading.Event()

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="artsim-ray-connect-watchdog").start()

    def __exit__(self, *exc):
        self.done.set()

    def _watch(self):
        if self.done.wait(self.seconds):
            return
        source = "" if self.target.how == "ray.address" else f" (found through {self.target.how})"
        sys.stderr.write(f"artsim: error: ray.address: {self.target.address}{source} accepts connections but did "
                         f"not answer as a Ray cluster within {self.seconds:g} s\n")
        sys.stderr.flush()
        os._exit(2)


def cluster_line() -> str:
    """Which cluster this process is connected to and what it has (the first line of every Ray stage)."""
    import ray

    target = _joined

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    total = ray.cluster_resources()
    gcs = ray.get_runtime_context().gcs_address
    custom = sorted(k for k in total if k not in ("CPU", "GPU", "memory", "object_store_memory")
                    and not k.startswith(("node:", "accelerator_type:")))
    kind = "private Ray" if target is not None and target.address is None else "Ray cluster"
    how = f" ({target.how})" if target is not None else ""
    largest = largest_node(node_shapes())
    return (f"{kind} at {gcs}{how}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, "
            f"{total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
            f"{total.get('memory', 0) / 2**30:.1f} GiB memory (largest node: {largest[0]:g} CPUs, "
            f"{largest[1]:g} GPUs){', resources ' + ', '.join(custom) if custom else ''}")


def cluster_resources() -> dict:
    """nodes, CPUs and GPUs of the connected Ray; this process alone (1 node, its CPUs) when none is connected."""
    ray = sys.modules.get("ray")  # not imported: a driver-only stage, which never pays Ray's import
    if ray is None or not ray.is_initialized():
        return {"ray": False, "nodes": 1, "cpus": float(os.cpu_count() or 1), "gpus": 0.0}
    total = ray.cluster_resources()
    return {"ray": True, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "cpus": total.get("CPU", 0.0),
            "gpus": total.get("GPU", 0.0)}


def quiet_local_worker() -> None:
    """Runs in every worker process of a Ray that artsim started itself (no dashboard, hence no State API).

    Ray Train's PlacementGroupCleaner polls the State API to learn whether the train controller died; without a
    dashboard every poll fails and it warns every few seconds (~20 lines per training run) about something that is
    known and harmless here: the cleaner is a fallback for a controller that dies ungracefully, and on a local Ray
    the placement group goes away with the session anyway. Clusters (ray.address set) keep Ray's logging as is.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# -- sizing tasks to the nodes that exist ----------------------------------------------------------------------------


def node_shapes() -> list[dict]:
    """Resources of every node a task could run on: the live nodes, plus the node types an autoscaler may still
    launch (from the cluster config the autoscaler publishes; absent on clusters without one)."""
    import ray

    shapes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        cluster_config = state.get_cluster_config()
        for group in (cluster_config.node_group_configs if cluster_config else []):
            if group.max_count != 0:
                shapes.append(dict(group.resources))
    except Exception as exc:  # a private API; the live nodes are what is known for sure
        log.debug("no autoscaler cluster config: %s", exc)
    return shapes


def largest_node(shapes: list[dict]) -> tuple[float, float]:
    """(most CPUs, most GPUs) that one node has."""
    return (max((s.get("CPU", 0.0) for s in shapes), default=0.0),
            max((s.get("GPU", 0.0) for s in shapes), default=0.0))


def size_task(shapes: list[dict], *, want_cpus: float, min_cpus: float = 1.0, gpus: float = 0.0,
              what: str, key: str) -> float:
    """The CPUs a task asks for: ``want_cpus`` capped by what one node has (a task never spans nodes; one that
    asks for more than every node waits forever). Raises ConfigError(key) when even ``min_cpus`` CPUs with
    ``gpus`` GPUs fit on no node.

    GPUs are whole per task and are never reduced: a task that needs a GPU cannot run on less."""
    if gpus > 0:
        fitting = [s for s in shapes if s.get("GPU", 0.0) >= gpus]
        if not fitting:
            raise ConfigError(key, f"{what} needs {gpus:g} GPU(s) on one node, but the largest node has "
                                   f"{largest_node(shapes)[1]:g} GPUs; no task can ever be scheduled")
    else:
        fitting = shapes
    node_cpus = max((s.get("CPU", 0.0) for s in fitting), default=0.0)
    if node_cpus < min_cpus:
        raise ConfigError(key, f"{what} needs {min_cpus:g} CPU(s){f' and {gpus:g} GPU(s)' if gpus else ''} on "
                               f"one node, but the largest such node has {node_cpus:g} CPUs; no task can ever be "
                               "scheduled")
    return max(min_cpus, min(want_cpus, node_cpus))


def fit_task(*, want_cpus: float, min_cpus: float = 1.0, gpus: float = 0.0, what: str, key: str) -> float:
    """size_task on the connected cluster."""
    return size_task(node_shapes(), want_cpus=want_cpus, min_cpus=min_cpus, gpus=gpus, what=what, key=key)


class StageTimer:
    """Measures a stage's wall time for the end-of-run summary."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - start
        return result
