"""The data-quality audit on the real Met works of ../shared/data (met_sample + met_more: 468 works, 468 images).

Builds a run directory under benchmarks/out/audit-met/ (records: the Met API JSON records as collection ``met``,
the 2013-scrape CSV rows as collection ``met2013``; images/: the local thumbnails, status ok), runs the report stage
with only the audit (no embeddings, tags, vocabulary or walks) and prints what it found.

    .venv/bin/python benchmarks/audit_met.py [--data ../shared/data]
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artsim.config import config_from_dict  # noqa: E402
from artsim.ingest.common import make_record  # noqa: E402
from artsim.ingest.met_api import parse_met_api  # noqa: E402
from artsim.report.stage import run_report  # noqa: E402
from artsim.runtime import RunContext  # noqa: E402
from artsim.rundir.schema import IMAGES_SCHEMA, records_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"


def build(data: Path, root: Path) -> RunContext:
    records = []
    for part in ("met_sample", "met_more"):
        for rec in parse_met_api(json.loads((data / part / "met_api_objects.json").read_text("utf-8")), "met"):
            if isinstance(rec, dict):
                records.append((rec, data / part / "images" / f"met_{rec['local_id']}.jpg"))
        with open(data / part / "met_2013_scrape.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                rec = make_record("met2013", row["object_id"], "met_csv", title=row.get("title"),
                                  creator=row.get("artist"), date=row.get("date"), medium=row.get("medium"),
                                  object_type=row.get("object_type"),
                                  image_url=f"https://images.metmuseum.org/2013/{row['object_id']}.jpg",
                                  license="CC0")
                records.append((rec, data / part / row["image_file"]))
    rows = []
    for rec, path in records:
        if path.exists():
            raw = path.read_bytes()
            rows.append({"object_id": rec["object_id"], "status": "ok", "http_status": 200, "error": None,
                         "url_final": rec.get("image_url"), "width": None, "height": None,
                         "sha256": hashlib.sha256(raw).hexdigest(), "image": raw})
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "report": {
        "suggest_tags": False, "classify_vocabulary": False, "latent_walks": 0}}))
    ctx.storage.write_table(records_table([r for r, _ in records]), ctx.paths.records)
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images)
    return ctx


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    root = REPO / "benchmarks" / "out" / "audit-met"
    shutil.rmtree(root, ignore_errors=True)
    ctx = build(args.data, root)
    start = time.perf_counter()
    summary = run_report(ctx)
    audit = json.loads(Path(summary["audit_uri"]).read_text("utf-8"))
    print(f"run_report with the audit: {time.perf_counter() - start:.1f} s; {summary['report_uri']}")
    for name, c in audit["collections"].items():
        shares = ", ".join(f"{f} {v['share']:.0%}" for f, v in c["fields"].items())
        print(f"{name}: {c['records']} records; licences {c['licences']}; {shares}")
    for what, d in audit["duplicates"].items():
        print(f"duplicate {what}: {d['groups']} values on {d['rows_in_groups']} records "
              f"{[e['value'] for e in d['examples'][:5]]}")
    near = audit["near_duplicate_images"]
    print(f"near-duplicate images: {near['pairs_found']} pairs among {near['images_hashed']} "
          f"({near['across_collections']} across collections)")
    for pair in near["pairs"]:
        print(f"  {pair['a']} ~ {pair['b']}: pHash {pair['phash_distance']}, dHash {pair['dhash_distance']}")
    for kind in ("creator", "term"):
        for g in audit["variants"][kind]:
            print(f"variant {kind}: {[s['value'] for s in g['spellings']]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
