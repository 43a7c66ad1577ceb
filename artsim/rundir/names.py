"""Names in the run directory: which embeddings/, index/ and links/ directory a config means, and a work's
collection. Computed from the config and what is in the run directory, never by loading a model."""
from __future__ import annotations

import os
import re
from typing import Optional

from artsim.errors import ConfigError
from artsim.storage import join


def is_artifact_uri(weights: str) -> bool:
    """Weights that look like a location (scheme, path separator, or an existing path) name an artifact."""
    return "://" in weights or "/" in weights or os.sep in weights or os.path.exists(weights)


def _safe_key_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "model"


def model_key(embed_cfg) -> str:
    """Directory name under embeddings/ for this embed config.

    "resnet50" (random init, seed 0), "resnet50-seed3", "resnet50-IMAGENET1K_V2", or for an artifact
    "resnet50-<artifact directory name>" ("resnet50-similarity" for models/similarity/export).
    """
    model, weights = embed_cfg.model, embed_cfg.weights
    if weights is None:
        return _safe_key_part(model if embed_cfg.seed == 0 else f"{model}-seed{embed_cfg.seed}")
    if is_artifact_uri(weights):
        parts = [p for p in weights.rstrip("/").split("/") if p]
        name = parts[-1] if parts else "artifact"
        if name == "export" and len(parts) >= 2:
            name = parts[-2]
        return _safe_key_part(f"{model}-{name}")
    return _safe_key_part(f"{model}-{weights.split('.')[-1]}")


def embeddings_key(ctx, explicit: Optional[str] = None, key_path: str = "index.embeddings",
                   required: bool = True) -> str:
    """Which embeddings/<key>/ a stage reads — one rule for index, mine, train, links and the report: ``explicit``
    (the stage's own ``*.embeddings`` key) when set, else the embed section's model key. ``required``: the
    directory must be complete, else a ConfigError naming ``key_path`` and the complete directories there are."""
    key = explicit or model_key(ctx.config.embed)
    storage, paths = ctx.storage, ctx.paths
    if required and not storage.is_complete(paths.embeddings(key)):
        base = join(paths.root, "embeddings")
        found = [c for c in storage.list(base)
                 if not c.startswith((".", "_")) and storage.is_complete(join(base, c))]
        raise ConfigError(key_path, f"no complete embeddings at {paths.embeddings(key)} (found: "
                                    f"{', '.join(found) or 'none'}); run the embed stage or set {key_path}")
    return key


def index_name(ctx) -> str:
    """index/<name>/ for this config: index.name, else the indexed embeddings' key."""
    return ctx.config.index.name or embeddings_key(ctx, ctx.config.index.embeddings)


def links_name(ctx) -> str:
    """links/<name>/ for this config: links.name, else index.name, else the indexed embeddings' key."""
    return ctx.config.links.name or index_name(ctx)


# Creator values that name nobody in particular; two such works are not "by the same creator".
UNKNOWN_CREATORS = frozenset({"", "unknown", "anonymous", "unidentified artist", "unidentified", "n/a", "none"})


def normalise_creator(value: Optional[str]) -> Optional[str]:
    """A creator as a grouping key (whitespace and case folded); None for no one in particular. Mining's
    same-creator strategy and training's held-out creators both group works by it."""
    if value is None:
        return None
    key = " ".join(str(value).split()).casefold()
    return None if key in UNKNOWN_CREATORS else key


def collection_of(object_id: str, collection: Optional[str] = None) -> str:
    """A work's collection: the record's ``collection`` when set, else the ``<collection>:`` prefix of its
    object_id ("" when it has none)."""
    if collection:
        return collection
    return object_id.split(":", 1)[0] if ":" in object_id else ""


def collections_of(object_ids, given=None):
    """``collection_of`` over Arrow arrays: ``given`` (a string array, may be null/empty) else the id prefix."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix = pc.if_else(pc.match_substring(object_ids, ":"),
                        pc.list_element(pc.split_pattern(object_ids, ":", max_splits=1), 0),
                        pa.scalar("", pa.string()))
    if given is None:
        return prefix
    missing = pc.fill_null(pc.equal(given, ""), True)
    return pc.if_else(missing, prefix, given)
