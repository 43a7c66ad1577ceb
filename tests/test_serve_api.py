"""`artsim serve`'s HTTP API against real indexes on a real loopback server: the same hits as ShardedIndex,
metadata, tags as the report computes them, and a 4xx with a message for every kind of bad input."""
from __future__ import annotations

import http.client
import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
import pytest

from artsim.config import EmbedConfig, config_from_dict
from artsim.index.stage import run_index
from artsim.testing.index_data import clustered_vectors, embeddings_table, object_ids_for, records_for, write_run
from artsim.runtime import RunContext
from artsim.serve.app import create_app
from artsim.serve.queries import Limits
from artsim.serve.registry import IndexRegistry
from artsim.serving import ShardedIndex
from conftest import free_port
from serve_util import call, running

N, DIM = 400, 16
IMAGES = sorted((Path(__file__).resolve().parent.parent / "data" / "met_sample" / "images").glob("*.jpg"))[:6]
SUBJECTS = ("Portraits", "Landscapes", "Flowers", "Ships", "Horses")


def _records_with_subjects(object_ids, vectors):
    """Subjects follow the vectors (the strongest of 5 random directions), so neighbours share them; the first 10
    works have none, so they get suggestions."""
    directions = np.random.default_rng(7).standard_normal((len(SUBJECTS), vectors.shape[1])).astype(np.float32)
    strongest = np.argmax(vectors @ directions.T, axis=1)
    rows = records_for(object_ids).to_pylist()
    for i, row in enumerate(rows):
        row["subjects"] = [] if i < 10 else [SUBJECTS[strongest[i]]] + (["Art"] if i % 3 == 0 else [])
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=records_for(object_ids[:1]).schema)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory, ray_session):
    """A facet index (flat, 400 x 16, records with subjects) and a small image index (resnet18, random init)."""
    root = tmp_path_factory.mktemp("serve")
    ctx = RunContext(config_from_dict({"run": {"root": str(root / "run")}, "index": {"embeddings": "test-model"}}))
    vectors = clustered_vectors(N, DIM, n_clusters=6, seed=3)
    object_ids = object_ids_for(N)
    records = _records_with_subjects(object_ids, vectors)
    write_run(ctx.storage, ctx.paths, object_ids, vectors, records=records)
    facet_uri = run_index(ctx)["index_uri"]

    from artsim.models.embedder import build_embedder

    embedder = build_embedder(EmbedConfig(model="resnet18", weights=None, seed=0))
    image_vectors = embedder.embed_pil([p.read_bytes() for p in IMAGES])
    ictx = RunContext(config_from_dict({"run": {"root": str(root / "images")},
                                        "index": {"embeddings": embedder.model_key}}))
    image_ids = [f"met:{p.stem.split('_')[1]}" for p in IMAGES]
    emb_uri = ictx.paths.embeddings(embedder.model_key)
    ictx.storage.write_table(embeddings_table(image_ids, image_vectors, embedder.model_key), emb_uri)
    ictx.storage.write_json(f"{emb_uri}/_model.json", embedder.describe())
    image_uri = run_index(ictx)["index_uri"]
    return {"facet": facet_uri, "image": image_uri, "vectors": vectors, "object_ids": object_ids,
            "records": records, "image_ids": image_ids}


@pytest.fixture(scope="module")
def server(indexes):
    registry = IndexRegistry([indexes["facet"], indexes["image"]], poll_seconds=0)
    with running(create_app(registry, Limits(max_k=100))) as port:
        yield port, registry


def get(port, path, **params):
    items = [(k, v) for k, vs in params.items() for v in (vs if isinstance(vs, list) else [vs])]
    return call(port, "GET", path + ("?" + urlencode(items) if items else ""))


