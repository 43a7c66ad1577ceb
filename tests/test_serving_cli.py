"""`artsim query` as a user runs it: a subprocess against a built index."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from artsim.config import config_from_dict
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
from artsim.runtime import RunContext


@pytest.fixture(scope="module")
def index_uri(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("cli")
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": "test-model"}}))
    write_run(ctx.storage, ctx.paths, object_ids_for(500), clustered_vectors(500, 16, n_clusters=5, seed=1))
    return run_index(ctx)["index_uri"]


def query(*args):
    return subprocess.run([sys.executable, "-m", "artsim.cli", "query", *args], capture_output=True, text=True,
                          timeout=120)


def test_query_json_prints_k_ranked_hits_with_filters(index_uri):
    result = query("--index", index_uri, "--id", "met:0", "-k", "7", "--json", "--where", "culture!=China",
                   "--where", "date_begin>=1500")
    assert result.returncode == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 7
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert all(h["culture"] != "China" and h["date_begin"] >= 1500 and h["object_id"] != "met:0" for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    farthest = query("--index", index_uri, "--id", "met:0", "-k", "3", "--json", "--farthest")
    far = [json.loads(line) for line in farthest.stdout.splitlines()]
    assert len(far) == 3 and far[0]["score"] < hits[-1]["score"]
    table = query("--index", index_uri, "--id", "met:0", "-k", "2")
    assert table.returncode == 0 and "object_id" in table.stdout.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--id", "met:999999"], "not in index"),
    (["--id", "met:0", "--where", "colour=red"], "unknown column 'colour'"),
    (["--id", "met:0", "--where", "date_begin>=soon"], "expected a number"),
    (["--id", "met:0", "-k", "0"], "-k"),
])
def test_query_bad_input_exits_2_with_one_line(index_uri, args, message):
    result = query("--index", index_uri, *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_query_missing_index_exits_2(tmp_path):
    result = query("--index", str(tmp_path / "none"), "--id", "met:0")
    assert result.returncode == 2 and "no manifest.json" in result.stderr
