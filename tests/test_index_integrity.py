"""Checksums come before parsing: a shard or id map with one flipped byte in the middle is refused with an
IntegrityError while FAISS and pyarrow's readers have not been called once (every reader entry point is wrapped
and its calls recorded), locally (read in place) and from S3 (through the cache)."""
from __future__ import annotations

import shutil
import uuid

import faiss
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest

from artsim.config import config_from_dict
from artsim.errors import IntegrityError
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex, read_index_ids

READERS = [(faiss, "read_index"), (faiss, "deserialize_index"), (faiss, "read_index_binary"),
           (pq, "read_table"), (pq, "ParquetFile"), (pq, "read_metadata"), (pq, "read_schema"),
           (pq, "ParquetDataset"), (pyarrow.dataset, "dataset")]


@pytest.fixture
def parse_calls(monkeypatch):
    """Every call into the FAISS and pyarrow readers, in order: [(name, first argument)]."""
    calls = []
    for module, name in READERS:
        real = getattr(module, name)

        def recorder(*args, _real=real, _name=f"{module.__name__}.{name}", **kwargs):
            calls.append((_name, args[0] if args else None))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorder)
    return calls


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("integrity")
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": "test-model",
                                                                             "num_shards": 2}}))
    write_run(ctx.storage, ctx.paths, object_ids_for(600), clustered_vectors(600, 32, n_clusters=4, seed=5))
    return run_index(ctx)["index_uri"]


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def _target(index_dir, which):
    manifest = ShardedIndex.open(str(index_dir)).manifest
    return index_dir / (manifest["ids"] if which == "ids" else manifest["shards"][1]["path"])


@pytest.mark.parametrize("which", ["shard", "ids"])
def test_flipped_byte_local_is_refused_before_any_parse(built, tmp_path, parse_calls, which):
    index_dir = tmp_path / "test-model"
    shutil.copytree(built, index_dir)
    ShardedIndex.open(str(index_dir)).close()
    assert any(n == "faiss.read_index" for n, _ in parse_calls)  # control: the recorder sees real parses
    assert any(n == "pyarrow.parquet.read_table" for n, _ in parse_calls)
    target = _target(index_dir, which)
    _flip(target)
    if which == "shard":  # the reason checksums must come first: FAISS parses a Flat shard with a flipped byte
        assert faiss.read_index(str(target)).ntotal > 0
    parse_calls.clear()
    with pytest.raises(IntegrityError, match="sha256"):
        ShardedIndex.open(str(index_dir))
    assert parse_calls == []
    if which == "ids":
        with pytest.raises(IntegrityError, match="sha256"):
            read_index_ids(str(index_dir))
        assert parse_calls == []


@pytest.mark.parametrize("which", ["shard", "ids"])
def test_flipped_byte_on_s3_is_refused_before_any_parse(built, tmp_path, s3_endpoint, monkeypatch, parse_calls,
                                                        which):
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = f"integrity-{uuid.uuid4().hex[:8]}/index/test-model"
    local = tmp_path / "test-model"
    shutil.copytree(built, local)
    _flip(_target(local, which))
    for path in local.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "artsim-test", f"{prefix}/{path.relative_to(local).as_posix()}")
    parse_calls.clear()
    with pytest.raises(IntegrityError, match="sha256"):
        ShardedIndex.open(f"s3://artsim-test/{prefix}", cache_dir=str(tmp_path / "cache"))
    assert parse_calls == []
