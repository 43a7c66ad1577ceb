"""Typed, validated configuration.

YAML is read into the dataclasses below. Every value is checked against its annotation; unknown keys, wrong types
and bad values raise :class:`ConfigError` naming the key path (``download.per_host_connections: expected an
integer, got 'four'``). ``--set key.path=value`` overrides are applied to the raw YAML tree before validation, so
they are checked exactly like file values.

Each stage owns one section dataclass. Range checks live in a section's ``check()`` method, which returns
``(key, message)`` pairs.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from artsim.errors import ConfigError

SOURCE_KINDS = ("table", "met_api_json", "met_csv", "smk_json", "europeana_json", "iiif_manifest")
STAGES = ("ingest", "download", "embed", "mine", "train", "index", "links", "report")


@dataclass
class RunConfig:
    root: str = "artifacts/demo"  # URI of the run directory: local path, file://, or s3://bucket/prefix


@dataclass
class StorageConfig:
    s3_endpoint_url: Optional[str] = None  # S3-compatible endpoint; credentials from the usual AWS env vars


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: start a local Ray; otherwise e.g. "auto"
    num_cpus: Optional[int] = None  # only for a local Ray started by artsim

    def check(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            yield "num_cpus", "must be at least 1"


@dataclass
class SourceConfig:
    # the parser: table, met_api_json, met_csv, smk_json, europeana_json or iiif_manifest
    kind: Literal["table", "met_api_json", "met_csv", "smk_json", "europeana_json", "iiif_manifest"]
    path: str  # URI of the source file, or of a directory / glob of such files
    collection: str  # prefix of object_id
    mapping: dict[str, str] = field(default_factory=dict)  # kind=table: canonical field <- source column
    # Rewrites image_url from the record's canonical fields, e.g. "http://mirror/{local_id}.jpg" (mirrors, demo).
    image_url_template: Optional[str] = None
    license: Optional[str] = None  # licence to assume where the source gives none

    def check(self):
        if not self.collection or ":" in self.collection:
            yield "collection", "must be a non-empty name without ':'"
        if self.mapping and self.kind != "table":
            yield "mapping", "only kind=table takes a mapping"


@dataclass
class DownloadConfig:
    image_size: int = 384  # longest side after resize
    # turn the private/loopback/link-local address block off (trusted mirrors only)
    allow_private_addresses: bool = False
    allow_hosts: list[str] = field(default_factory=list)  # hosts/IPs exempt from the private-address block
    per_host_connections: int = 4  # concurrent connections per host, across the whole job
    per_host_requests_per_second: float = 10.0  # across the whole job
    timeout_s: float = 20.0  # per request (connect + read)
    max_bytes: int = 50_000_000  # per response body
    max_pixels: int = 100_000_000  # decoded pixels (decompression bombs)
    max_redirects: int = 5  # every hop is checked again before connecting
    retries: int = 3  # for retryable failures (5xx, 429, timeouts, connection errors)
    backoff_base_s: float = 0.5  # exponential backoff with full jitter: base
    backoff_max_s: float = 60.0  # backoff cap; a longer Retry-After ends the record as http_error
    circuit_breaker_failures: int = 20  # consecutive failures that pause a host
    # put your contact here; its product token is what robots.txt rules match
    user_agent: str = "artsim/0.1 (+https://github.com/artsim/artsim; artsim@example.org)"
    format: Literal["jpeg", "webp"] = "jpeg"  # re-encoding of stored images
    quality: int = 90  # re-encoding quality (1-100)
    respect_robots_txt: bool = True  # robots.txt per origin, fetched once per job
    respect_x_robots_tag: bool = True  # X-Robots-Tag noai/noimageai/noml/noindex/none -> status opted_out
    allowed_licenses: list[str] = field(default_factory=list)  # empty: every licence
    allow_local_files: bool = False  # file:// and s3:// image URLs
    shard_size: int = 1000  # records per output shard
    fetch_threads: int = 32  # concurrent fetches inside one task
    iiif_rendition: bool = True  # fetch a server-side resized IIIF rendition when a service is known
    circuit_breaker_cooldown_s: float = 300.0  # a paused host gets one trial request after this
    limiter_actors: int = 1  # job-wide host limiter actors (hosts hashed over them); ~1 per 20 nodes
    workers: Optional[int] = None  # shard workers (Ray actors, 1 CPU each); null: every CPU of the cluster

    def check(self):
        if self.image_size < 16:
            yield "image_size", "must be at least 16"
        if self.per_host_connections < 1:
            yield "per_host_connections", "must be at least 1"
        if self.per_host_requests_per_second <= 0:
            yield "per_host_requests_per_second", "must be positive"
        if self.timeout_s <= 0:
            yield "timeout_s", "must be positive"
        if not 1 <= self.quality <= 100:
            yield "quality", "must be between 1 and 100"
        if self.shard_size < 1:
            yield "shard_size", "must be at least 1"
        if self.fetch_threads < 1:
            yield "fetch_threads", "must be at least 1"
        if self.retries < 0:
            yield "retries", "must be 0 or more"
        if not 0 <= self.max_redirects <= 20:
            yield "max_redirects", "must be between 0 and 20"
        if self.max_bytes < 1:
            yield "max_bytes", "must be at least 1"
        if self.max_pixels < 1:
            yield "max_pixels", "must be at least 1"
        if self.circuit_breaker_failures < 1:
            yield "circuit_breaker_failures", "must be at least 1"
        if self.circuit_breaker_cooldown_s < 0:
            yield "circuit_breaker_cooldown_s", "must be 0 or more"
        if self.limiter_actors < 1:
            yield "limiter_actors", "must be at least 1"
        if self.workers is not None and self.workers < 1:
            yield "workers", "must be at least 1 (or null)"
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            yield "backoff_max_s", "backoff needs 0 <= backoff_base_s <= backoff_max_s"
        if not self.user_agent.strip() or any(c in self.user_agent for c in "\r\n"):
            yield "user_agent", "must be a non-empty single line"


@dataclass
class EmbedConfig:
    model: str = "resnet50"  # a torchvision model name
    weights: Optional[str] = None  # torchvision weights name, artifact URI, or null = random init
    batch_size: int = 32  # images per model call (and per block through the pipeline)
    num_actors: int = 1  # model replicas in the actor pool
    num_gpus: float = 0.0  # per actor; 0 runs on CPU
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # autocast on GPU; CPU always runs fp32
    dtype: Literal["float16", "float32"] = "float32"  # stored vector type
    seed: int = 0  # random init (weights: null) is seeded so that runs agree
    image_size: Optional[int] = None  # crop side fed to the model; null: from the weights (224 for random init)
    torch_threads: Optional[int] = None  # intra-op threads per CPU actor; null: the node's CPUs / num_actors
    cpus_per_actor: float = 1.0  # Ray CPUs reserved per model actor (CPU inference)
    preprocess_concurrency: Optional[int] = None  # max decode/resize tasks at once; null: Ray decides
    rows_per_file: int = 50_000  # rows per output Parquet file

    def check(self):
        if self.image_size is not None and not 16 <= self.image_size <= 4096:
            yield "image_size", "must be between 16 and 4096"
        if self.torch_threads is not None and self.torch_threads < 1:
            yield "torch_threads", "must be at least 1"
        if self.cpus_per_actor < 0:
            yield "cpus_per_actor", "must be 0 or more"
        if self.preprocess_concurrency is not None and self.preprocess_concurrency < 1:
            yield "preprocess_concurrency", "must be at least 1"
        if self.rows_per_file < 1:
            yield "rows_per_file", "must be at least 1"
        if self.batch_size < 1:
            yield "batch_size", "must be at least 1"
        if self.num_actors < 1:
            yield "num_actors", "must be at least 1"
        if self.num_gpus < 0:
            yield "num_gpus", "must be 0 or more"


@dataclass
class MineConfig:
    num_triplets: int = 10_000  # triplets wanted (LiviaAI: at least 10,000)
    # strategy name -> weight; see artsim/mine/strategies.py (STRATEGIES) for the list
    strategies: dict[str, float] = field(default_factory=lambda: {"shared_terms": 1.0, "text": 1.0})
    same_collection: bool = False  # anchor, positive and negative all from one collection
    annotations: Optional[str] = None  # CSV of curator annotations: anchor, similar[, dissimilar]
    seed: int = 0  # mining is deterministic in the seed
    # shared_terms / hard_negatives: which record fields count as controlled terms
    term_fields: list[str] = field(default_factory=lambda: ["subjects", "concepts", "object_type", "medium"])
    text_neighbors: int = 10  # text: positives come from this many nearest texts ...
    text_min_similarity: float = 0.5  # ... with at least this cosine; negatives stay below it
    hard_negative_k: int = 20  # hard_negatives: negatives come from this many nearest images
    embeddings: Optional[str] = None  # hard_negatives: embeddings/<key>/; null: the embed section's model key
    # mine within at most this many objects: above it, a per-collection sample by hash of object_id and seed
    # (annotated objects always join); bounds driver memory and text encoding
    max_objects: int = 200_000

    def check(self):
        from artsim.mine.strategies import STRATEGIES
        from artsim.mine.corpus import TERM_FIELDS

        if self.num_triplets < 1:
            yield "num_triplets", "must be at least 1"
        for name, weight in self.strategies.items():
            if name not in STRATEGIES:
                yield f"strategies.{name}", f"unknown strategy; expected one of {', '.join(STRATEGIES)}"
            if weight < 0:
                yield f"strategies.{name}", "weight must be 0 or more"
        if not any(w > 0 for w in self.strategies.values()):
            yield "strategies", "at least one strategy needs a weight above 0"
        for i, name in enumerate(self.term_fields):
            if name not in TERM_FIELDS:
                yield f"term_fields.{i}", f"unknown field {name!r}; expected some of {', '.join(TERM_FIELDS)}"
        if self.text_neighbors < 1:
            yield "text_neighbors", "must be at least 1"
        if not -1 <= self.text_min_similarity <= 1:
            yield "text_min_similarity", "must be between -1 and 1"
        if self.hard_negative_k < 1:
            yield "hard_negative_k", "must be at least 1"
        if self.max_objects < 3:
            yield "max_objects", "must be at least 3 (a triplet names three objects)"


@dataclass
class TrainConfig:
    name: str = "similarity"  # models/<name>/; submitting again with the same name resumes
    # head: projection head over cached embeddings; finetune: backbone + head on images
    mode: Literal["head", "finetune"] = "head"
    num_workers: int = 2  # Ray Train workers (DDP: gloo on CPU, nccl on GPU)
    use_gpu: bool = False  # one GPU per worker
    epochs: int = 5  # total epochs (raise it and resubmit to train further)
    batch_size: int = 64  # triplets per batch and worker
    learning_rate: float = 1e-3  # Adam learning rate of the head
    margin: float = 0.2  # triplet margin on cosine distance
    mining: Literal["none", "batch_hard", "semi_hard"] = "none"  # in-batch negative mining
    head_dim: int = 256  # output dimension of the projection head
    validation_fraction: float = 0.2  # share of objects held out for validation recall@k
    seed: int = 0  # initial weights, batches and the held-out split
    head_hidden_dims: list[int] = field(default_factory=list)  # [] = linear head; e.g. [512] = one hidden layer
    backbone_learning_rate: Optional[float] = None  # finetune: null = learning_rate / 10
    cpus_per_worker: int = 1  # CPUs (and torch threads) per Train worker
    recall_k: int = 10  # validation recall@k on held-out objects every epoch
    max_failures: int = 3  # worker failures to recover from (restart from the last checkpoint)
    keep_checkpoints: int = 2  # newest checkpoints kept under models/<name>/
    embeddings: Optional[str] = None  # head mode: embeddings/<key>/; null: the embed section's model key
    steps_per_epoch: Optional[int] = None  # batches per worker and epoch; null: one pass over the triplets
    # head mode: also apply the trained head to every cached embedding and write embeddings/<backbone>-<name>/,
    # exactly what `embed` with embed.weights=<export> would write, without running the backbone again
    project_embeddings: bool = True
    # head mode: the head subtracts the mean feature of the collection first (kept in the export); helps most
    # where backbone features share a large common component (random-init backbones)
    center_features: bool = True

    def check(self):
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            yield "steps_per_epoch", "must be at least 1"
        if self.num_workers < 1:
            yield "num_workers", "must be at least 1"
        if self.epochs < 1:
            yield "epochs", "must be at least 1"
        if self.batch_size < 2:
            yield "batch_size", "must be at least 2"
        if self.learning_rate <= 0:
            yield "learning_rate", "must be positive"
        if self.backbone_learning_rate is not None and self.backbone_learning_rate < 0:
            yield "backbone_learning_rate", "must be 0 or more"
        if self.head_dim < 1 or any(d < 1 for d in self.head_hidden_dims):
            yield "head_dim", "dimensions must be at least 1"
        if self.cpus_per_worker < 1:
            yield "cpus_per_worker", "must be at least 1"
        if self.recall_k < 1:
            yield "recall_k", "must be at least 1"
        if self.max_failures < -1:
            yield "max_failures", "must be -1 (unlimited) or more"
        if self.keep_checkpoints < 1:
            yield "keep_checkpoints", "must be at least 1"
        if not self.name or "/" in self.name or self.name.startswith("."):
            yield "name", "must be a plain directory name"
        if not 0 < self.margin < 2:
            yield "margin", "must be in (0, 2) for cosine distance"
        if not 0 <= self.validation_fraction < 1:
            yield "validation_fraction", "must be in [0, 1)"


@dataclass
class IndexConfig:
    name: Optional[str] = None  # index/<name>/; default: the embedding model key
    embeddings: Optional[str] = None  # embeddings/<key>/ to index; default: the key of the embed section's model
    # columns of records/ that where-filters can use
    facets: list[str] = field(default_factory=lambda: ["collection", "creator", "culture", "object_type"])
    factory: Optional[str] = None  # FAISS factory string; null chooses from N, dimension and memory budget
    num_shards: int = 1  # shards, built by parallel Ray tasks and searched in parallel
    memory_budget_gb: float = 4.0  # memory the index may take; picks exact, IVF-SQ8 or IVF-PQ
    target_recall: float = 0.95  # recall@10 vs exact search that tuning must reach
    # Extra ids.parquet columns from records/ (shown with hits, usable in `where` like facets).
    metadata: list[str] = field(default_factory=lambda: ["title", "license", "date_begin", "date_end"])
    exact_max_vectors: int = 1_000_000  # up to this N (and within memory_budget_gb) the index is exact (Flat)
    train_sample: int = 200_000  # vectors the IVF / PQ training sees (at least 40 per IVF list are used)
    tuning_queries: int = 1000  # held-out queries for recall@10 tuning
    seed: int = 0  # training sample and tuning queries

    def check(self):
        if self.num_shards < 1:
            yield "num_shards", "must be at least 1"
        if not 0 < self.target_recall <= 1:
            yield "target_recall", "must be in (0, 1]"
        if self.memory_budget_gb <= 0:
            yield "memory_budget_gb", "must be positive"
        if self.train_sample < 1000:
            yield "train_sample", "must be at least 1000"
        if self.tuning_queries < 10:
            yield "tuning_queries", "must be at least 10"


@dataclass
class LinksConfig:
    k: int = 10  # neighbours per work and target collection
    include_own_collection: bool = False  # also link within a work's own collection (never to itself)
    name: Optional[str] = None  # index/<name>/ to read and links/<name>/ to write; default: as the index stage
    batch_size: int = 1024  # queries per batched search
    num_tasks: Optional[int] = None  # parallel Ray tasks; null: one per available CPU (at most one per batch)

    def check(self):
        if self.k < 1:
            yield "k", "must be at least 1"
        if self.batch_size < 1:
            yield "batch_size", "must be at least 1"
        if self.num_tasks is not None and self.num_tasks < 1:
            yield "num_tasks", "must be at least 1"


@dataclass
class ReportConfig:
    name: str = "report"  # reports/<name>/index.html
    example_queries: int = 3  # demo: example queries printed at the end
    # suggested subjects/concepts from visual neighbours and label-to-metadata text similarity, with a held-out
    # evaluation of each signal
    suggest_tags: bool = True
    tag_text_weight: float = 0.5  # weight of the text signal in suggested tags (0: neighbours only, no text model)
    classify_vocabulary: bool = True  # Europeana's 20 image categories from metadata text + image neighbours
    latent_walks: int = 2  # paths through the embedding space between works of different collections
    # map, clusters, tags, vocabulary and walks use at most this many works: a deterministic sample, stratified per
    # collection, of larger runs (the driver holds only their vectors); counts always describe the whole run
    max_works: int = 20_000
    # data-quality audit (reports/<name>/audit.json + a section): completeness, duplicates, near-duplicate images,
    # variant spellings, licences, failed image links by host
    audit: bool = True
    # neighbour sheets for these works (object ids) or clusters ("cluster:3"): nearest and farthest works in other
    # collections, one printed page each (reports/<name>/sheets.html); empty: the works with the strongest links
    sheets: list[str] = field(default_factory=list)
    walk: list[str] = field(default_factory=list)  # [start id, end id]: a latent walk between two chosen works

    def check(self):
        if self.latent_walks < 0:
            yield "latent_walks", "must be 0 or more"
        if self.max_works < 3:
            yield "max_works", "must be 3 or more (the map and clusters need 3 works)"
        if not 0.0 <= self.tag_text_weight <= 1.0:
            yield "tag_text_weight", "must be between 0 and 1"
        if self.walk and (len(self.walk) != 2 or self.walk[0] == self.walk[1]):
            yield "walk", "must be two different object ids: [start, end]"
        for i, item in enumerate(self.sheets):
            if not item.strip():
                yield f"sheets.{i}", "must be an object id or cluster:N"
            elif item.startswith("cluster:") and not item[len("cluster:"):].isdigit():
                yield f"sheets.{i}", f"{item!r}: a cluster is named cluster:N with N a number (the report's numbering)"


@dataclass
class PipelineConfig:
    # what `artsim pipeline` runs, in order
    stages: list[str] = field(default_factory=lambda: ["ingest", "download", "embed", "index", "links", "report"])

    def check(self):
        for i, stage in enumerate(self.stages):
            if stage not in STAGES:
                yield f"stages.{i}", f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}"


@dataclass
class Config:
    sources: list[SourceConfig] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{type(value).__name__} {value!r}"


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if value is None:
            raise ConfigError(path, "must not be null")
        return _convert(value, inner[0], path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"expected one of {', '.join(map(str, args))}, got {_describe(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        return [_convert(v, args[0], f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        return {_convert(k, args[0], path): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if value is None:
        raise ConfigError(path, "must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module, not user input


def _build(cls: type, data: Any, path: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "config", f"expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(_join(path, str(key)), f"unknown key (known keys here: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, message in check():
            raise ConfigError(_join(path, key), message)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``key.path=value`` to a raw config tree; the value is parsed as YAML (``4``, ``true``, ``[a, b]``)."""
    if "=" not in assignment:
        raise ConfigError(assignment, "--set expects key.path=value")
    key_path, raw = assignment.split("=", 1)
    keys = key_path.strip().split(".")
    if not all(keys):
        raise ConfigError(key_path, "empty key in --set path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key_path, f"cannot parse value {raw!r}: {exc}") from None
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, key, here)]
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
        if not isinstance(node, (dict, list)):
            raise ConfigError(here, f"is a {type(node).__name__}, cannot set a key inside it")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key_path)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, path: str) -> int:
    try:
        index = int(key)
    except ValueError:
        raise ConfigError(path, f"expected a list index, got {key!r}") from None
    if not 0 <= index < len(node):
        raise ConfigError(path, f"index {index} out of range (the list has {len(node)} entries)")
    return index


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    import copy

    tree = copy.deepcopy(tree) if tree else {}
    for assignment in overrides:
        apply_override(tree, assignment)
    return _build(Config, tree, "")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (local path) and apply ``--set`` overrides; raises ConfigError on any problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    tree = tree or {}
    # Relative source paths are relative to the working directory (as `ray job submit --working-dir .` expects).
    return config_from_dict(tree, overrides)
