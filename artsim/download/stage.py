"""The download stage: records/ -> images/ (+ images/_report.json). See docs/download.md."""
from __future__ import annotations

import time

from artsim.rundir.schema import RETRYABLE_STATUSES

__all__ = ["run_download", "RETRYABLE_STATUSES"]


def run_download(ctx, retry_failed: bool = False) -> dict:
    """Fetch every record's image once (resuming committed work); returns the report dict.

    ``retry_failed``: also refetch records whose committed status is retryable (artsim.rundir.schema.RETRYABLE_STATUSES).
    Records committed as internal_error are refetched by every run. If any record of this run ends as
    internal_error, the report is still written and the records committed, then :class:`StageFailed` (exit 1).
    """
    import logging

    import ray

    from artsim.console import Progress, say
    from artsim.errors import StageFailed
    from artsim.download.ray_job import run_shards, start_limiters
    from artsim.download.report import build_report, print_report
    from artsim.download.planner import count_committed, plan_download, ray_plan_runner
    from artsim.rundir.schema import REFETCH_STATUSES
    from artsim.runtime import ensure_ray
    from artsim.storage import SUCCESS, join

    storage, paths, cfg = ctx.storage, ctx.paths, ctx.config
    storage.dataset_files(paths.records)  # records/ missing or incomplete: a clear error before Ray starts
    _clean_stale_temporaries(storage, paths.images)
    # The plan runs as Ray tasks that read records/ and the committed shards and write shard-task files under a
    # work directory; the driver gets counts and file names (artsim/download/planner.py).
    ensure_ray(cfg)
    work = join(paths.root, "_work", "download-plan")
    refetch = set(REFETCH_STATUSES) | (set(RETRYABLE_STATUSES) if retry_failed else set())
    plan = plan_download(storage, paths.records, paths.images, work, cfg.download.shard_size, refetch,
                         remote=ray_plan_runner)
    if plan.duplicate_ids:
        say(f"download: {plan.duplicate_ids} duplicate object_ids in records/ (first occurrence kept)")
    if plan.missing_ids:
        say(f"download: {plan.missing_ids} records without object_id skipped")
    say(f"download: {plan.total_records} records, {plan.committed} already committed, {plan.pending_new} to fetch"
        + (f", {plan.pending_retry} to retry" if retry_failed or plan.pending_retry else "")
        + f" in {plan.shards} shards → {paths.images}")

    run = {"records": 0, "shards": 0, "status": {}, "bytes_downloaded": 0, "bytes_written": 0, "requests": 0,
           "elapsed_s": 0.0, "retry_failed": retry_failed, "internal_errors": {}}
    snapshot: dict = {}
    start = time.perf_counter()
    if plan.shards:
        storage.delete(join(paths.images, SUCCESS))  # images/ is being extended: not complete until we say so
        limiters = start_limiters(cfg)
        progress = Progress("download", total=plan.pending_new + plan.pending_retry, unit="records")

        def on_summary(summary: dict) -> None:
            run["records"] += summary["records"]
            run["shards"] += 1
            for status, n in summary["status"].items():
                run["status"][status] = run["status"].get(status, 0) + n
            for key in ("bytes_downloaded", "bytes_written", "requests"):
                run[key] += summary[key]
            for signature, seen in summary.get("internal_errors", {}).items():
                known = run["internal_errors"].get(signature)
                if known is None:  # the traceback once per distinct error per job, not once per record
                    run["internal_errors"][signature] = dict(seen)
                    logging.getLogger("artsim.download").error(
                        "internal error (a bug in artsim, not a host failure): %s\n%s", signature,
                        seen.get("traceback", ""))
                else:
                    known["count"] += seen["count"]
            progress.update(summary["records"], extra=f"ok={run['status'].get('ok', 0)} "
                                                      f"shards={run['shards']}/{plan.shards}")

        try:
            run_shards(cfg, plan.task_files, plan.shards, limiters, on_summary)
            for actor in limiters:
                try:
                    snapshot.update(ray.get(actor.snapshot.remote()))
                except ray.exceptions.RayError as exc:  # the report is still written, without per-host state
                    say(f"download: host limiter state lost ({type(exc).__name__}); report without it")
        finally:
            for actor in limiters:
                ray.kill(actor)
    storage.delete(work)
    run["elapsed_s"] = time.perf_counter() - start

    # Every record of records/ is in images/ when every planned record was committed: a shard task's summary counts
    # the records it committed (new shards: all of theirs; replaced ones: the refetched), and a failed task fails
    # the run before this point. Shard files are only ever added, or replaced with the same records.
    complete = run["records"] == plan.pending_new + plan.pending_retry
    report = build_report(count_committed(storage, paths.images), run, snapshot, plan.unique_records, complete,
                          paths.images)
    storage.write_json(paths.images_report, report)
    internal = report["by_status"].get("internal_error", 0)
    if complete and not internal:  # records that met a bug are not done: downstream stages wait for the fix
        storage.write_bytes(join(paths.images, SUCCESS), b"")
    print_report(report, paths.images_report)
    if internal:
        kinds = max(len(run["internal_errors"]), 1)
        raise StageFailed(f"download: {internal} records failed with internal_error ({kinds} distinct "
                          f"error{'s' if kinds > 1 else ''}: a bug in artsim, not a host failure; tracebacks "
                          f"above and in {paths.images_report}); they are committed and the next run fetches "
                          f"them again")
    return report


def _clean_stale_temporaries(storage, images_uri: str) -> None:
    """Remove half-written shard files left by a killed run (local storage names them .<name>.tmp-<uuid>)."""
    from artsim.storage import join

    for name in storage.list(images_uri):
        if name.startswith(".shard-") and ".tmp-" in name:
            storage.delete(join(images_uri, name))
