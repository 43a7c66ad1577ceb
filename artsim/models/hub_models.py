"""Models people use on clusters, by name, with weights fetched at run time and cached per node:

- ``open_clip:<arch>`` (e.g. ``open_clip:ViT-B-32``): a CLIP model from the pinned ``open_clip_torch``; the image
  tower embeds images, the text tower (kept beside it, see :class:`ClipTextTower`) embeds text queries into the same
  space. ``embed.weights``: an open_clip pretrained tag (``laion2b_s34b_b79k``, see
  ``open_clip.list_pretrained_tags_by_model``) or null = the same architecture with a seeded random init.
- ``timm:<name>`` (e.g. ``timm:vit_small_patch14_dinov2.lvd142m``, DINOv2): a ``timm`` model with its classifier
  removed (``num_classes=0``: pooled features). ``embed.weights``: ``hub`` (the name's pretrained weights from the
  Hugging Face hub) or null = seeded random init.

Weights come from the Hugging Face hub through ``huggingface_hub``'s cache (``HF_HOME`` / ``HF_HUB_CACHE``; point it
at a node-local disk): a node looks in its cache first and only then downloads, under a deadline
(``DOWNLOAD_TIMEOUT_S``), so a node without network fails within seconds with an error naming the model, never
hangs. ``HF_ENDPOINT`` (a mirror) is honoured. Files are loaded without unpickling code (safetensors where the repo
has it, else ``torch.load(weights_only=True)`` inside open_clip/timm).

Preprocessing is the one the weights were published with (mean/std, crop size, crop fraction); artsim's shared
pipeline resizes bilinearly (with antialiasing) for every model where open_clip and timm resize bicubically.

Kept out of backbones.py like efficientnet_lite.py: backbones.py and embedder.py only ask :func:`is_hub_model` and
call the functions below.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional

import torch.nn as nn

from artsim.errors import ArtsimError, ConfigError
from artsim.models.state import load_backbone_state
from artsim.models.spec import DOWNLOAD_TIMEOUT_S

OPEN_CLIP = "open_clip:"
TIMM = "timm:"
HUB_WEIGHTS = "hub"  # timm: the pretrained weights the model name (or its default tag) points at
OPEN_CLIP_PACKAGE = "open_clip_torch==3.3.0"
TIMM_PACKAGE = "timm==1.0.31"


def is_hub_model(name: str) -> bool:
    return name.startswith((OPEN_CLIP, TIMM))


def is_clip_model(name: str) -> bool:
    return name.startswith(OPEN_CLIP)


def _arch(name: str) -> str:
    arch = name.split(":", 1)[1]
    if not arch:
        raise ConfigError("embed.model", f"{name!r}: the name after the colon is missing "
                                         f"(e.g. open_clip:ViT-B-32, timm:vit_small_patch14_dinov2.lvd142m)")
    return arch


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ArtsimError(f"embed.model: open_clip models need the package {OPEN_CLIP_PACKAGE} "
                          f"(it is in requirements.txt)") from None
    return open_clip


def _timm():
    try:
        import timm
    except ImportError:
        raise ArtsimError(f"embed.model: timm models need the package {TIMM_PACKAGE} (it is in requirements.txt)") \
            from None
    return timm


# -- names and weights ---------------------------------------------------------------------------------------------

def _check_open_clip(name: str, weights: Optional[str]) -> tuple[str, Optional[str]]:
    open_clip = _open_clip()
    arch = _arch(name)
    archs = open_clip.list_models()
    if arch not in archs:
        close = [a for a in archs if a.lower().startswith(arch.split("-")[0].lower())][:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError("embed.model", f"{arch!r} is not an open_clip model{hint}")
    if weights is None:
        return arch, None
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        raise ConfigError("embed.weights", f"{weights!r} is not a pretrained tag of open_clip {arch} (valid: "
                                           f"{', '.join(tags) or 'none'}; or null for random init), nor an artifact URI")
    return arch, weights


def _timm_pretrained_cfg(arch: str):
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ConfigError("embed.weights", f"timm {arch} has no pretrained weights; use embed.weights: null")
    return cfg


def _check_timm(name: str, weights: Optional[str]) -> tuple[str, Optional[str]]:
    timm = _timm()
    arch = _arch(name)
    if not timm.is_model(arch):
        close = timm.list_models(f"{arch.split('.')[0].split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError("embed.model", f"{arch!r} is not a timm model{hint}")
    if weights is None:
        return arch, None
    if weights.lower() not in (HUB_WEIGHTS, "default", "pretrained"):
        raise ConfigError("embed.weights", f"{weights!r} is not a weights name of timm {arch} (valid: {HUB_WEIGHTS}, "
                                           f"or null for random init; put a pretrained tag in the name: "
                                           f"timm:<arch>.<tag>), nor an artifact URI")
    cfg = _timm_pretrained_cfg(arch)
    if not getattr(cfg, "hf_hub_id", None):
        raise ConfigError("embed.weights", f"timm {arch}'s weights are not on the Hugging Face hub; use null")
    return arch, HUB_WEIGHTS


def check_weights_name(model: str, weights: Optional[str]) -> Optional[str]:
    """The canonical weights name (an open_clip tag, ``hub``) or None; a ConfigError for anything else."""
    return (_check_open_clip if is_clip_model(model) else _check_timm)(model, weights)[1]


def weights_id(model: str, weights: Optional[str], seed: int) -> str:
    if weights is None:
        return f"random-init-seed-{seed}"
    weights = check_weights_name(model, weights)
    if is_clip_model(model):
        return f"open_clip:{_arch(model)}/{weights}"
    cfg = _timm_pretrained_cfg(_arch(model))
    return f"timm:{cfg.hf_hub_id}"


# -- fetching weights ------------------------------------------------------------------------------------------------

def _under_deadline(fn: Callable[[], str], timeout_s: float, what: str, hint: str) -> str:
    """Run a download in a daemon thread: libraries without a timeout of their own cannot hang the caller."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="artsim-weights-download")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ArtsimError(f"embed.weights: could not fetch {what} within {timeout_s:g} s (no network, or the "
                          f"server does not answer); {hint}")
    if "error" in result:
        exc = result["error"]
        raise ArtsimError(f"embed.weights: cannot fetch {what} ({type(exc).__name__}: {str(exc)[:300]}); "
                          f"{hint}") from None
    return result["value"]