def test_health_and_openapi(server, indexes):
    port, registry = server
    status, body = call(port, "GET", "/health")
    assert status == 200 and body["status"] == "ok"
    by_name = {i["name"]: i for i in body["indexes"]}
    facet = ShardedIndex.open(indexes["facet"])
    assert by_name["test-model"]["vectors"] == N and by_name["test-model"]["version"] == facet.version
    assert by_name["test-model"]["model"] == "test-model" and by_name["test-model"]["text_queries"] is False
    assert len(by_name) == 2
    status, spec = call(port, "GET", "/openapi.json")
    assert status == 200
    paths = spec["paths"]
    assert {"/health", "/v1/{index}/neighbors", "/v1/{index}/objects/{object_id}", "/v1/{index}/tags"} <= set(paths)
    assert {"get", "post"} <= set(paths["/v1/{index}/neighbors"])


def test_neighbors_by_id_are_the_python_api_hits(server, indexes):
    port, _ = server
    index = ShardedIndex.open(indexes["facet"])
    where = ["culture!=China", "date_begin>=1500"]
    status, body = get(port, "/v1/test-model/neighbors", id="met:0", k=7, where=where)
    assert status == 200
    expected = index.search_ids(["met:0"], 7, where={"culture": {"not": ["China"]}, "date_begin": {">=": 1500}})[0]
    assert body["results"] == json.loads(json.dumps(expected))
    assert [h["rank"] for h in body["results"]] == list(range(1, 8))
    status, far = get(port, "/v1/test-model/neighbors", id="met:0", k=3, farthest="true")
    assert status == 200 and far["results"] == json.loads(json.dumps(index.farthest_ids(["met:0"], 3)[0]))
    assert far["results"][0]["score"] < body["results"][-1]["score"]


def test_post_vector_and_text(server, indexes):
    port, registry = server
    index = ShardedIndex.open(indexes["facet"])
    q = indexes["vectors"][42]
    status, body = call(port, "POST", "/v1/test-model/neighbors?k=5&where=collection%3Dsmk", {"vector": q.tolist()})
    assert status == 200
    assert body["results"] == json.loads(json.dumps(index.search(q, 5, where={"collection": "smk"})[0]))
    status, body = call(port, "POST", "/v1/test-model/neighbors", {"text": "a ship at sea"})
    assert status == 400 and "CLIP" in body["error"]


def test_text_query_plugs_into_an_embedder_that_offers_embed_texts(indexes):
    """The plug-in point for CLIP: an embedder with embed_texts serves {"text": ...} (this one looks texts up)."""
    vectors, object_ids = indexes["vectors"], indexes["object_ids"]

    class LookupTextEmbedder:
        def embed_texts(self, texts):
            return np.stack([vectors[object_ids.index(t)] for t in texts])

    registry = IndexRegistry([indexes["facet"]], poll_seconds=0)
    registry.slot("test-model").index.attach_embedder(LookupTextEmbedder())
    with running(create_app(registry)) as port:
        assert call(port, "GET", "/health")[1]["indexes"][0]["text_queries"] is True
        status, body = call(port, "POST", "/v1/test-model/neighbors?k=4", {"text": "smk:7"})
    assert status == 200
    expected = ShardedIndex.open(indexes["facet"]).search(vectors[7], 4)[0]
    assert body["results"] == json.loads(json.dumps(expected)) and body["results"][0]["object_id"] == "smk:7"


def test_image_upload_finds_the_same_work(server, indexes):
    port, _ = server
    name = indexes["image"].rstrip("/").rsplit("/", 1)[-1]
    status, body = call(port, "POST", f"/v1/{name}/neighbors?k=2", IMAGES[3].read_bytes(),
                        {"Content-Type": "image/jpeg"})
    assert status == 200, body
    assert body["results"][0]["object_id"] == indexes["image_ids"][3] and body["results"][0]["score"] > 0.999


