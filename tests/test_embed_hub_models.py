"""Models by name (artsim/models/hub_models.py): open_clip CLIP towers and timm (DINOv2), offline.

No test downloads anything: the architectures are built with seeded random weights (embed.weights: null), the
cached-weights path is exercised with a file written into a private Hugging Face cache, and "no network" is a
closed loopback port or a loopback server that accepts and never answers.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from artsim.config import EmbedConfig, config_from_dict
from artsim.errors import ArtsimError, ConfigError
from artsim.models import hub_models
from artsim.models.embedder import ClipEmbedder, build_embedder, describe_model
from artsim.rundir.schema import IMAGES_SCHEMA
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex
from tests.conftest import MET_SAMPLE, free_port

CLIP = "open_clip:ViT-B-32"
DINO = "timm:vit_small_patch14_dinov2.lvd142m"
IMAGES = sorted((MET_SAMPLE / "images").glob("*.jpg"))[:4]


def image_rows(paths) -> list[dict]:
    return [{"object_id": f"met:{p.stem[4:]}", "status": "ok", "http_status": 200, "error": None,
             "url_final": None, "width": None, "height": None, "sha256": None, "image": p.read_bytes()}
            for p in paths]


def cli_query(*args):
    return subprocess.run([sys.executable, "-m", "artsim.cli", "query", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory, ray_session):
    """images/ -> the real embed stage (Ray actor, CLIP image tower, random weights) -> the real index stage."""
    from artsim.embed.stage import run_embed
    from artsim.index.stage import run_index

    root = tmp_path_factory.mktemp("clip")
    ctx = RunContext(config_from_dict({"run": {"root": str(root)},
                                       "embed": {"model": CLIP, "weights": None, "batch_size": 4}}))
    rows = image_rows(IMAGES)
    ctx.storage.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), ctx.paths.images)
    summary = run_embed(ctx)
    assert summary["embedded"] == len(rows)
    return run_index(ctx)["index_uri"], [r["object_id"] for r in rows]


def test_named_vit_b_32_builds_with_random_weights_image_and_text_512_d():
    cfg = EmbedConfig(model=CLIP, weights=None)
    spec, weights_id = describe_model(cfg)
    assert (spec.feature_dim, spec.output_dim, spec.image_size, spec.resize_size) == (512, 512, 224, 224)
    assert spec.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])  # CLIP's, not ImageNet's
    assert weights_id == "random-init-seed-0"
    embedder = build_embedder(cfg)
    assert isinstance(embedder, ClipEmbedder) and embedder.model_key == "open_clip_ViT-B-32"
    assert sum(p.numel() for p in embedder.backbone.parameters()) > 80_000_000  # the full ViT-B/32 image tower
    images = embedder.embed_pil([p.read_bytes() for p in IMAGES[:2]])
    texts = embedder.embed_texts(["a bronze statue", "a portrait of a woman", "a bronze statue"])
    assert images.shape == (2, 512) and texts.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(np.vstack([images, texts]), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-6)
    assert not np.allclose(texts[0], texts[1], atol=1e-3)
    with pytest.raises(ArtsimError, match="non-empty string"):
        embedder.embed_texts(["  "])
    assert embedder.describe()["backbone"] == CLIP
    image_only = build_embedder(cfg, with_text=False)  # what the embed stage's replicas build
    assert not hasattr(image_only, "embed_texts")
    np.testing.assert_allclose(image_only.embed_pil([p.read_bytes() for p in IMAGES[:2]]), images, atol=1e-6)


def test_dinov2_through_timm_builds_with_random_weights():
    cfg = EmbedConfig(model=DINO, weights=None, image_size=112)  # 518 px is the weights' size; 112 keeps it quick
    spec, _ = describe_model(cfg)
    assert (spec.feature_dim, spec.image_size, spec.resize_size) == (384, 112, 112)
    embedder = build_embedder(cfg)
    assert not hasattr(embedder, "embed_texts")  # no text tower: serving refuses text queries for it
    vectors = embedder.embed_pil([p.read_bytes() for p in IMAGES[:2]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert describe_model(EmbedConfig(model=DINO))[0].image_size == 518  # the published input size by default


@pytest.mark.parametrize("model, weights, key, message", [
    ("open_clip:ViT-B-99", None, "embed.model", "not an open_clip model"),
    ("open_clip:ViT-B-32", "no_such_tag", "embed.weights", "laion2b_s34b_b79k"),
    ("timm:not_a_model_at_all", None, "embed.model", "not a timm model"),
    (DINO, "IMAGENET1K_V2", "embed.weights", "hub"),
    ("open_clip:", None, "embed.model", "missing"),
])
def test_bad_names_are_config_errors(model, weights, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        describe_model(EmbedConfig(model=model, weights=weights))
    assert info.value.path == key


@pytest.fixture
def closed_hub(monkeypatch, tmp_path):
    """An empty node cache and a hub endpoint where nothing listens."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(hub_models, "DOWNLOAD_TIMEOUT_S", 3.0)
    return tmp_path / "hf" / "hub"


