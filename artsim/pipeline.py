"""Runs the configured stages in order and prints one summary at the end."""
from __future__ import annotations

import json
import os
import socket
import time

from artsim.console import say, table
from artsim.runtime import RunContext, StageTimer, cluster_line, cluster_resources, ensure_ray
from artsim.stages import stage_function


# Stages that run Ray work; the others (mine, report) run on the driver and need not pay Ray's start-up. Ingest
# starts Ray itself once its sources are checked (a bad source is one line, before any cluster is touched) and
# then names the cluster the same way.
RAY_STAGES = frozenset({"download", "embed", "train", "index", "links"})
SELF_STARTING_RAY_STAGES = frozenset({"ingest"})


def run_stage(ctx: RunContext, name: str, **options) -> dict:
    if name in RAY_STAGES:
        ensure_ray(ctx.config)
        where = cluster_line()
    elif name in SELF_STARTING_RAY_STAGES:
        where = "checks its inputs here, then joins Ray (the cluster is named when it does)"
    else:
        where = f"runs in this process, no Ray needed ({os.cpu_count()} CPUs on {socket.gethostname()})"
    say(f"stage {name}: {where}")  # first: on a cluster, which one a submitted job really joined
    ctx.save_config()
    say(f"stage {name}: starting (run directory {ctx.paths.root})")
    started = time.perf_counter()
    summary = stage_function(name)(ctx, **options) or {}
    # what `artsim plan` learns rates from: the stage's wall time and what it ran on
    run = {"wall_seconds": round(time.perf_counter() - started, 3), "cluster": cluster_resources(),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ctx.storage.write_json(f"{ctx.paths.summaries}/{name}.json", {**summary, "_run": run})
    return summary


def run_pipeline(ctx: RunContext, **options) -> dict:
    timer = StageTimer()
    summaries = {}
    for name in ctx.config.pipeline.stages:
        stage_options = {k: v for k, v in options.items() if k == "retry_failed" and name == "download"}
        summaries[name] = timer.run(name, run_stage, ctx, name, **stage_options)
    say("pipeline finished")
    table(["stage", "seconds", "summary"],
          [(n, f"{timer.times[n]:.1f}", _short(summaries[n])) for n in summaries])
    return {"stages": summaries, "seconds": timer.times}


def _short(summary: dict) -> str:
    text = json.dumps({k: v for k, v in summary.items() if not isinstance(v, (dict, list))}, default=str)
    return text if len(text) < 110 else text[:107] + "..."
