"""The model artifact format and model building (no Ray): round trips, integrity, clear errors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from artsim.config import EmbedConfig, StorageConfig
from artsim.errors import ArtsimError, ConfigError, IntegrityError
from artsim.models.artifact import load_artifact, save_artifact
from artsim.models.backbones import strip_classifier
from artsim.models.embedder import build_embedder
from artsim.models.heads import build_head
from artsim.models.spec import ModelSpec
from artsim.rundir.names import model_key
from artsim.storage import Storage, join
from tests.conftest import MET_SAMPLE, REPO

SMALL = 64  # px: resnet18 at 64 px keeps these tests fast


def small_cfg(**kw) -> EmbedConfig:
    return EmbedConfig(model=kw.pop("model", "resnet18"), weights=kw.pop("weights", None), image_size=SMALL, **kw)


def met_bytes(n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((MET_SAMPLE / "images").glob("*.jpg"))[:n]]


def export_with_head(storage: Storage, uri: str, finetuned: bool, seed: int = 0):
    """What the train stage does: a head on the embedder's features (and optionally the backbone), then export."""
    embedder = build_embedder(small_cfg(seed=seed), storage)
    head_dict = {"type": "mlp", "in_dim": embedder.spec.feature_dim, "hidden_dims": [64], "out_dim": 32}
    torch.manual_seed(123)
    head = build_head(head_dict)
    backbone_state = None
    if finetuned:  # perturb the backbone so that "includes_backbone_weights" really carries different weights
        backbone_state = {k: (v + 0.01 if v.is_floating_point() else v)
                          for k, v in embedder.backbone.state_dict().items()}
    spec = dataclasses.replace(embedder.spec, head=head_dict, output_dim=32, includes_backbone_weights=finetuned)
    weights_id = save_artifact(storage, uri, spec, backbone_state=backbone_state, head_state=head.state_dict())
    return embedder, head, backbone_state, weights_id


@pytest.mark.parametrize("finetuned", [False, True])
def test_artifact_round_trip_local_with_head(tmp_path, finetuned):
    storage = Storage()
    uri = str(tmp_path / "models" / "sim" / "export")
    embedder, head, backbone_state, weights_id = export_with_head(storage, uri, finetuned)
    data = (tmp_path / "models" / "sim" / "export" / "weights.safetensors").read_bytes()
    assert weights_id == hashlib.sha256(data).hexdigest()

    spec, loaded_backbone, loaded_head, loaded_id = load_artifact(storage, uri)
    assert loaded_id == weights_id and spec.output_dim == 32 and spec.head["type"] == "mlp"
    assert (loaded_backbone is not None) == finetuned
    for k, v in head.state_dict().items():
        assert torch.equal(loaded_head[k], v)

    # Embedding with the artifact == backbone (+ its weights) followed by the head, computed by hand.
    cfg = small_cfg(weights=uri)
    cfg.image_size = None  # the artifact fixes the size
    from_artifact = build_embedder(cfg, storage)
    assert from_artifact.model_key == "resnet18-sim" == model_key(cfg)
    assert from_artifact.weights_id == weights_id and from_artifact.spec.image_size == SMALL
    images = met_bytes(4)
    got = from_artifact.embed_pil(images)
    assert got.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    backbone = embedder.backbone
    if finetuned:
        backbone.load_state_dict(backbone_state)
    x = torch.stack([embedder.preprocess(b) for b in images])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(head(backbone(x)), dim=1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_artifact_round_trip_s3(s3_endpoint):
    storage = Storage(StorageConfig(s3_endpoint_url=s3_endpoint))
    uri = "s3://artsim-test/artifact-test/models/s3sim/export"
    _, head, _, weights_id = export_with_head(storage, uri, finetuned=False)
    spec, backbone_state, head_state, loaded_id = load_artifact(storage, uri)
    assert loaded_id == weights_id and backbone_state is None
    assert all(torch.equal(head_state[k], v) for k, v in head.state_dict().items())
    cfg = small_cfg(weights=uri)
    cfg.image_size = None
    assert build_embedder(cfg, storage).embed_pil(met_bytes(2)).shape == (2, 32)


def test_tampered_weights_are_refused(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "export")
    export_with_head(storage, uri, finetuned=False)
    path = tmp_path / "export" / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match"):
        load_artifact(storage, uri)


def test_unfinished_or_missing_artifact_is_a_clear_error(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "export")
    export_with_head(storage, uri, finetuned=False)
    (tmp_path / "export" / "artifact.json").unlink()  # what a crash before the last write leaves
    with pytest.raises(ArtsimError, match="unfinished export"):
        load_artifact(storage, uri)
    start = time.perf_counter()
    with pytest.raises(ArtsimError, match="not a model artifact"):
        build_embedder(small_cfg(weights=str(tmp_path / "nowhere")), storage)
    assert time.perf_counter() - start < 5


def test_artifact_json_is_validated(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "export")
    export_with_head(storage, uri, finetuned=False)
    meta_path = tmp_path / "export" / "artifact.json"
    meta = json.loads(meta_path.read_text())
    meta["spec"]["output_dim"] = "lots"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtsimError, match="output_dim: expected a positive integer"):
        load_artifact(storage, uri)
    meta["format"] = "pickle-please"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtsimError, match="unsupported artifact format"):
        load_artifact(storage, uri)


def test_artifact_for_another_backbone_is_refused(tmp_path):
    storage = Storage()
    uri = str(tmp_path / "export")
    export_with_head(storage, uri, finetuned=False)
    with pytest.raises(ConfigError, match="embed.model.*trained on 'resnet18'"):
        build_embedder(EmbedConfig(model="resnet34", weights=uri), storage)


