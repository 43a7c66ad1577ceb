"""Download throughput: artsim vs img2dataset on the same locally served URLs.

Both download the same N URLs (default 2,000) from a loopback server that adds per-request latency (default 50 ms)
and serves large originals (1,500 px JPEGs made from the real Met sample images, upscaled with film grain so they
have a realistic size), and both resize to 384 px (longest side) JPEG quality 90.

* img2dataset==1.47.0 runs from its own venv (benchmarks/.venv-img2dataset; created with
  ``python3.11 -m venv benchmarks/.venv-img2dataset && benchmarks/.venv-img2dataset/bin/pip install img2dataset==1.47.0``),
  ``processes_count`` = CPU count, ``thread_count`` 64, ``resize_mode keep_ratio_largest``.
* artsim runs ``run_download`` with politeness and safety ON: the job-wide limiter actor (cap raised to
  ``--per-host-connections`` / ``--per-host-rps`` because all URLs share one loopback host), robots.txt and
  X-Robots-Tag checks, address checks with 127.0.0.1 in allow_hosts, pinned connections, byte/pixel/time caps.

The server runs in its own process so that it does not compete with either client for the GIL.

    .venv/bin/python benchmarks/bench_download.py [--n 2000] [--latency 0.05] [--skip-img2dataset]
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMG2DATASET = REPO / "benchmarks" / ".venv-img2dataset" / "bin" / "img2dataset"


def make_originals(out_dir: Path, count: int, size: int) -> list[Path]:
    from PIL import Image, ImageChops

    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(glob.glob(str(REPO / "data" / "met_sample" / "images" / "*.jpg")))
    rng = random.Random(0)
    paths = []
    for i in range(count):
        path = out_dir / f"orig_{i:03d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        base = Image.open(sources[i % len(sources)]).convert("RGB")
        scale = size / max(base.size)
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.Resampling.BICUBIC)
        grain = Image.effect_noise(base.size, 24 + rng.random() * 16).convert("RGB")
        img = ImageChops.add(base, grain, scale=1.6, offset=-60)
        img.save(path, "JPEG", quality=92)
    return paths


def start_server(work: Path, originals: list[Path], n: int, latency: float, keep_alive: bool = True):
    # HTTP/1.1 with keep-alive, like most image hosts and CDNs (img2dataset closes every connection regardless).
    spec = {"latency_s": latency, "keep_alive": keep_alive, "files": {f"/img/{i:05d}.jpg": str(originals[i % len(originals)])
                                             for i in range(n)}}
    spec_path, port_file = work / "server_spec.json", work / "server.port"
    spec_path.write_text(json.dumps(spec))
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "httpd.py"), "--spec", str(spec_path),
                             "--port-file", str(port_file), "--stats-file", str(work / "server_stats.json")])
    deadline = time.time() + 60
    while not port_file.exists():
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError("benchmark server did not start")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def process_kind(cmd: str) -> str:
    """What a process of the artsim job is, from its command line (where the CPU goes, by kind)."""
    for needle, kind in (("ShardWorker", "fetch workers"), ("HostLimiter", "limiter actor"), ("raylet", "raylet"),
                         ("gcs_server", "gcs"), ("ray::", "other ray workers")):
        if needle in cmd:
            return kind
    return "other ray daemons"  # dashboard agent, runtime-env agent, log monitor, autoscaler monitor, idle workers


def process_tree_cpu(root_pid: int, exclude: set[int], with_cmd: bool = False) -> dict[int, tuple]:
    """{pid: (kind, CPU seconds user+system)} of the live processes under ``root_pid`` (Linux /proc).

    Ray's daemons and workers are descendants of the driver, so this covers the whole artsim job, by kind (see
    ``process_kind``).
    """
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (cmd, (utime + stime) / tick)
    out: dict[int, tuple[str, float]] = {}
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if pid in exclude or pid not in stats:
            continue
        cmd, cpu = stats[pid]
        kind = "driver" if pid == root_pid else process_kind(cmd)
        out[pid] = (kind, cpu, cmd) if with_cmd else (kind, cpu)
    return out


class CpuSampler:
    """Samples the process tree every 0.25 s while a job runs: a Ray worker that exits before the job returns
    (Ray Data releases its actor pool at the end) still counts, up to its last sample."""

    def __init__(self, root_pid: int, exclude: set[int]):
        import threading

        self.root_pid, self.exclude = root_pid, exclude
        self.first = process_tree_cpu(root_pid, exclude)
        self.last = dict(self.first)
        self._cmds: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.25):
            self._sample()

    def _sample(self):
        now = process_tree_cpu(self.root_pid, self.exclude, with_cmd=True)
        self.last.update({pid: (kind, cpu) for pid, (kind, cpu, _cmd) in now.items()})
        self._cmds.update({pid: (cmd, cpu) for pid, (_kind, cpu, cmd) in now.items()})

    def stop(self) -> dict[str, float]:
        """CPU seconds used since start, by kind."""
        self._stop.set()
        self._thread.join()
        self._sample()
        used: dict[str, float] = {}
        for pid, (kind, cpu) in self.last.items():
            used[kind] = used.get(kind, 0.0) + cpu - self.first.get(pid, (kind, 0.0))[1]
        return used

    def by_process(self, top: int = 15) -> list[tuple[str, float]]:
        """The ``top`` processes by CPU seconds used since start: (command line, seconds)."""
        rows = [(cmd[:100], cpu - self.first.get(pid, (cmd, 0.0))[1]) for pid, (cmd, cpu) in self._cmds.items()]
        return sorted(rows, key=lambda r: -r[1])[:top]


def run_img2dataset(work: Path, urls: list[str], processes: int) -> dict:
    if not IMG2DATASET.exists():
        return {"error": f"{IMG2DATASET} missing (see module doc to create it)"}
    url_file = work / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    out = work / "img2dataset_out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(IMG2DATASET), "--url_list", str(url_file), "--output_folder", str(out), "--image_size", "384",
           "--resize_mode", "keep_ratio_largest", "--processes_count", str(processes), "--thread_count", "64",
           "--output_format", "parquet", "--encode_quality", "90", "--number_sample_per_shard", "250",
           "--timeout", "20", "--retries", "0", "--enable_wandb", "False", "--distributor", "multiprocessing"]
    t0 = time.perf_counter()
    cpu0 = os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    cpu_s = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    ok = 0
    for stats in glob.glob(str(out / "*_stats.json")):
        ok += json.loads(Path(stats).read_text()).get("successes", 0)
    result = {"seconds": elapsed, "ok": ok, "images_per_s": ok / elapsed, "returncode": proc.returncode,
              "cpu_ms_per_image": 1000 * cpu_s / max(ok, 1)}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def run_artsim(work: Path, urls: list[str], args, server_pid: int, connections: int | None = None,
               rps: float | None = None) -> dict:
    import ray

    from artsim.config import config_from_dict
    from artsim.download.stage import run_download
    from artsim.runtime import RunContext
    from artsim.rundir.schema import empty_record, records_table

    root = work / "artsim_run"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for i, url in enumerate(urls):
        r = empty_record()
        r.update(object_id=f"bench:{i}", collection="bench", image_url=url, license="CC0")
        rows.append(r)
    tree = {"run": {"root": str(root)}, "ray": {"num_cpus": os.cpu_count()},
            "download": {"allow_hosts": ["127.0.0.1"],
                         "per_host_connections": connections or args.per_host_connections,
                         "per_host_requests_per_second": rps or args.per_host_rps or None,
                         "shard_size": args.shard_size,
                         "fetch_threads": args.fetch_threads, "image_size": 384, "quality": 90, "retries": 0,
                         "workers": args.workers or os.cpu_count()}}
    ctx = RunContext(config_from_dict(tree))
    ctx.storage.write_table(records_table(rows), ctx.paths.records)
    t0 = time.perf_counter()
    # address="local": always a fresh Ray of our own, never another session's cluster on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t0
    sampler = CpuSampler(os.getpid(), {server_pid})
    t1 = time.perf_counter()
    report = run_download(ctx)
    elapsed = time.perf_counter() - t1
    cpu_used = sampler.stop()
    top_processes = [(cmd, round(1000 * cpu / max(report["by_status"].get("ok", 0), 1), 2))
                     for cmd, cpu in sampler.by_process()]
    ok = report["by_status"].get("ok", 0)
    ray.shutdown()
    cpu_ms = {k: round(1000 * v / max(ok, 1), 2) for k, v in cpu_used.items()}
    return {"seconds": elapsed, "ray_init_seconds": ray_start, "ok": ok, "images_per_s": ok / elapsed,
            "images_per_s_incl_ray_init": ok / (elapsed + ray_start), "by_status": report["by_status"],
            "max_concurrent_per_host": report["max_concurrent_connections_per_host"],
            "cpu_ms_per_image": round(sum(cpu_ms.values()), 2), "cpu_ms_per_image_by_process": cpu_ms,
            "cpu_ms_per_image_top_processes": top_processes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--size", type=int, default=1500)
    p.add_argument("--originals", type=int, default=40)
    p.add_argument("--work", default=str(REPO / "benchmarks" / "out" / "download"))
    p.add_argument("--per-host-connections", type=int, default=64)
    p.add_argument("--per-host-rps", type=float, default=0.0,
                   help="artsim's per-host requests/s cap in the main run; 0: none (the connection cap holds)")
    p.add_argument("--no-keep-alive", action="store_true", help="the server closes every connection (HTTP/1.0)")
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--fetch-threads", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--skip-img2dataset", action="store_true")
    p.add_argument("--capped-connections", type=int, default=4,
                   help="a second artsim run where the per-host caps bind (0: skip it)")
    p.add_argument("--capped-rps", type=float, default=40.0)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    originals = make_originals(work / "originals", args.originals, args.size)
    mean_kb = sum(p.stat().st_size for p in originals) / len(originals) / 1024
    server, port = start_server(work, originals, args.n, args.latency, keep_alive=not args.no_keep_alive)
    urls = [f"http://127.0.0.1:{port}/img/{i:05d}.jpg" for i in range(args.n)]
    results = {"n": args.n, "latency_s": args.latency, "original_px": args.size, "original_mean_kb": mean_kb,
               "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    try:
        results["artsim"] = run_artsim(work, urls, args, server.pid)
        if not args.skip_img2dataset:
            results["img2dataset"] = run_img2dataset(work, urls, os.cpu_count() or 1)
        if args.capped_connections:
            # The caps bind: throughput is what the host allows (connections / rps), CPU per image must not grow.
            results["artsim_capped"] = run_artsim(work, urls[: min(len(urls), 400)], args, server.pid,
                                                  args.capped_connections, args.capped_rps)
            results["artsim_capped"]["caps"] = {"per_host_connections": args.capped_connections,
                                                "per_host_requests_per_second": args.capped_rps}
    finally:
        server.terminate()
        server.wait()
    results["load_average_after"] = os.getloadavg()
    print(f"load average before {results['load_average_before']}, after {results['load_average_after']}")
    a = results["artsim"]
    print(f"\nartsim:      {a['ok']}/{args.n} ok in {a['seconds']:.1f}s = {a['images_per_s']:.1f} images/s "
          f"(+{a['ray_init_seconds']:.1f}s ray.init: {a['images_per_s_incl_ray_init']:.1f} images/s); "
          f"CPU {a['cpu_ms_per_image']:.1f} ms/image {a['cpu_ms_per_image_by_process']}")
    if "img2dataset" in results:
        b = results["img2dataset"]
        if "error" in b or not b.get("ok"):
            print(f"img2dataset: failed: {b}")
        else:
            print(f"img2dataset: {b['ok']}/{args.n} ok in {b['seconds']:.1f}s = {b['images_per_s']:.1f} images/s; "
                  f"CPU {b['cpu_ms_per_image']:.1f} ms/image")
            results["ratio"] = a["images_per_s"] / b["images_per_s"]
            results["ratio_incl_ray_init"] = a["images_per_s_incl_ray_init"] / b["images_per_s"]
            print(f"ratio artsim / img2dataset: {results['ratio']:.2f}x "
                  f"({results['ratio_incl_ray_init']:.2f}x counting ray.init)")
    if "artsim_capped" in results:
        c = results["artsim_capped"]
        print(f"artsim with binding caps ({c['caps']}): {c['ok']} ok, {c['images_per_s']:.1f} images/s "
              f"(cap allows {args.capped_rps:g}/s), max concurrent per host {c['max_concurrent_per_host']}, "
              f"CPU {c['cpu_ms_per_image']:.1f} ms/image")
    if "img2dataset" in results and results["img2dataset"].get("ok"):
        b = results["img2dataset"]
        print("\n| | CPU ms/image | images/s |\n| --- | --- | --- |")
        print(f"| artsim | {a['cpu_ms_per_image']:.1f} | {a['images_per_s']:.1f} |")
        print(f"| img2dataset | {b['cpu_ms_per_image']:.1f} | {b['images_per_s']:.1f} |")
        print(f"| artsim / img2dataset | {a['cpu_ms_per_image'] / b['cpu_ms_per_image']:.2f}x (target <= 0.6x) | "
              f"{a['images_per_s'] / b['images_per_s']:.2f}x (target >= 1.5x) |")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
