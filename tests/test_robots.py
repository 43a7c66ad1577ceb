"""robots.txt per RFC 9309 (artsim.download.robots): matching, groups, fetch outcomes, size, Crawl-delay — the rules
on their own, then through a Fetcher against a loopback server that counts what reaches it."""
from __future__ import annotations

import io
import socket
import sys
import time
import urllib.robotparser
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

from artsim.config import DownloadConfig  # noqa: E402
from artsim.download import robots  # noqa: E402
from artsim.download.fetch import Fetcher  # noqa: E402
from artsim.download.politeness import HostBook, LocalHostLimiter  # noqa: E402
from artsim.download.robots import RobotsFetch, RobotsRules  # noqa: E402


def rules(body: str, status: int = 200, token: str = "artsim") -> RobotsRules:
    return RobotsRules(RobotsFetch(status, body, time.time()), token)


def jpeg(width=300, height=200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def make_fetcher(**overrides) -> tuple[Fetcher, LocalHostLimiter]:
    cfg = DownloadConfig(**{"allow_hosts": ["127.0.0.1"], "timeout_s": 2.0, "retries": 2, "backoff_base_s": 0.05,
                            "backoff_max_s": 1.0, "per_host_requests_per_second": 1000.0, **overrides})
    limiter = LocalHostLimiter(cfg.per_host_connections, cfg.per_host_requests_per_second,
                               cfg.circuit_breaker_failures, cfg.circuit_breaker_cooldown_s)
    return Fetcher(cfg, limiter, seed=0), limiter


# -- matching (RFC 9309 §2.2.2, §2.2.3) ---------------------------------------------------------------------------
RFC_CASES = [
    # (robots.txt, path, allowed per RFC 9309)
    ("User-agent: *\nDisallow: /*.jpg$\n", "/a/b.jpg", False),
    ("User-agent: *\nDisallow: /*.jpg$\n", "/a/b.jpg?x=1", True),  # $ anchors at the end of the path+query
    ("User-agent: *\nDisallow: /iiif/*/full/\n", "/iiif/x/full/", False),
    ("User-agent: *\nDisallow: /iiif/*/full/\n", "/iiif/x/max/", True),
    ("User-agent: *\nAllow: /images/public/\nDisallow: /images/\n", "/images/public/x.jpg", True),
    ("User-agent: *\nAllow: /images/public/\nDisallow: /images/\n", "/images/private/x.jpg", False),
    ("User-agent: *\nDisallow: /images/\nAllow: /images/public/\n", "/images/public/x.jpg", True),  # order-free
    ("User-agent: *\nAllow: /a\nDisallow: /a\n", "/a/x", True),  # equal length: the least restrictive (Allow)
]


@pytest.mark.parametrize("body,path,allowed", RFC_CASES)
def test_rfc9309_matching(body, path, allowed):
    assert rules(body).allows(f"http://museum.test{path}") is allowed


def test_the_three_cases_urllib_got_wrong_are_now_right():
    """The issue's three cases: Python's urllib.robotparser answers the opposite of RFC 9309 on each (the third
    only with Disallow written first: urllib takes the first matching line, not the longest)."""
    for body, path, allowed in (RFC_CASES[0], RFC_CASES[2], RFC_CASES[6]):
        old = urllib.robotparser.RobotFileParser()
        old.parse(body.splitlines())
        url = f"http://museum.test{path}"
        assert old.can_fetch("artsim", url) is (not allowed)  # what the download used to do
        assert rules(body).allows(url) is allowed


# -- user-agent groups (RFC 9309 §2.2.1) ---------------------------------------------------------------------------
GROUPS = """\
User-agent: *
Disallow: /

User-agent: art
Disallow: /art-only/

User-agent: artsimbot
Disallow: /bot-only/

User-agent: ARTSIM
Disallow: /ours/

User-agent: otherbot
User-agent: artsim/2.0
Disallow: /also-ours/
Crawl-delay: 2
"""


def test_our_group_is_the_one_with_our_product_token():
    r = rules(GROUPS)
    allows = {p: r.allows(f"http://m.test{p}") for p in ("/", "/art-only/x", "/bot-only/x", "/ours/x",
                                                         "/also-ours/x")}
    # Our groups (case-insensitive, version ignored, two groups merged) replace the * group entirely; "art" and
    # "artsimbot" are other crawlers even though one is a prefix of our name and the other starts with it.
    assert allows == {"/": True, "/art-only/x": True, "/bot-only/x": True, "/ours/x": False, "/also-ours/x": False}
    assert r.min_interval_s() == 2.0
    # Another crawler gets the * group; a crawler called "art" gets its own.
    assert rules(GROUPS, token="somebot").allows("http://m.test/x") is False
    assert rules(GROUPS, token="art").allows("http://m.test/x") is True
    assert rules(GROUPS, token="art").allows("http://m.test/art-only/x") is False


def test_no_group_for_us_and_no_star_group_means_no_rules():
    r = rules("User-agent: googlebot\nDisallow: /\n")
    assert r.allows("http://m.test/a.jpg") is True and r.min_interval_s() == 0.0


def test_crawl_delay_and_request_rate_become_a_min_interval():
    assert rules("User-agent: *\nCrawl-delay: 1.5\n").min_interval_s() == 1.5
    assert rules("User-agent: *\nRequest-rate: 1/5\n").min_interval_s() == 5.0
    assert rules("User-agent: *\nRequest-rate: 2/1\nCrawl-delay: 3\n").min_interval_s() == 3.0
    assert rules("User-agent: *\nCrawl-delay: 999999\n").min_interval_s() == robots.MAX_CRAWL_DELAY_S
    assert rules("User-agent: *\nCrawl-delay: soon\n").min_interval_s() == 0.0
    assert rules("User-agent: other\nCrawl-delay: 9\n").min_interval_s() == 0.0  # not our group


# -- fetch outcomes and caching (RFC 9309 §2.3.1, §2.4) ------------------------------------------------------------
@pytest.mark.parametrize("status,verdict", [(404, True), (410, True), (401, True), (403, True), (429, None),
                                            (500, None), (503, None), (0, None)])
def test_unavailable_allows_unreachable_disallows(status, verdict):
    assert rules("", status=status).allows("http://m.test/a.jpg") is verdict


def test_cached_copy_lifetimes():
    now = 1_000_000.0
    good, down = RobotsFetch(200, "", now), RobotsFetch(503, "", now)
    assert good.fresh(now + robots.MAX_AGE_S - 1) and not good.fresh(now + robots.MAX_AGE_S + 1)
    assert down.fresh(now + robots.UNREACHABLE_RETRY_S - 1) and not down.fresh(now + robots.UNREACHABLE_RETRY_S)
    assert RobotsFetch.from_tuple(good.to_tuple()) == good
    assert RobotsFetch.from_tuple((200, "")) is None  # a cache entry from an older artsim is fetched again


def test_truncate_keeps_whole_lines_only():
    body = b"User-agent: *\nDisallow: /a/\nDisallow: /b/\n"
    assert robots.truncate(body, 1000) == body
    assert robots.truncate(body, 30) == b"User-agent: *\nDisallow: /a/\n"  # "Disallow: /b" would be a new rule
    assert robots.truncate(b"x" * 100, 10) == b""


# -- through the Fetcher, counted at the server ---------------------------------------------------------------------

def assert_spaced(starts: list[float], delay: float) -> None:
    """Request starts seen at the server honour a minimum interval: any j - i requests later came at least
    (j - i - 1) intervals later. One interval of slack, because the server sees arrivals, not grants: on a loaded
    machine a granted request can reach the server late, next to the one granted after it (the existing caps tests
    allow the same "+1 for jitter")."""
    starts = sorted(starts)
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            assert starts[j] - starts[i] >= (j - i - 1) * delay * 0.95, (i, j, starts)
    assert starts[-1] - starts[0] >= (len(starts) - 2) * delay * 0.95

def _fetch_all(fetcher, srv, paths, threads=8):
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: fetcher.fetch_url(p, srv.url(p)), paths))


