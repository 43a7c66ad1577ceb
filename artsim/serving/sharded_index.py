"""`ShardedIndex`: the serving API over index/<name>/ (docs/DESIGN.md, "Python API for downstream services").

    index = ShardedIndex.open("s3://bucket/run/index/resnet50", cache_dir="/var/cache/artsim")
    index.search_ids(["met:436535"], k=10, where={"culture": {"not": "Dutch"}})

Opening: the manifest is read and validated; the id map and every shard are copied into a local cache (content-
addressed by sha256, so indexes share files and a rebuilt shard never overwrites one being read), and each file's
size and sha256 are checked against the manifest *before* pyarrow or FAISS parses it (a mismatch raises
:class:`artsim.errors.IntegrityError`). Local indexes are read in place unless a cache_dir is given. Shards are
memory-mapped where FAISS supports it.

Searching: the shards are searched in parallel threads and their top-k lists merged. ``where`` (see
:mod:`artsim.serving.filters`) is a pre-filter, applied in one of two ways:

- **exact over the subset** when its vectors take at most ``exact_subset_max_bytes`` and, for IVF indexes, the
  subset is small (fraction <= sqrt(nprobe / nlist), where scanning the subset costs less than probing lists):
  the subset's stored vectors are reconstructed once (cached per where) and scored with a matrix product;
- **an IDSelector** (``faiss.IDSelectorBatch`` in ``SearchParameters``) otherwise, with nprobe raised by
  1 / fraction (capped at nlist) so that the probed lists still hold about as many allowed vectors as an
  unfiltered search sees.

Scores are inner products of L2-normalised vectors (cosine similarity). ``farthest`` searches with the negated
query, so an IVF index probes the lists nearest to -q, which hold the least similar works; reported scores are the
true similarities (lowest first).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from artsim.errors import ArtsimError, IntegrityError
from artsim.serving.filters import normalize_where, parse_where, where_key, where_mask
from artsim.rundir.index_manifest import MANIFEST, validate_manifest
from artsim.serving.shards import ShardSet, read_shard, verify_file
from artsim.serving.topk import EMPTY_ID, exact_topk
from artsim.storage import Storage, is_s3, join, strip_scheme

__all__ = ["ShardedIndex", "parse_where", "read_index_ids"]

EXACT_SUBSET_MAX_BYTES = 512 * 1024 ** 2
TEXT_MODEL_PREFIXES = ("open_clip:",)  # embed.model values whose embedders offer embed_texts
MAX_QUERY_IMAGE_BYTES = 50_000_000
_INTERNAL_COLUMNS = ("shard",)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "artsim", "index")


@dataclass
class _Subset:
    ids: np.ndarray  # allowed FAISS ids
    fraction: float
    vectors: Optional[np.ndarray] = None  # set: exact search over these
    selector: Any = None  # set: faiss.IDSelectorBatch for the shards


class ShardedIndex:
    def __init__(self, uri: str, manifest: dict, shards: ShardSet, table: pa.Table, storage: Storage,
                 exact_subset_max_bytes: int = EXACT_SUBSET_MAX_BYTES):
        self.uri = uri
        self.manifest = manifest
        self.shards = shards
        self.table = table  # ids.parquet, sorted by id
        self.storage = storage
        self.exact_subset_max_bytes = exact_subset_max_bytes
        self.dim = int(manifest["dim"])
        self.ntotal = int(manifest["ntotal"])
        self.params = dict(manifest.get("search_params") or {})
        self._ids = table.column("id").to_numpy()
        self._shard_of = table.column("shard").to_numpy()
        self._object_ids = np.asarray(table.column("object_id").to_pylist(), dtype=object)
        self._row_of_object: Optional[dict] = None
        self._subsets: OrderedDict[str, _Subset] = OrderedDict()
        # Guards the subset cache and the lazily built embedder only; searches themselves run without a lock
        # (FAISS releases the GIL), so concurrent requests use every core.
        self._lock = threading.Lock()
        self.columns = {name: table.schema.field(name).type for name in table.column_names
                        if name not in ("id",) + _INTERNAL_COLUMNS}
        self._embedder = None
        self._files: list[str] = []  # set by open(): the verified local files behind this index

    # -- opening -----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, cache_dir: Optional[str] = None, storage: Optional[Storage] = None,
             mmap: bool = True) -> "ShardedIndex":
        storage = storage or Storage()
        uri = uri.rstrip("/")
        manifest, files = _read_manifest(uri, storage, cache_dir)
        # Every file is verified (size + sha256) before any of them is parsed: a corrupt shard is refused without
        # pyarrow or FAISS ever reading a byte of this version (tests/test_index_integrity.py counts the calls).
        ids_path = files.fetch(manifest["ids"], manifest["ids_sha256"], manifest["ids_bytes"], ".parquet")
        shard_paths = [files.fetch(e["path"], e["sha256"], e["bytes"], ".faiss") for e in manifest["shards"]]
        table = _read_id_table(ids_path, manifest)
        shards = []
        for i, (entry, path) in enumerate(zip(manifest["shards"], shard_paths)):
            shard = read_shard(path, mmap=mmap)
            _check_shard(shard, entry, manifest, i)
            shards.append(shard)
        index = cls(uri, manifest, ShardSet(shards, manifest.get("search_params")), table, storage)
        index._files = [ids_path] + shard_paths
        return index

    def close(self) -> None:
        self.shards.close()

    # -- metadata ----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest.get("name", ""))

    @property
    def version(self) -> str:
        """The manifest's identity: a new build (new manifest.json) under the same URI has a new version."""
        return manifest_version(self.manifest)

    def files(self) -> list[str]:
        """Local paths of the verified files this index reads (cache entries when loaded from S3)."""
        return list(self._files)

    def object_ids(self) -> list[str]:
        return self._object_ids.tolist()

    def _rows_for_objects(self, object_ids: Sequence[str]) -> np.ndarray:
        if self._row_of_object is None:
            self._row_of_object = {o: i for i, o in enumerate(self._object_ids.tolist())}
        rows = [self._row_of_object.get(o) for o in object_ids]
        missing = [o for o, r in zip(object_ids, rows) if r is None]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" …" if len(missing) > 5 else "")
            raise ArtsimError(f"object_id not in index {self.name!r}: {shown}")
        return np.asarray(rows, dtype=np.int64)

    def contains(self, object_id: str) -> bool:
        if self._row_of_object is None:
            self._row_of_object = {o: i for i, o in enumerate(self._object_ids.tolist())}
        return object_id in self._row_of_object

    def rows(self, object_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of indexed works in :attr:`table` (ArtsimError for unknown object_ids)."""
        return self._rows_for_objects(object_ids)

    def metadata(self, object_id: str) -> dict:
        row = int(self._rows_for_objects([object_id])[0])
        return self._row_dicts(np.array([row]))[0]

    def _row_dicts(self, rows: np.ndarray) -> list[dict]:
        cols = [c for c in self.table.column_names if c not in _INTERNAL_COLUMNS]
        return self.table.select(cols).take(pa.array(rows, pa.int64())).to_pylist()

    def faiss_ids(self, object_ids: Sequence[str]) -> np.ndarray:
        """The int64 FAISS ids of indexed works (ArtsimError for unknown object_ids)."""
        return self._ids[self._rows_for_objects(object_ids)]

    def object_ids_of(self, ids: np.ndarray) -> np.ndarray:
        """object_ids (object array) of FAISS ids returned by search_arrays (ids must be valid, not -1)."""
        ids = np.asarray(ids, dtype=np.int64)
        positions = np.searchsorted(self._ids, ids)
        if len(ids) and (positions.max() >= len(self._ids) or (self._ids[positions] != ids).any()):
            raise ArtsimError("object_ids_of: an id that is not in this index")
        return self._object_ids[positions]

    def vectors_for_ids(self, object_ids: Sequence[str]) -> np.ndarray:
        """Stored vectors of indexed works (decoded codes for quantized indexes)."""
        rows = self._rows_for_objects(object_ids)
        return self.shards.reconstruct(self._ids[rows], self._shard_of[rows])

    # -- search ------------------------------------------------------------------------------------------------
    def search(self, vectors, k: int = 10, where: Optional[dict] = None) -> list[list[dict]]:
        scores, ids = self.search_arrays(vectors, k, where)
        return self._hits(scores, ids)

    def farthest(self, vectors, k: int = 10, where: Optional[dict] = None) -> list[list[dict]]:
        scores, ids = self.search_arrays(vectors, k, where, farthest=True)
        return self._hits(scores, ids)

    def search_text(self, texts, k: int = 10, where: Optional[dict] = None,
                    farthest: bool = False) -> list[list[dict]]:
        """Works nearest a text (or each of several texts), for an index built with a CLIP model
        (``open_clip:<arch>``): the text is embedded by the same model's text tower, L2-normalised like the image
        vectors. Any other model: ArtsimError saying so."""
        vectors = self.embed_texts([texts] if isinstance(texts, str) else list(texts))
        return (self.farthest if farthest else self.search)(vectors, k, where)

    def search_ids(self, object_ids: Sequence[str], k: int = 10, where: Optional[dict] = None) -> list[list[dict]]:
        """Neighbours of indexed works; a work is never its own hit."""
        object_ids = _as_list(object_ids)
        rows = self._rows_for_objects(object_ids)
        scores, ids = self.search_arrays(self.shards.reconstruct(self._ids[rows], self._shard_of[rows]), k, where,
                                         exclude_ids=self._ids[rows])
        return self._hits(scores, ids)

    def farthest_ids(self, object_ids: Sequence[str], k: int = 10, where: Optional[dict] = None
                     ) -> list[list[dict]]:
        object_ids = _as_list(object_ids)
        rows = self._rows_for_objects(object_ids)
        scores, ids = self.search_arrays(self.shards.reconstruct(self._ids[rows], self._shard_of[rows]), k, where,
                                         exclude_ids=self._ids[rows], farthest=True)
        return self._hits(scores, ids)

    def search_arrays(self, vectors, k: int, where: Optional[dict] = None, exclude_ids: Optional[np.ndarray] = None,
                      farthest: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The array form behind every search: (scores, ids) of shape (nq, k), best first, id -1 where fewer than
        k works qualify. ``exclude_ids[i]`` is dropped from query i's hits (the query work itself)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ArtsimError(f"k must be a positive integer, got {k!r}")
        queries = self._check_queries(vectors)
        if farthest:
            queries = -queries
        kk = int(k) + (1 if exclude_ids is not None else 0)
        subset = self._subset(where)
        nq = len(queries)
        if subset is None:
            scores, ids = self.shards.search(queries, kk)
        elif len(subset.ids) == 0:
            scores = np.full((nq, kk), -np.inf, np.float32)
            ids = np.full((nq, kk), EMPTY_ID, np.int64)
        elif subset.vectors is not None:
            scores, ids = exact_topk(queries, subset.vectors, subset.ids, kk)
        else:
            scores, ids = self.shards.search(queries, kk, params=self._filtered_params(subset.fraction),
                                             selector=subset.selector)
        if farthest:
            scores = -scores
        if exclude_ids is not None:
            scores, ids = _drop(scores, ids, np.asarray(exclude_ids, dtype=np.int64), int(k))
        return scores[:, :k], ids[:, :k]

    def _check_queries(self, vectors) -> np.ndarray:
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ArtsimError(f"query vectors must have shape (n, {self.dim}), got {tuple(np.shape(vectors))}")
        if not np.isfinite(q).all():
            raise ArtsimError("query vectors contain NaN or infinity")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ArtsimError("a query vector is all zeros")
        return np.ascontiguousarray(q / norms)  # cosine similarity, like the indexed vectors

    def _subset(self, where: Optional[dict]) -> Optional[_Subset]:
        norm = normalize_where(where, self.columns)
        if not norm:
            return None
        key = where_key(norm)
        with self._lock:
            if key in self._subsets:
                self._subsets.move_to_end(key)
                return self._subsets[key]
        mask = where_mask(self.table, norm)
        n = int(mask.sum())
        if n == len(mask):
            subset = None
        else:
            subset = _Subset(ids=self._ids[mask], fraction=n / max(len(mask), 1))
            small_enough = n * self.dim * 4 <= self.exact_subset_max_bytes
            if self.shards.kind == "ivf":
                nprobe = int(self.params.get("nprobe", 1))
                small_enough = small_enough and subset.fraction <= math.sqrt(nprobe / max(self.shards.nlist, 1))
            if n == 0:
                pass
            elif small_enough:
                subset.vectors = self.shards.reconstruct(subset.ids, self._shard_of[mask])
            else:
                import faiss

                subset.selector = faiss.IDSelectorBatch(np.ascontiguousarray(subset.ids))
        with self._lock:
            self._subsets[key] = subset
            while len(self._subsets) > 8:  # each entry can hold a subset's vectors: keep a few recent ones
                self._subsets.popitem(last=False)
        return subset

    def _filtered_params(self, fraction: float) -> dict:
        params = dict(self.params)
        if self.shards.kind == "ivf" and "nprobe" in params:
            nprobe = min(self.shards.nlist, math.ceil(params["nprobe"] / max(fraction, 1e-9)))
            params["nprobe"] = nprobe
            if "efSearch" in params:
                params["efSearch"] = max(int(params["efSearch"]), nprobe)
        if self.shards.kind == "hnsw":
            params["efSearch"] = max(int(params.get("efSearch", 16)), 64)
        return params

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[dict]]:
        positions = np.searchsorted(self._ids, ids.clip(min=0))
        valid = ids != EMPTY_ID
        flat_rows = positions[valid]
        dicts = self._row_dicts(flat_rows) if len(flat_rows) else []
        out, cursor = [], 0
        for q in range(len(ids)):
            hits = []
            for j in np.nonzero(valid[q])[0]:
                meta = dicts[cursor]
                cursor += 1
                hit = {"object_id": meta.pop("object_id"), "score": float(scores[q, j]), "rank": len(hits) + 1}
                hit.update(meta)
                hits.append(hit)
            out.append(hits)
        return out

    # -- images ------------------------------------------------------------------------------------------------
    def embed_images(self, paths: Sequence[str]) -> np.ndarray:
        """Embed image files with the model recorded in the manifest (artsim.embed)."""
        images = []
        for path in _as_list(paths):
            try:
                size = os.path.getsize(path)
            except OSError:
                raise ArtsimError(f"{path}: image file not found") from None
            if size > MAX_QUERY_IMAGE_BYTES:
                raise ArtsimError(f"{path}: {size} bytes is over the {MAX_QUERY_IMAGE_BYTES}-byte limit")
            with open(path, "rb") as f:
                images.append(f.read())
        return self.embed_image_bytes(images, ", ".join(map(str, _as_list(paths))))

    def embed_image_bytes(self, images: Sequence[bytes], label: str = "the image") -> np.ndarray:
        """Embed encoded images (bytes already size-checked by the caller) with the manifest's model."""
        embedder = self._get_embedder()
        try:
            vectors = embedder.embed_pil(list(images))
        except ArtsimError:
            raise
        except Exception as exc:  # decode errors of a hostile or broken file: one line for the user
            raise ArtsimError(f"cannot embed {label}: {exc}") from None
        if vectors.shape[1] != self.dim:
            raise ArtsimError(f"the model gives {vectors.shape[1]}-d vectors but the index holds {self.dim}-d")
        return vectors

    def supports_text(self) -> bool:
        """Whether text queries can work: a CLIP-style model (one whose embedder offers ``embed_texts``)."""
        if self._embedder is not None:
            return callable(getattr(self._embedder, "embed_texts", None))
        model = self.manifest.get("model") or {}
        spec = model.get("spec") if isinstance(model.get("spec"), dict) else {}
        # a trained head or a fine-tuned image tower leaves the space the text tower was trained to meet; an
        # artifact that carries both towers (save_clip_artifact) keeps them together
        retrained = spec.get("head") is not None or (bool(spec.get("includes_backbone_weights"))
                                                     and spec.get("text_tower") is None)
        return str(model.get("backbone") or "").startswith(TEXT_MODEL_PREFIXES) and not retrained

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts into the image space; only models that embed text (CLIP: ``open_clip:<arch>``) can.

        The plug-in point is the embedder's ``embed_texts(list[str]) -> (n, dim) array``: any embedder that
        ``embedder_for_manifest`` builds (or that :meth:`attach_embedder` sets) and that offers it serves text."""
        if not self.supports_text():
            model = self.manifest.get("model") or {}
            backbone = model.get("backbone") or "no recorded model"
            if str(backbone).startswith(TEXT_MODEL_PREFIXES):
                backbone += " with a trained head or fine-tuned image tower (its text tower no longer matches)"
            raise ArtsimError(f"text queries need a CLIP model (embed.model: open_clip:<arch>); index "
                              f"{self.name!r} was built with {backbone}: query by id, vector or image")
        embedder = self._get_embedder()
        embed = getattr(embedder, "embed_texts", None)
        if not callable(embed):
            raise ArtsimError(f"the model of index {self.name!r} ({type(embedder).__name__}) cannot embed text")
        vectors = np.asarray(embed(list(texts)), dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ArtsimError(f"the text model gives vectors of shape {vectors.shape}; the index holds {self.dim}-d")
        return vectors

    def attach_embedder(self, embedder) -> None:
        """Use ``embedder`` (``embed_pil`` for images, ``embed_texts`` for text) instead of rebuilding the
        manifest's model: a server keeps the model it already built when a reload brings the same model."""
        with self._lock:
            self._embedder = embedder

    @property
    def embedder_if_built(self):
        return self._embedder

    def _get_embedder(self):
        with self._lock:  # one build, however many requests arrive first
            if self._embedder is None:
                self._embedder = embedder_for_manifest(self.manifest.get("model") or {}, self.storage)
            return self._embedder


def manifest_version(manifest: dict) -> str:
    """A short, stable identity of a manifest's content (sha256 of its canonical JSON)."""
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_index_ids(uri: str, storage: Optional[Storage] = None, cache_dir: Optional[str] = None
                   ) -> tuple[dict, pa.Table]:
    """The validated manifest and the verified id map of an index, without loading any shard."""
    manifest, table, _ = _open_manifest_and_ids(uri.rstrip("/"), storage or Storage(), cache_dir)
    return manifest, table


class _VerifiedFiles:
    """Local, sha256-verified copies of the files a manifest names."""

    def __init__(self, uri: str, storage: Storage, cache_dir: Optional[str]):
        self.uri, self.storage = uri, storage
        self.in_place = not is_s3(uri) and cache_dir is None
        self.cache_dir = None
        if not self.in_place:
            self.cache_dir = cache_dir or default_cache_dir()
            os.makedirs(self.cache_dir, exist_ok=True)

    def fetch(self, rel: str, sha256: str, size: int, suffix: str) -> str:
        label = join(self.uri, rel)
        if self.in_place:
            path = os.path.join(os.path.abspath(strip_scheme(self.uri)), *rel.split("/"))
            if not os.path.exists(path):
                raise IntegrityError(f"{label}: named in the manifest but missing")
        else:
            # Content-addressed: indexes share files, and a rebuilt shard never overwrites one being read.
            path = os.path.join(self.cache_dir, f"{sha256}{suffix}")
            if not os.path.exists(path) or os.path.getsize(path) != size:
                tmp = os.path.join(self.cache_dir, f".{sha256}.{uuid.uuid4().hex}.tmp")
                try:
                    try:
                        self.storage.download_file(label, tmp)
                    except FileNotFoundError:
                        raise IntegrityError(f"{label}: named in the manifest but missing") from None
                    verify_file(tmp, sha256, size, label)
                    os.replace(tmp, path)  # only verified bytes ever get the cache name
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
        verify_file(path, sha256, size, label)  # on every open: a cached file may have changed since
        return path


def _read_manifest(uri: str, storage: Storage, cache_dir: Optional[str]):
    manifest_uri = join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise ArtsimError(f"{uri}: no {MANIFEST} (not an artsim index, or its build has not finished)")
    manifest = validate_manifest(storage.read_json(manifest_uri), manifest_uri)
    return manifest, _VerifiedFiles(uri, storage, cache_dir)


def _open_manifest_and_ids(uri: str, storage: Storage, cache_dir: Optional[str]):
    manifest, files = _read_manifest(uri, storage, cache_dir)
    ids_path = files.fetch(manifest["ids"], manifest["ids_sha256"], manifest["ids_bytes"], ".parquet")
    return manifest, _read_id_table(ids_path, manifest), files


def embedder_for_manifest(model: dict, storage: Storage):
    """Rebuild the embedding model that the manifest names (artsim.embed), checking it is the same one."""
    try:
        from artsim.models.embedder import build_embedder
        from artsim.models.spec import ModelSpec
    except ImportError as exc:
        raise ArtsimError(f"image queries need artsim.embed ({exc})") from None
    from artsim.config import EmbedConfig

    if not isinstance(model, dict) or not model:
        raise ArtsimError("this index's manifest records no embedding model; query by --id or by vector")
    weights = model.get("weights", "absent")
    spec_dict = model.get("spec")
    spec = ModelSpec.from_dict(spec_dict, "manifest.model.spec") if spec_dict is not None else None
    if weights == "absent":  # older _model.json: derive the config from the spec where that is unambiguous
        if spec is None or spec.head is not None or spec.includes_backbone_weights:
            raise ArtsimError("the index was built with an artsim-trained model whose location the manifest does "
                              "not record; embed the image yourself and use ShardedIndex.search")
        weights = spec.backbone_weights
    backbone = model.get("backbone") or (spec.backbone if spec else None)
    if not isinstance(backbone, str):
        raise ArtsimError("manifest.model: no backbone name")
    seed = (spec.backbone_seed if spec and spec.backbone_seed is not None else model.get("seed", 0)) or 0
    cfg = EmbedConfig(model=backbone, weights=weights, seed=int(seed))
    from artsim.rundir.names import is_artifact_uri

    # An artifact carries its own input size; a bare backbone is rebuilt at the size it embedded with.
    image_size = None if (spec is None or (weights is not None and is_artifact_uri(weights))) else spec.image_size
    embedder = build_embedder(cfg, storage, image_size=image_size)
    expected = model.get("weights_id")
    if expected and embedder.weights_id != expected:
        raise IntegrityError(f"the model rebuilt for image queries has weights {embedder.weights_id!r}, but the "
                             f"index was built with {expected!r}")
    return embedder


def _read_id_table(path: str, manifest: dict) -> pa.Table:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # verified bytes that still do not parse: a broken build, not a crash
        raise IntegrityError(f"ids.parquet: not readable Parquet ({exc})") from None
    for column in ("id", "object_id", "shard"):
        if column not in table.column_names:
            raise IntegrityError(f"ids.parquet: missing column {column!r}")
    if table.num_rows != manifest["ntotal"]:
        raise IntegrityError(f"ids.parquet: {table.num_rows} rows but the manifest says {manifest['ntotal']}")
    table = table.sort_by("id")
    ids = table.column("id").to_numpy()
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise IntegrityError("ids.parquet: repeated ids")
    shard = table.column("shard").to_numpy()
    if len(shard) and (shard.min() < 0 or shard.max() >= len(manifest["shards"])):
        raise IntegrityError("ids.parquet: a shard number outside the manifest's shards")
    return table


def _check_shard(shard, entry: dict, manifest: dict, i: int) -> None:
    import faiss

    if shard.d != manifest["dim"]:
        raise IntegrityError(f"shard {i}: dimension {shard.d}, manifest says {manifest['dim']}")
    if shard.ntotal != entry["ntotal"]:
        raise IntegrityError(f"shard {i}: {shard.ntotal} vectors, manifest says {entry['ntotal']}")
    if shard.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IntegrityError(f"shard {i}: not an inner-product index")


def _drop(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove ``exclude[i]`` from row i and shift the rest up (stable), keeping k columns."""
    keep = ids != exclude[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    ids = np.take_along_axis(ids, order, axis=1)[:, :k]
    kept = np.take_along_axis(keep, order, axis=1)[:, :k]
    return np.where(kept, scores, -np.inf), np.where(kept, ids, EMPTY_ID)


def _as_list(values) -> list:
    if isinstance(values, (str, bytes)):
        return [values]
    return list(values)
