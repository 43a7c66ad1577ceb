"""Index, serving and links with run.root on S3 (moto's real S3 server on 127.0.0.1)."""
from __future__ import annotations

import os
import uuid

import boto3
import numpy as np
import pytest

from artsim.config import StorageConfig, config_from_dict
from artsim.errors import IntegrityError
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
from artsim.links.stage import run_links
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex
from artsim.storage import Storage

N, DIM = 800, 16


def test_s3_round_trip_verification_and_links(s3_endpoint, ray_session, tmp_path, monkeypatch):
    prefix = f"ix-{uuid.uuid4().hex[:8]}"
    root = f"s3://artsim-test/{prefix}"
    ctx = RunContext(config_from_dict({"run": {"root": root}, "storage": {"s3_endpoint_url": s3_endpoint},
                                       "index": {"embeddings": "test-model", "num_shards": 2},
                                       "links": {"k": 2, "batch_size": 300}}))
    vectors = clustered_vectors(N, DIM, n_clusters=8, seed=2)
    object_ids = object_ids_for(N, collections=("met", "smk"))
    write_run(ctx.storage, ctx.paths, object_ids, vectors)
    summary = run_index(ctx)
    uri = summary["index_uri"]
    assert uri == f"{root}/index/test-model"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="artsim-test", Prefix=f"{prefix}/index/")["Contents"]}
    assert f"{prefix}/index/test-model/manifest.json" in keys and f"{prefix}/index/test-model/ids.parquet" in keys

    # AWS_ENDPOINT_URL alone (no artsim config) is enough for a downstream service
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    cache = tmp_path / "cache"
    index = ShardedIndex.open(uri, cache_dir=str(cache))
    q = 17
    hits = index.search_ids([object_ids[q]], 5, where={"collection": "smk"})[0]
    scores = vectors @ vectors[q]
    allowed = np.array([o.startswith("smk:") for o in object_ids]) & (np.arange(N) != q)
    best = np.nonzero(allowed)[0][np.argsort(-scores[allowed], kind="stable")[:5]]
    assert [h["object_id"] for h in hits] == [object_ids[i] for i in best]
    assert len(os.listdir(cache)) == 3  # ids + 2 shards, named by sha256
    index.close()

    # a shard replaced on S3 is caught when it is downloaded into a fresh cache
    manifest = index.manifest
    shard_key = f"{prefix}/index/test-model/{manifest['shards'][0]['path']}"
    body = s3.get_object(Bucket="artsim-test", Key=shard_key)["Body"].read()
    s3.put_object(Bucket="artsim-test", Key=shard_key, Body=body[:-8] + b"\x00" * 8)
    with pytest.raises(IntegrityError, match="sha256"):
        ShardedIndex.open(uri, cache_dir=str(tmp_path / "fresh"))
    s3.put_object(Bucket="artsim-test", Key=shard_key, Body=body)

    # links written to S3 with the _SUCCESS marker last
    links = run_links(ctx)
    table = Storage(StorageConfig(s3_endpoint_url=s3_endpoint)).read_table(links["links_uri"])
    assert table.num_rows == N * 2 and links["links"] == N * 2
