"""Ingest in pieces: the plan (pure), CSV record starts, and run_ingest with tiny pieces giving exactly what reading
everything in order on one machine gives (ingest_sources): the same rows in the same order, the same counts."""
from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from artsim.config import SourceConfig, config_from_dict
from artsim.ingest.pieces import csv_record_starts, read_segment
from artsim.ingest.plan import Segment, SourceFile, group_parts, plan_ingest
from artsim.ingest.stage import ingest_sources, run_ingest
from artsim.runtime import RunContext
from artsim.storage import Storage

REPO = Path(__file__).resolve().parent.parent
MET_SAMPLE = REPO / "data" / "met_sample"
FIXTURES = REPO / "tests" / "fixtures" / "ingest"


def _src(kind, path="x", **kw):
    return SourceConfig(kind=kind, path=str(path), collection="c", **kw)


def test_plan_groups_small_files_splits_big_ones_and_keeps_order():
    listing = {0: [SourceFile(f"a{i}.json", 10, "json") for i in range(5)]
               + [SourceFile("big.csv", 250, "csv"), SourceFile("z.json", 10, "json")],
               1: [SourceFile("doc.json", 500, "json"), SourceFile("rows.jsonl.gz", 900, "jsonl", gzip=True)]}
    plan = plan_ingest([_src("table"), _src("europeana_json")], listing, piece_bytes=100, json_memory_bytes=400,
                       buckets=2)
    modes = [[(s.uri, s.mode, s.start, s.end) for s in p.segments] for p in plan.pieces]
    assert modes == [
        [(f"a{i}.json", "whole", 0, -1) for i in range(5)],
        [("big.csv", "csv_range", 0, 100)], [("big.csv", "csv_range", 100, 200)], [("big.csv", "csv_range", 200, 250)],
        [("z.json", "whole", 0, -1)],
        [("doc.json", "json_stream", 0, -1)],
        [("rows.jsonl.gz", "whole", 0, -1)],  # gzip cannot be cut; it streams line by line in one task
    ]
    assert [p.index for p in plan.pieces] == list(range(7)) and [p.source for p in plan.pieces] == [0] * 5 + [1] * 2
    assert plan.csv_cuts == {"big.csv": [0, 100, 200, 250]}
    assert plan.files_per_source == [7, 2] and plan.buckets == 2
    api = plan_ingest([_src("europeana_api", "http://x")], {}, api_partitions={0: 3})
    assert [(p.segments[0].mode, p.segments[0].start) for p in api.pieces] == [("api", 0), ("api", 1), ("api", 2)]


def test_group_parts():
    groups = group_parts([3, 0, 4, 9, 2], rows_per_file=5, parsed_rows=[3, 2, 4, 9, 2])
    assert [(g.pieces, g.first_part, g.parts, g.rows) for g in groups] == [
        ((0, 1), 0, 1, 3), ((2,), 1, 1, 4), ((3,), 2, 2, 9), ((4,), 4, 1, 2)]
    assert [(g.pieces, g.parts) for g in group_parts([0, 0])] == [((), 1)]  # one empty file