@pytest.mark.parametrize("model, weights", [(CLIP, "laion2b_s34b_b79k"), (DINO, "hub")])
def test_no_network_is_a_clear_error_within_seconds(closed_hub, model, weights):
    hub_models.check_weights_name(model, weights)  # library imports outside the timed part
    start = time.monotonic()
    with pytest.raises(ArtsimError) as info:
        describe_model(EmbedConfig(model=model, weights=weights))  # what the embed driver runs first
    elapsed = time.monotonic() - start
    assert elapsed < 3.0 + 2.0, elapsed
    message = str(info.value)
    assert f"cannot fetch the weights of {model}" in message or f"could not fetch the weights of {model}" in message
    assert str(closed_hub) in message and "HF_ENDPOINT" in message


def test_a_server_that_never_answers_cannot_hang_the_build(closed_hub, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # accepts connections (the kernel does), never reads or answers
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        hub_models.check_weights_name(DINO, "hub")
        start = time.monotonic()
        with pytest.raises(ArtsimError, match="vit_small_patch14_dinov2"):
            build_embedder(EmbedConfig(model=DINO, weights="hub", image_size=112))
        assert time.monotonic() - start < 5.0
    finally:
        listener.close()


def test_weights_in_the_node_cache_load_without_network(closed_hub):
    """A node whose Hugging Face cache holds the file needs no network: the file is found and loaded."""
    import timm
    import torch
    from safetensors.torch import save_file

    arch = DINO.split(":", 1)[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        published = timm.create_model(arch, pretrained=False, num_classes=0)  # stands in for the hub's file
    repo = closed_hub / "models--timm--vit_small_patch14_dinov2.lvd142m"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(snapshot / "model.safetensors"))

    cfg = EmbedConfig(model=DINO, weights="hub", image_size=112)
    spec, weights_id = describe_model(cfg)
    assert weights_id == "timm:timm/vit_small_patch14_dinov2.lvd142m" and spec.backbone_weights == "hub"
    embedder = build_embedder(cfg)
    loaded = embedder.backbone.state_dict()
    # the file's weights, not a random init (position embeddings are resampled from 518 to 112 px by timm)
    torch.testing.assert_close(loaded["patch_embed.proj.weight"], published.state_dict()["patch_embed.proj.weight"])
    torch.testing.assert_close(loaded["blocks.11.mlp.fc2.weight"], published.state_dict()["blocks.11.mlp.fc2.weight"])
    assert loaded["pos_embed"].shape[1] == 1 + 8 * 8


def test_text_query_end_to_end_through_the_embed_and_index_stages(clip_index):
    uri, object_ids = clip_index
    index = ShardedIndex.open(uri)
    assert index.supports_text() and index.manifest["model"]["backbone"] == CLIP
    hits = index.search_text("a bronze sculpture of an emperor", k=3)[0]
    assert len(hits) == 3 and {h["object_id"] for h in hits} <= set(object_ids)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # the text vector is the model's own text tower, unit length, and the scores are its cosines with the images
    reference = build_embedder(EmbedConfig(model=CLIP, weights=None))
    text = reference.embed_texts(["a bronze sculpture of an emperor"])[0]
    images = reference.embed_pil([p.read_bytes() for p in IMAGES])
    expected = sorted(zip(images @ text, object_ids), reverse=True)[:3]
    assert [h["object_id"] for h in hits] == [oid for _, oid in expected]
    assert [h["score"] for h in hits] == pytest.approx([float(s) for s, _ in expected], abs=1e-4)
    # serving rebuilt the same image tower the Ray actor used: an indexed image finds itself
    assert index.search(index.embed_images([str(IMAGES[2])]), 1)[0][0]["object_id"] == object_ids[2]

    result = cli_query("--index", uri, "--text", "a bronze sculpture of an emperor", "-k", "2", "--json")
    assert result.returncode == 0, result.stderr
    cli_hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert [h["object_id"] for h in cli_hits] == [h["object_id"] for h in hits[:2]]
    empty = cli_query("--index", uri, "--text", " ")
    assert empty.returncode == 2 and "--text" in empty.stderr


def test_an_index_of_a_non_clip_model_refuses_text_queries(tmp_path_factory, ray_session):
    from artsim.index.stage import run_index
    from artsim.testing.index_data import embeddings_table

    embedder = build_embedder(EmbedConfig(model="resnet18", weights=None, image_size=64))
    vectors = embedder.embed_pil([p.read_bytes() for p in IMAGES])
    root = tmp_path_factory.mktemp("resnet")
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": embedder.model_key}}))
    object_ids = [f"met:{p.stem[4:]}" for p in IMAGES]
    emb_uri = ctx.paths.embeddings(embedder.model_key)
    ctx.storage.write_table(embeddings_table(object_ids, vectors, embedder.model_key), emb_uri)
    ctx.storage.write_json(f"{emb_uri}/_model.json", embedder.describe())
    uri = run_index(ctx)["index_uri"]
    index = ShardedIndex.open(uri)
    assert not index.supports_text()
    with pytest.raises(ArtsimError, match="text queries need a CLIP model.*resnet18"):
        index.search_text("a vase")
    result = cli_query("--index", uri, "--text", "a vase")
    assert result.returncode == 2
    assert "text queries need a CLIP model" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_clip_artifact_carries_both_towers_and_loads_without_network(closed_hub, tmp_path):
    """save_clip_artifact -> embed.weights: <artifact>: the same image and text vectors on a node with no network
    and an empty Hugging Face cache (a small registered CLIP architecture keeps the file at ~100 MB)."""
    from artsim.models.artifact import load_artifact_parts
    from artsim.models.embedder import save_clip_artifact
    from artsim.storage import Storage

    small = "open_clip:ViT-S-32-alt"
    original = build_embedder(EmbedConfig(model=small, weights=None, seed=5))
    uri = str(tmp_path / "clip-export")
    weights_id = save_clip_artifact(original, Storage(), uri)
    spec, backbone, head, text, loaded_id = load_artifact_parts(Storage(), uri)
    assert loaded_id == weights_id and spec.text_tower == {"tokenizer": "ViT-S-32-alt"} and head is None
    assert backbone and text and not any(k.startswith("clip.visual") for k in text)

    rebuilt = build_embedder(EmbedConfig(model=small, weights=uri))
    assert isinstance(rebuilt, ClipEmbedder) and rebuilt.weights_id == weights_id
    texts = ["a bronze statue", "a landscape with cows"]
    np.testing.assert_allclose(rebuilt.embed_texts(texts), original.embed_texts(texts), atol=1e-5)
    images = [p.read_bytes() for p in IMAGES[:2]]
    np.testing.assert_allclose(rebuilt.embed_pil(images), original.embed_pil(images), atol=1e-5)
    assert not list(closed_hub.parent.glob("**/*.safetensors"))  # nothing was fetched


def test_http_neighbors_accepts_a_text_for_a_clip_index(clip_index):
    """POST /v1/{index}/neighbors {"text": ...} on a real loopback server: the Python API's hits."""
    from serve_util import call, running

    from artsim.serve.app import create_app
    from artsim.serve.registry import IndexRegistry

    uri, _ = clip_index
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    with running(create_app(IndexRegistry([uri], poll_seconds=0))) as port:
        health = call(port, "GET", "/health")[1]
        assert [ix["text_queries"] for ix in health["indexes"]] == [True]
        status, body = call(port, "POST", f"/v1/{name}/neighbors?k=3", {"text": "a bronze sculpture of an emperor"})
    assert status == 200, body
    expected = ShardedIndex.open(uri).search_text("a bronze sculpture of an emperor", k=3)[0]
    assert [h["object_id"] for h in body["results"]] == [h["object_id"] for h in expected]
    assert [h["score"] for h in body["results"]] == pytest.approx([h["score"] for h in expected], abs=1e-5)
