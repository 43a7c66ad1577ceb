"""Data-quality audit: plain computations on real Met images and names, and audit.json + the report section on a
run directory with planted problems (whose exact counts are known)."""
import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageEnhance

from artsim.config import config_from_dict
from artsim.curate.audit import (DuplicateFinder, dhash, hamming, name_key, phash, term_key, variant_groups)
from artsim.report.stage import run_report
from artsim.runtime import RunContext
from artsim.rundir.schema import IMAGES_SCHEMA, empty_record, records_table
from conftest import MET_SAMPLE


def _degraded(path) -> bytes:
    """A copy as another museum might publish it: half size, 8% brighter, JPEG quality 55."""
    im = Image.open(path).convert("RGB")
    im = ImageEnhance.Brightness(im.resize((im.width // 2, im.height // 2))).enhance(1.08)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=55)
    return buf.getvalue()


def test_perceptual_hashes_match_a_degraded_copy_and_separate_different_works():
    files = sorted((MET_SAMPLE / "images").glob("*.jpg"))[:24]
    copy = Image.open(io.BytesIO(_degraded(files[0])))
    assert hamming(phash(Image.open(files[0])), phash(copy)) <= 6
    assert hamming(dhash(Image.open(files[0])), dhash(copy)) <= 10
    ph = [phash(Image.open(f)) for f in files]
    distances = [hamming(ph[i], ph[j]) for i in range(len(ph)) for j in range(i + 1, len(ph))
                 if hashlib.sha256(files[i].read_bytes()).digest() != hashlib.sha256(files[j].read_bytes()).digest()]
    assert np.median(distances) > 20 and np.mean(np.array(distances) <= 6) < 0.01


def test_variant_spellings_collide_only_when_unambiguous():
    counts = Counter({"Rembrandt van Rijn": 5, "Rembrandt Harmensz. van Rijn": 2, "REMBRANDT": 1,
                      "Rijn, Rembrandt van": 1, "Jan van Eyck": 3, "Jan Steen": 2, "JAN": 1,
                      "Albrecht Dürer": 2, "Albrecht Durer (German, 1471–1528)": 1})
    groups = {g["key"]: g for g in variant_groups(counts, "creator")}
    assert {s["value"] for s in groups["rembrandt rijn"]["spellings"]} == {
        "Rembrandt van Rijn", "Rembrandt Harmensz. van Rijn", "REMBRANDT", "Rijn, Rembrandt van"}
    assert groups["rembrandt rijn"]["preferred"] == "Rembrandt van Rijn" and groups["rembrandt rijn"]["records"] == 9
    assert len(groups["albrecht durer"]["spellings"]) == 2
    assert not any("JAN" in [s["value"] for s in g["spellings"]] for g in groups.values())  # Eyck or Steen?
    assert "jan eyck" not in groups  # one spelling only: not a variant
    assert name_key("Dürer, Albrecht") == "albrecht durer"
    terms = {g["key"]: g for g in variant_groups(Counter({"Portraits": 3, "portrait": 1, "Horse.": 1, "Horses": 2,
                                                          "Glass": 1}), "term")}
    assert set(terms) == {"portrait", "horse"} and term_key("Glass") == "glass"


def test_duplicate_finder_gives_the_same_answer_in_one_pass_or_many():
    rng = np.random.default_rng(0)
    values = [f"http://h/{i}.jpg" for i in rng.integers(0, 4000, 5000)]
    ids = [f"c:{i}" for i in range(5000)]

    def batches():
        for s in range(0, 5000, 700):
            yield (pa.array(values[s:s + 700]), pa.array(ids[s:s + 700]), pa.array(["c"] * len(ids[s:s + 700])))

    truth = Counter(values)
    one = DuplicateFinder(batches, 5000, budget=10_000).run()
    many = DuplicateFinder(batches, 5000, budget=600).run()
    assert one["passes"] == 1 and many["passes"] == 9
    for got in (one, many):
        assert got["groups"] == sum(1 for c in truth.values() if c > 1)
        assert got["rows_in_groups"] == sum(c for c in truth.values() if c > 1)
        for ex in got["examples"]:
            assert ex["rows"] == truth[ex["value"]]
            assert all(values[int(w["object_id"][2:])] == ex["value"] for w in ex["works"])
        assert len(got["examples"]) == 20  # max_examples, each a real duplicate (checked above)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit") / "run"
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": "m"},
                                       "report": {"suggest_tags": False, "classify_vocabulary": False,
                                                  "latent_walks": 0}}))
    files = sorted((MET_SAMPLE / "images").glob("*.jpg"))[:10]
    creators = ["Rembrandt van Rijn", "Rembrandt Harmensz. van Rijn", "REMBRANDT", None, "Jan Steen"]
    recs, imgs = [], []
    for i, f in enumerate(files):
        coll = "a" if i < 6 else "b"
        oid = f"{coll}:{f.stem}"
        recs.append({**empty_record(), "object_id": oid, "collection": coll, "title": f"T{i}",
                     "creator": creators[i % 5], "license": "CC0" if i % 2 else None,
                     "image_url": f"http://img{i % 3}.example.org/{f.name}",
                     "subjects": ["Portraits"] if i == 0 else (["portrait"] if i == 1 else [])})
        imgs.append({"object_id": oid, "status": "ok", "url_final": recs[-1]["image_url"], "image": f.read_bytes()})
    # planted: the first image again in collection b (degraded), sharing its source URL; a repeated record id
    recs.append({**recs[0], "object_id": "b:copy", "collection": "b"})
    imgs.append({"object_id": "b:copy", "status": "ok", "url_final": "http://img0.example.org/x.jpg",
                 "image": _degraded(files[0])})
    recs.append(dict(recs[3]))
    for oid, status, host in (("a:x1", "opted_out", "img1.example.org"), ("a:x2", "robots_disallowed",
                              "img1.example.org"), ("a:x3", "not_found", "img2.example.org"),
                              ("a:x4", "timeout", "img2.example.org")):
        imgs.append({"object_id": oid, "status": status, "url_final": f"http://{host}/{oid}.jpg", "image": None})
    ctx.storage.write_table(records_table(recs), ctx.paths.records)
    rows = [{**{k: None for k in IMAGES_SCHEMA.names}, **r} for r in imgs]
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images)
    ids = [r["object_id"] for r in recs[:-1]]
    vec = np.random.default_rng(1).normal(size=(len(ids), 16)).astype(np.float32)
    vec[ids.index("b:copy")] = vec[0] + 0.01
    emb = pa.table({"object_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), 16)})
    ctx.storage.write_table(emb, ctx.paths.embeddings("m"))
    summary = run_report(ctx)
    audit = json.loads(open(summary["audit_uri"], encoding="utf-8").read())
    page = open(summary["report_uri"], encoding="utf-8").read()
    return recs, audit, page


def test_audit_counts_completeness_licences_and_duplicates(audited):
    recs, audit, page = audited
    assert audit["records"] == len(recs) == 12
    a = audit["collections"]["a"]
    a_recs = [r for r in recs if r["collection"] == "a"]
    assert a["records"] == len(a_recs) == 7
    assert a["fields"]["creator"]["present"] == sum(bool(r["creator"]) for r in a_recs)
    assert a["fields"]["title"]["share"] == 1.0 and a["fields"]["medium"]["present"] == 0
    assert a["licences"] == dict(Counter(r["license"] or "(none)" for r in a_recs))
    assert a["licence_coverage"] == round(sum(bool(r["license"]) for r in a_recs) / 7, 4)
    dup_ids = audit["duplicates"]["object_id"]
    assert dup_ids["groups"] == 1 and dup_ids["examples"][0]["value"] == recs[3]["object_id"]
    urls = audit["duplicates"]["image_url"]
    assert urls["groups"] == 2  # recs[0] and its copy; recs[3] and its repeated record
    assert {w["object_id"] for e in urls["examples"] for w in e["works"]} >= {recs[0]["object_id"], "b:copy"}


def test_audit_finds_the_planted_near_duplicate_images_with_both_thumbnails(audited):
    recs, audit, page = audited
    near = audit["near_duplicate_images"]
    assert near["images_hashed"] == 11
    pair = {(p["a"], p["b"]) for p in near["pairs"]}
    assert (recs[0]["object_id"], "b:copy") in pair or ("b:copy", recs[0]["object_id"]) in pair
    assert all(p["phash_distance"] <= 6 for p in near["pairs"])
    planted = [p for p in near["pairs"] if "b:copy" in (p["a"], p["b"])][0]
    assert planted["across_collections"]
    emb = audit["near_duplicate_embeddings"]
    assert [(p["a"], p["b"]) for p in emb["pairs"]] == [(recs[0]["object_id"], "b:copy")]
    section = page[page.index("<h2>Data-quality audit"):]
    pair_html = section[section.index("<div class='pair'>"):][:20000].split("<div class='pair'>")[1]
    assert pair_html.count("data:image/jpeg;base64,") == 2  # both thumbnails


def test_audit_variants_and_failed_links_by_host(audited):
    recs, audit, page = audited
    creator = audit["variants"]["creator"]
    assert len(creator) == 1 and {s["value"] for s in creator[0]["spellings"]} == {
        "Rembrandt van Rijn", "Rembrandt Harmensz. van Rijn", "REMBRANDT"}
    assert [g["key"] for g in audit["variants"]["term"]] == ["portrait"]
    hosts = {h["host"]: h for h in audit["image_links"]["hosts"]}
    assert hosts["img1.example.org"]["opted_out"] == 1 and hosts["img1.example.org"]["blocked"] == 1
    assert hosts["img2.example.org"]["broken"] == 2
    assert audit["image_links"]["totals"] == {"total": 15, "ok": 11, "broken": 2, "blocked": 1, "opted_out": 1,
                                              "other": 0}
    assert "Rembrandt Harmensz. van Rijn" in page and "<table class='links'>" in page