def _write_tricky_csv(path: Path, n: int, seed: int = 3) -> list[dict]:
    """Quoted newlines, doubled quotes, commas, a BOM, non-ASCII, a ragged row and duplicate ids."""
    rng = random.Random(seed)
    rows = []
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["id", "title", "image_url", "subjects"])
        for i in range(n):
            title = rng.choice(['plain', 'with "quotes"', 'two\nlines', 'comma, here', 'Ærø "x"\n\n"y"', ''])
            oid = str(i if i % 17 else i // 2)  # every 17th id repeats an earlier one
            row = [oid, f"{title} {i}", f"http://h/{i}.jpg" if i % 5 else "", "a|b"]
            if i == n // 2:
                row = row[:2]  # ragged: an unparsable row
            w.writerow(row)
            rows.append(row)
    return rows


def test_csv_record_starts_land_on_record_starts(tmp_path):
    path = tmp_path / "t.csv"
    _write_tricky_csv(path, 400)
    size = path.stat().st_size
    cuts = list(range(0, size, 97)) + [size]
    starts = csv_record_starts(Storage(), str(path), cuts)
    assert starts[0] == 0 and starts[-1] == size and starts == sorted(starts)
    # Reading every range and concatenating gives exactly the whole file's records.
    source = _src("table", path)
    whole = [r for r in read_segment(Storage(), source, "sources.0", Segment(str(path), "whole"))]
    pieces = []
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        pieces += list(read_segment(Storage(), source, "sources.0", Segment(str(path), "csv_range", cut=k), (a, b)))
    assert [r for r in pieces if isinstance(r, dict)] == [r for r in whole if isinstance(r, dict)]
    assert len([r for r in pieces if not isinstance(r, dict)]) == len([r for r in whole if not isinstance(r, dict)]) == 1


def _sources(d: Path) -> list[dict]:
    return [
        {"kind": "met_api_json", "path": str(d / "met_api_objects.json"), "collection": "met"},  # streamed
        {"kind": "met_csv", "path": str(d / "MetObjects_sample.csv"), "collection": "met"},  # byte ranges
        {"kind": "europeana_json", "path": str(d / "europeana_search_response.json"), "collection": "europeana"},
        {"kind": "table", "path": str(d / "tricky.csv"), "collection": "t", "license": "CC0"},
        {"kind": "table", "path": str(d / "rows.jsonl"), "collection": "t"},  # overlaps tricky.csv ids
        {"kind": "table", "path": str(d / "rows.jsonl.gz"), "collection": "g"},
        {"kind": "iiif_manifest", "path": str(d / "manifests"), "collection": "smk"},  # grouped small files
    ]


def _inputs(d: Path) -> None:
    d.mkdir()
    for src in (MET_SAMPLE / "met_api_objects.json", FIXTURES / "MetObjects_sample.csv",
                FIXTURES / "europeana_search_response.json"):
        (d / src.name).write_bytes(src.read_bytes())
    _write_tricky_csv(d / "tricky.csv", 1500)
    lines = [json.dumps({"id": str(i), "title": f"j{i}", "image_url": f"http://j/{i}"}) for i in range(1400, 1700)]
    lines.insert(40, "{not json")
    (d / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (d / "rows.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (d / "manifests").mkdir()
    for name in ("iiif_v2_manifest.json", "iiif_v3_manifest.json"):
        (d / "manifests" / name).write_bytes((FIXTURES / name).read_bytes())


def test_pieces_give_what_one_reader_gives(tmp_path):
    d = tmp_path / "in"
    _inputs(d)
    config = config_from_dict({"run": {"root": str(tmp_path / "run")}, "sources": _sources(d)})
    ctx = RunContext(config)
    expected_table, expected_stats, expected_total, expected_licenses = ingest_sources(ctx.storage, config.sources)
    summary = run_ingest(ctx, piece_bytes=4096, json_memory_bytes=20_000, buckets=3, rows_per_file=700)
    report = ctx.storage.read_json(ctx.paths.ingest_report)
    assert summary["pieces"] > 20  # the CSVs and the JSON lines were really cut
    names = sorted(p.name for p in (tmp_path / "run" / "records").iterdir())
    parts = [n for n in names if n.startswith("part-")]
    assert names == ["_SUCCESS", "_report.json"] + parts and len(parts) >= 3
    got = ds.dataset(sorted(str(tmp_path / "run" / "records" / n) for n in parts), format="parquet").to_table()
    assert got.num_rows == expected_table.num_rows == expected_total.records_written
    assert got.to_pylist() == expected_table.to_pylist()  # same rows, same order: first occurrence wins
    for mine, ref in zip(report["sources"], expected_stats):
        for field in ("files", "rows_read", "records_written", "duplicate_ids", "missing_image_url",
                      "unparsable_rows", "duplicate_examples"):
            assert mine[field] == getattr(ref, field), (mine["source"], field)
        assert len(mine["unparsable_examples"]) == len(ref.unparsable_examples)
    assert report["licenses"] == dict(expected_licenses)
    assert sum(report["collections"].values()) == got.num_rows
    assert report["total"]["duplicate_ids"] > 100  # within tricky.csv and across sources 3 and 4


def test_user_errors_from_tasks_reach_the_caller(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_tricky_csv(d / "t.csv", 300)
    config = config_from_dict({"run": {"root": str(tmp_path / "run")}, "sources": [
        {"kind": "table", "path": str(d / "t.csv"), "collection": "t", "mapping": {"title": "nope"}}]})
    from artsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^sources\.0\.mapping\.title: column 'nope' does not exist"):
        run_ingest(RunContext(config), piece_bytes=2048)
    assert not (tmp_path / "run" / "records").exists()
