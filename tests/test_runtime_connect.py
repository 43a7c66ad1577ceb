"""Which Ray a stage joins (`ray.address`), and that a dead address ends the run in seconds with exit 2 naming
ray.address instead of hanging in ray.init (which retries for minutes: measured > 2 min at 127.0.0.1:1)."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from artsim.errors import ConfigError
from artsim.runtime import RECORDED, probe, resolve_ray_target
from conftest import REPO, free_port


def never(*_):
    raise AssertionError("must not be consulted")


def test_null_joins_ray_address_first():
    t = resolve_ray_target(None, {"RAY_ADDRESS": "10.0.0.5:6379"}, current_cluster=never)
    assert (t.address, t.how) == ("10.0.0.5:6379", "RAY_ADDRESS")


def test_null_joins_a_running_ray_start_when_no_ray_address():
    t = resolve_ray_target(None, {}, current_cluster=lambda: "127.0.0.1:6379", reachable=lambda a: True)
    assert (t.address, t.how) == ("127.0.0.1:6379", RECORDED)


def test_null_starts_a_private_ray_when_there_is_none_or_the_record_is_stale():
    assert resolve_ray_target(None, {}, current_cluster=lambda: None).address is None
    stale = resolve_ray_target(None, {}, current_cluster=lambda: "127.0.0.1:6379", reachable=lambda a: False)
    assert stale.address is None and "127.0.0.1:6379" in stale.how and "gone" in stale.how


def test_local_always_private_even_inside_a_submitted_job():
    t = resolve_ray_target("local", {"RAY_ADDRESS": "10.0.0.5:6379"}, current_cluster=never)
    assert t.address is None and t.how == "ray.address: local"


def test_explicit_address_is_used_as_given():
    for address in ("auto", "10.0.0.5:6379", "ray://head:10001"):
        t = resolve_ray_target(address, {"RAY_ADDRESS": "elsewhere:1"}, current_cluster=never)
        assert (t.address, t.how) == (address, "ray.address")


def test_probe_names_ray_address_for_a_closed_port():
    port = free_port()  # bound then released: nothing listens
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^ray.address: no Ray cluster answers at 127.0.0.1:{port}"):
        probe(f"127.0.0.1:{port}", "ray.address")
    assert time.monotonic() - t0 < 6
    with pytest.raises(ConfigError, match=r"found through RAY_ADDRESS"):
        probe(f"ray://127.0.0.1:{port}", "RAY_ADDRESS")


def _run_download(address: str, tmp_path, extra_env=None, extra_args=()):
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra_env or {})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "download.py"), "-c", str(REPO / "configs" / "demo.yaml"),
                           "--set", f"run.root={tmp_path / 'run'}", "--set", f"ray.address={address}", *extra_args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    return proc, time.monotonic() - t0


def test_cli_exits_2_naming_ray_address_when_nothing_listens(tmp_path):
    port = free_port()
    proc, seconds = _run_download(f"127.0.0.1:{port}", tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"artsim: error: ray.address: no Ray cluster answers at "
                                                           f"127.0.0.1:{port}")
    assert seconds < 30


def test_cli_exits_2_when_the_address_accepts_tcp_but_is_no_ray(tmp_path):
    """A port that accepts connections and never answers (a wrong service, a half-dead head): ray.init would retry
    for minutes; the watchdog ends the run with exit 2 at ray.connect_timeout_s."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.5)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        proc, seconds = _run_download(f"127.0.0.1:{port}", tmp_path, extra_args=["--set", "ray.connect_timeout_s=8"])
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"artsim: error: ray.address: 127.0.0.1:{port} accepts connections but did not answer "
                           "as a Ray cluster within 8 s"), last
    assert seconds < 30