def test_objects_and_tags(server, indexes):
    port, _ = server
    index = ShardedIndex.open(indexes["facet"])
    status, body = call(port, "GET", "/v1/test-model/objects/" + quote("rijks:5"))
    assert status == 200 and body["results"] == [json.loads(json.dumps(index.metadata("rijks:5")))]

    # as the report computes them: recommend_tags(k=10, min_support=2) over every work's vector
    from artsim.curate import recommend_tags

    report = {r["object_id"]: r["tags"] for r in recommend_tags(indexes["records"], indexes["vectors"],
                                                                  indexes["object_ids"], k=10, min_support=2)}
    checked = 0
    for object_id in indexes["object_ids"][:10]:
        status, body = get(port, "/v1/test-model/tags", id=object_id)
        assert status == 200
        got, want = body["results"], report.get(object_id, [])
        assert [(t["key"], t["support"], [e["object_id"] for e in t["evidence"]]) for t in got] == \
               [(t["key"], t["support"], [e["object_id"] for e in t["evidence"]]) for t in want]
        assert all(abs(a["score"] - b["score"]) < 2e-4 for a, b in zip(got, want))
        checked += bool(got)
    assert checked >= 5  # works without subjects do get suggestions, each with the neighbours behind it

    # the text signal on request: each suggestion says which signal carried it, with its words or neighbours
    with_words = 0
    for object_id in indexes["object_ids"][:10]:
        status, body = get(port, "/v1/test-model/tags", id=object_id, text_weight=0.5)
        assert status == 200, body
        for t in body["results"]:
            assert abs(t["score"] - 0.5 * (t["text"] or 0) - 0.5 * (t["visual"] or 0)) < 2e-3
            assert t["signal"] in ("text", "visual") and (t["evidence"] != []) == (t["visual"] is not None)
            with_words += bool(t["words"])
    assert with_words > 0
    status, body = get(port, "/v1/test-model/tags", id=indexes["object_ids"][0], text_weight=2)
    assert status in (400, 422) and "text_weight" in json.dumps(body)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixel cap must refuse it before any decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


BAD_GETS = [
    ("/v1/nope/neighbors?id=met:0", 404, "no index named 'nope'"),
    ("/v1/test-model/neighbors?id=met:999999", 404, "not in index"),
    ("/v1/test-model/neighbors?id=met:0&where=colour%3Dred", 400, "unknown column 'colour'"),
    ("/v1/test-model/neighbors?id=met:0&where=date_begin%3E%3Dsoon", 400, "date_begin"),
    ("/v1/test-model/neighbors?id=met:0&where=nonsense", 400, "expected FIELD=VALUE"),
    ("/v1/test-model/neighbors?id=met:0&k=0", 400, "k must be at least 1"),
    ("/v1/test-model/neighbors?id=met:0&k=101", 400, "cap of 100"),
    ("/v1/test-model/neighbors?id=met:0&k=ten", 400, "k"),
    ("/v1/test-model/neighbors", 400, "id"),
    ("/v1/test-model/objects/met:999999", 404, "not in index"),
    ("/v1/test-model/tags?id=met:999999", 404, "not in index"),
    ("/v1/test-model/nothing-here", 404, ""),
]


@pytest.mark.parametrize("path, status, message", BAD_GETS)
def test_bad_gets_get_4xx_with_a_message(server, path, status, message):
    port, _ = server
    got, body = call(port, "GET", path)
    assert got == status and message in body["error"], body


