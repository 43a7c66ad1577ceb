"""The report stage on a small run directory written by hand (real images from the Met sample)."""
import hashlib
import re

import numpy as np
import pyarrow as pa
import pytest

from artsim.config import config_from_dict
from artsim.report.stage import run_report
from artsim.runtime import RunContext
from artsim.rundir.schema import IMAGES_SCHEMA, empty_record, records_table
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
    from artsim.rundir.schema import records_table

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


# -- runs larger than report.max_works: a sample for the map & co., whole-run counts and sheets --------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from artsim.report.inputs import read_sample_vectors, report_sample, strongest_links  # noqa: E402
from artsim.rundir.sample import allocate, stable_hashes  # noqa: E402
from artsim.storage import join  # noqa: E402
from conftest import REPO  # noqa: E402

SIZES = {"a": 1500, "b": 600, "c": 250, "d": 12}  # uneven on purpose: "d" must still be in the sample


def _big_run(root, sizes=SIZES, dim=16, emb_files=5, max_works=200, seed=0, dtype=np.float16, row_group=128):
    """A run directory with sum(sizes) works spread over several records / embeddings / links files (collections
    interleaved), 3 cross-collection links per work with distinct rank-1 scores; no images."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"{c}:{i}" for c, n in sizes.items() for i in range(n)], dtype=object)
    ids = ids[rng.permutation(len(ids))]
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": "m"},
                                       "report": {"max_works": max_works, "classify_vocabulary": False}}))
    subjects = ["Horses", "Landscapes", "Portraits", "Ships"]
    recs = [{**empty_record(), "object_id": o, "collection": o.split(":")[0], "title": f"T {o}",
             "subjects": [subjects[i % 4], subjects[(i // 4) % 4]][: i % 3]} for i, o in enumerate(ids)]
    ctx.storage.write_table(records_table(recs), ctx.paths.records, rows_per_file=700)
    vectors = rng.normal(size=(len(ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    per = -(-len(ids) // emb_files)
    with ctx.storage.atomic_dir(ctx.paths.embeddings("m")) as staging:
        for f in range(emb_files):
            part = slice(f * per, (f + 1) * per)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors[part].astype(dtype).ravel()), dim)
            pq.write_table(pa.table({"object_id": pa.array(ids[part].tolist(), pa.string()), "embedding": emb}),
                           join(staging, f"part-{f:05d}.parquet"), row_group_size=row_group)
    collection = np.array([o.split(":")[0] for o in ids])
    top_scores = rng.permutation(len(ids)) / len(ids) * 0.5 + 0.45  # distinct, so "strongest" is unambiguous
    links = {"object_id": [], "neighbor_id": [], "rank": [], "score": [], "neighbor_collection": []}
    for i, o in enumerate(ids):
        others = np.flatnonzero(collection != collection[i])
        for rank, j in enumerate(rng.choice(others, 3, replace=False), 1):
            links["object_id"].append(o)
            links["neighbor_id"].append(ids[j])
            links["rank"].append(rank)
            links["score"].append(float(top_scores[i]) - 0.01 * rank)
            links["neighbor_collection"].append(collection[j])
    ctx.storage.write_table(pa.table(links), ctx.paths.links("m"), rows_per_file=2000)
    return ctx, ids, vectors


def _expected_sample(ids, max_works):
    """Brute force over all ids at once: per collection, the quota of ids with the smallest hash."""
    hashes = stable_hashes(pa.array(ids.tolist()), 0)
    collection = np.array([o.split(":")[0] for o in ids])
    quotas = allocate({c: int((collection == c).sum()) for c in sorted(set(collection))}, max_works)
    out = set()
    for c, q in quotas.items():
        mine = np.flatnonzero(collection == c)
        out |= set(ids[mine[np.argsort(hashes[mine], kind="stable")[:q]]].tolist())
    return out


def test_large_run_report_uses_a_deterministic_stratified_sample(tmp_path):
    ctx, ids, _ = _big_run(tmp_path / "run")
    total = sum(SIZES.values())
    summary = run_report(ctx)
    assert summary["works"] == total and summary["sampled"] and summary["sampled_works"] == 200
    page = open(summary["report_uri"], encoding="utf-8").read()
    assert f"200 of {total:,} works, sampled per collection" in page
    # counts describe the whole run; the "in the sample" column shows every collection represented
    in_sample = dict(re.findall(r"<tr><td>(\w)</td><td>\d+</td><td>(\d+)</td></tr>", page))
    for c, n in SIZES.items():
        assert re.search(rf"<tr><td>{c}</td><td>{n}</td><td>\d+</td></tr>", page)
        assert int(in_sample[c]) >= 1
    assert sum(int(v) for v in in_sample.values()) == 200
    assert f"<li>records: {total}</li>" in page and f"({total} works)" in page
    for section in ("Map", "Clusters", "Neighbour sheets", "Suggested tags", "Latent walk"):
        assert f"<h2>{section}" in page

    # the sample read is exactly the brute-force one, and only its rows were read
    _, sample = report_sample(ctx, 200)
    got_ids, got_vectors = read_sample_vectors(ctx.storage, sample)
    assert set(got_ids) == _expected_sample(ids, 200) and len(got_ids) == 200
    assert got_vectors.shape == (200, 16)
    # deterministic: the same run again, and the same works split into other files, give the same sample
    _, again = report_sample(ctx, 200)
    assert again.rows.tolist() == sample.rows.tolist()
    ctx2, ids2, _ = _big_run(tmp_path / "run2", emb_files=3, row_group=50)
    assert set(read_sample_vectors(ctx2.storage, report_sample(ctx2, 200)[1])[0]) == set(got_ids)


def test_large_run_sheets_are_the_strongest_links_of_the_whole_table(tmp_path):
    ctx, ids, _ = _big_run(tmp_path / "run")
    links = ctx.storage.read_table(ctx.paths.links("m"))
    top = links.filter(pc.equal(links["rank"], 1))
    expected = top.take(pc.sort_indices(top, sort_keys=[("score", "descending")])).column("object_id")
    expected = expected.to_pylist()[:12]
    assert strongest_links(ctx.storage, ctx.paths.links("m"), 12) == expected
    page = open(run_report(ctx)["report_uri"], encoding="utf-8").read()
    sheets = page[page.index("<h2>Neighbour sheets"):]
    sheets = sheets[:sheets.index("<h2>", 4)]
    assert re.findall(r"<b>work</b><br>([^<]+)<br>", sheets) == expected
    # each sheet shows that object's own links, in rank order (then its farthest works, when it is sampled)
    first = links.filter(pc.equal(links["object_id"], expected[0])).sort_by("rank").column("neighbor_id")
    row = sheets.split("<div class='sheet-page'>")[1].split("<h4>farthest")[0]
    assert re.findall(r"</b><br>([^<]+)<br>", row) == [expected[0]] + first.to_pylist()


def test_strongest_links_ties_keep_table_order(tmp_path):
    ctx = RunContext(config_from_dict({"run": {"root": str(tmp_path / "run")}}))
    table = pa.table({"object_id": ["x:1", "x:2", "x:3", "x:4", "x:5"], "rank": [1, 1, 2, 1, 1],
                      "score": [0.5, 0.9, 0.99, 0.9, float("nan")]})
    ctx.storage.write_table(table, ctx.paths.links("t"), rows_per_file=2)
    assert strongest_links(ctx.storage, ctx.paths.links("t"), 3) == ["x:2", "x:4", "x:1"]
    assert strongest_links(ctx.storage, ctx.paths.links("t"), 10) == ["x:2", "x:4", "x:1", "x:5"]


MEMORY_CHILD = r"""
import json, os, sys, tracemalloc
import numpy as np
import pyarrow as pa
from artsim.config import config_from_dict
from artsim.runtime import RunContext
root, mode = sys.argv[1:3]
ctx = RunContext(config_from_dict({"run": {"root": root}, "index": {"embeddings": "m"},
                                   "report": {"max_works": 1000, "classify_vocabulary": False}}))
