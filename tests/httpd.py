"""A loopback HTTP server that misbehaves on purpose, for download tests and benchmarks.

Routes map a path to a *behaviour* (a callable that writes the response). The server measures what politeness
promises: the maximum number of requests it was serving at the same time (``max_concurrent``), hits per path,
request times and headers. With ``count_connections=True`` it also counts what a per-host connection cap is about:
the client sockets connected to it that the client has not closed yet (``max_live_connections``, each accepted
socket's TCP state read from the kernel at every accept and every request). A handler still working for a client that gave up is not
a live connection; a keep-alive connection idle between requests is. Run it in-process (``with MisbehavingServer() as srv``) or as a separate process
(``python tests/httpd.py --spec FILE``) so that a job under test can be killed without killing the server.
"""
from __future__ import annotations

import http.server
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

Behaviour = Callable[["_Handler"], None]


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "misbehaving/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: connection count == request count

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv: MisbehavingServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        srv._enter(path, dict(self.headers.items()))
        self._counted = True
        try:
            behaviour = srv.routes.get(path) or srv.default
            behaviour(self)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.done_writing()

    def done_writing(self):
        """Stop counting this request as in flight (called just before the final bytes go out)."""
        if getattr(self, "_counted", False):
            self._counted = False
            self.server.owner._leave()  # type: ignore[attr-defined]

    # helpers for behaviours
    def send_body(self, code: int, body: bytes, headers: Optional[dict] = None, content_type: str = "image/jpeg",
                  content_length: Optional[int] = None):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        for k, v in (headers or {}).items():
            for item in (v if isinstance(v, list) else [v]):
                self.send_header(k, str(item))
        self.end_headers()
        self.done_writing()
        self.wfile.write(body)


class _KeepAliveHandler(_Handler):
    protocol_version = "HTTP/1.1"  # persistent connections (Content-Length on every response)


TCP_ESTABLISHED = 1  # tcpi_state, the first byte of struct tcp_info (Linux)