def test_fetcher_obeys_rfc_rules_and_fetches_robots_once():
    image = jpeg()
    with MisbehavingServer() as srv:
        srv.add("/robots.txt", httpd.ok(b"User-agent: *\nDisallow: /*.png$\nDisallow: /iiif/*/full/\n"
                                        b"Allow: /images/public/\nDisallow: /images/\n", "text/plain"))
        paths = ["/a/b.png", "/iiif/x/full/", "/images/public/x.jpg", "/images/y.jpg", "/iiif/x/info.json",
                 "/free.jpg"]
        for p in paths:
            srv.add(p, httpd.ok(image))
        fetcher, _ = make_fetcher()
        got = {r.object_id: r.status for r in _fetch_all(fetcher, srv, paths)}
        assert got == {"/a/b.png": "robots_disallowed", "/iiif/x/full/": "robots_disallowed",
                       "/images/public/x.jpg": "ok", "/images/y.jpg": "robots_disallowed",
                       "/iiif/x/info.json": "ok", "/free.jpg": "ok"}
        assert srv.hits["/robots.txt"] == 1
        assert set(srv.hits) == {"/robots.txt", "/images/public/x.jpg", "/iiif/x/info.json", "/free.jpg"}


def test_robots_4xx_allows_everything():
    with MisbehavingServer() as srv:
        srv.add("/robots.txt", httpd.status(404))
        srv.add("/a.jpg", httpd.ok(jpeg()))
        fetcher, _ = make_fetcher()
        assert fetcher.fetch_url("a", srv.url("/a.jpg")).status == "ok"


