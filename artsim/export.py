"""`artsim export -c CONFIG --format webdataset|img2dataset --out URI`: the ``ok`` images of ``images/`` and their
records, in the layout another tool reads.

* ``webdataset`` — tar shards ``{out}/{shard:05d}.tar``; each sample is ``{key}.jpg`` (``.webp`` when
  ``download.format`` is webp) and ``{key}.json`` (the artsim record: every ``records/`` field, plus ``width``,
  ``height``, ``original_width``, ``original_height``, ``sha256`` of the downloaded bytes, ``url_final``).
* ``img2dataset`` — what img2dataset writes with ``--output_format webdataset --caption_col title
  --save_additional_columns [record fields]``: ``{out}/{shard:05d}.tar`` with ``{key}.jpg``, ``{key}.txt``
  (the title) and ``{key}.json``; ``{out}/{shard:05d}.parquet`` with one row per sample and img2dataset's columns
  (``url``, ``caption``, the record fields, ``key``, ``status`` = success, ``error_message``, ``width``,
  ``height``, ``original_width``, ``original_height``, ``sha256``); ``{out}/{shard:05d}_stats.json``.

Keys are img2dataset's: shard number (5 digits) then the sample's index in its shard (4 digits at the default
10,000 samples per shard), e.g. ``000010005``. The record's ``object_id`` is in every ``.json``: keys never carry
it because object ids may hold dots, which webdataset readers take as the start of the file extension.

Order is deterministic (images/ shard files in name order, rows in file order). Images stream through in small
batches and each tar is written to a local temporary file, so memory holds one batch of images plus the
``records/`` table (metadata only). ``{out}/_SUCCESS`` is written last; ``--out`` must be empty or absent.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa

FORMATS = ("webdataset", "img2dataset")
IMAGE_COLUMNS = ("object_id", "status", "image", "width", "height", "original_width", "original_height", "sha256",
                 "url_final")
BATCH_ROWS = 256  # images per read batch (~10 MB at 384 px JPEG)


@dataclass
class ExportSummary:
    format: str
    out: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    skipped_without_record: int = 0  # ok images whose object_id is no longer in records/
    images_complete: bool = True


def img2dataset_key(shard: int, index: int, samples_per_shard: int) -> str:
    """img2dataset's compute_key: ``{shard:05d}`` then the index in the shard, zero-padded to the digits the
    shard size needs (``ceil(log10(samples_per_shard))``)."""
    digits = max(1, math.ceil(math.log10(samples_per_shard))) if samples_per_shard > 1 else 1
    return f"{shard:05d}{index:0{digits}d}"


def image_extension(data: bytes) -> str:
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "jpg"


class _ShardWriter:
    """One tar (and, for img2dataset, one parquet + stats). The tar is written under a hidden temporary name next
    to its target and renamed into place (locally), or to a local temporary file and PUT once (S3): readers never
    see half a shard."""

    def __init__(self, storage, out: str, shard: int, tmpdir: str):
        from artsim.storage import is_s3, join, strip_scheme

        self.storage, self.out, self.shard = storage, out, shard
        self.name = f"{shard:05d}"
        self.uri = join(out, f"{self.name}.tar")
        if is_s3(out):
            self.final = None
            self.tmp_path = os.path.join(tmpdir, f"{self.name}.tar")
        else:
            self.final = os.path.abspath(strip_scheme(self.uri))
            os.makedirs(os.path.dirname(self.final), exist_ok=True)
            self.tmp_path = os.path.join(os.path.dirname(self.final), f".{self.name}.tar.tmp-{uuid.uuid4().hex}")
        self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.rows: list[dict] = []
        self.count = 0
        self.start = time.time()
        self.mtime = int(self.start)

    def add(self, key: str, files: dict[str, bytes], parquet_row: Optional[dict]) -> None:
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), self.mtime, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        if parquet_row is not None:
            self.rows.append(parquet_row)
        self.count += 1

    def close(self, parquet_schema: Optional[pa.Schema]) -> list[str]:
        from artsim.storage import join

        self.tar.close()
        if self.final is None:
            self.storage.upload_file(self.tmp_path, self.uri)
            os.unlink(self.tmp_path)
        else:
            os.replace(self.tmp_path, self.final)
        published = [self.uri]
        if parquet_schema is not None:
            uri = join(self.out, f"{self.name}.parquet")
            self.storage.write_parquet_file(pa.Table.from_pylist(self.rows, schema=parquet_schema), uri)
            end = time.time()
            self.storage.write_json(join(self.out, f"{self.name}_stats.json"), {
                "count": self.count, "successes": self.count, "failed_to_download": 0, "failed_to_resize": 0,
                "duration": end - self.start, "start_time": self.start, "end_time": end,
                "status_dict": {"success": self.count}})
            published.append(uri)
        return published


def _img2dataset_schema(record_fields: list[str], records_schema: pa.Schema) -> pa.Schema:
    fields = [pa.field("url", pa.string()), pa.field("caption", pa.string())]
    fields += [records_schema.field(f) for f in record_fields]
    fields += [pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("error_message", pa.string()),
               pa.field("width", pa.int32()), pa.field("height", pa.int32()),
               pa.field("original_width", pa.int32()), pa.field("original_height", pa.int32()),
               pa.field("sha256", pa.string())]
    return pa.schema(fields)


def run_export(ctx, fmt: str, out: str, samples_per_shard: int = 10_000) -> ExportSummary:
    from artsim.console import Progress, say
    from artsim.rundir.images import shard_files
    from artsim.errors import ArtsimError
    from artsim.storage import SUCCESS, join

    if fmt not in FORMATS:
        raise ArtsimError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if samples_per_shard < 1:
        raise ArtsimError("--samples-per-shard: must be at least 1")
    storage, paths = ctx.storage, ctx.paths
    out = out.rstrip("/")
    if storage.list(out):
        raise ArtsimError(f"--out {out}: not empty; export writes a new directory (remove it or choose another)")
    names = shard_files(storage, paths.images)
    if not names:
        raise ArtsimError(f"{paths.images}: no committed shards (has the download stage run?)")
    summary = ExportSummary(fmt, out, images_complete=storage.is_complete(paths.images))
    if not summary.images_complete:
        say(f"export: {paths.images} is incomplete (no {SUCCESS}); exporting the ok images committed so far")

    records = storage.read_table(paths.records)
    record_fields = [f for f in records.column_names if f not in ("image_url", "sha256")]
    row_of = {oid: i for i, oid in enumerate(records.column("object_id").to_pylist()) if oid}
    parquet_schema = _img2dataset_schema(record_fields, records.schema) if fmt == "img2dataset" else None

    progress = Progress("export", total=None, unit="images")
    writer: Optional[_ShardWriter] = None
    shard_count = 0
    with tempfile.TemporaryDirectory(prefix="artsim-export-") as tmpdir:
        for name in names:
            for batch in storage.iter_batches(join(paths.images, name), list(IMAGE_COLUMNS), BATCH_ROWS):
                rows = [r for r in batch.to_pylist() if r["status"] == "ok" and r["image"]]
                if not rows:
                    continue
                known = [r for r in rows if r["object_id"] in row_of]
                summary.skipped_without_record += len(rows) - len(known)
                recs = records.take(pa.array([row_of[r["object_id"]] for r in known], pa.int64())).to_pylist()
                for image_row, rec in zip(known, recs):
                    if writer is None or writer.count >= samples_per_shard:
                        if writer is not None:
                            summary.shards += writer.close(parquet_schema)
                        writer = _ShardWriter(storage, out, shard_count, tmpdir)
                        shard_count += 1
                    key = img2dataset_key(writer.shard, writer.count, samples_per_shard)
                    files, parquet_row = _sample(fmt, key, image_row, rec, record_fields)
                    writer.add(key, files, parquet_row)
                    summary.samples += 1
                progress.update(len(known))
        if writer is not None:
            summary.shards += writer.close(parquet_schema)
    storage.write_bytes(join(out, SUCCESS), b"")
    tars = [s for s in summary.shards if s.endswith(".tar")]
    say(f"export: {summary.samples} ok images in {len(tars)} shards ({fmt}) → {out}"
        + (f"; {summary.skipped_without_record} images without a record skipped"
           if summary.skipped_without_record else ""))
    if tars:
        say(f"export: read with webdataset.WebDataset('{out}/{{00000..{len(tars) - 1:05d}}}.tar')")
    return summary


def _sample(fmt: str, key: str, image_row: dict, rec: dict, record_fields: list[str]) -> tuple[dict, Optional[dict]]:
    image = image_row["image"]
    ext = image_extension(image)
    download = {k: image_row[k] for k in ("width", "height", "original_width", "original_height", "sha256",
                                          "url_final")}
    if fmt == "webdataset":
        meta = {**{f: rec[f] for f in record_fields}, "image_url": rec.get("image_url"), **download}
        return {ext: image, "json": _json(meta)}, None
    caption = rec.get("title") or ""
    row = {"url": rec.get("image_url"), "caption": caption, **{f: rec[f] for f in record_fields}, "key": key,
           "status": "success", "error_message": None,
           **{k: download[k] for k in ("width", "height", "original_width", "original_height", "sha256")}}
    return {ext: image, "txt": caption.encode("utf-8"), "json": _json(row)}, row


def _json(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, indent=1, default=str).encode("utf-8")


def export_main(argv: list[str]) -> int:
    """`artsim export -c CONFIG --format webdataset|img2dataset --out URI`."""
    from artsim.command import run_command

    p = argparse.ArgumentParser(
        prog="artsim export",
        description="Write the ok images of the run's images/ and their records in another tool's layout: "
                    "webdataset (tar shards, .jpg + .json per sample) or img2dataset (its tar + parquet + "
                    "stats layout). See docs/download.md.")
    p.add_argument("-c", "--config", required=True, help="YAML config file (its run.root holds images/ and records/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output layout")
    p.add_argument("--out", required=True, help="output directory URI (local, file:// or s3://); must be empty")
    p.add_argument("--samples-per-shard", type=int, default=10_000,
                   help="samples per tar shard (default 10000, like img2dataset)")
    args = p.parse_args(argv)

    def run() -> int:
        from artsim.config import load_config
        from artsim.runtime import RunContext

        ctx = RunContext(load_config(args.config, args.overrides))
        run_export(ctx, args.format, args.out, args.samples_per_shard)
        return 0

    return run_command(run)
