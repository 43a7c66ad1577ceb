"""run_ingest end to end: local and S3 (moto server) run directories, the report's counts, user errors, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from artsim.config import config_from_dict
from artsim.errors import ArtsimError, ConfigError
from artsim.ingest.stage import run_ingest
from artsim.runtime import RunContext
from artsim.rundir.schema import RECORDS_SCHEMA

REPO = Path(__file__).resolve().parent.parent
MET_SAMPLE = REPO / "data" / "met_sample"
FIXTURES = REPO / "tests" / "fixtures" / "ingest"
MET_2013_MAPPING = {"local_id": "object_id", "creator": "artist", "subjects": "what_terms",
                    "image_url": "image_url_2013", "landing_url": "object_url_now"}


def _sources(base: str) -> list[dict]:
    """Four sources with known problems: duplicates, missing image URLs, unparsable rows."""
    return [
        {"kind": "met_api_json", "path": f"{base}/met_api_objects.json", "collection": "met"},
        {"kind": "met_csv", "path": f"{base}/MetObjects_sample.csv", "collection": "met"},  # overlaps source 0
        {"kind": "europeana_json", "path": f"{base}/europeana_search_response.json", "collection": "europeana"},
        {"kind": "table", "path": f"{base}/met_2013_scrape.csv", "collection": "met2013",
         "mapping": MET_2013_MAPPING, "license": "CC0"},
    ]


def _copy_inputs(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in (MET_SAMPLE / "met_api_objects.json", MET_SAMPLE / "met_2013_scrape.csv",
                FIXTURES / "MetObjects_sample.csv", FIXTURES / "europeana_search_response.json"):
        (dest / src.name).write_bytes(src.read_bytes())


def _check_report(report: dict, records) -> None:
    by_source = {s["source"]: s for s in report["sources"]}
    met_api, met_csv, europeana, table = (by_source[f"sources.{i}"] for i in range(4))
    assert (met_api["rows_read"], met_api["records_written"], met_api["duplicate_ids"]) == (40, 40, 0)
    # MetObjects_sample.csv: 16 rows = 12 objects also in the API file (duplicates across sources, first kept),
    # one new print, one duplicate within the file, one row without id, one truncated row.
    assert met_csv["rows_read"] == 16
    assert met_csv["records_written"] == 1
    assert met_csv["duplicate_ids"] == 13
    assert met_csv["unparsable_rows"] == 2
    assert met_csv["missing_image_url"] == 1
    assert any("7 fields, the header has 54" in e for e in met_csv["unparsable_examples"])
    assert "met:36131" in met_csv["duplicate_examples"]
    assert (europeana["rows_read"], europeana["records_written"], europeana["duplicate_ids"],
            europeana["unparsable_rows"], europeana["missing_image_url"]) == (8, 6, 1, 1, 1)
    assert (table["rows_read"], table["records_written"]) == (40, 40)
    total = report["total"]
    assert total["records_written"] == 87 == records.num_rows
    assert (total["duplicate_ids"], total["unparsable_rows"], total["missing_image_url"]) == (14, 3, 2)
    assert report["collections"] == {"met": 41, "met2013": 40, "europeana": 6}
    assert report["licenses"]["CC0"] == 40 + 1 + 40 + 1


def _check_records(records) -> None:
    assert records.schema.equals(RECORDS_SCHEMA)
    rows = {r["object_id"]: r for r in records.to_pylist()}
    assert len(rows) == records.num_rows  # no duplicate ids
    # The first occurrence wins: met:36131 comes from the API JSON (with its image), not the CSV (without).
    assert rows["met:36131"]["source"] == "met_api_json" and rows["met:36131"]["image_url"]
    assert rows["met:990001"]["creator"] == "Hendrick Goltzius"
    assert rows["met2013:12600"]["title"] == "Francis Brinley"
    assert rows["europeana:91668/GSM_objekt_1252515"]["image_url"] is None  # kept without an image URL


def test_run_ingest_local(tmp_path, capsys):
    _copy_inputs(tmp_path / "in")
    config = config_from_dict({"run": {"root": str(tmp_path / "run")}, "sources": _sources(str(tmp_path / "in"))})
    ctx = RunContext(config)
    summary = run_ingest(ctx)
    assert summary["records"] == 87 and summary["duplicate_ids"] == 14 and summary["unparsable_rows"] == 3
    assert summary["records_uri"] == str(tmp_path / "run" / "records")
    records = ctx.storage.read_table(ctx.paths.records)
    report = ctx.storage.read_json(ctx.paths.ingest_report)
    _check_report(report, records)
    _check_records(records)
    out = capsys.readouterr().out
    assert "no image url" in out and "unparsable" in out  # the counts table
    assert "ingest: 87 records from 4 source(s)" in out
    # Re-running replaces the output in one step (no stale files, marker present).
    run_ingest(ctx)
    names = sorted(os.listdir(tmp_path / "run" / "records"))
    assert names == ["_SUCCESS", "_report.json", "part-00000.parquet"]


def test_run_ingest_s3(tmp_path, s3_endpoint):
    import boto3

    _copy_inputs(tmp_path / "in")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for f in (tmp_path / "in").iterdir():
        s3.upload_file(str(f), "artsim-test", f"ingest-inputs/{f.name}")
    config = config_from_dict({
        "run": {"root": "s3://artsim-test/ingest-run"},
        "storage": {"s3_endpoint_url": s3_endpoint},
        "sources": _sources("s3://artsim-test/ingest-inputs"),
    })
    ctx = RunContext(config)
    summary = run_ingest(ctx)
    assert summary["records"] == 87
    assert ctx.storage.is_complete(ctx.paths.records)
    records = ctx.storage.read_table(ctx.paths.records)
    _check_report(ctx.storage.read_json(ctx.paths.ingest_report), records)
    _check_records(records)
    # A glob over S3 keys: only met_api_objects.json matches.
    from artsim.config import SourceConfig
    from artsim.ingest.stage import ingest_sources

    _, stats, _, _ = ingest_sources(ctx.storage, [SourceConfig(kind="met_api_json", collection="m",
                                                               path="s3://artsim-test/ingest-inputs/met_*.json")])
    assert (stats[0].files, stats[0].records_written) == (1, 40)


def test_source_directory_and_glob(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    for name in ("iiif_v2_manifest.json", "iiif_v3_manifest.json"):
        (d / name).write_bytes((FIXTURES / name).read_bytes())
    (d / "notes.txt").write_text("not a manifest")  # ignored: not a data file
    for path in (str(d), f"file://{d}/*.json"):
        config = config_from_dict({"run": {"root": str(tmp_path / "run")},
                                   "sources": [{"kind": "iiif_manifest", "path": path, "collection": "smk"}]})
        summary = run_ingest(RunContext(config))
        assert summary["records"] == 2, path
        report = RunContext(config).storage.read_json(str(tmp_path / "run" / "records" / "_report.json"))
        assert report["sources"][0]["files"] == 2


def test_missing_source_file_names_the_key(tmp_path):
    config = config_from_dict({"run": {"root": str(tmp_path / "run")}, "sources": [
        {"kind": "met_api_json", "path": str(MET_SAMPLE / "met_api_objects.json"), "collection": "met"},
        {"kind": "smk_json", "path": str(tmp_path / "nope.json"), "collection": "smk"}]})
    with pytest.raises(ArtsimError, match=r"^sources\.1\.path: source file not found: .*nope\.json"):
        run_ingest(RunContext(config))
    assert not (tmp_path / "run" / "records").exists()  # nothing half-written


def test_bad_mapping_and_bad_files_are_user_errors(tmp_path):
    def run(source):
        return run_ingest(RunContext(config_from_dict({"run": {"root": str(tmp_path / "run")},
                                                       "sources": [source]})))

    with pytest.raises(ConfigError, match=r"^sources\.0\.mapping\.image_url: column 'url' does not exist"):
        run({"kind": "table", "path": str(MET_SAMPLE / "met_2013_scrape.csv"), "collection": "m",
             "mapping": {"local_id": "object_id", "image_url": "url"}})
    (tmp_path / "broken.json").write_text('{"items": [1, 2')
    with pytest.raises(ArtsimError, match="not valid JSON"):
        run({"kind": "smk_json", "path": str(tmp_path / "broken.json"), "collection": "smk"})
    with pytest.raises(ArtsimError, match=r"^sources\.0\.path: .* is not a MetObjects.csv"):
        run({"kind": "met_csv", "path": str(MET_SAMPLE / "met_2013_scrape.csv"), "collection": "m"})
    with pytest.raises(ConfigError, match=r"^sources: no sources configured"):
        run_ingest(RunContext(config_from_dict({"run": {"root": str(tmp_path / "run")}})))


def _cli(config_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    return subprocess.run([str(REPO / ".venv" / "bin" / "artsim"), "ingest", "-c", str(config_path)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def test_cli_ingest(tmp_path, ray_session):
    # The CLI joins the test session's Ray (by its exact GCS address) instead of starting a second one.
    address = ray_session.get_runtime_context().gcs_address
    config = {"run": {"root": "run"}, "ray": {"address": address},
              "sources": [{"kind": "met_api_json", "path": str(MET_SAMPLE / "met_api_objects.json"),
                           "collection": "met", "image_url_template": "http://127.0.0.1:8000/met_{local_id}.jpg"},
                          {"kind": "smk_json", "path": str(tmp_path / "missing.json"), "collection": "smk"}]}
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    bad = _cli(path, tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "sources.1.path: source file not found" in bad.stderr
    config["sources"].pop()
    path.write_text(yaml.safe_dump(config))
    ok = _cli(path, tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "ingest: 40 records from 1 source(s)" in ok.stdout
    import pyarrow.dataset as ds

    rows = ds.dataset(tmp_path / "run" / "records", format="parquet").to_table().to_pylist()
    assert len(rows) == 40
    assert {r["image_url"] for r in rows if r["local_id"] == "436105"} == {"http://127.0.0.1:8000/met_436105.jpg"}
    summary = json.loads((tmp_path / "run" / "summaries" / "ingest.json").read_text())
    assert summary["records"] == 40
