"""A real uvicorn server on 127.0.0.1 in a thread, and a stdlib HTTP client for the serve tests."""
from __future__ import annotations

import http.client
import json
import threading
import time
from contextlib import contextmanager

from conftest import free_port


@contextmanager
def running(app):
    """Serve ``app`` on a free loopback port; yields the port once the server accepts connections."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # state, not a sleep: uvicorn sets it once the socket listens
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def call(port: int, method: str, path: str, body=None, headers=None, timeout: float = 120):
    """(status, parsed JSON body) of one request; ``body`` dict/list -> JSON, bytes -> as is."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()