def hub_cache_dir() -> str:
    """This node's Hugging Face cache, read from the environment now (HF_HUB_CACHE, else HF_HOME/hub), so that a
    worker's runtime_env or a test can point it elsewhere after huggingface_hub was imported."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _hf_fetch(repo_id: str, filenames: list[str], what: str, timeout_s: float) -> str:
    """Local path of the first of ``filenames`` in ``repo_id``: from the node's cache if there, else downloaded."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    for filename in filenames:  # the cache first: a node that has the file needs no network at all
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache, local_files_only=True)
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT  # read now: tests and mirrors set it late

    def download() -> str:
        missing = []
        for filename in filenames:
            try:
                return hf_hub_download(repo_id, filename, cache_dir=cache, endpoint=endpoint,
                                       etag_timeout=timeout_s)
            except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError) the hub could not be reached
                raise
            except EntryNotFoundError:  # the repo has the other format
                missing.append(filename)
        raise FileNotFoundError(f"{repo_id} has none of {', '.join(missing)}")

    hint = (f"without internet, fill the Hugging Face cache on every node ({cache}; HF_HOME / "
            f"HF_HUB_CACHE) from a machine that has it, or set HF_ENDPOINT to a mirror")
    return _under_deadline(download, timeout_s, f"{what} from {endpoint}/{repo_id}", hint)


def fetch_weights(model: str, weights: Optional[str], timeout_s: Optional[float] = None) -> Optional[str]:
    """The local weights file of a hub model (cached per node), or None for random init."""
    if weights is None:
        return None
    timeout_s = DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s  # module value read now: tests shorten it
    if is_clip_model(model):
        arch, tag = _check_open_clip(model, weights)
        cfg = _open_clip().get_pretrained_cfg(arch, tag)
        what = f"the weights of open_clip:{arch} ({tag})"
        if cfg.get("hf_hub"):
            repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" (default file) or "org/repo/file"
            filename = filename or "open_clip_pytorch_model.bin"
            stem = filename.rsplit(".", 1)[0]
            safe = "open_clip_model.safetensors" if filename == "open_clip_pytorch_model.bin" else f"{stem}.safetensors"
            return _hf_fetch(repo_id, [safe, filename], what, timeout_s)
        from open_clip.pretrained import download_pretrained_from_url

        url = cfg.get("url")
        if not url:
            raise ArtsimError(f"embed.weights: open_clip names no download for {arch} ({tag})")
        return _under_deadline(lambda: download_pretrained_from_url(url), timeout_s, f"{what} from {url}",
                               "without internet, copy the file into ~/.cache/clip on every node")
    arch, _ = _check_timm(model, weights)
    cfg = _timm_pretrained_cfg(arch)
    return _hf_fetch(cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin"], f"the weights of timm:{arch}",
                     timeout_s)


# -- specs and modules -----------------------------------------------------------------------------------------------

