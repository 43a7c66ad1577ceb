"""Download stage without Ray: safety, politeness, fetch and resize against a misbehaving loopback server."""
from __future__ import annotations

import hashlib
import io
import random
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

from artsim.config import DownloadConfig  # noqa: E402
from artsim.download.fetch import Fetcher, iiif_rendition_url  # noqa: E402
from artsim.download.politeness import (  # noqa: E402
    HostBook, LocalHostLimiter, backoff_delay, parse_retry_after, x_robots_opt_out,
)
from artsim.download.resize import ImageRejected, process_image, sniff_format  # noqa: E402
from artsim.download.safety import CachingResolver, URLPolicy, UnsafeURL, blocked_reason  # noqa: E402
from artsim.download.shards import ShardTask, plan_shards, process_shard, read_committed  # noqa: E402
from artsim.rundir.schema import STATUSES, empty_record, records_table  # noqa: E402
from artsim.storage import Storage  # noqa: E402


def jpeg(width=1500, height=1000, seed=0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    img.paste(Image.effect_noise((width // 4, height // 4), 30).convert("RGB"), (10, 10))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def png_bomb(width=30_000, height=30_000) -> bytes:
    """A valid small PNG whose header claims width*height pixels (a few KB on the wire, ~900 MP decoded)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\x00" * (width // 8 + 1) * 64, 9)  # a few rows of a 1-bit image
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def make_fetcher(**overrides) -> tuple[Fetcher, LocalHostLimiter]:
    cfg = DownloadConfig(**{"allow_hosts": ["127.0.0.1"], "timeout_s": 1.0, "retries": 2, "backoff_base_s": 0.05,
                            "backoff_max_s": 3.0, **overrides})
    limiter = LocalHostLimiter(cfg.per_host_connections, cfg.per_host_requests_per_second,
                               cfg.circuit_breaker_failures, cfg.circuit_breaker_cooldown_s)
    return Fetcher(cfg, limiter, seed=0), limiter


# -- safety -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:a00:1::1", "64:ff9b::a9fe:a9fe",
])
def test_blocked_addresses(address):
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_allowed(address):
    assert blocked_reason(address) is None


def test_url_policy_rejects_bad_urls():
    policy = URLPolicy(allow_hosts=["127.0.0.1"])
    for url, status in [("ftp://example.org/a.jpg", "invalid_url"), ("javascript:alert(1)", "invalid_url"),
                        ("file:///etc/passwd", "invalid_url"), ("/etc/passwd", "invalid_url"),
                        ("http://user:pw@127.0.0.1/a.jpg", "invalid_url"), ("", "invalid_url"),
                        ("http://127.0.0.1:99999/", "invalid_url"),
                        ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
                        ("http://2130706433/", "blocked_address"),  # decimal form of 127.0.0.1
                        ("http://localhost/", "blocked_address"),  # allow_hosts lists the literal, not names
                        ("http://[::1]/", "blocked_address")]:
        with pytest.raises(UnsafeURL) as info:
            policy.scheme_of(url)
            policy.check(url)
        assert info.value.status == status, url


def test_mixed_dns_answers_are_blocked():
    """A name with one public and one private answer is refused (picking the good one is what rebinding abuses)."""
    policy = URLPolicy(resolver=lambda host, port: ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(UnsafeURL) as info:
        policy.check("http://images.example.org/a.jpg")
    assert info.value.status == "blocked_address" and "10.0.0.1" in str(info.value)


def test_connection_goes_to_checked_address_with_host_name():
    """The connection is pinned to the resolved IP; Host carries the name (which no real DNS could resolve)."""
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"]

    with MisbehavingServer() as srv:
        srv.add("/a.jpg", httpd.ok(jpeg(400, 300)))
        fetcher, _ = make_fetcher(allow_hosts=["images.museum.invalid"], respect_robots_txt=False)
        fetcher.policy.resolver = resolver
        result = fetcher.fetch_url("x:1", f"http://images.museum.invalid:{srv.port}/a.jpg")
        assert result.status == "ok", result.error
        assert srv.request_headers[-1]["Host"] == f"images.museum.invalid:{srv.port}"
        assert calls == ["images.museum.invalid"]  # resolved once, then connected to that answer
        assert srv.request_headers[-1]["User-Agent"] == fetcher.cfg.user_agent


# -- politeness bookkeeping ---------------------------------------------------------------------------------------
def test_hostbook_connection_and_rate_caps():
    book = HostBook(connections=2, requests_per_second=10, breaker_failures=3, breaker_cooldown_s=30)
    a, _, _ = book.try_acquire("h", now=0.0)
    assert a is not None
    lease, wait, reason = book.try_acquire("h", now=0.0)
    assert lease is None and reason == "rate" and wait == pytest.approx(0.1)  # checked after the connection cap
    b, _, _ = book.try_acquire("h", now=0.1)
    c, wait, reason = book.try_acquire("h", now=0.2)
    assert b is not None and c is None and reason == "connections"
    # Nothing to time: only a release (or a dead holder's leases taken back) frees a slot. Waiters never spin.
    assert wait is None
    assert book.try_acquire("other", now=0.2)[0] is not None  # caps are per host
    book.release("h", a, "ok", now=0.25)
    assert book.try_acquire("h", now=0.25)[0] is not None
    assert book.hosts["h"].max_active == 2


def test_hostbook_lease_never_expires_while_holder_lives_and_dead_holders_give_slots_back():
    book = HostBook(connections=1, requests_per_second=1000, breaker_failures=3, breaker_cooldown_s=30)
    assert book.try_acquire("h", now=0.0, holder="starved")[0] is not None
    # A holder stalled for an hour (a loaded machine) still owns its slot: no second connection is granted.
    assert book.try_acquire("h", now=3600.0, holder="other")[:3:2] == (None, "connections")
    assert book.held_by("starved") == 1
    assert book.drop_holder("starved") == (["h"], [])  # known dead (the Ray front end watches its process)
    assert book.try_acquire("h", now=3600.1, holder="other")[0] is not None
    assert book.snapshot()["h"]["reclaimed"] == 1


def test_hostbook_never_grants_a_slot_to_a_dead_holders_waiting_ticket():
    """A dead worker's threads were queued when it died: their tickets leave the queue with it, and a call of
    its that arrives late is refused. Granted, such a slot would never be returned (nobody holds it and its
    holder is already written off): three of them hung the node-loss download on a cap of 3."""
    from artsim.download.politeness import Ticket

    book = HostBook(connections=1, requests_per_second=1000, breaker_failures=3, breaker_cooldown_s=30)
    lease = book.try_acquire("h", now=0.0, holder="dead")[0]
    queued = [Ticket("dead", give_up=100.0), Ticket("dead", give_up=100.0), Ticket("live", give_up=100.0)]
    for t in queued:
        assert book.submit("h", t)
    hosts, dropped = book.drop_holder("dead")
    assert hosts == ["h"] and dropped == queued[:2]
    done, _ = book.settle("h", now=1.0)
    assert [(t.holder, lease is not None) for t, lease, _ in done] == [("live", True)]
    assert not book.submit("h", Ticket("dead", give_up=100.0))  # its call that was still on the way
    assert book.hosts["h"].active == 1 and lease not in book.hosts["h"].leases


def test_hostbook_queue_is_fifo_one_grant_at_a_time():
    from artsim.download.politeness import Ticket

    book = HostBook(connections=2, requests_per_second=10, breaker_failures=3, breaker_cooldown_s=30)
    tickets = [Ticket(f"w{i}", give_up=100.0) for i in range(6)]
    for t in tickets:
        book.submit("h", t)
    done, wake = book.settle("h", now=0.0)
    assert [t.holder for t, lease, _ in done] == ["w0"] and wake == pytest.approx(0.1)  # rate: next slot at 0.1
    done, wake = book.settle("h", now=0.1)
    assert [t.holder for t, _, _ in done] == ["w1"] and wake == pytest.approx(100.0)  # cap reached: wait a release
    attempts = book.hosts["h"].attempts
    book.release("h", 1, "ok", now=0.5)
    done, _ = book.settle("h", now=0.5)
    assert [t.holder for t, _, _ in done] == ["w2"]  # the head, not whoever polls first
    assert book.hosts["h"].attempts - attempts == 2  # one grant + one look at the next head: no herd of 4
    done, _ = book.settle("h", now=100.0)  # the rest give up at their deadline, still in order
    assert [(t.holder, reason) for t, _, reason in done] == [(f"w{i}", "queue_timeout") for i in (3, 4, 5)]


def test_hostbook_circuit_breaker_pauses_then_half_opens():
    book = HostBook(connections=4, requests_per_second=1000, breaker_failures=3, breaker_cooldown_s=10)
    now = 0.0
    for _ in range(3):
        lease = book.try_acquire("h", now)[0]
        book.release("h", lease, "server_error", now)
        now += 0.01
    lease, wait, reason = book.try_acquire("h", now)
    assert lease is None and reason == "paused" and wait == pytest.approx(10, abs=0.1)
    lease = book.try_acquire("h", now + 10.1)[0]  # half-open: one trial
    book.release("h", lease, "timeout", now + 10.2)  # fails again: re-opens at once
    assert book.try_acquire("h", now + 10.3)[2] == "paused"
    lease = book.try_acquire("h", now + 20.3)[0]
    book.release("h", lease, "ok", now + 20.4)  # recovers
    assert book.try_acquire("h", now + 20.5)[0] is not None
    assert book.hosts["h"].times_opened == 2


def test_backoff_and_retry_after_parsing():
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 8.0, rng) for a in range(10) for _ in range(50)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(backoff_delay(0, 0.5, 8.0, rng) for _ in range(100)) <= 0.5
    assert max(backoff_delay(6, 0.5, 8.0, rng) for _ in range(200)) > 4  # grows, jittered, capped
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now_epoch=1445412480.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_x_robots_tag_parsing():
    assert x_robots_opt_out(["noai"], "artsim") == "noai"
    assert x_robots_opt_out(["index, NoImageAI"], "artsim") == "noimageai"
    assert x_robots_opt_out(["googlebot: noindex"], "artsim") is None  # scoped to another crawler
    assert x_robots_opt_out(["artsim: noml"], "artsim") == "noml"
    assert x_robots_opt_out(["noarchive, nofollow"], "artsim") is None
    assert x_robots_opt_out([], "artsim") is None


# -- resize -------------------------------------------------------------------------------------------------------
def test_resize_keeps_aspect_and_sniffs_formats():
    out = process_image(jpeg(1500, 1000), 384, 10**8, "jpeg", 90)
    assert (out.width, out.height, out.original_width, out.original_height) == (384, 256, 1500, 1000)
    assert sniff_format(out.data) == "JPEG"
    webp = process_image(jpeg(300, 600), 128, 10**8, "webp", 80)
    assert (webp.width, webp.height) == (64, 128) and sniff_format(webp.data) == "WEBP"
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = process_image(buf.getvalue(), 100, 10**8)
    assert Image.open(io.BytesIO(out.data)).getpixel((5, 5))[0] > 240  # transparent → white, not black
    with pytest.raises(ImageRejected) as info:
        process_image(b"<html>hello</html>", 384, 10**8)
    assert info.value.status == "not_image"
    with pytest.raises(ImageRejected) as info:
        process_image(png_bomb(), 384, 10**8)
    assert info.value.status == "too_large"


def test_reduced_size_jpeg_decoding_is_faster():
    """draft() decodes a 4,000 px JPEG at reduced scale: much faster than a full decode + resize."""
    data = jpeg(4000, 3000)
    t0 = time.perf_counter()
    for _ in range(3):
        process_image(data, 384, 10**8)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        img = Image.open(io.BytesIO(data))
        img.load()
        img.resize((384, 288), Image.Resampling.LANCZOS)
    full = time.perf_counter() - t0
    assert fast < full / 2, (fast, full)


def test_iiif_rendition_url():
    assert iiif_rendition_url("https://iiif.example.org/iiif/2/abc/", 384) == \
        "https://iiif.example.org/iiif/2/abc/full/!384,384/0/default.jpg"
    assert iiif_rendition_url("https://x.org/iiif/3/abc/info.json", 256) == "https://x.org/iiif/3/abc/full/!256,256/0/default.jpg"


# -- fetch against the misbehaving server --------------------------------------------------------------------------
def test_misbehaving_server_statuses(tmp_path):
    image = jpeg()
    body_slow_redirect_hits = {}
    with MisbehavingServer() as srv:
        routes = {
            "/ok.jpg": httpd.ok(image),
            "/missing.jpg": httpd.status(404),
            "/gone.jpg": httpd.status(410),
            "/forbidden.jpg": httpd.status(403),
            "/flaky.jpg": httpd.sequence(httpd.status(500), httpd.ok(image)),
            "/always500.jpg": httpd.status(500),
            "/throttled.jpg": httpd.sequence(httpd.status(429, {"Retry-After": "1"}), httpd.ok(image)),
            "/slow.jpg": httpd.slow(3.0, image),
            "/trickle.jpg": httpd.trickle(image, 0.05),
            "/truncated.jpg": httpd.truncated(image, 500),
            "/corrupt.jpg": httpd.ok(image[:300] + random.Random(0).randbytes(4000)),
            "/bomb.png": httpd.ok(png_bomb(), "image/png"),
            "/huge.jpg": httpd.ok(b"\xff\xd8\xff" + bytes(300_000)),
            "/page.jpg": httpd.ok(b"<!doctype html><html>not an image</html>", "image/jpeg"),  # lies
            "/noai.jpg": httpd.ok(image, headers={"X-Robots-Tag": "noai"}),
            "/private/secret.jpg": httpd.ok(image),
            "/robots.txt": httpd.ok(b"User-agent: *\nDisallow: /private/\n", "text/plain"),
            "/to-metadata": httpd.redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-private": httpd.redirect("http://10.0.0.1/a.jpg"),
            "/to-private-name": httpd.redirect("http://intranet.museum.invalid/a.jpg"),
            "/to-ok": httpd.redirect("/ok.jpg", 301),
            "/loop": httpd.redirect("/loop"),
            "/iiif/abc/full/!384,384/0/default.jpg": httpd.ok(jpeg(384, 300)),
        }
        for path, behaviour in routes.items():
            srv.add(path, behaviour)
        expected = {
            "ok.jpg": "ok", "missing.jpg": "not_found", "gone.jpg": "not_found", "forbidden.jpg": "http_error",
            "flaky.jpg": "ok", "always500.jpg": "http_error", "throttled.jpg": "ok", "slow.jpg": "timeout",
            "trickle.jpg": "timeout", "truncated.jpg": "http_error", "corrupt.jpg": "decode_error",
            "bomb.png": "too_large", "huge.jpg": "too_large", "page.jpg": "not_image", "noai.jpg": "opted_out",
            "private/secret.jpg": "robots_disallowed", "to-metadata": "blocked_address",
            "to-private": "blocked_address", "to-private-name": "blocked_address", "to-ok": "ok",
            "loop": "http_error",
        }
        rows = []
        for name in expected:
            r = empty_record()
            r.update(object_id=f"t:{name}", collection="t", image_url=srv.url("/" + name))
            rows.append(r)
        extra = {"t:iiif": ("ok", dict(iiif_service=srv.url("/iiif/abc"), image_url=srv.url("/missing.jpg"))),
                 "t:ftp": ("invalid_url", dict(image_url="ftp://example.org/a.jpg")),
                 "t:none": ("invalid_url", {}),
                 "t:nc": ("license_excluded", dict(image_url=srv.url("/ok.jpg"), license="CC-BY-NC-4.0"))}
        for oid, (_status, fields) in extra.items():
            r = empty_record()
            r.update(object_id=oid, collection="t", **fields)
            rows.append(r)
        for r in rows:
            if r["object_id"] != "t:nc":
                r["license"] = "CC0"

        def resolver(host, port):
            return {"intranet.museum.invalid": ["10.0.0.1"]}.get(host) or __import__(
                "artsim.download.safety", fromlist=["x"]).system_resolver(host, port)

        fetcher, limiter = make_fetcher(max_bytes=200_000, per_host_connections=3,
                                        per_host_requests_per_second=200, retries=1,
                                        allowed_licenses=["CC0", "PDM"])
        fetcher.policy.resolver = resolver
        storage = Storage()
        images = str(tmp_path / "images")
        records = records_table(rows)
        plan = plan_shards(records, read_committed(storage, images), shard_size=10, retry_failed=False,
                           retry_statuses=("http_error", "timeout"))
        assert len(plan.tasks) == 3 and plan.pending_new == len(rows)
        t0 = time.monotonic()
        for task in plan.tasks:
            process_shard(task, fetcher, storage, images, threads=16)
        elapsed = time.monotonic() - t0

        table = read_committed(storage, images, columns=("object_id", "status", "http_status", "error", "image",
                                                          "width", "height", "sha256", "url_final"))
        got = dict(zip(table.column("object_id").to_pylist(), table.column("status").to_pylist()))
        # Every record exactly once, with the status it deserves.
        assert sorted(table.column("object_id").to_pylist()) == sorted(r["object_id"] for r in rows)
        want = {f"t:{k}": v for k, v in expected.items()} | {k: v[0] for k, v in extra.items()}
        assert got == want, {k: (got.get(k), want[k]) for k in want if got.get(k) != want[k]}
        assert set(got.values()) <= set(STATUSES)
        by_id = {row["object_id"]: row for row in table.to_pylist()}
        ok_row = by_id["t:ok.jpg"]
        assert (ok_row["width"], ok_row["height"]) == (384, 256) and sniff_format(ok_row["image"]) == "JPEG"
        assert len(ok_row["sha256"]) == 64 and by_id["t:missing.jpg"]["image"] is None
        assert by_id["t:missing.jpg"]["http_status"] == 404 and by_id["t:to-ok"]["url_final"].endswith("/ok.jpg")
        assert by_id["t:iiif"]["url_final"].endswith("/full/!384,384/0/default.jpg")

        hits = srv.hits
        # No retries on 403/404/410; one retry on 500 / 429; nothing requested for refused records.
        assert hits["/missing.jpg"] == 1 and hits["/gone.jpg"] == 1 and hits["/forbidden.jpg"] == 1
        assert hits["/flaky.jpg"] == 2 and hits["/always500.jpg"] == 2 and hits["/throttled.jpg"] == 2
        assert "/private/secret.jpg" not in hits and hits["/robots.txt"] == 1
        assert hits["/noai.jpg"] == 1
        assert hits["/loop"] == fetcher.cfg.max_redirects + 1
        # Retry-After: 1 was honoured (measured between the two requests).
        first, second = srv.request_times["/throttled.jpg"]
        assert second - first >= 0.95
        # Timeouts are total deadlines: the trickling response (each recv fast) was cut at ~timeout_s.
        assert "within 1s" in by_id["t:trickle.jpg"]["error"]
        # The per-host connection cap held at the server.
        assert srv.max_concurrent <= 3
        assert elapsed < 20


def test_resized_image_stays_close_to_full_decode_lanczos():
    """The cheap path (reduced-scale decode + bilinear) must look like the expensive one: full decode + Lanczos."""
    import numpy as np

    rng = random.Random(3)
    # Grey levels only, so that the output JPEG's chroma subsampling does not dominate the comparison.
    base = Image.new("L", (1500, 1000))
    base.putdata([(x * y) % 256 for y in range(0, 1000) for x in range(0, 1500)])
    base = base.filter(ImageFilter.GaussianBlur(2))
    for _ in range(40):  # hard edges too, where a poor filter aliases
        x, y = rng.randrange(1400), rng.randrange(900)
        base.paste(rng.randrange(256), (x, y, x + 90, y + 70))
    base = base.convert("RGB")
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=95)
    out = process_image(buf.getvalue(), 384, 10**8, "jpeg", 100)
    got = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"), np.float64)
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    ref = np.asarray(full.resize((384, 256), Image.Resampling.LANCZOS), np.float64)
    assert got.shape == ref.shape
    psnr = 10 * np.log10(255 ** 2 / np.mean((got - ref) ** 2))
    # Measured: bilinear 39 dB, bicubic 45 dB, nearest neighbour 34 dB (aliasing): the bar rejects the latter.
    assert psnr > 37, psnr


def test_body_without_length_is_read_whole_under_the_cap():
    data = jpeg(700, 500)

    def no_length(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.end_headers()
        h.done_writing()
        for i in range(0, len(data), 7_000):
            h.wfile.write(data[i:i + 7_000])

    with MisbehavingServer() as srv:
        srv.add("/nolen.jpg", no_length)
        fetcher, _ = make_fetcher(max_bytes=len(data) + 10, respect_robots_txt=False)
        result = fetcher.fetch_url("x", srv.url("/nolen.jpg"))
        assert result.status == "ok", result.error
        assert result.bytes_downloaded == len(data)
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        assert (result.original_width, result.original_height) == (700, 500)


def test_body_without_length_over_cap_is_cut():
    def unbounded(h):
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.end_headers()
        h.done_writing()
        for _ in range(100):
            h.wfile.write(b"\xff\xd8\xff" + bytes(10_000))

    with MisbehavingServer() as srv:
        srv.add("/stream.jpg", unbounded)
        fetcher, _ = make_fetcher(max_bytes=50_000, respect_robots_txt=False)
        result = fetcher.fetch_url("x", srv.url("/stream.jpg"))
        assert result.status == "too_large" and "max_bytes" in result.error


def test_redirect_to_blocked_address_makes_no_connection():
    """The redirect target is checked before connecting: a non-routable private address returns at once."""
    with MisbehavingServer() as srv:
        srv.add("/r", httpd.redirect("http://10.255.255.1:81/x.jpg"))
        fetcher, _ = make_fetcher(timeout_s=5.0, respect_robots_txt=False)
        t0 = time.monotonic()
        result = fetcher.fetch_url("x", srv.url("/r"))
        assert result.status == "blocked_address" and time.monotonic() - t0 < 1.0  # a connect would hang ~5 s
        assert result.url_final == "http://10.255.255.1:81/x.jpg"


def _fetch_many(srv, n, **overrides):
    fetcher, _ = make_fetcher(respect_robots_txt=False, **overrides)
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: fetcher.fetch_url(str(i), srv.url(f"/{i}.jpg")), range(n)))
    return results, time.monotonic() - t0


def test_connection_and_rate_caps_hold_under_many_threads():
    image = jpeg(300, 200)
    with MisbehavingServer(latency_s=0.05) as srv:
        for i in range(40):
            srv.add(f"/{i}.jpg", httpd.ok(image))
        results, _ = _fetch_many(srv, 40, per_host_connections=3, per_host_requests_per_second=1000)
        assert Counter(r.status for r in results) == {"ok": 40}
        assert srv.max_concurrent == 3  # 16 threads wanted more: the cap was reached and never exceeded
    with MisbehavingServer(latency_s=0.05) as srv:
        for i in range(30):
            srv.add(f"/{i}.jpg", httpd.ok(image))
        results, elapsed = _fetch_many(srv, 30, per_host_connections=16, per_host_requests_per_second=20)
        assert Counter(r.status for r in results) == {"ok": 30}
        assert elapsed >= 29 / 20 * 0.95  # 20 requests per second at most
        times = sorted(t for ts in srv.request_times.values() for t in ts)
        # Seen at the server (arrival jitter included): never more than 20 (+1 for jitter) in any one-second window.
        assert max(sum(1 for u in times if t <= u < t + 1.0) for t in times) <= 21


def test_circuit_breaker_pauses_failing_host():
    with MisbehavingServer() as srv:
        srv.add("/down.jpg", httpd.status(503))
        fetcher, limiter = make_fetcher(retries=0, circuit_breaker_failures=3, circuit_breaker_cooldown_s=60,
                                        respect_robots_txt=False)
        results = [fetcher.fetch_url(str(i), srv.url("/down.jpg")) for i in range(8)]
        assert [r.status for r in results] == ["http_error"] * 8
        assert srv.hits["/down.jpg"] == 3  # paused after three consecutive failures
        assert "paused" in results[-1].error
        assert limiter.snapshot()["127.0.0.1"]["times_paused"] == 1


def test_local_files_need_opt_in(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg(800, 600))
    fetcher, _ = make_fetcher()
    assert fetcher.fetch_url("x", str(path)).status == "invalid_url"
    fetcher, _ = make_fetcher(allow_local_files=True)
    result = fetcher.fetch_url("x", f"file://{path}")
    assert result.status == "ok" and (result.width, result.height) == (384, 288)
    assert fetcher.fetch_url("y", str(tmp_path / "nope.jpg")).status == "not_found"


def test_retry_failed_rewrites_only_the_failed_rows(tmp_path):
    """Plain-function version of --retry-failed: the shard file is replaced, rows stay unique."""
    image = jpeg(400, 300)
    with MisbehavingServer() as srv:
        srv.add("/a.jpg", httpd.ok(image))
        srv.add("/b.jpg", httpd.status(500))
        srv.add("/c.jpg", httpd.status(404))
        rows = []
        for name in "abc":
            r = empty_record()
            r.update(object_id=f"t:{name}", collection="t", image_url=srv.url(f"/{name}.jpg"))
            rows.append(r)
        fetcher, _ = make_fetcher(retries=0, respect_robots_txt=False)
        storage, images = Storage(), str(tmp_path / "images")
        retry = ("http_error", "timeout")
        plan = plan_shards(records_table(rows), read_committed(storage, images), 10, False, retry)
        for task in plan.tasks:
            process_shard(task, fetcher, storage, images, threads=4)
        srv.add("/b.jpg", httpd.ok(image))  # the server recovers
        committed = read_committed(storage, images)
        again = plan_shards(records_table(rows), committed, 10, False, retry)
        assert again.tasks == [] and again.committed == 3  # a plain re-run has nothing to do
        retry_plan = plan_shards(records_table(rows), committed, 10, True, retry)
        assert [len(t.records) for t in retry_plan.tasks] == [1] and retry_plan.tasks[0].replace
        for task in retry_plan.tasks:
            process_shard(task, fetcher, storage, images, threads=4)
        table = read_committed(storage, images)
        assert sorted(zip(table.column("object_id").to_pylist(), table.column("status").to_pylist())) == [
            ("t:a", "ok"), ("t:b", "ok"), ("t:c", "not_found")]
        assert srv.hits == {"/a.jpg": 1, "/b.jpg": 2, "/c.jpg": 1}
        assert len(list((tmp_path / "images").glob("shard-*.parquet"))) == 1
        assert pq.read_table(next((tmp_path / "images").glob("shard-*.parquet"))).num_rows == 3


def test_shard_plan_is_deterministic_and_incremental():
    def recs(ids):
        out = []
        for i in ids:
            r = empty_record()
            r.update(object_id=f"c:{i}", collection="c", image_url=f"http://h{i % 3}.example/{i}.jpg")
            out.append(r)
        return records_table(out)

    empty = read_committed(Storage(), "/nonexistent/images")
    a = plan_shards(recs(range(50)), empty, 8, False, ())
    b = plan_shards(recs(reversed(range(50))), empty, 8, False, ())
    assert [t.shard_id for t in a.tasks] == [t.shard_id for t in b.tasks]  # source order does not matter
    assert sum(len(t.records) for t in a.tasks) == 50 and len(a.tasks) == 7
    assert len({t.shard_id for t in a.tasks}) == 7
    dup = plan_shards(recs(list(range(5)) + [3, 4]), empty, 8, False, ())
    assert dup.duplicate_ids == 2 and sum(len(t.records) for t in dup.tasks) == 5
    assert ShardTask.from_json(a.tasks[0].to_json()) == a.tasks[0]


def test_unreachable_limiter_fails_the_shard_instead_of_inventing_statuses():
    """A dead job-wide limiter is an infrastructure failure: fetch_record raises (Ray retries the shard) rather
    than committing `http_error` rows that no server returned."""
    from artsim.download.politeness import LimiterUnavailable

    class DeadLimiter:
        def acquire(self, host, deadline):
            raise LimiterUnavailable("host limiter unavailable: ActorDiedError")

        def get_robots(self, origin):
            raise LimiterUnavailable("host limiter unavailable: ActorDiedError")

        def put_robots(self, origin, value):
            pass

        def release(self, *args, **kwargs):
            pass

    fetcher = Fetcher(DownloadConfig(allow_hosts=["127.0.0.1"]), DeadLimiter(), seed=0)
    record = {**empty_record(), "object_id": "t:1", "image_url": "http://127.0.0.1:9/a.jpg"}
    with pytest.raises(LimiterUnavailable):
        fetcher.fetch_record(record)


def test_a_shard_task_run_again_after_its_commit_fetches_nothing(tmp_path):
    """Ray re-runs a task whose worker died after committing (the node went away before the result reached the
    driver): the committed file holds exactly the shard's records, so the servers are not asked twice."""
    image = jpeg(300, 200)
    with MisbehavingServer() as srv:
        rows = []
        for i in range(6):
            srv.add(f"/{i}.jpg", httpd.ok(image) if i != 4 else httpd.status(404))
            rows.append({**empty_record(), "object_id": f"t:{i}", "collection": "t", "image_url": srv.url(f"/{i}.jpg"),
                         "license": "CC0"})
        fetcher, _ = make_fetcher(respect_robots_txt=False)
        storage, images = Storage(), str(tmp_path / "images")
        plan = plan_shards(records_table(rows), read_committed(storage, images), shard_size=10, retry_failed=False,
                           retry_statuses=("http_error", "timeout"))
        (task,) = plan.tasks
        first = process_shard(task, fetcher, storage, images, threads=4)
        hits = dict(srv.hits)
        again = process_shard(ShardTask.from_json(task.to_json()), fetcher, storage, images, threads=4)
        assert srv.hits == hits  # nothing requested the second time
        assert again["already_committed"] and again["records"] == first["records"] == 6
        assert again["status"] == first["status"] == {"ok": 5, "not_found": 1}
        assert read_committed(storage, images).num_rows == 6  # still every record once


# -- keep-alive connections, DNS cache (issue 14 item 4) ---------------------------------------------------------
def _fetch_all(fetcher, urls, threads):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda u: fetcher.fetch_url(u.rsplit("/", 1)[1], u), urls))


@pytest.mark.parametrize("rps", [None, 1000.0])
def test_keep_alive_reuses_connections_under_the_cap(rps):
    """An HTTP/1.1 server: 40 images over 3 connection slots with 8 threads. Counted at the server: far fewer TCP
    connections than requests, never more than 3 live client sockets (idle kept-alive ones count), every image ok;
    every slot is returned once the idle connections are closed."""
    body = jpeg()
    with MisbehavingServer(latency_s=0.01, count_connections=True, keep_alive=True) as srv:
        urls = [srv.add(f"/img/{i}.jpg", httpd.ok(body)) for i in range(40)]
        fetcher, limiter = make_fetcher(per_host_connections=3, per_host_requests_per_second=rps,
                                        respect_robots_txt=False, timeout_s=10.0)
        results = _fetch_all(fetcher, urls, 8)
        fetcher.release_connections()
        stats = srv.stats()
    assert [r.status for r in results] == ["ok"] * 40
    assert stats["max_live_connections"] <= 3 and srv.live_samples >= 40
    assert stats["connections_accepted"] <= 10, stats  # 40 requests; one per connection before keep-alive
    assert fetcher.pool.reused >= 30
    assert limiter.book.hosts["127.0.0.1"].active == 0  # every lease back after the sockets closed
    asked = limiter.snapshot()["127.0.0.1"]["requests"]
    # With a rate cap every start asks the limiter; without one, only each new connection does.
    assert asked == (40 if rps else fetcher.pool.opened), (asked, fetcher.pool.opened)


def test_keep_alive_not_used_after_an_incomplete_response_or_a_failure():
    """A connection goes back to the pool only after a body read to its end with an ok outcome: a 404 (body not
    read), a 500 and an X-Robots-Tag opt-out each close theirs."""
    body = jpeg()
    with MisbehavingServer(keep_alive=True) as srv:
        ok = srv.add("/ok.jpg", httpd.ok(body))
        missing = srv.url("/missing.jpg")
        err = srv.add("/err.jpg", httpd.status(500))
        opted = srv.add("/noai.jpg", httpd.ok(body, headers={"X-Robots-Tag": "noai"}))
        fetcher, _ = make_fetcher(per_host_connections=1, respect_robots_txt=False, retries=0, timeout_s=10.0)
        statuses = [fetcher.fetch_url("x", u).status for u in (ok, ok, missing, ok, err, ok, opted, ok)]
        fetcher.release_connections()
    assert statuses == ["ok", "ok", "not_found", "ok", "http_error", "ok", "opted_out", "ok"]
    # ok,ok share one; the 404, the 500 and the opt-out each end theirs; the ok after each opens a new one
    assert srv.connections_accepted == 4, srv.connections_accepted


def test_keep_alive_survives_a_server_that_closes_idle_connections():
    """The server closes every connection after its response although it announced keep-alive (like a server
    whose keep-alive timeout passed): the next request notices (socket readable / reset before any byte) and
    goes out on a new connection; nothing fails."""
    body = jpeg()

    def close_after(h):
        h.send_body(200, body)
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    with MisbehavingServer(keep_alive=True) as srv:
        urls = [srv.add(f"/img/{i}.jpg", close_after) for i in range(6)]
        fetcher, _ = make_fetcher(per_host_connections=1, respect_robots_txt=False, retries=0, timeout_s=10.0)
        statuses = [fetcher.fetch_url("x", u).status for u in urls]
        fetcher.release_connections()
    assert statuses == ["ok"] * 6
    assert srv.hits and sum(srv.hits.values()) == 6  # no request was sent twice


def test_dns_answers_are_cached_and_still_checked():
    """The system resolver sits behind a bounded cache; every use of a cached answer is checked again, so a name
    that resolves to a private address is refused every time, and an expired answer is asked for again."""
    calls = []

    def resolver(host, port):
        calls.append(host)
        return {"public.example": ["93.184.216.34"], "evil.example": ["10.0.0.1"]}[host]

    cached = CachingResolver(resolver, ttl_s=60.0)
    policy = URLPolicy(resolver=cached)
    for _ in range(5):
        assert policy.check("http://public.example/a.jpg").address == "93.184.216.34"
        with pytest.raises(UnsafeURL) as exc:
            policy.check("http://evil.example/a.jpg")
        assert exc.value.status == "blocked_address"
    assert calls == ["public.example", "evil.example"]
    cached._clock = lambda: time.monotonic() + 61.0  # past the TTL: resolved again
    policy.check("http://public.example/b.jpg")
    assert calls == ["public.example", "evil.example", "public.example"]
    assert isinstance(URLPolicy().resolver, CachingResolver)


def test_images_are_processed_one_at_a_time_per_slot_while_downloads_overlap(monkeypatch):
    """A shard worker has one CPU: its threads download together but decode one image at a time (image_slots=1);
    with two slots two decodes do run together (a barrier that only two concurrent decodes can pass)."""
    import artsim.download.fetch as fetch_module

    real = fetch_module.process_image
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "barrier": None}

    def counting(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            if state["barrier"] is not None:
                state["barrier"].wait()  # BrokenBarrierError (-> internal_error) unless a second decode arrives
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(fetch_module, "process_image", counting)
    image = jpeg(600, 400)
    with MisbehavingServer(latency_s=0.1) as srv:
        urls = [srv.add(f"/{i}.jpg", httpd.ok(image)) for i in range(24)]
        fetcher, _ = make_fetcher(per_host_connections=8, per_host_requests_per_second=None, respect_robots_txt=False)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda u: fetcher.fetch_url("x", u), urls))
        assert [r.status for r in results] == ["ok"] * 24
        assert state["max"] == 1
        assert srv.max_concurrent >= 2  # the downloads themselves overlapped

        cfg = DownloadConfig(allow_hosts=["127.0.0.1"], per_host_connections=8, per_host_requests_per_second=None,
                             respect_robots_txt=False)
        limiter = LocalHostLimiter(8, cfg.per_host_requests_per_second, cfg.circuit_breaker_failures)
        two = Fetcher(cfg, limiter, image_slots=2)
        state.update(max=0, barrier=threading.Barrier(2, timeout=30))
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda u: two.fetch_url("x", u), urls[:8]))
        assert [r.status for r in results] == ["ok"] * 8, [r.error for r in results]
        assert state["max"] == 2