@pytest.mark.parametrize("failure", [httpd.status(503), httpd.status(429), httpd.status(500)])
def test_unreachable_robots_disallows_for_a_while_then_asks_again(failure, monkeypatch):
    monkeypatch.setattr(robots, "UNREACHABLE_RETRY_S", 0.3)
    with MisbehavingServer() as srv:
        srv.add("/robots.txt", httpd.sequence(failure, httpd.ok(b"User-agent: *\nDisallow: /no/\n", "text/plain")))
        srv.add("/a.jpg", httpd.ok(jpeg()))
        fetcher, _ = make_fetcher()
        first = _fetch_all(fetcher, srv, [f"/a.jpg?{i}" for i in range(20)])
        # Disallowed while unreachable: no image requested; robots.txt asked once for all 20 records; the records
        # say why and stay retryable for --retry-failed (not retried within the run: the answer is cached).
        assert {r.status for r in first} == {"http_error"}
        assert all("robots.txt unreachable" in r.error and r.attempts == 1 for r in first)
        assert srv.hits == {"/robots.txt": 1}
        deadline = time.monotonic() + 10
        while (result := fetcher.fetch_url("again", srv.url("/a.jpg"))).status != "ok":
            assert time.monotonic() < deadline, result.error
        assert srv.hits["/robots.txt"] == 2 and srv.hits["/a.jpg"] == 1
        assert fetcher.fetch_url("no", srv.url("/no/x.jpg")).status == "robots_disallowed"


def test_robots_on_a_dead_port_is_unreachable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fetcher, limiter = make_fetcher(retries=0)
    result = fetcher.fetch_url("x", f"http://127.0.0.1:{port}/a.jpg")
    assert result.status == "http_error" and "robots.txt unreachable" in result.error
    cached = RobotsFetch.from_tuple(limiter.get_robots(f"http://127.0.0.1:{port}"))
    assert cached.status == 0 and cached.unreachable  # shared job-wide, so other workers do not hammer it


