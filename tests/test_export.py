"""`artsim export`: the ok images and their records in webdataset's and img2dataset's layouts, read back by the
`webdataset` package itself (and pyarrow for img2dataset's parquet)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpd  # noqa: E402
from httpd import MisbehavingServer  # noqa: E402

from artsim.config import DownloadConfig, config_from_dict  # noqa: E402
from artsim.download.fetch import Fetcher  # noqa: E402
from artsim.download.politeness import LocalHostLimiter  # noqa: E402
from artsim.download.shards import plan_shards, process_shard, read_committed  # noqa: E402
from artsim.export import run_export  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.rundir.schema import RETRYABLE_STATUSES, empty_record, records_table  # noqa: E402
from artsim.storage import SUCCESS, Storage, join  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_OK = 9


def jpeg(width, height, shade) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 100, 50)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """A run directory with records/ and images/ from a real download (no Ray): 9 ok images (object ids with dots
    and slashes, which must not leak into tar member names), one 404, one too small."""
    root = tmp_path_factory.mktemp("run")
    storage = Storage()
    rows = []
    with MisbehavingServer() as srv:
        for i in range(N_OK):
            srv.add(f"/{i}.jpg", httpd.ok(jpeg(600 + i, 400, 20 * i)))
            r = empty_record()
            r.update(object_id=f"met:{i}.v2/x", collection="met", image_url=srv.url(f"/{i}.jpg"),
                     title=f"Work number {i}", creator="Somebody", subjects=["a", f"s{i}"], license="CC0")
            rows.append(r)
        srv.add("/tiny.jpg", httpd.ok(jpeg(20, 20, 0)))
        for oid, path in (("met:missing", "/missing.jpg"), ("met:tiny", "/tiny.jpg")):
            r = empty_record()
            r.update(object_id=oid, collection="met", image_url=srv.url(path), title="not exported")
            rows.append(r)
        cfg = DownloadConfig(allow_hosts=["127.0.0.1"], respect_robots_txt=False, min_width=100, image_size=128,
                             per_host_requests_per_second=1000)
        limiter = LocalHostLimiter(4, 1000, 20)
        fetcher = Fetcher(cfg, limiter, seed=0)
        images = str(root / "images")
        records = records_table(rows)
        storage.write_table(records, str(root / "records"))
        plan = plan_shards(records, read_committed(storage, images), 4, False, RETRYABLE_STATUSES)
        for task in plan.tasks:
            process_shard(task, fetcher, storage, images, threads=4)
    storage.write_bytes(join(images, SUCCESS), b"")
    committed = read_committed(storage, images, columns=("object_id", "status", "image", "sha256"))
    assert Counter(committed.column("status").to_pylist()) == {"ok": N_OK, "not_found": 1, "too_small": 1}
    return root, {r["object_id"]: r for r in committed.to_pylist() if r["status"] == "ok"}, {
        r["object_id"]: r for r in rows}


def ctx_for(root) -> RunContext:
    return RunContext(config_from_dict({"run": {"root": str(root)}}))


def read_back(out: Path, n_shards: int) -> list[dict]:
    pattern = str(out / f"{{00000..{n_shards - 1:05d}}}.tar")
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=True))


def test_webdataset_export_through_the_cli(run_root, tmp_path):
    root, ok, records = run_root
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"root": str(root)}}))
    out = tmp_path / "wds"
    cmd = [sys.executable, "-m", "artsim.cli", "export", "-c", str(config), "--format", "webdataset",
           "--out", str(out), "--samples-per-shard", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "9 ok images in 3 shards (webdataset)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", SUCCESS]

    samples = read_back(out, 3)
    assert len(samples) == N_OK
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002", "000003", "000010", "000011",
                                               "000012", "000013", "000020"]
    seen = set()
    for s in samples:
        assert set(s) >= {"__key__", "jpg", "json"} and not set(s) - {"__key__", "__url__", "__local_path__",
                                                                      "jpg", "json"}
        meta = json.loads(s["json"])
        oid = meta["object_id"]
        seen.add(oid)
        assert s["jpg"] == ok[oid]["image"]  # the stored image, byte for byte
        assert meta["sha256"] == ok[oid]["sha256"] and meta["title"] == records[oid]["title"]
        assert meta["subjects"] == records[oid]["subjects"] and meta["image_url"] == records[oid]["image_url"]
        assert max(meta["width"], meta["height"]) == 128 and meta["original_height"] == 400
        assert Image.open(io.BytesIO(s["jpg"])).size == (meta["width"], meta["height"])
    assert seen == set(ok)

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 2 and "not empty" in again.stderr  # never mixes two exports


def test_img2dataset_export_layout(run_root, tmp_path):
    root, ok, records = run_root
    out = tmp_path / "i2d"
    summary = run_export(ctx_for(root), "img2dataset", str(out), samples_per_shard=10_000)
    assert summary.samples == N_OK
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json", SUCCESS]
    table = pq.read_table(out / "00000.parquet")
    names = table.column_names
    # img2dataset's order: url, caption, the saved additional columns, then its own columns.
    assert names[:2] == ["url", "caption"]
    assert names[-8:] == ["key", "status", "error_message", "width", "height", "original_width",
                          "original_height", "sha256"]
    assert "object_id" in names and "license" in names
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"00000{i:04d}" for i in range(N_OK)]
    assert {r["status"] for r in rows} == {"success"} and {r["error_message"] for r in rows} == {None}
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == stats["successes"] == N_OK and stats["status_dict"] == {"success": N_OK}

    samples = read_back(out, 1)
    assert [s["__key__"] for s in samples] == [r["key"] for r in rows]
    for s, row in zip(samples, rows):
        assert set(s) - {"__url__", "__local_path__"} == {"__key__", "jpg", "txt", "json"}
        meta = json.loads(s["json"])
        assert meta == json.loads(json.dumps(row, default=str))  # the .json is the parquet row
        assert s["txt"].decode() == records[row["object_id"]]["title"] == row["caption"]
        assert s["jpg"] == ok[row["object_id"]]["image"] and row["url"] == records[row["object_id"]]["image_url"]
    # Decoded by webdataset itself, as a training loop would.
    first = next(iter(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("pil")))
    assert first["jpg"].size == (rows[0]["width"], rows[0]["height"])


def test_export_to_s3(run_root, s3_endpoint, tmp_path):
    root, ok, _ = run_root
    out = f"s3://artsim-test/export-{uuid.uuid4().hex[:8]}"
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "storage": {"s3_endpoint_url": s3_endpoint}}))
    run_export(ctx, "webdataset", out, samples_per_shard=5)
    assert ctx.storage.list(out) == ["00000.tar", "00001.tar", SUCCESS]
    local = tmp_path / "copy"
    for name in ("00000.tar", "00001.tar"):
        ctx.storage.download_file(join(out, name), str(local / name))
    samples = read_back(local, 2)
    assert sorted(json.loads(s["json"])["object_id"] for s in samples) == sorted(ok)


def test_export_refuses_bad_input(run_root, tmp_path):
    from artsim.errors import ArtsimError

    root, _, _ = run_root
    with pytest.raises(ArtsimError, match="no committed shards"):
        run_export(ctx_for(tmp_path / "empty-run"), "webdataset", str(tmp_path / "o1"))
    with pytest.raises(ArtsimError, match="--format"):
        run_export(ctx_for(root), "tfrecord", str(tmp_path / "o2"))