def backbone_spec_fields(model: str, weights: Optional[str], seed: int, image_size: Optional[int]) -> dict:
    """ModelSpec fields of the bare backbone, from the library's own preprocessing config (no weights loaded)."""
    if is_clip_model(model):
        open_clip = _open_clip()
        arch, tag = _check_open_clip(model, weights)
        config = open_clip.get_model_config(arch)
        native = config["vision_cfg"]["image_size"]
        native = native[0] if isinstance(native, (list, tuple)) else native
        pre = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        mean = list(pre.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        std = list(pre.get("std") or open_clip.OPENAI_DATASET_STD)
        size = image_size or int(native)
        resize = size  # open_clip's "shortest" resize mode: shorter side to the crop size, then centre crop
        feature_dim = int(config["embed_dim"])
    else:
        arch, name = _check_timm(model, weights)
        cfg = _timm().models.get_pretrained_cfg(arch)
        cfg = cfg.to_dict() if cfg is not None else {}
        mean = list(cfg.get("mean") or (0.485, 0.456, 0.406))
        std = list(cfg.get("std") or (0.229, 0.224, 0.225))
        size = image_size or int((cfg.get("input_size") or (3, 224, 224))[-1])
        resize = round(size / float(cfg.get("crop_pct") or 1.0))
        tag = name
        feature_dim = 0  # known once the network is built (on the meta device: see feature_dim)
    return {"backbone": model, "backbone_weights": tag, "image_size": size, "mean": [float(x) for x in mean],
            "std": [float(x) for x in std], "resize_size": resize, "backbone_seed": None if tag else seed,
            "feature_dim": feature_dim, "output_dim": feature_dim}


def _timm_kwargs(arch: str, image_size: int) -> dict:
    cfg = _timm().models.get_pretrained_cfg(arch)
    native = int(cfg.input_size[-1]) if cfg is not None else None
    # ViTs are built for one input size (timm resamples the position embeddings of loaded weights); CNNs take any
    if native and image_size != native and getattr(cfg, "fixed_input_size", False):
        return {"img_size": image_size}
    return {}


def feature_dim(model: str, image_size: int) -> int:
    """The pooled feature size, from the network's shapes only (built on the meta device: no memory, no init)."""
    import torch

    if is_clip_model(model):
        return int(_open_clip().get_model_config(_arch(model))["embed_dim"])
    arch = _arch(model)
    with torch.device("meta"):
        network = _timm().create_model(arch, pretrained=False, num_classes=0, **_timm_kwargs(arch, image_size))
    return int(network.num_features)


class ClipTextTower(nn.Module):
    """A CLIP model's text side (token embedding, transformer, final norm, projection) and its tokenizer; the image
    tower is dropped from it. ``forward(list[str])`` -> (N, embed_dim) unnormalised text features."""

    def __init__(self, clip_model, tokenizer):
        super().__init__()
        clip_model.visual = nn.Identity()  # the image tower lives in the Embedder's backbone, not here
        self.clip = clip_model
        self.tokenizer = tokenizer

    def forward(self, texts: list[str]):
        device = next(self.clip.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        return self.clip.encode_text(tokens)


def build_backbone(model: str, weights: Optional[str], seed: int, image_size: int,
                   backbone_state: Optional[dict] = None, with_text: bool = True, text_state: Optional[dict] = None):
    """(image module in eval mode, feature_dim, ClipTextTower or None). ``backbone_state`` / ``text_state`` (an
    artifact's towers) win over ``weights`` (nothing is fetched then); the text tower is only offered with the image
    tower it was trained with: the published weights, or an artifact that carries both."""
    import torch

    path = fetch_weights(model, weights) if backbone_state is None else None
    if text_state is not None and not is_clip_model(model):
        raise ArtsimError(f"{model}: only open_clip models have a text tower")
    text = None
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        if is_clip_model(model):
            open_clip = _open_clip()
            arch = _arch(model)
            native = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
            native = native[0] if isinstance(native, (list, tuple)) else native
            force = image_size if image_size != native else None
            try:
                clip = open_clip.create_model(arch, pretrained=path, force_image_size=force, weights_only=True)
            except Exception as exc:
                raise ArtsimError(f"embed.weights: cannot load {path} into open_clip:{arch}: {str(exc)[:300]}") \
                    from None
            network = clip.visual
            dim = int(open_clip.get_model_config(arch)["embed_dim"])
            if with_text and (backbone_state is None or text_state is not None):
                text = ClipTextTower(clip, open_clip.get_tokenizer(arch)).eval()
                if text_state is not None:
                    try:
                        text.load_state_dict(text_state, strict=True)
                    except RuntimeError as exc:
                        raise ArtsimError(f"artifact text tower weights do not fit {model}: {str(exc)[:500]}") \
                            from None
                for p in text.parameters():
                    p.requires_grad_(False)
        else:
            arch = _arch(model)
            overlay = {"file": path} if path else None
            try:
                network = _timm().create_model(arch, pretrained=path is not None, pretrained_cfg_overlay=overlay,
                                               num_classes=0, **_timm_kwargs(arch, image_size))
            except Exception as exc:
                raise ArtsimError(f"embed.weights: cannot load {path} into timm:{arch}: {str(exc)[:300]}") from None
            dim = int(network.num_features)
    if backbone_state is not None:
        load_backbone_state(network, backbone_state, model)
    network.eval()
    return network, dim, text