BAD_POSTS = [
    ({"vector": [0.1] * (DIM - 1)}, None, 400, f"{DIM}-d"),
    ({"vector": [float("nan")] + [0.1] * (DIM - 1)}, None, 400, "NaN"),
    ({"vector": ["a"] * DIM}, None, 400, "list of numbers"),
    ({"vector": [0.0] * DIM}, None, 400, "all zeros"),
    ({"vector": [1e39] * DIM}, None, 400, "float32"),
    ({"vector": [0.1] * DIM, "text": "x"}, None, 400, "exactly one"),
    ({"text": ""}, None, 400, "non-empty"),
    ({"text": "x" * 5000}, None, 400, "limit"),
    (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"hello", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    (b"<html>not an image</html>", {"Content-Type": "image/jpeg"}, 415, "not a supported image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 100, {"Content-Type": "image/jpeg"}, 400, "cannot"),
    (_png_header(20_000, 20_000), {"Content-Type": "image/png"}, 413, "pixel"),
    (_png_header(9_000, 9_000), {"Content-Type": "image/png"}, 413, "pixel limit"),
    (b"", {"Content-Type": "image/png"}, 400, "empty"),
]


@pytest.mark.parametrize("body, headers, status, message", BAD_POSTS)
def test_bad_posts_get_4xx_with_a_message(server, body, headers, status, message):
    port, _ = server
    got, answer = call(port, "POST", "/v1/test-model/neighbors", body, headers)
    assert got == status and message in answer["error"], answer


def test_bad_image_to_the_image_index_is_a_4xx(server, indexes):
    port, _ = server
    name = indexes["image"].rstrip("/").rsplit("/", 1)[-1]
    broken = IMAGES[0].read_bytes()[:2000]  # a truncated JPEG: header fine, pixels missing
    got, answer = call(port, "POST", f"/v1/{name}/neighbors", broken, {"Content-Type": "image/jpeg"})
    assert 400 <= got < 500 and answer["error"]


def test_oversized_uploads_are_refused_declared_or_streamed(server):
    port, _ = server
    cap = Limits().max_upload_bytes  # the download stage's max_bytes
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest("POST", "/v1/test-model/neighbors")
    conn.putheader("Content-Type", "image/jpeg")
    conn.putheader("Content-Length", str(cap + 1))
    conn.endheaders()  # the body is never sent: the declared size alone is refused
    resp = conn.getresponse()
    assert resp.status == 413 and "byte limit" in json.loads(resp.read())["error"]
    conn.close()

    def chunks():  # no Content-Length: the server counts while it reads and stops past the cap
        block = b"\xff\xd8\xff" + b"\x00" * (1 << 20)
        for _ in range(cap // len(block) + 2):
            yield block

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/test-model/neighbors", body=chunks(), headers={"Content-Type": "image/jpeg"},
                     encode_chunked=True)
        resp = conn.getresponse()
        status, answer = resp.status, json.loads(resp.read())
    except (BrokenPipeError, ConnectionResetError):  # the server may answer and close before we finish sending
        status, answer = 413, {"error": "byte limit (connection closed by the server)"}
    finally:
        conn.close()
    assert status == 413 and "byte limit" in answer["error"]


def test_concurrent_requests_all_get_their_own_answers(server, indexes):
    """16 threads, each with its own filter and query: every answer is that query's answer (no shared state
    between requests, no 5xx from racing caches)."""
    port, _ = server
    index = ShardedIndex.open(indexes["facet"])
    cultures = ["China", "Japan", "France", "Netherlands", "Italy", "Egypt", "Mexico", "Denmark"]
    results, errors = {}, []

    def worker(i):
        try:
            for j in range(5):
                oid = indexes["object_ids"][i * 5 + j]
                status, body = get(port, "/v1/test-model/neighbors", id=oid, k=5,
                                   where=f"culture={cultures[i % 8]}")
                results[(i, j)] = (status, body, oid, cultures[i % 8])
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 80
    for status, body, oid, culture in results.values():
        assert status == 200
        assert body["results"] == json.loads(json.dumps(index.search_ids([oid], 5, where={"culture": culture})[0]))


def test_cli_serves_and_rejects_bad_startup(indexes, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "artsim.cli", "serve", "--index", indexes["facet"], "--port", str(port),
           "--poll-seconds", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        status = None
        while status != 200:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "artsim serve did not answer /health"
            try:
                status, body = call(port, "GET", "/health", timeout=5)
            except OSError:
                time.sleep(0.2)
        assert body["indexes"][0]["vectors"] == N
        status, body = call(port, "GET", "/v1/test-model/neighbors?id=met:3&k=3")
        assert status == 200 and len(body["results"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    for args, message in [(["--index", str(tmp_path / "none")], "no manifest.json"),
                          (["--index", indexes["facet"], "--index", indexes["facet"]], "same directory name")]:
        result = subprocess.run([sys.executable, "-m", "artsim.cli", "serve", *args, "--port", str(free_port())],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "artsim: error:" in result.stderr
