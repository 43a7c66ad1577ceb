"""Why the test server no longer counts live connections by walking /proc/net/tcp (tests/httpd.py).

3 client sockets are open at any instant (each new one opens only after an old one closed); a reader walks
/proc/net/tcp again and again and counts the client sockets it sees ESTABLISHED or SYN_SENT. One walk is not a
snapshot (the kernel walks its hash table over many read() calls), so it can count more than were ever open
together. Prints the largest count and how many walks counted more than 3.

    .venv/bin/python benchmarks/proc_tcp_walk.py [--walks 300] [--noise 2000]
"""
from __future__ import annotations

import argparse
import os
import socket
import threading
import time


def count_walk(port: int) -> int:
    fd = os.open("/proc/net/tcp", os.O_RDONLY)
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 300)  # small reads, as a preempted reader effectively makes them
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    n = 0
    for line in b"".join(chunks).decode().splitlines()[1:]:
        parts = line.split()
        addr, remote_port = parts[2].rsplit(":", 1)
        if int(remote_port, 16) == port and parts[3] in ("01", "02"):
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--walks", type=int, default=300)
    p.add_argument("--noise", type=int, default=2000,
                   help="idle connections to another port, so that the table is as long as on a busy machine")
    args = p.parse_args()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    port = server.getsockname()[1]
    accepted: list = []

    def accept_forever() -> None:
        while True:
            accepted.append(server.accept()[0])
            if len(accepted) > 20:
                accepted.pop(0).close()

    threading.Thread(target=accept_forever, daemon=True).start()
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(4096)
    noise_accepted: list = []
    threading.Thread(target=lambda: [noise_accepted.append(other.accept()[0]) for _ in range(args.noise)],
                     daemon=True).start()
    noise = [socket.create_connection(other.getsockname()) for _ in range(args.noise)]
    live = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            live.pop(0).close()  # close first ...
            live.append(socket.create_connection(("127.0.0.1", port)))  # ... then open: never more than 3
            time.sleep(0.001)

    threading.Thread(target=churn, daemon=True).start()
    counts = [count_walk(port) for _ in range(args.walks)]
    stop.set()
    with open("/proc/net/tcp") as f:
        lines = sum(1 for _ in f)
    del noise
    print(f"{args.walks} walks of /proc/net/tcp ({lines} lines): at most 3 sockets open together; counted up to "
          f"{max(counts)}, {sum(c > 3 for c in counts)} walks over 3")


if __name__ == "__main__":
    main()
