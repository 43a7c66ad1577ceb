"""index/<name>/manifest.json: what it holds and how a reader validates it before trusting anything it names.

A manifest is read from storage that may have been tampered with, so every field a reader acts on is checked:
shard paths must be relative paths inside the index directory (no ``..``, no scheme, no absolute path), checksums
must be 64 hex digits, counts must add up.
"""
from __future__ import annotations

import re
from typing import Any

from artsim.errors import IntegrityError

FORMAT = "artsim-index/1"
MANIFEST = "manifest.json"
IDS = "ids.parquet"
METRIC = "inner_product"
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_relative_path(path: Any, label: str) -> str:
    if not isinstance(path, str) or not _SAFE_PATH.match(path) or any(p in (".", "..") for p in path.split("/")):
        raise IntegrityError(f"manifest: {label} {path!r} is not a plain relative path inside the index directory")
    return path


def _int(value: Any, label: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise IntegrityError(f"manifest: {label} must be an integer >= {minimum}, got {value!r}")
    return value


def _sha(value: Any, label: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise IntegrityError(f"manifest: {label} must be a sha256 hex digest, got {value!r}")
    return value


def validate_manifest(m: Any, uri: str = "manifest") -> dict:
    """Raise IntegrityError naming the first problem; return the manifest unchanged when it is sound."""
    if not isinstance(m, dict):
        raise IntegrityError(f"{uri}: not a JSON object")
    if m.get("format") != FORMAT:
        raise IntegrityError(f"{uri}: format {m.get('format')!r} is not {FORMAT!r} (not an artsim index, or "
                             "written by an incompatible version)")
    if m.get("metric") != METRIC:
        raise IntegrityError(f"{uri}: metric {m.get('metric')!r}; artsim indexes use {METRIC!r}")
    _int(m.get("dim"), "dim", 1)
    ntotal = _int(m.get("ntotal"), "ntotal")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise IntegrityError(f"{uri}: shards must be a non-empty list")
    total = 0
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise IntegrityError(f"{uri}: shards[{i}] must be an object")
        check_relative_path(shard.get("path"), f"shards[{i}].path")
        _sha(shard.get("sha256"), f"shards[{i}].sha256")
        _int(shard.get("bytes"), f"shards[{i}].bytes", 1)
        total += _int(shard.get("ntotal"), f"shards[{i}].ntotal")
    if total != ntotal:
        raise IntegrityError(f"{uri}: shards hold {total} vectors but ntotal is {ntotal}")
    check_relative_path(m.get("ids"), "ids")
    _sha(m.get("ids_sha256"), "ids_sha256")
    _int(m.get("ids_bytes"), "ids_bytes", 1)
    if not isinstance(m.get("search_params", {}), dict):
        raise IntegrityError(f"{uri}: search_params must be an object")
    return m