def client_still_open(sock: socket.socket) -> bool:
    """Whether the client of an accepted socket has not closed its end: the server side is still ESTABLISHED
    (after the client's FIN it is CLOSE_WAIT), read from the kernel for this one socket (TCP_INFO)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_ESTABLISHED
    except OSError:
        return False


class _CountingHTTPServer(http.server.ThreadingHTTPServer):
    def process_request(self, request, client_address):
        owner = self.owner  # type: ignore[attr-defined]
        with owner._lock:
            owner.connections_accepted += 1
            owner._open_sockets.add(request)
        owner._sample_connections()
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.owner._lock:  # type: ignore[attr-defined]
            self.owner._open_sockets.discard(request)  # type: ignore[attr-defined]
        super().shutdown_request(request)


class MisbehavingServer:
    def __init__(self, latency_s: float = 0.0, host: str = "127.0.0.1", count_connections: bool = False,
                 keep_alive: bool = False):
        self.latency_s = latency_s
        self.routes: dict[str, Behaviour] = {}
        self.default: Behaviour = status(404)
        self.hits: dict[str, int] = {}
        self.request_times: dict[str, list[float]] = {}
        self.request_headers: list[dict] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.count_connections = count_connections
        self.max_live_connections = 0
        self._open_sockets: set = set()  # accepted sockets the server has not closed yet
        self.live_samples = 0
        self.connections_accepted = 0  # TCP connections the server accepted (keep-alive: fewer than requests)
        self._lock = threading.Lock()
        self._httpd = _CountingHTTPServer((host, 0), _KeepAliveHandler if keep_alive else _Handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 512
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(self, path: str, behaviour: Behaviour) -> str:
        self.routes[path] = behaviour
        return self.url(path)

    def _sample_connections(self) -> None:
        """Count the accepted connections whose client has not closed its socket. Each socket's state is one
        kernel read, and every socket counted was accepted before the count began and seen open after it, so
        all of them were open together at that instant: the count never exceeds a real simultaneous number. (It
        replaced a walk of /proc/net/tcp, which is not a snapshot: the kernel walks its hash table over many
        read() calls, so a preempted reader can see a socket that closed during the walk next to one opened
        after it closed, and count connections that were never open together.)"""
        if not self.count_connections:
            return
        with self._lock:
            sockets = list(self._open_sockets)
        live = sum(1 for s in sockets if client_still_open(s))
        with self._lock:
            self.live_samples += 1
            self.max_live_connections = max(self.max_live_connections, live)

    def _enter(self, path: str, headers: dict):
        self._sample_connections()
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
            self.hits[path] = self.hits.get(path, 0) + 1
            self.request_times.setdefault(path, []).append(time.monotonic())
            if len(self.request_headers) < 10_000:
                self.request_headers.append(headers)
        if self.latency_s:
            time.sleep(self.latency_s)

    def _leave(self):
        with self._lock:
            self.concurrent -= 1

    def start(self) -> "MisbehavingServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stats(self) -> dict:
        with self._lock:
            return {"max_concurrent": self.max_concurrent, "hits": dict(self.hits),
                    "max_live_connections": self.max_live_connections,
                    "connections_accepted": self.connections_accepted}


# -- which process made a request (Linux /proc): for tests that prove work ran in several processes -----------


def _socket_inode(client_port: int, server_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote = parts[1], parts[2]
            if int(local.rsplit(":", 1)[1], 16) == client_port and int(remote.rsplit(":", 1)[1], 16) == server_port:
                return parts[9]
    return None


def _pid_owning(inode: str) -> int | None:
    target = f"socket:[{inode}]"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # the process ended or is not ours
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return int(pid)
            except OSError:  # this fd closed while we looked; the process's other fds still count
                continue
    return None


def requester_pid(client_port: int, server_port: int, attempts: int = 5) -> int | None:
    # The scan races with other processes opening and closing fds (a CI run once lost one of 36 lookups that way);
    # the client's socket stays open while it waits for our answer, so a second look finds it.
    for _ in range(attempts):
        inode = _socket_inode(client_port, server_port)
        pid = _pid_owning(inode) if inode else None
        if pid is not None:
            return pid
        time.sleep(0.02)
    return None


def traced(behaviour, requesters: list):
    """Wrap a route: record the pid of the process on the other end of the connection, then answer as usual."""
    def run(h):
        requesters.append(requester_pid(h.client_address[1], h.server.server_address[1]))
        behaviour(h)

    return run



# -- behaviours ------------------------------------------------------------------------------------------------------
def ok(body: bytes, content_type: str = "image/jpeg", headers: Optional[dict] = None) -> Behaviour:
    return lambda h: h.send_body(200, body, headers, content_type)


def status(code: int, headers: Optional[dict] = None, body: bytes = b"") -> Behaviour:
    return lambda h: h.send_body(code, body, headers, "text/plain")


def redirect(location: str, code: int = 302) -> Behaviour:
    return lambda h: h.send_body(code, b"", {"Location": location}, "text/plain")


def sequence(*behaviours: Behaviour) -> Behaviour:
    """The n-th request gets the n-th behaviour; the last one repeats."""
    count = {"n": 0}
    lock = threading.Lock()

    def run(h):
        with lock:
            i = min(count["n"], len(behaviours) - 1)
            count["n"] += 1
        behaviours[i](h)

    return run


def slow(delay_s: float, body: bytes) -> Behaviour:
    def run(h):
        time.sleep(delay_s)
        h.send_body(200, body)

    return run


def trickle(body: bytes, interval_s: float, chunk: int = 16) -> Behaviour:
    """Sends the body a few bytes at a time: every recv() succeeds quickly, the whole takes forever."""
    def run(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.done_writing()
        for i in range(0, len(body), chunk):
            h.wfile.write(body[i:i + chunk])
            h.wfile.flush()
            time.sleep(interval_s)

    return run


def truncated(body: bytes, keep: int) -> Behaviour:
    """Announces the full length, sends ``keep`` bytes, closes."""
    def run(h):
        h.send_body(200, body[:keep], content_length=len(body))
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)

    return run


# -- as a separate process ------------------------------------------------------------------------------------------
def _serve_directory_spec(spec: dict) -> MisbehavingServer:
    """spec: {"latency_s": float, "files": {"/path": "local file"}, "status": {"/path": code},
    "slow": {"/path": [delay_s, "local file"]}}"""
    srv = MisbehavingServer(latency_s=spec.get("latency_s", 0.0), count_connections=spec.get("count_connections", False),
                            keep_alive=spec.get("keep_alive", False))
    for path, file in spec.get("files", {}).items():
        with open(file, "rb") as f:
            srv.add(path, ok(f.read()))
    for path, code in spec.get("status", {}).items():
        srv.add(path, status(int(code)))
    for path, (delay, file) in spec.get("slow", {}).items():
        with open(file, "rb") as f:
            srv.add(path, slow(float(delay), f.read()))
    return srv


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON file describing routes")
    p.add_argument("--port-file", required=True, help="written with the port once serving")
    p.add_argument("--stats-file", help="written with stats on SIGTERM / every second")
    args = p.parse_args(argv)
    with open(args.spec) as f:
        spec = json.load(f)
    srv = _serve_directory_spec(spec).start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(srv.port))
    import os

    os.replace(args.port_file + ".tmp", args.port_file)
    try:
        while True:
            time.sleep(0.5)
            if args.stats_file:
                with open(args.stats_file + ".tmp", "w") as f:
                    json.dump(srv.stats(), f)
                os.replace(args.stats_file + ".tmp", args.stats_file)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
