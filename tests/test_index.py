"""Index stage + ShardedIndex on an exact (Flat) index: results must equal (filtered) brute force exactly."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from artsim.config import config_from_dict
from artsim.errors import ArtsimError, IntegrityError
from artsim.index.stage import run_index
from artsim.serving.shards import sha256_file
from artsim.testing.index_data import clustered_vectors, object_ids_for, records_for, write_run
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex, parse_where

N, DIM = 3000, 32


def make_ctx(root, **index):
    index = {"embeddings": "test-model", "num_shards": 3, **index}
    return RunContext(config_from_dict({"run": {"root": str(root)}, "index": index}))


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("run")
    ctx = make_ctx(root)
    vectors = clustered_vectors(N, DIM, n_clusters=30, seed=3)
    object_ids = object_ids_for(N)
    records = records_for(object_ids, seed=3)
    write_run(ctx.storage, ctx.paths, object_ids, vectors, records=records)
    summary = run_index(ctx)
    index = ShardedIndex.open(summary["index_uri"])
    yield {"ctx": ctx, "summary": summary, "index": index, "vectors": vectors, "object_ids": np.array(object_ids),
           "records": records.to_pylist()}
    index.close()


def brute_force(vectors, queries, allowed, k, farthest=False, exclude=None):
    """Reference ranking computed from the raw vectors: indexes (into vectors) and scores per query."""
    out = []
    for qi, q in enumerate(queries):
        scores = vectors @ q
        candidates = np.nonzero(allowed)[0]
        if exclude is not None:
            candidates = candidates[candidates != exclude[qi]]
        order = candidates[np.argsort(scores[candidates] if farthest else -scores[candidates], kind="stable")]
        out.append([(int(i), float(scores[i])) for i in order[:k]])
    return out


def assert_same(hits, expected, object_ids):
    assert len(hits) == len(expected)
    for got, want in zip(hits, expected):
        assert [h["object_id"] for h in got] == [object_ids[i] for i, _ in want]
        assert [h["rank"] for h in got] == list(range(1, len(want) + 1))
        np.testing.assert_allclose([h["score"] for h in got], [s for _, s in want], rtol=0, atol=1e-5)


def test_build_writes_manifest_ids_and_verified_shards(built):
    ctx, summary = built["ctx"], built["summary"]
    index_dir = summary["index_uri"]
    manifest = json.load(open(os.path.join(index_dir, "manifest.json")))
    assert manifest["factory"] == "IDMap2,Flat" and manifest["dim"] == DIM and manifest["ntotal"] == N
    assert manifest["metric"] == "inner_product" and len(manifest["shards"]) == 3
    assert sum(s["ntotal"] for s in manifest["shards"]) == N
    for shard in manifest["shards"]:
        assert sha256_file(os.path.join(index_dir, shard["path"])) == shard["sha256"]
    assert manifest["recall_at_10"] == 1.0 and manifest["tuning"]["target_reached"]
    assert manifest["latency_ms"]["p50_ms"] > 0
    ids = pq.read_table(os.path.join(index_dir, manifest["ids"]))
    for column in ("id", "object_id", "collection", "creator", "culture", "object_type", "title", "date_begin"):
        assert column in ids.column_names
    assert ids.num_rows == N and len(set(ids.column("id").to_pylist())) == N
    by_id = {r["object_id"]: r for r in built["records"]}
    for row in ids.slice(0, 50).to_pylist():
        assert row["culture"] == by_id[row["object_id"]]["culture"]
    assert summary["vectors"] == N and summary["recall_at_10"] == 1.0


def test_unfiltered_search_equals_brute_force(built):
    rng = np.random.default_rng(0)
    queries = clustered_vectors(5, DIM, n_clusters=30, seed=3)[:5] + 0.01 * rng.standard_normal((5, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    hits = built["index"].search(queries, 10)
    assert_same(hits, brute_force(built["vectors"], queries, np.ones(N, bool), 10), built["object_ids"])


WHERES = [
    ({"culture": "China"}, lambda r: r["culture"] == "China"),
    ({"culture": ["China", "Japan"]}, lambda r: r["culture"] in ("China", "Japan")),
    ({"culture": {"not": "China"}}, lambda r: r["culture"] != "China"),
    ({"date_begin": {">=": 1800, "<": 1850}}, lambda r: 1800 <= r["date_begin"] < 1850),
    ({"collection": "smk", "object_type": {"not": ["vase", "print"]}, "license": "CC0"},
     lambda r: r["collection"] == "smk" and r["object_type"] not in ("vase", "print") and r["license"] == "CC0"),
    ({"creator": "Artist 7", "culture": "Egypt"}, lambda r: r["creator"] == "Artist 7" and r["culture"] == "Egypt"),
]


@pytest.mark.parametrize("path", ["exact_subset", "id_selector"])
@pytest.mark.parametrize("case", range(len(WHERES)))
def test_conditional_search_equals_filtered_brute_force(built, case, path):
    where, predicate = WHERES[case]
    index = built["index"]
    index._subsets.clear()
    index.exact_subset_max_bytes = 512 * 1024 ** 2 if path == "exact_subset" else 0  # 0: always IDSelectorBatch
    try:
        allowed = np.array([predicate(r) for r in built["records"]])
        assert 0 < allowed.sum() < N
        queries = built["vectors"][[5, 500, 2500]]
        expected = brute_force(built["vectors"], queries, allowed, 8, exclude=[5, 500, 2500])
        hits = index.search_ids(list(built["object_ids"][[5, 500, 2500]]), 8, where=where)
        assert_same(hits, expected, built["object_ids"])
        subset = index._subset(where)
        assert (subset.vectors is not None) == (path == "exact_subset")
        farthest = index.farthest(queries, 5, where=where)
        assert_same(farthest, brute_force(built["vectors"], queries, allowed, 5, farthest=True), built["object_ids"])
    finally:
        index.exact_subset_max_bytes = 512 * 1024 ** 2
        index._subsets.clear()


def test_search_ids_excludes_the_query_and_carries_metadata(built):
    index, object_ids = built["index"], built["object_ids"]
    hits = index.search_ids([object_ids[42]], 5)[0]
    assert len(hits) == 5 and object_ids[42] not in [h["object_id"] for h in hits]
    assert all({"object_id", "score", "rank", "collection", "culture", "title"} <= set(h) for h in hits)
    assert [h["score"] for h in hits] == sorted([h["score"] for h in hits], reverse=True)
    # another culture than the query's own: MosAIC's conditional retrieval
    own = index.metadata(object_ids[42])["culture"]
    other = index.search_ids([object_ids[42]], 5, where={"culture": {"not": own}})[0]
    assert other and all(h["culture"] != own for h in other)


def test_empty_subset_and_small_subset_return_what_exists(built):
    index, object_ids = built["index"], built["object_ids"]
    assert index.search_ids([object_ids[0]], 5, where={"culture": "Atlantis"}) == [[]]
    one = [r for r in built["records"] if r["creator"] == "Artist 1" and r["culture"] == "Italy"
           and r["object_type"] == "vase" and r["license"] == "PDM"]
    where = {"creator": "Artist 1", "culture": "Italy", "object_type": "vase", "license": "PDM"}
    hits = index.search(built["vectors"][:1], 50, where=where)[0]
    assert sorted(h["object_id"] for h in hits) == sorted(r["object_id"] for r in one)


def test_bad_queries_raise_clear_errors(built):
    index = built["index"]
    with pytest.raises(ArtsimError, match="unknown column 'colour'"):
        index.search(built["vectors"][:1], 3, where={"colour": "red"})
    with pytest.raises(ArtsimError, match="range >= needs a numeric column"):
        index.search(built["vectors"][:1], 3, where={"culture": {">=": 3}})
    with pytest.raises(ArtsimError, match="not in index"):
        index.search_ids(["nowhere:1"], 3)
    with pytest.raises(ArtsimError, match="shape"):
        index.search(np.ones((1, DIM + 1)), 3)
    with pytest.raises(ArtsimError, match="k must be"):
        index.search(built["vectors"][:1], 0)


def test_parse_where_syntax():
    assert parse_where(["culture=China|Japan", "culture!=Korea", "date_begin>=1800", "date_end<1900"]) == {
        "culture": {"in": ["China", "Japan"], "not": ["Korea"]}, "date_begin": {">=": 1800}, "date_end": {"<": 1900}}
    assert parse_where(["date_begin=1500..1600"]) == {"date_begin": {">=": 1500, "<=": 1600}}
    for bad in ["culture", "=x", "date_begin>=soon", "culture="]:
        with pytest.raises(ArtsimError):
            parse_where([bad])


def _copy_index(built, tmp_path):
    dest = tmp_path / "index"
    shutil.copytree(built["summary"]["index_uri"], dest)
    return dest, json.load(open(dest / "manifest.json"))


def test_tampered_shard_is_rejected_before_loading(built, tmp_path):
    dest, manifest = _copy_index(built, tmp_path)
    shard = dest / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        ShardedIndex.open(str(dest))


def test_truncated_shard_and_tampered_ids_are_rejected(built, tmp_path):
    dest, manifest = _copy_index(built, tmp_path)
    shard = dest / manifest["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="truncated"):
        ShardedIndex.open(str(dest))
    dest2, manifest2 = _copy_index(built, tmp_path / "b")
    ids = dest2 / manifest2["ids"]
    data = bytearray(ids.read_bytes())
    data[100] ^= 0x01
    ids.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        ShardedIndex.open(str(dest2))


def test_manifest_pointing_outside_the_index_is_rejected(built, tmp_path):
    dest, manifest = _copy_index(built, tmp_path)
    manifest["shards"][0]["path"] = "../../etc/passwd"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="plain relative path"):
        ShardedIndex.open(str(dest))
    with pytest.raises(ArtsimError, match="no manifest.json"):
        ShardedIndex.open(str(tmp_path / "nothing-here"))


def test_incremental_build_keeps_old_ids_and_never_reuses_retired_ones(tmp_path, ray_session):
    ctx = make_ctx(tmp_path, num_shards=2)
    vectors = clustered_vectors(1500, 16, n_clusters=10, seed=9)
    first = object_ids_for(1000)
    write_run(ctx.storage, ctx.paths, first, vectors[:1000])
    uri = run_index(ctx)["index_uri"]
    before = dict(zip(*[pq.read_table(os.path.join(uri, "ids.parquet")).column(c).to_pylist()
                        for c in ("object_id", "id")]))
    # second run: 200 works removed, 500 new ones, one bad vector and one duplicate row
    kept = first[200:]
    new = object_ids_for(500, start=1000)
    vecs = np.concatenate([vectors[200:1000], vectors[1000:1500]])
    vecs[-1] = np.nan
    object_ids = kept + new
    object_ids_dup = object_ids + [kept[0]]
    vecs_dup = np.concatenate([vecs, vecs[:1]])
    write_run(ctx.storage, ctx.paths, object_ids_dup, vecs_dup)
    summary = run_index(ctx)
    assert summary["reused_ids"] == 800 and summary["new_ids"] == 499
    assert summary["skipped"] == {"bad_vector_or_id": 1, "duplicate_object_id": 1}
    after = dict(zip(*[pq.read_table(os.path.join(uri, "ids.parquet")).column(c).to_pylist()
                       for c in ("object_id", "id")]))
    assert all(after[o] == before[o] for o in kept)
    assert min(after[o] for o in new[:-1]) > max(before.values())  # retired ids 0..199 stay retired
    assert new[-1] not in after
    index = ShardedIndex.open(uri)
    hits = index.search_ids([new[0]], 1)[0]
    assert hits[0]["score"] > 0.5  # the new vectors are searchable
    shard_dirs = os.listdir(os.path.join(uri, "shards"))
    assert len(shard_dirs) == 2  # this build and the previous one (a reader may still hold its manifest)


def test_id_table_joins_only_the_wanted_record_columns(tmp_path):
    import pyarrow as pa

    from artsim.errors import ConfigError
    from artsim.index.build import id_table, read_record_columns
    from artsim.rundir.schema import empty_record, records_table
    from artsim.storage import Storage

    storage = Storage()
    uri = str(tmp_path / "records")
    recs = [{**empty_record(), "object_id": "met:1", "collection": "met", "culture": "French", "creator": "A"},
            {**empty_record(), "object_id": "met:1", "collection": "met", "culture": "Dutch", "creator": "B"},
            {**empty_record(), "object_id": "smk:2", "collection": "smk", "culture": None, "creator": "C"}]
    storage.write_table(records_table(recs), uri)
    records = read_record_columns(storage, uri, ["collection", "culture"], ["creator"])
    assert records.column_names == ["object_id", "collection", "culture", "creator"]  # not the whole schema
    with pytest.raises(ConfigError, match=r"index.facets: column 'museum' is not in records/"):
        read_record_columns(storage, uri, ["museum"], [])

    table = id_table(np.array([7, 3, 5]), pa.array(["met:1", "smk:2", "rijks:9"]), np.array([0, 1, 0]), records,
                     ["collection", "culture"], ["creator"])
    rows = {r["object_id"]: r for r in table.to_pylist()}
    assert table.column("id").to_pylist() == [3, 5, 7]  # sorted by id
    assert rows["met:1"]["culture"] == "French" and rows["met:1"]["creator"] == "A"  # repeated record: first wins
    assert rows["rijks:9"]["collection"] == "rijks" and rows["rijks:9"]["culture"] is None  # no record: id prefix
    assert rows["smk:2"]["shard"] == 1


def test_nothing_indexable_is_a_plain_error_from_the_plan_task(tmp_path, ray_session):
    """Every vector is zero: the plan task (a Ray task) finds no row to index; the user gets the ArtsimError itself,
    not a Ray traceback wrapping it, and nothing is published."""
    import ray

    ctx = make_ctx(tmp_path)
    object_ids = object_ids_for(50)
    write_run(ctx.storage, ctx.paths, object_ids, np.zeros((50, 8), np.float32), records=records_for(object_ids))
    with pytest.raises(ArtsimError, match="no row of .* has a valid vector") as info:
        run_index(ctx)
    assert not isinstance(info.value, ray.exceptions.RayTaskError)
    assert not os.path.exists(os.path.join(ctx.paths.index("test-model"), "manifest.json"))
