"""What every stage receives: the validated config, storage, the run directory's paths, and a Ray connection."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from artsim.config import Config
from artsim.rundir.paths import RunPaths
from artsim.storage import Storage

log = logging.getLogger("artsim")


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


def ensure_ray(config: Config) -> None:
    """Connect to Ray as the config says; reuse a connection that already exists (tests share one Ray)."""
    import ray

    if ray.is_initialized():
        return
    # Ray's own progress bars are noisy in logs of batch jobs; artsim prints its own progress and summaries.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    env = {}
    if config.storage.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = config.storage.s3_endpoint_url
    kwargs = dict(ignore_reinit_error=True, log_to_driver=True, include_dashboard=False)
    if config.ray.address:
        ray.init(address=config.ray.address, runtime_env={"env_vars": env} if env else None, **kwargs)
    else:
        # address="local": always start our own Ray, never attach to another process's Ray on this machine.
        ray.init(address="local", num_cpus=config.ray.num_cpus,
                 runtime_env={"worker_process_setup_hook": "artsim.runtime.quiet_local_worker"}, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("ARTSIM_RAY_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False


def quiet_local_worker() -> None:
    """Runs in every worker process of a Ray that artsim started itself (no dashboard, hence no State API).

    Ray Train's PlacementGroupCleaner polls the State API to learn whether the train controller died; without a
    dashboard every poll fails and it warns every few seconds (~20 lines per training run) about something that is
    known and harmless here: the cleaner is a fallback for a controller that dies ungracefully, and on a local Ray
    the placement group goes away with the session anyway. Clusters (ray.address set) keep Ray's logging as is.
    """
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class StageTimer:
    """Measures a stage's wall time for the end-of-run summary."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - start
        return result
