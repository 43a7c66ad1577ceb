"""images/_report.json and the end-of-run tables.

Counts describe the whole images/ dataset (every committed shard, this run's and earlier ones); throughput, bytes and
paused hosts describe this run.
"""
from __future__ import annotations

from typing import Optional

from artsim.console import say, table
from artsim.rundir.schema import STATUSES

TOP_HOSTS = 20


def build_report(committed, run: dict, limiter_snapshot: dict, total_records: int,
                 complete: bool, images_uri: str) -> dict:
    """``committed``: images/ as counted by ``planner.count_committed`` (rows, by_status, by_host)."""
    by_status, by_host, rows = committed.by_status, committed.by_host, committed.rows
    host_rows = []
    for host, counts in by_host.items():
        total = sum(counts.values())
        failed = total - counts.get("ok", 0) - counts.get("internal_error", 0)  # a bug is not the host's failure
        host_rows.append({"host": host, "total": total, "ok": counts.get("ok", 0), "failed": failed,
                          "status": dict(counts)})
    host_rows.sort(key=lambda r: (-r["total"], r["host"]))
    failing = sorted((r for r in host_rows if r["failed"]), key=lambda r: (-r["failed"], r["host"]))[:TOP_HOSTS]
    paused = sorted(({"host": h, "times_paused": s["times_paused"], "requests": s["requests"]}
                     for h, s in limiter_snapshot.items() if s.get("times_paused")), key=lambda r: r["host"])
    elapsed = max(run.get("elapsed_s", 0.0), 1e-9)
    fetched = run.get("records", 0)
    return {
        "images": images_uri,
        "complete": complete,
        "records_total": total_records,
        "records_in_images": rows,
        "by_status": {s: by_status.get(s, 0) for s in STATUSES if by_status.get(s)},
        # records committed as internal_error (bugs in artsim, never blamed on a host) and, for this run, each
        # distinct error with its count and first traceback
        "internal_errors": by_status.get("internal_error", 0),
        "by_host": {r["host"]: r["status"] for r in host_rows},
        "top_failing_hosts": failing,
        "paused_hosts": paused,
        "max_concurrent_connections_per_host": {h: s["max_active"] for h, s in limiter_snapshot.items()},
        "this_run": {
            **run,
            "records_per_s": fetched / elapsed,
            "ok_per_s": run.get("status", {}).get("ok", 0) / elapsed,
            "mb_downloaded_per_s": run.get("bytes_downloaded", 0) / elapsed / 1e6,
        },
    }


def print_report(report: dict, report_uri: Optional[str] = None) -> None:
    run = report["this_run"]
    say(f"download: {run.get('records', 0)} records fetched this run in {run.get('elapsed_s', 0):.1f}s "
        f"({run['records_per_s']:.1f} records/s, {run['ok_per_s']:.1f} ok/s, "
        f"{run.get('bytes_downloaded', 0) / 1e6:.1f} MB in, {run.get('bytes_written', 0) / 1e6:.1f} MB out)")
    total = max(report["records_in_images"], 1)
    table(["status", "records", "share"],
          [[s, n, f"{100 * n / total:.1f}%"] for s, n in report["by_status"].items()])
    if report["top_failing_hosts"]:
        table(["failing host", "failed", "total", "statuses"],
              [[r["host"], r["failed"], r["total"], ", ".join(f"{k}={v}" for k, v in sorted(r["status"].items()))]
               for r in report["top_failing_hosts"][:10]])
    for signature, seen in report["this_run"].get("internal_errors", {}).items():
        say(f"internal error x{seen['count']}: {signature}")
    if report["paused_hosts"]:
        say("paused by the circuit breaker: " + ", ".join(r["host"] for r in report["paused_hosts"]))
    state = "complete" if report["complete"] else "INCOMPLETE (re-run to finish)"
    say(f"images: {report['records_in_images']}/{report['records_total']} records accounted for, {state}: "
        f"{report['images']}")
    if report_uri:
        say(f"report: {report_uri}")