from artsim.report.stage import run_report
run_report(ctx)  # warm-up: lazily imported modules (matplotlib, faiss) are not what is measured
proxy = pa.proxy_memory_pool(pa.default_memory_pool())
pa.set_memory_pool(proxy)  # counts what Arrow allocates from here on (Parquet reads included)
tracemalloc.start()  # numpy reports its buffers to tracemalloc, Python objects are traced anyway
if mode == "run_report":
    works = run_report(ctx)["sampled_works"]
else:  # the whole matrix in memory, as the report stage did before
    table = ctx.storage.read_table(ctx.paths.embeddings("m"), columns=["object_id", "embedding"])
    emb = table.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, emb.type.list_size)
    works = len(vectors)
print("RESULT " + json.dumps({"works": works, "traced_peak": tracemalloc.get_traced_memory()[1],
                              "arrow_peak": proxy.max_memory()}), flush=True)
os._exit(0)  # skip interpreter teardown: Arrow buffers may outlive the proxy pool
"""


def _report_peaks(root, mode):
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(root), mode], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_large_run_driver_memory_stays_far_below_the_vectors(tmp_path):
    n_sizes = {"a": 30_000, "b": 15_000, "c": 3_000}
    dim = 256
    _big_run(tmp_path / "run", sizes=n_sizes, dim=dim, emb_files=4, max_works=1000, dtype=np.float32,
             row_group=2048)
    vector_bytes = sum(n_sizes.values()) * dim * 4  # 47 MiB of float32
    cap = vector_bytes // 4
    sampled = _report_peaks(tmp_path / "run", "run_report")
    assert sampled["works"] == 1000
    assert sampled["traced_peak"] < cap, sampled
    assert sampled["arrow_peak"] < cap, sampled
    # the same measure sees the vectors when the driver does load them all: the checks above can fail
    whole = _report_peaks(tmp_path / "run", "whole_matrix")
    # (half the vectors is plenty to show that: twice the cap, without betting on allocator overheads)
    assert whole["traced_peak"] > vector_bytes // 2 and whole["arrow_peak"] > vector_bytes // 2, whole
    print(f"report driver peaks, MiB: sampled numpy/Python {sampled['traced_peak'] / 2**20:.1f}, Arrow "
          f"{sampled['arrow_peak'] / 2**20:.1f}; whole matrix {whole['traced_peak'] / 2**20:.1f}, "
          f"{whole['arrow_peak'] / 2**20:.1f}; vectors {vector_bytes / 2**20:.1f}")


def test_chosen_sheets_and_walk_from_the_command_line(tmp_path):
    import yaml

    from artsim.cli import main
    from artsim.errors import ArtsimError

    ctx, recs = _run_dir(tmp_path)
    a, b, c = recs[1]["object_id"], recs[10]["object_id"], recs[4]["object_id"]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"root": ctx.paths.root}, "index": {"embeddings": "m"},
                                   "report": {"classify_vocabulary": False, "suggest_tags": False,
                                              "latent_walks": 0}}))
    assert main(["report", "-c", str(cfg), "--walk", a, b, "--sheet", c, "--sheet", "cluster:1"]) == 0
    report_dir = tmp_path / "run" / "reports" / "report"
    page = (report_dir / "index.html").read_text(encoding="utf-8")
    assert f"<h2>Latent walk: {a} → {b}</h2>" in page
    sheets = (report_dir / "sheets.html").read_text(encoding="utf-8")
    assert sheets.count("<div class='sheet-page'>") == 2 and "@page" in sheets and "break-after: page" in sheets
    first = sheets.split("<div class='sheet-page'>")[1]
    assert f"<b>work</b><br>{c}<br>" in first
    # farthest works are in other collections and ordered from the least similar
    far = re.findall(r"<b>(-?\d\.\d{3})</b><br>(\w+):", first.split("<h4>farthest")[1])
    assert far and all(coll != c.split(":")[0] for _, coll in far)
    assert [float(s) for s, _ in far] == sorted(float(s) for s, _ in far)
    assert "cluster 1:" in sheets.split("<div class='sheet-page'>")[2]

    ctx.config.report.walk = [a, "x:not-embedded"]
    with pytest.raises(ArtsimError, match="x:not-embedded.*no embedding"):
        run_report(ctx)
    ctx.config.report.walk = []
    ctx.config.report.sheets = ["cluster:99"]
    with pytest.raises(ArtsimError, match="cluster:99 does not exist"):
        run_report(ctx)
    assert main(["report", "-c", str(cfg), "--sheet", "cluster:x"]) == 2  # a config error, named
