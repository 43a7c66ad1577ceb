"""Query by image file: the manifest's model (from embeddings/<key>/_model.json) is rebuilt through artsim.embed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from artsim.config import EmbedConfig, config_from_dict
from artsim.index.stage import run_index
from artsim.testing.index_data import embeddings_table
from artsim.runtime import RunContext
from artsim.serving import ShardedIndex

IMAGES = sorted((Path(__file__).resolve().parent.parent / "data" / "met_sample" / "images").glob("*.jpg"))[:8]


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, ray_session):
    from artsim.models.embedder import build_embedder

    embedder = build_embedder(EmbedConfig(model="resnet18", weights=None, seed=0))  # random init: no download
    vectors = embedder.embed_pil([p.read_bytes() for p in IMAGES])
    root = tmp_path_factory.mktemp("images")
    ctx = RunContext(config_from_dict({"run": {"root": str(root)}, "index": {"embeddings": embedder.model_key}}))
    object_ids = [f"met:{p.stem.split('_')[1]}" for p in IMAGES]
    emb_uri = ctx.paths.embeddings(embedder.model_key)
    ctx.storage.write_table(embeddings_table(object_ids, vectors, embedder.model_key), emb_uri)
    ctx.storage.write_json(f"{emb_uri}/_model.json", embedder.describe())
    return run_index(ctx)["index_uri"], object_ids


def test_image_query_finds_the_same_work(image_index):
    uri, object_ids = image_index
    index = ShardedIndex.open(uri)
    vectors = index.embed_images([str(IMAGES[3])])
    hits = index.search(vectors, 3)[0]
    assert hits[0]["object_id"] == object_ids[3] and hits[0]["score"] > 0.999
    result = subprocess.run([sys.executable, "-m", "artsim.cli", "query", "--index", uri, "--image", str(IMAGES[5]),
                             "-k", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])
    assert first["object_id"] == object_ids[5] and first["rank"] == 1


def test_image_query_rejects_a_non_image(image_index, tmp_path):
    from artsim.errors import ArtsimError

    bogus = tmp_path / "not-an-image.jpg"
    bogus.write_bytes(b"<html>definitely not a jpeg</html>")
    index = ShardedIndex.open(image_index[0])
    with pytest.raises(ArtsimError, match="cannot embed"):
        index.embed_images([str(bogus)])
    with pytest.raises(ArtsimError, match="not found"):
        index.embed_images([str(tmp_path / "missing.jpg")])