@pytest.mark.parametrize("with_length", [True, False])
def test_oversized_robots_is_parsed_up_to_the_limit(with_length):
    head = b"User-agent: *\nDisallow: /early/\n"
    filler = b"# " + b"x" * 98 + b"\n"
    body = head + filler * (robots.MAX_BYTES // len(filler) + 100) + b"Disallow: /late/\n"
    assert len(body) > robots.MAX_BYTES + 10_000

    def send(h):
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        if with_length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.done_writing()
        h.wfile.write(body)

    with MisbehavingServer() as srv:
        srv.add("/robots.txt", send)
        srv.add("/late/a.jpg", httpd.ok(jpeg()))
        fetcher, _ = make_fetcher()
        assert fetcher.fetch_url("e", srv.url("/early/a.jpg")).status == "robots_disallowed"
        assert fetcher.fetch_url("l", srv.url("/late/a.jpg")).status == "ok"  # beyond the limit: not read


def test_crawl_delay_is_a_per_host_rate_cap_at_the_server():
    with MisbehavingServer() as srv:
        srv.add("/robots.txt", httpd.ok(b"User-agent: artsim\nCrawl-delay: 0.25\n", "text/plain"))
        paths = [f"/{i}.jpg" for i in range(8)]
        for p in paths:
            srv.add(p, httpd.ok(jpeg()))
        fetcher, limiter = make_fetcher(per_host_connections=8)
        assert {r.status for r in _fetch_all(fetcher, srv, paths)} == {"ok"}
        # 8 threads and 8 connection slots wanted them all at once; the server saw one every 0.25 s.
        assert_spaced([t for p in paths for t in srv.request_times[p]], 0.25)
        assert limiter.snapshot()["127.0.0.1"]["crawl_delay_s"] == 0.25


def test_hostbook_min_interval_applies_from_the_last_request():
    book = HostBook(connections=10, requests_per_second=100, breaker_failures=5, breaker_cooldown_s=1)
    lease, _, _ = book.try_acquire("h", 0.0)
    book.release("h", lease, "ok", 0.0)
    book.set_min_interval("h", 2.0)
    assert book.try_acquire("h", 1.0)[0] is None and book.try_acquire("h", 1.0)[1] == pytest.approx(1.0)
    assert book.try_acquire("h", 2.0)[0] is not None
    assert book.try_acquire("h", 3.9)[0] is None and book.try_acquire("h", 4.0)[0] is not None
    assert book.try_acquire("other", 4.0)[0] is not None  # per host


def test_crawl_delay_holds_job_wide_across_ray_workers(ray_session, tmp_path):
    """The whole stage on Ray, two shard workers (processes) × 8 threads: Crawl-delay, learnt by whichever worker
    reads robots.txt first, spaces the request starts of every worker, counted at the server."""
    from collections import Counter

    from artsim.config import config_from_dict
    from artsim.download.stage import run_download
    from artsim.download.shards import read_committed
    from artsim.runtime import RunContext
    from artsim.rundir.schema import empty_record, records_table

    with MisbehavingServer() as srv:
        srv.add("/robots.txt", httpd.ok(b"User-agent: *\nCrawl-delay: 0.3\n", "text/plain"))
        rows = []
        for i in range(10):
            srv.add(f"/{i}.jpg", httpd.ok(jpeg()))
            r = empty_record()
            r.update(object_id=f"t:{i}", collection="t", image_url=srv.url(f"/{i}.jpg"), license="CC0")
            rows.append(r)
        ctx = RunContext(config_from_dict({"run": {"root": str(tmp_path / "run")}, "download": {
            "allow_hosts": ["127.0.0.1"], "timeout_s": 5.0, "per_host_connections": 8,
            "per_host_requests_per_second": 1000.0, "shard_size": 5, "workers": 2, "fetch_threads": 8}}))
        ctx.storage.write_table(records_table(rows), ctx.paths.records)
        report = run_download(ctx)
        assert Counter(read_committed(ctx.storage, ctx.paths.images).column("status").to_pylist()) == {"ok": 10}
        assert_spaced([t for i in range(10) for t in srv.request_times[f"/{i}.jpg"]], 0.3)
        assert report["this_run"]["elapsed_s"] >= 9 * 0.3
