"""The report stage on a small run directory written by hand (real images from the Met sample)."""
import hashlib
import re

import numpy as np
import pyarrow as pa

from artsim.config import config_from_dict
from artsim.report import run_report
from artsim.runtime import RunContext
from artsim.schema import IMAGES_SCHEMA, empty_record, records_table
from conftest import MET_SAMPLE


def _run_dir(tmp_path):
    ctx = RunContext(config_from_dict({"run": {"root": str(tmp_path / "run")}, "index": {"embeddings": "m"}}))
    files = sorted((MET_SAMPLE / "images").glob("*.jpg"))[:12]
    recs, imgs = [], []
    for i, f in enumerate(files):
        coll = "a" if i % 2 else "b"
        oid = f"{coll}:{f.stem}"
        recs.append({**empty_record(), "object_id": oid, "collection": coll, "title": f"Title <{i}>",
                     "creator": f"Artist {i % 3}", "object_type": "Painting",
                     "subjects": ["Horses", "Landscapes"][: i % 3]})
        data = f.read_bytes()
        imgs.append({"object_id": oid, "status": "ok", "http_status": 200, "error": None, "url_final": None,
                     "width": 1, "height": 1, "sha256": hashlib.sha256(data).hexdigest(), "image": data})
    imgs.append({"object_id": "a:missing", "status": "not_found", "http_status": 404, "error": "404",
                 "url_final": None, "width": None, "height": None, "sha256": None, "image": None})
    ctx.storage.write_table(records_table(recs), ctx.paths.records)
    ctx.storage.write_table(pa.Table.from_pylist(imgs, schema=IMAGES_SCHEMA), ctx.paths.images)
    ctx.storage.write_json(ctx.paths.images_report, {"by_status": {"ok": 12, "not_found": 1}})
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(12, 8)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    emb = pa.table({"object_id": [r["object_id"] for r in recs],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 8),
                    "model": ["m"] * 12})
    ctx.storage.write_table(emb, ctx.paths.embeddings("m"))
    links = []
    for r in recs:
        others = [o for o in recs if o["collection"] != r["collection"]][:3]
        for rank, o in enumerate(others, 1):
            links.append({"object_id": r["object_id"], "neighbor_id": o["object_id"], "rank": rank,
                          "score": 1.0 - rank / 10, "neighbor_collection": o["collection"]})
    ctx.storage.write_table(pa.Table.from_pylist(links), ctx.paths.links("m"))
    return ctx, recs


def test_report_is_offline_html_with_map_clusters_and_sheets(tmp_path):
    ctx, recs = _run_dir(tmp_path)
    summary = run_report(ctx)
    page = open(summary["report_uri"], encoding="utf-8").read()
    assert page.startswith("<!doctype html>")
    # offline: no external resources (links to museum pages are fine, but nothing is loaded from the network)
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page.replace("href='http", "href='local"))
    for section in ("Overview", "Download", "Map", "Clusters", "Neighbour sheets", "Suggested tags",
                    "Vocabulary", "Latent walk"):
        assert f"<h2>{section}" in page
    # every record's thumbnail is embedded, and titles are escaped
    assert page.count("data:image/jpeg;base64,") >= 12
    assert "Title &lt;3&gt;" in page and "Title <3>" not in page


def test_report_without_tags_or_curator_sections(tmp_path):
    ctx, recs = _run_dir(tmp_path)
    from artsim.schema import records_table

    ctx.storage.write_table(records_table([{**r, "subjects": []} for r in recs]), ctx.paths.records)
    ctx.config.report.classify_vocabulary = False
    ctx.config.report.latent_walks = 0
    page = open(run_report(ctx)["report_uri"], encoding="utf-8").read()
    assert "<h2>Neighbour sheets" in page
    assert "Suggested tags" not in page and "Vocabulary" not in page and "Latent walk" not in page


def test_report_shows_the_configured_embeddings_and_links_not_the_newest(tmp_path):
    # A later experiment wrote other embeddings and links into the same run; the report follows the config (the same
    # rule the index and links stages use), so it describes the run's indexed vectors, not whatever was written last.
    ctx, recs = _run_dir(tmp_path)
    other = pa.table({"object_id": [r["object_id"] for r in recs[:4]],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(16, np.float32)), 4),
                      "model": ["other"] * 4})
    ctx.storage.write_table(other, ctx.paths.embeddings("other"))
    ctx.storage.write_table(pa.Table.from_pylist([{"object_id": recs[0]["object_id"], "neighbor_id": "x:1",
                                                   "rank": 1, "score": 0.5, "neighbor_collection": "x"}]),
                            ctx.paths.links("other"))
    summary = run_report(ctx)
    page = open(summary["report_uri"], encoding="utf-8").read()
    assert f"<code>{ctx.paths.embeddings('m')}</code>" in page
    assert f"<code>{ctx.paths.links('m')}</code>" in page
    assert "x:1" not in page

    ctx.config.index.embeddings = "not-written"  # configured but absent: the report says so instead of guessing
    page = open(run_report(ctx)["report_uri"], encoding="utf-8").read()
    assert "<h2>Overview" in page and "<h2>Neighbour sheets" not in page and "<h2>Map" not in page
