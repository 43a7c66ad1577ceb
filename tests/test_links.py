"""Links stage: every work's top-k in each other collection equals brute force over that collection."""
from __future__ import annotations

import numpy as np
import pytest

from artsim.config import config_from_dict
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
from artsim.links.stage import run_links
from artsim.runtime import RunContext

N, DIM, K = 600, 24, 3


@pytest.fixture(scope="module")
def linked_run(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("links")
    vectors = clustered_vectors(N, DIM, n_clusters=12, seed=5)
    object_ids = object_ids_for(N, collections=("met", "smk", "rijks"))
    ctx = RunContext(config_from_dict({"run": {"root": str(root)},
                                       "index": {"embeddings": "test-model", "num_shards": 2},
                                       "links": {"k": K, "batch_size": 128, "num_tasks": 2}}))
    write_run(ctx.storage, ctx.paths, object_ids, vectors)
    run_index(ctx)
    return ctx, vectors, np.array(object_ids)


def expected_links(vectors, object_ids, include_own):
    collections = np.array([o.split(":")[0] for o in object_ids])
    out = {}
    for i, q in enumerate(vectors):
        scores = vectors @ q
        for target in sorted(set(collections)):
            if target == collections[i] and not include_own:
                continue
            candidates = np.nonzero((collections == target) & (np.arange(len(vectors)) != i))[0]
            best = candidates[np.argsort(-scores[candidates], kind="stable")[:K]]
            out[(object_ids[i], target)] = [(object_ids[j], float(scores[j])) for j in best]
    return out


@pytest.mark.parametrize("include_own", [False, True])
def test_links_equal_brute_force(linked_run, include_own):
    ctx, vectors, object_ids = linked_run
    ctx.config.links.include_own_collection = include_own
    summary = run_links(ctx)
    links = ctx.storage.read_table(summary["links_uri"])  # refuses a directory without _SUCCESS
    assert links.column_names == ["object_id", "neighbor_id", "rank", "score", "neighbor_collection"]
    got = {}
    for row in links.to_pylist():
        got.setdefault((row["object_id"], row["neighbor_collection"]), []).append(row)
    want = expected_links(vectors, object_ids, include_own)
    assert set(got) == set(want)
    for key, rows in got.items():
        rows.sort(key=lambda r: r["rank"])
        assert [r["rank"] for r in rows] == list(range(1, K + 1))
        assert [r["neighbor_id"] for r in rows] == [o for o, _ in want[key]], key
        np.testing.assert_allclose([r["score"] for r in rows], [s for _, s in want[key]], atol=1e-5)
        assert all(r["neighbor_id"].split(":")[0] == key[1] for r in rows)
    per_object = 3 if include_own else 2
    assert summary["links"] == links.num_rows == N * per_object * K
    assert summary["works"] == N
    assert sum(p["links"] for p in summary["pairs"].values()) == links.num_rows
    if not include_own:
        assert "met->met" not in summary["pairs"] and summary["pairs"]["met->smk"]["links"] == 200 * K