def test_save_refuses_inconsistent_inputs(tmp_path):
    storage = Storage()
    embedder = build_embedder(small_cfg(), storage)
    spec = dataclasses.replace(embedder.spec, head={"type": "linear", "in_dim": 512, "out_dim": 8}, output_dim=8)
    with pytest.raises(ArtsimError, match="head_state"):
        save_artifact(storage, str(tmp_path / "a"), spec)  # head declared, no weights
    wrong = build_head({"type": "linear", "in_dim": 512, "out_dim": 9}).state_dict()
    with pytest.raises(ArtsimError, match="does not match spec.head"):
        save_artifact(storage, str(tmp_path / "a"), spec, head_state=wrong)
    assert not (tmp_path / "a" / "artifact.json").exists()


def test_bad_model_or_weights_name_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="embed.model.*not a torchvision"):
        build_embedder(EmbedConfig(model="resnet5000"))
    with pytest.raises(ConfigError, match="embed.weights.*IMAGENET1K_V9.*valid: DEFAULT, IMAGENET1K_V1"):
        build_embedder(EmbedConfig(model="resnet18", weights="IMAGENET1K_V9"))
    assert time.perf_counter() - start < 10


def test_model_keys():
    assert model_key(EmbedConfig(model="resnet50")) == "resnet50"
    assert model_key(EmbedConfig(model="resnet50", seed=3)) == "resnet50-seed3"
    assert model_key(EmbedConfig(model="resnet50", weights="IMAGENET1K_V2")) == "resnet50-IMAGENET1K_V2"
    assert model_key(EmbedConfig(model="resnet50", weights="ResNet50_Weights.IMAGENET1K_V2")) == \
        "resnet50-IMAGENET1K_V2"
    assert model_key(EmbedConfig(model="resnet50", weights="s3://b/run/models/sim v2/export/")) == "resnet50-sim_v2"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny", "efficientnet_b0",
                                  "vit_b_16", "swin_t", "regnet_y_400mf"])
def test_headless_backbones_give_pooled_unit_vectors(name):
    from torchvision.models import get_model

    model = get_model(name, weights=None)
    feature_dim = strip_classifier(model)
    model.eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, feature_dim)
    embedder = build_embedder(EmbedConfig(model=name))
    with torch.no_grad():
        out = embedder(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, feature_dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-4)


def test_random_init_is_identical_across_processes():
    code = ("import torch,hashlib;from artsim.config import EmbedConfig;from artsim.models.embedder import "
            "build_embedder;torch.manual_seed({noise});e=build_embedder(EmbedConfig(model='resnet18',seed={seed}));"
            "print(hashlib.sha256(b''.join(v.numpy().tobytes() for v in e.state_dict().values())).hexdigest())")

    def digest(seed, noise):
        out = subprocess.run([sys.executable, "-c", code.format(seed=seed, noise=noise)], cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().splitlines()[-1]

    # Same seed, different global RNG state in each process -> same weights; another seed -> different weights.
    assert digest(7, 1) == digest(7, 2)
    assert digest(7, 1) != digest(8, 1)
    # And build_embedder does not disturb the caller's RNG.
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    build_embedder(EmbedConfig(model="resnet18", seed=7))
    assert torch.equal(before, torch.random.get_rng_state())


def test_describe_model_agrees_with_the_built_model(tmp_path):
    from artsim.models.embedder import describe_model

    storage = Storage()
    for cfg in (small_cfg(seed=4), EmbedConfig(model="efficientnet_b0")):
        spec, weights_id = describe_model(cfg, storage)
        built = build_embedder(cfg, storage)
        assert spec == built.spec and weights_id == built.weights_id
    uri = str(tmp_path / "export")
    _, _, _, weights_id = export_with_head(storage, uri, finetuned=False)
    cfg = small_cfg(weights=uri)
    cfg.image_size = None
    spec, described_id = describe_model(cfg, storage)
    assert described_id == weights_id and spec.output_dim == 32


def test_torchvision_weights_download_cache_and_integrity(tmp_path, monkeypatch):
    """The registry path end to end against a loopback HTTP server standing in for download.pytorch.org."""
    import functools
    import http.server
    import threading

    from torchvision.models import get_model

    from artsim.models.backbones import fetch_torchvision_state

    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    state = get_model("resnet18", weights=None).state_dict()
    torch.save(state, serve_dir / "ckpt.pth")
    digest = hashlib.sha256((serve_dir / "ckpt.pth").read_bytes()).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"  # torchvision's naming: the sha256 prefix is in the file name
    (serve_dir / "ckpt.pth").rename(serve_dir / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve_dir))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    try:
        loaded = fetch_torchvision_state(url)
    finally:
        server.shutdown()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / name
    assert cached.exists()
    assert set(fetch_torchvision_state(url)) == set(state)  # server gone: served from the cache

    cached.write_bytes(cached.read_bytes()[:-10])  # truncated download in the cache
    with pytest.raises(IntegrityError, match="sha256 does not start with"):
        fetch_torchvision_state(url)
    start = time.perf_counter()
    # the server stopped answering (its socket still accepts): the deadline turns a hang into a clear error
    with pytest.raises(ArtsimError, match="cannot download|took longer than 5 s"):
        fetch_torchvision_state(url.replace(name, "resnet18-00000000.pth"), timeout_s=5)
    assert time.perf_counter() - start < 10
