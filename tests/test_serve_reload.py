"""Hot reload from S3 (moto's server on 127.0.0.1): a new build under the same URI is verified and swapped in,
in-flight requests finish on the old version, a corrupt new version is refused and the old one keeps serving, and
`artsim serve --poll-seconds` notices a new build by itself."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import pytest

from artsim.config import config_from_dict
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, object_ids_for, write_run
from artsim.runtime import RunContext
from artsim.serve.app import create_app
from artsim.serve.registry import IndexRegistry
from conftest import free_port
from serve_util import call, running

DIM = 16


def _build(root, endpoint, n, collection, seed):
    ctx = RunContext(config_from_dict({"run": {"root": root}, "storage": {"s3_endpoint_url": endpoint},
                                       "index": {"embeddings": "test-model", "num_shards": 2}}))
    vectors = clustered_vectors(n, DIM, n_clusters=5, seed=seed)
    object_ids = object_ids_for(n, collections=(collection,))
    write_run(ctx.storage, ctx.paths, object_ids, vectors)
    return run_index(ctx)["index_uri"], vectors, object_ids


def _flip_middle_byte(s3, key):
    body = bytearray(s3.get_object(Bucket="artsim-test", Key=key)["Body"].read())
    original = bytes(body)
    body[len(body) // 2] ^= 0xFF
    s3.put_object(Bucket="artsim-test", Key=key, Body=bytes(body))
    return original


def test_reload_swaps_verified_versions_and_refuses_corrupt_ones(s3_endpoint, ray_session, tmp_path, monkeypatch,
                                                                 caplog):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    prefix = f"reload-{uuid.uuid4().hex[:8]}"
    root = f"s3://artsim-test/{prefix}"
    uri, v1_vectors, v1_ids = _build(root, s3_endpoint, 300, "met", seed=1)
    cache = tmp_path / "cache"
    registry = IndexRegistry([uri], cache_dir=str(cache), poll_seconds=0, retry_refused_seconds=0)
    slot = registry.slot("test-model")
    v1 = slot.index
    v1_files = v1.files()

    entered, release = threading.Event(), threading.Event()

    class BlockingTextEmbedder:  # holds a request inside the old version until the test lets it go
        def embed_texts(self, texts):
            entered.set()
            assert release.wait(120)
            return v1_vectors[[int(t) for t in texts]]

    v1.attach_embedder(BlockingTextEmbedder())
    with running(create_app(registry)) as port:
        in_flight = {}
        request = threading.Thread(target=lambda: in_flight.update(
            answer=call(port, "POST", "/v1/test-model/neighbors?k=5", {"text": "7"})))
        request.start()
        assert entered.wait(60)  # the request now holds a lease on version 1

        uri2, v2_vectors, v2_ids = _build(root, s3_endpoint, 400, "smk", seed=2)
        assert uri2 == uri
        assert registry.check_now() == {"test-model": "reloaded"}
        health = call(port, "GET", "/health")[1]["indexes"][0]
        assert health["vectors"] == 400 and health["version"] == slot.index.version != v1.version
        status, body = call(port, "GET", "/v1/test-model/neighbors?id=smk:3&k=3")
        assert status == 200 and all(h["object_id"].startswith("smk:") for h in body["results"])
        assert all(os.path.exists(p) for p in v1_files)  # still in use by the in-flight request

        release.set()
        request.join(timeout=60)
        status, body = in_flight["answer"]
        assert status == 200 and body["results"][0]["object_id"] == v1_ids[7]  # answered by version 1
        assert all(h["object_id"].startswith("met:") for h in body["results"])
        # its last lease ended: version 1 is closed and its cache files (none shared with version 2) are gone
        assert not any(os.path.exists(p) for p in v1_files)
        assert all(os.path.exists(p) for p in slot.index.files())

        # a new build whose shard is corrupted on S3: refused, logged, version 2 keeps serving
        v2_version = slot.index.version
        uri3, _, _ = _build(root, s3_endpoint, 350, "rijks", seed=3)
        s3 = boto3.client("s3", endpoint_url=s3_endpoint)
        manifest = registry.storage.read_json(f"{uri}/manifest.json")
        shard_key = f"{prefix}/index/test-model/{manifest['shards'][1]['path']}"
        original = _flip_middle_byte(s3, shard_key)
        with caplog.at_level(logging.ERROR, logger="artsim.serve"):
            assert registry.check_now() == {"test-model": "refused"}
        assert any("refused new version" in r.getMessage() and "sha256" in r.getMessage() for r in caplog.records)
        health = call(port, "GET", "/health")[1]["indexes"][0]
        assert health["version"] == v2_version and health["vectors"] == 400
        assert "IntegrityError" in health["last_refused"]["error"]
        status, body = call(port, "GET", "/v1/test-model/neighbors?id=smk:3&k=3")
        assert status == 200 and body["results"][0]["object_id"].startswith("smk:")

        # the shard repaired: the same version is tried again and served
        s3.put_object(Bucket="artsim-test", Key=shard_key, Body=original)
        assert registry.check_now() == {"test-model": "reloaded"}
        health = call(port, "GET", "/health")[1]["indexes"][0]
        assert health["vectors"] == 350 and health["last_refused"] is None
    registry.close()


def test_refused_version_waits_before_retry(s3_endpoint, ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    prefix = f"retry-{uuid.uuid4().hex[:8]}"
    root = f"s3://artsim-test/{prefix}"
    uri, _, _ = _build(root, s3_endpoint, 200, "met", seed=4)
    registry = IndexRegistry([uri], cache_dir=str(tmp_path / "c"), poll_seconds=0, retry_refused_seconds=3600)
    _build(root, s3_endpoint, 250, "met", seed=5)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    manifest = registry.storage.read_json(f"{uri}/manifest.json")
    _flip_middle_byte(s3, f"{prefix}/index/test-model/{manifest['ids']}")  # the id map this time
    assert registry.check_now() == {"test-model": "refused"}
    assert registry.check_now() == {"test-model": "refused"}  # not downloaded again within the retry period
    assert registry.slot("test-model").index.ntotal == 200
    registry.close()


def test_cli_poller_notices_a_new_build(s3_endpoint, ray_session, tmp_path):
    prefix = f"poll-{uuid.uuid4().hex[:8]}"
    root = f"s3://artsim-test/{prefix}"
    uri, _, _ = _build(root, s3_endpoint, 200, "met", seed=6)
    port = free_port()
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_endpoint)
    proc = subprocess.Popen([sys.executable, "-m", "artsim.cli", "serve", "--index", uri, "--port", str(port),
                             "--poll-seconds", "0.5", "--cache-dir", str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        def health():
            try:
                return call(port, "GET", "/health", timeout=5)[1]["indexes"][0]
            except OSError:
                return None

        deadline = time.monotonic() + 120
        while (first := health()) is None:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert first["vectors"] == 200
        _build(root, s3_endpoint, 260, "smk", seed=7)
        deadline = time.monotonic() + 120
        while (now := health())["vectors"] != 260:  # waits on the server's state
            assert proc.poll() is None and time.monotonic() < deadline, "the new build was not picked up"
            time.sleep(0.2)
        assert now["version"] != first["version"] and now["reloads"] == 1
        status, body = call(port, "GET", "/v1/test-model/neighbors?id=smk:1&k=2")
        assert status == 200 and len(body["results"]) == 2
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert "now serving version" in out
