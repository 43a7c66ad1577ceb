"""What download users ask for and what keeps bugs honest: too_small filters, the source's sha256 (hash_mismatch),
and internal_error — through a Fetcher against a loopback server, and the whole stage through the CLI."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

import artsim.download.fetch as fetch_module  # noqa: E402
from artsim.config import DownloadConfig  # noqa: E402
from artsim.download.fetch import Fetcher  # noqa: E402
from artsim.download.politeness import LocalHostLimiter  # noqa: E402
from artsim.download.resize import ImageRejected, process_image  # noqa: E402
from artsim.download.shards import ShardTask, plan_shards, process_shard, read_committed  # noqa: E402
from artsim.ingest.table import parse_table  # noqa: E402
from artsim.ingest.common import BadRow  # noqa: E402
from artsim.rundir.schema import RETRYABLE_STATUSES, STATUSES, empty_record, records_table  # noqa: E402
from artsim.storage import Storage  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def jpeg(width, height, exif_orientation=None) -> bytes:
    img = Image.new("RGB", (width, height), (200, 90, 40))
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif.tobytes())
    else:
        img.save(buf, "JPEG")
    return buf.getvalue()


def make_fetcher(**overrides) -> tuple[Fetcher, LocalHostLimiter]:
    cfg = DownloadConfig(**{"allow_hosts": ["127.0.0.1"], "timeout_s": 2.0, "retries": 2, "backoff_base_s": 0.05,
                            "backoff_max_s": 1.0, "per_host_requests_per_second": 1000.0,
                            "respect_robots_txt": False, **overrides})
    limiter = LocalHostLimiter(cfg.per_host_connections, cfg.per_host_requests_per_second,
                               cfg.circuit_breaker_failures, cfg.circuit_breaker_cooldown_s)
    return Fetcher(cfg, limiter, seed=0), limiter


def record(object_id: str, url: str | None = None, **fields) -> dict:
    r = empty_record()
    r.update(object_id=object_id, collection=object_id.split(":")[0], image_url=url, **fields)
    return r


def test_new_statuses_are_in_the_vocabulary():
    assert {"too_small", "hash_mismatch", "internal_error"} <= set(STATUSES)
    assert "internal_error" not in RETRYABLE_STATUSES  # never retried within a run, never blamed on a host


# -- too_small ----------------------------------------------------------------------------------------------------
def test_shape_filters_on_the_header_before_decoding():
    keep = process_image(jpeg(400, 300), 128, 10**8, min_width=400, min_height=300, max_aspect_ratio=1.34)
    assert (keep.original_width, keep.original_height) == (400, 300)
    for data, kwargs, words in [
        (jpeg(399, 300), {"min_width": 400}, "399x300 is below"),
        (jpeg(400, 299), {"min_height": 300}, "400x299 is below"),
        (jpeg(1000, 100), {"max_aspect_ratio": 4}, "aspect ratio 10.00"),
        (jpeg(100, 1000), {"max_aspect_ratio": 4}, "aspect ratio 10.00"),  # tall strips too
    ]:
        with pytest.raises(ImageRejected, match=words) as info:
            process_image(data, 128, 10**8, **kwargs)
        assert info.value.status == "too_small"


def test_shape_filters_judge_the_upright_image():
    # Stored 600x300, EXIF orientation 6 (shown rotated 90°): the picture is 300 wide, 600 tall.
    rotated = jpeg(600, 300, exif_orientation=6)
    with pytest.raises(ImageRejected, match="300x600"):
        process_image(rotated, 128, 10**8, min_width=400)
    assert process_image(rotated, 128, 10**8, min_height=600).original_width == 600


def test_too_small_through_the_fetcher_is_not_retried():
    with MisbehavingServer() as srv:
        srv.add("/tiny.jpg", httpd.ok(jpeg(64, 64)))
        srv.add("/banner.jpg", httpd.ok(jpeg(2000, 200)))
        srv.add("/fine.jpg", httpd.ok(jpeg(800, 600)))
        fetcher, _ = make_fetcher(min_width=100, min_height=100, max_aspect_ratio=3.0)
        got = {p: fetcher.fetch_url(p, srv.url(p)) for p in ("/tiny.jpg", "/banner.jpg", "/fine.jpg")}
        assert {p: r.status for p, r in got.items()} == {"/tiny.jpg": "too_small", "/banner.jpg": "too_small",
                                                         "/fine.jpg": "ok"}
        assert got["/tiny.jpg"].image is None and srv.hits == {"/tiny.jpg": 1, "/banner.jpg": 1, "/fine.jpg": 1}


@pytest.mark.parametrize("key,value,message", [
    ("min_width", -1, "download.min_width: must be at least 0"),
    ("max_aspect_ratio", 0.5, "download.max_aspect_ratio: must be at least 1"),
])
def test_filter_config_is_checked(key, value, message):
    from artsim.config import config_from_dict
    from artsim.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_from_dict({"download": {key: value}})


# -- the source's sha256 --------------------------------------------------------------------------------------------
def test_expected_sha256_is_checked_on_the_downloaded_bytes(tmp_path):
    good, other = jpeg(500, 400), jpeg(500, 401)
    digest = hashlib.sha256(good).hexdigest()
    with MisbehavingServer() as srv:
        srv.add("/good.jpg", httpd.ok(good))
        srv.add("/swapped.jpg", httpd.ok(other))  # the museum replaced the file since the source was written
        srv.add("/iiif/1/full/!384,384/0/default.jpg", httpd.ok(jpeg(384, 307)))
        srv.add("/missing.jpg", httpd.status(404))
        fetcher, _ = make_fetcher()
        rows = [record("t:good", srv.url("/good.jpg"), sha256=digest),
                record("t:swapped", srv.url("/swapped.jpg"), sha256=digest),
                record("t:nohash", srv.url("/swapped.jpg")),
                # the hash is of the original file: with both known, the original is fetched, not the rendition
                record("t:iiif", srv.url("/good.jpg"), iiif_service=srv.url("/iiif/1"), sha256=digest),
                record("t:missing", srv.url("/missing.jpg"), sha256=digest)]
        storage, images = Storage(), str(tmp_path / "images")
        plan = plan_shards(records_table(rows), read_committed(storage, images), 10, False, RETRYABLE_STATUSES)
        process_shard(plan.tasks[0], fetcher, storage, images, threads=4)
        table = read_committed(storage, images, columns=("object_id", "status", "error", "image", "sha256"))
        by_id = {r["object_id"]: r for r in table.to_pylist()}
        assert {k: v["status"] for k, v in by_id.items()} == {
            "t:good": "ok", "t:swapped": "hash_mismatch", "t:nohash": "ok", "t:iiif": "ok", "t:missing": "not_found"}
        assert by_id["t:swapped"]["image"] is None and digest in by_id["t:swapped"]["error"]
        assert by_id["t:good"]["sha256"] == digest
        assert "/iiif/1/full/!384,384/0/default.jpg" not in srv.hits


def test_ingest_normalizes_sha256_and_refuses_what_is_not_one():
    digest = "ab" * 32
    rows = [("1", {"id": "1", "sha256": "SHA256:" + digest.upper()}), ("2", {"id": "2", "sha256": ""}),
            ("3", {"id": "3", "sha256": "md5:1234"})]
    out = list(parse_table(rows, "c", {"local_id": "id", "sha256": "sha256"}))
    assert out[0]["sha256"] == digest and out[1]["sha256"] is None
    assert isinstance(out[2], BadRow) and "not 64 hex digits" in out[2].reason


# -- internal_error -----------------------------------------------------------------------------------------------
def test_a_bug_in_the_fetch_path_is_internal_error_not_a_host_failure(tmp_path, monkeypatch):
    """A bug injected where decoding happens: the records say internal_error, nothing is retried, the host's
    circuit breaker hears nothing, the traceback is kept once, and the next plan fetches them again."""
    real = fetch_module.process_image

    def buggy(data, *args, **kwargs):
        if data.endswith(b"BUG"):
            return {}["a key that is not there"]
        return real(data, *args, **kwargs)

    monkeypatch.setattr(fetch_module, "process_image", buggy)
    image = jpeg(500, 400)
    with MisbehavingServer() as srv:
        rows = []
        for i in range(6):
            srv.add(f"/{i}.jpg", httpd.ok(image + (b"BUG" if i % 2 else b"")))
            rows.append(record(f"t:{i}", srv.url(f"/{i}.jpg")))
        fetcher, limiter = make_fetcher(circuit_breaker_failures=2)
        storage, images = Storage(), str(tmp_path / "images")
        plan = plan_shards(records_table(rows), read_committed(storage, images), 10, False, RETRYABLE_STATUSES)
        summary = process_shard(plan.tasks[0], fetcher, storage, images, threads=3)
        committed = read_committed(storage, images)
        statuses = dict(zip(committed.column("object_id").to_pylist(), committed.column("status").to_pylist()))
        assert statuses == {f"t:{i}": "internal_error" if i % 2 else "ok" for i in range(6)}
        assert all(srv.hits[f"/{i}.jpg"] == 1 for i in range(6))  # not retried
        assert limiter.snapshot()["127.0.0.1"]["times_paused"] == 0  # 3 "failures" >= 2, yet no pause
        [(signature, seen)] = summary["internal_errors"].items()
        assert signature.startswith("KeyError at artsim/download/fetch.py:") and seen["count"] == 3
        assert "a key that is not there" in seen["traceback"] and "Traceback" in seen["traceback"]
        errors = read_committed(storage, images, columns=("object_id", "error", "host")).to_pylist()
        assert all(signature in r["error"] and r["host"] == "127.0.0.1" for r in errors if r["object_id"] in
                   ("t:1", "t:3", "t:5"))
        # The next run (no --retry-failed) plans exactly the three again, in place.
        again = plan_shards(records_table(rows), read_committed(storage, images), 10, False, RETRYABLE_STATUSES)
        assert again.pending_new == 0 and again.pending_retry == 3
        assert [sorted(r["object_id"] for r in t.records) for t in again.tasks] == [["t:1", "t:3", "t:5"]]
        assert again.tasks[0].replace


INJECT = '''
import os
if os.environ.get("ARTSIM_TEST_INJECT_BUG") == "1":
    import artsim.download.resize as resize
    _real = resize.process_image
    def process_image(data, *args, **kwargs):
        if data.endswith(b"BUG"):
            raise ZeroDivisionError("injected bug")
        return _real(data, *args, **kwargs)
    resize.process_image = process_image
'''


def test_stage_exits_1_on_internal_errors_and_a_rerun_after_the_fix_completes(tmp_path):
    """The whole stage through the CLI, on its own local Ray. The bug is injected by a sitecustomize module that
    every process of the job (driver and Ray workers) loads; 'the fix' is running without it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    image = jpeg(500, 400)
    root = tmp_path / "run"
    with MisbehavingServer() as srv:
        rows = []
        for i in range(8):
            srv.add(f"/{i}.jpg", httpd.ok(image + (b"BUG" if i < 3 else b"")))
            rows.append(record(f"t:{i}", srv.url(f"/{i}.jpg"), license="CC0"))
        storage = Storage()
        storage.write_table(records_table(rows), str(root / "records"))
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"root": str(root)}, "ray": {"num_cpus": 2},
            "download": {"allow_hosts": ["127.0.0.1"], "timeout_s": 5.0, "respect_robots_txt": False,
                         "workers": 2, "shard_size": 4}}))
        env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{REPO}", "ARTSIM_TEST_INJECT_BUG": "1"}
        cmd = [sys.executable, "-m", "artsim.cli", "download", "-c", str(config)]
        first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert first.returncode == 1, first.stderr[-3000:]
        last = first.stderr.strip().splitlines()[-1]
        assert last.startswith("artsim: error: download: 3 records failed with internal_error (1 distinct error")
        assert first.stderr.count("ZeroDivisionError: injected bug") == 1  # one traceback for three records
        report = json.loads((root / "images" / "_report.json").read_text())
        assert report["internal_errors"] == 3 and report["by_status"] == {"ok": 5, "internal_error": 3}
        [(signature, seen)] = report["this_run"]["internal_errors"].items()
        assert signature.startswith("ZeroDivisionError at artsim/") and seen["count"] == 3
        assert report["top_failing_hosts"] == []  # not blamed on the museum
        assert not (root / "images" / "_SUCCESS").exists()  # embed must not start on a stage that failed

        env["ARTSIM_TEST_INJECT_BUG"] = "0"  # the fix
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        table = read_committed(storage, str(root / "images"))
        assert Counter(table.column("status").to_pylist()) == {"ok": 8} and table.num_rows == 8
        assert (root / "images" / "_SUCCESS").exists()
        # Only the three were fetched again.
        assert [srv.hits[f"/{i}.jpg"] for i in range(8)] == [2, 2, 2, 1, 1, 1, 1, 1]
