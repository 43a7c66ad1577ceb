"""The run-directory package: torch- and Ray-free names, the one sampler, the one rule for usable embedding rows."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artsim.config import config_from_dict
from artsim.errors import ConfigError
from artsim.rundir.embeddings import iter_embedding_batches, load_embedding_matrix
from artsim.rundir.names import collection_of, embeddings_key, index_name, links_name, model_key
from artsim.rundir.sample import allocate, sample_rows, stable_hashes
from artsim.runtime import RunContext
from artsim.storage import Storage, join
from conftest import REPO


def _reference_hash(object_id: str, seed: int) -> int:
    """FNV-1a 64 over (seed as 8 little-endian bytes + UTF-8 id), then splitmix64: the documented definition."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for byte in (seed & mask).to_bytes(8, "little") + object_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    return h ^ (h >> 31)


def test_stable_hashes_match_the_definition_and_depend_on_the_seed():
    ids = ["met:1", "rijks:SK-A-1505", "", "é:ü", "x" * 300, "met:10", "met:1"]
    for seed in (0, 7, -1):
        assert stable_hashes(ids, seed).tolist() == [_reference_hash(i, seed) for i in ids]
    sliced = pa.array(["skip", *ids], pa.string()).slice(1)  # an Arrow slice (offset into the buffers)
    assert stable_hashes(sliced, 3).tolist() == stable_hashes(ids, 3).tolist()
    assert stable_hashes(ids, 0)[0] != stable_hashes(ids, 1)[0]
    # the same values in another interpreter (no Python hash(), no per-process salt)
    code = f"from artsim.rundir.sample import stable_hashes; print(stable_hashes({ids!r}, 7).tolist())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, PYTHONHASHSEED="123", PYTHONPATH=str(REPO)))
    assert json.loads(other.stdout) == stable_hashes(ids, 7).tolist(), other.stderr


def test_allocate_fills_the_budget_and_represents_every_collection():
    counts = {"big": 1_000_000, "mid": 5_000, "small": 300, "tiny": 4}
    quotas = allocate(counts, 2_000)
    assert sum(quotas.values()) == 2_000
    assert quotas["tiny"] == 4 and quotas["small"] == 100  # the floor, not the 0.6 of a share
    assert quotas["big"] > 15 * quotas["mid"] and all(quotas[c] <= counts[c] for c in counts)
    assert allocate(counts, 2_000_000) == counts  # it all fits: nothing is sampled
    assert sum(allocate({f"c{i}": 10 for i in range(50)}, 60).values()) == 60  # floor shrinks with many
    assert sum(allocate({f"c{i}": 10 for i in range(50)}, 40).values()) == 40  # more collections than budget
    assert sum(allocate({"x": 7, "y": 7}, 13).values()) == 13


def _ctx(root, **sections):
    return RunContext(config_from_dict({"run": {"root": str(root)}, **sections}))


def test_report_and_mining_pool_draw_the_same_sample(tmp_path):
    """One sampler: records/ (with a collection column) and embeddings/ (collection from the id prefix) of the
    same works give the same rows for the same budget and seed."""
    rng = np.random.default_rng(0)
    ids = [f"{c}:{i}" for c, n in {"a": 900, "b": 300, "c": 20}.items() for i in range(n)]
    ids = [ids[i] for i in rng.permutation(len(ids))]
    storage = Storage()
    rec = join(str(tmp_path), "records")
    emb = join(str(tmp_path), "emb")
    for uri, table in ((rec, pa.table({"object_id": ids, "collection": [collection_of(o) for o in ids]})),
                       (emb, pa.table({"object_id": ids,
                                       "embedding": pa.FixedSizeListArray.from_arrays(
                                           pa.array(rng.normal(size=len(ids) * 4).astype(np.float32)), 4)}))):
        with storage.atomic_dir(uri) as staging:
            for f in range(3):
                pq.write_table(table.slice(f * 420, 420), join(staging, f"part-{f}.parquet"))
    a = sample_rows(storage, storage.dataset_files(rec), 200, seed=3)
    b = sample_rows(storage, storage.dataset_files(emb), 200, seed=3)
    assert a.sampled and len(a.rows) == 200 and a.rows.tolist() == b.rows.tolist()
    assert a.quotas == b.quotas and a.quotas["c"] == 20
    assert sample_rows(storage, storage.dataset_files(rec), 200, seed=4).rows.tolist() != a.rows.tolist()


def test_usable_embedding_rows_are_one_rule(tmp_path):
    """Bad vectors (NaN, zero, wrong length), empty ids and repeated ids are skipped by the streaming reader, as
    the index stage skips them; off-unit vectors are normalised."""
    storage = Storage()
    uri = join(str(tmp_path), "emb")
    rows = [("m:1", [3.0, 4.0]), ("m:2", [float("nan"), 1.0]), ("m:3", [0.0, 0.0]), ("", [1.0, 0.0]),
            ("m:1", [0.0, 1.0]), ("m:4", [0.0, 2.0])]
    table = pa.table({"object_id": [r[0] for r in rows], "embedding": pa.array([r[1] for r in rows],
                                                                               pa.list_(pa.float32()))})
    storage.write_table(table, uri)
    ids, matrix = load_embedding_matrix(storage, uri)
    assert ids == ["m:1", "m:4"]
    np.testing.assert_allclose(matrix, [[0.6, 0.8], [0.0, 1.0]], atol=1e-6)
    from artsim.index.build import embeddings_from_table

    indexed = embeddings_from_table(table)
    assert indexed.object_ids.tolist() == ids
    assert [b[0] for b in iter_embedding_batches(storage, uri, keep={"m:4"})] == [["m:4"]]


def test_names_follow_the_config_and_need_no_model(tmp_path):
    ctx = _ctx(tmp_path, embed={"model": "resnet18", "weights": "artifacts/x/models/sim/export"})
    assert model_key(ctx.config.embed) == "resnet18-sim"
    with pytest.raises(ConfigError, match="index.embeddings"):
        embeddings_key(ctx)
    assert embeddings_key(ctx, required=False) == "resnet18-sim"
    ctx = _ctx(tmp_path, index={"embeddings": "e", "name": "idx"}, links={"name": None})
    assert embeddings_key(ctx, "e", required=False) == "e" and index_name(ctx) == "idx" == links_name(ctx)
    assert collection_of("met:1") == "met" and collection_of("met:1", "smk") == "smk" and collection_of("x") == ""


def test_rundir_imports_neither_torch_nor_ray():
    code = ("import sys, artsim.rundir.names, artsim.rundir.sample, artsim.rundir.embeddings, artsim.rundir.paths, "
            "artsim.rundir.schema, artsim.rundir.index_manifest; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'faiss')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_mine_implements_exactly_the_strategies_and_term_fields_config_accepts():
    from artsim import config
    from artsim.mine import corpus, stage

    assert set(stage.STRATEGIES) == set(config.STRATEGIES)
    assert tuple(corpus.TERM_FIELDS) == config.TERM_FIELDS
