"""Typed, validated configuration.

YAML is read into the dataclasses below. Every value is checked against its annotation; unknown keys, wrong types
and bad values raise :class:`ConfigError` naming the key path (``download.per_host_connections: expected an
integer, got 'four'``). ``--set key.path=value`` overrides are applied to the raw YAML tree before validation, so
they are checked exactly like file values.

Each stage owns one section dataclass. Every number has an allowed range in its section's ``RANGES`` (finite,
and bounded above wherever a value could exhaust memory, time or a remote host); floats are never NaN or infinite.
Other checks live in a section's ``check()`` method, which returns ``(key, message)`` pairs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from artsim.errors import ConfigError

SOURCE_KINDS = ("table", "met_api_json", "met_csv", "smk_json", "europeana_json", "iiif_manifest", "europeana_api")
STAGES = ("ingest", "download", "embed", "mine", "train", "index", "links", "report")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low``..``high``, each end inclusive unless marked open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        low = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        high = f"below {self.high:g}" if self.high_open else f"at most {self.high:g}"
        return f"must be {low} and {high}"


@dataclass
class RunConfig:
    root: str = "artifacts/demo"  # URI of the run directory: local path, file://, or s3://bucket/prefix


@dataclass
class StorageConfig:
    s3_endpoint_url: Optional[str] = None  # S3-compatible endpoint; credentials from the usual AWS env vars


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: join RAY_ADDRESS or a running `ray start`, else a private Ray; "local": always a private Ray; or host:port, ray://host:port, "auto"
    num_cpus: Optional[int] = None  # only for a local Ray started by artsim
    # an address that accepts connections but does not answer as Ray: exit 2 naming ray.address after this long
    connect_timeout_s: float = 20.0

    RANGES = {"num_cpus": Range(1, 100_000), "connect_timeout_s": Range(1, 600)}


@dataclass
class SourceConfig:
    # the parser: table, met_api_json, met_csv, smk_json, europeana_json, iiif_manifest, or europeana_api (a harvest)
    kind: Literal["table", "met_api_json", "met_csv", "smk_json", "europeana_json", "iiif_manifest", "europeana_api"]
    # URI of the source file, or of a directory / glob of such files; europeana_api: the Search API URL
    # (https://api.europeana.eu/record/v2/search.json)
    path: str
    collection: str  # prefix of object_id
    mapping: dict[str, str] = field(default_factory=dict)  # kind=table: canonical field <- source column
    # Rewrites image_url from the record's canonical fields, e.g. "http://mirror/{local_id}.jpg" (mirrors, demo).
    image_url_template: Optional[str] = None
    license: Optional[str] = None  # licence to assume where the source gives none
    # europeana_api: Search API parameters (query, reusability, media, profile, ...); reusability defaults to open
    query: dict[str, str] = field(default_factory=dict)
    filters: list[str] = field(default_factory=list)  # europeana_api: qf values, all applied (TYPE:IMAGE, ...)
    # europeana_api: one more qf per partition, each harvested by its own cursor in parallel (e.g. one per
    # DATA_PROVIDER or TYPE); empty: one cursor over the whole result set
    partitions: list[str] = field(default_factory=list)
    api_key_env: str = "EUROPEANA_API_KEY"  # europeana_api: the environment variable that holds the API key
    page_size: int = 100  # europeana_api: rows per page (the API allows up to 100)
    max_records: Optional[int] = None  # europeana_api: stop each partition after this many items (trial runs)
    retries: int = 8  # europeana_api: attempts per page on 429, 5xx and connection errors
    backoff_base_s: float = 1.0  # europeana_api: exponential backoff with jitter: base
    backoff_max_s: float = 120.0  # europeana_api: backoff cap (a longer Retry-After is waited up to this)
    timeout_s: float = 60.0  # europeana_api: per request

    RANGES = {
        "page_size": Range(1, 100),  # the Search API's limit
        "max_records": Range(1, 10**10),
        "retries": Range(1, 100),
        "backoff_base_s": Range(0, 3600),
        "backoff_max_s": Range(0, 3600),
        "timeout_s": Range(0, 3600, low_open=True),
    }

    def check(self):
        if not self.collection or ":" in self.collection:
            yield "collection", "must be a non-empty name without ':'"
        if self.mapping and self.kind != "table":
            yield "mapping", "only kind=table takes a mapping"
        if self.kind == "europeana_api":
            if not self.path.startswith(("http://", "https://")):
                yield "path", "europeana_api: the Search API URL (https://api.europeana.eu/record/v2/search.json)"
            if not self.api_key_env:
                yield "api_key_env", "name the environment variable that holds the Europeana API key"
            if not 1 <= self.page_size <= 100:
                yield "page_size", "must be between 1 and 100 (the Search API's limit)"
            if self.retries < 1:
                yield "retries", "must be at least 1"
            if self.max_records is not None and self.max_records < 1:
                yield "max_records", "must be at least 1"
            if not (0 < self.timeout_s <= 3600 and 0 <= self.backoff_base_s <= self.backoff_max_s <= 3600):
                yield "timeout_s", "timeout_s in (0, 3600], 0 <= backoff_base_s <= backoff_max_s <= 3600"
        elif self.query or self.filters or self.partitions:
            yield "query", "query, filters and partitions are for kind=europeana_api"


@dataclass
class IngestConfig:
    """Limits on reading sources, which outsiders write: past a cap a source stops with a one-line error (bytes,
    documents, stalls) or a row becomes an unparsable row (rows, fields). Only regular files and S3 objects are read."""

    max_source_bytes: int = 4_000_000_000  # bytes read from one source (all its files, after gunzip)
    max_document_bytes: int = 1_000_000_000  # a JSON document (not JSON lines) is parsed whole: at most this size
    max_row_chars: int = 10_000_000  # one CSV row or JSON line
    max_field_chars: int = 131_072  # one CSV field, or one text value of a JSON-lines or Parquet table row
    read_timeout_s: float = 120.0  # a read that returns nothing for this long ends the source with an error

    RANGES = {
        "max_source_bytes": Range(1, 1_000_000_000_000),
        "max_document_bytes": Range(1, 16_000_000_000),
        "max_row_chars": Range(64, 1_000_000_000),
        "max_field_chars": Range(16, 1_000_000_000),
        "read_timeout_s": Range(0, 86_400, low_open=True),
    }


@dataclass
class DownloadConfig:
    image_size: int = 384  # longest side after resize (never enlarged beyond the original)
    # turn the private/loopback/link-local address block off (trusted mirrors only)
    allow_private_addresses: bool = False
    allow_hosts: list[str] = field(default_factory=list)  # hosts/IPs exempt from the private-address block
    per_host_connections: int = 4  # concurrent connections per host, across the whole job
    # request starts per host per second, across the whole job; null: no rate cap (the connection cap still
    # holds), which lets kept-alive connections start requests without asking the limiter each time
    per_host_requests_per_second: Optional[float] = 10.0
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
    respect_robots_txt: bool = True  # robots.txt per origin (RFC 9309), cached job-wide
    respect_x_robots_tag: bool = True  # X-Robots-Tag noai/noimageai/noml/noindex/none -> status opted_out
    allowed_licenses: list[str] = field(default_factory=list)  # empty: every licence
    allow_local_files: bool = False  # file:// and s3:// image URLs
    shard_size: int = 1000  # records per output shard
    fetch_threads: int = 32  # concurrent fetches inside one task
    iiif_rendition: bool = True  # fetch a server-side resized IIIF rendition when a service is known
    # reuse connections (HTTP/1.1 keep-alive) to the same checked address; false: one request per connection
    keep_alive: bool = True
    circuit_breaker_cooldown_s: float = 300.0  # a paused host gets one trial request after this
    limiter_actors: int = 1  # job-wide host limiter actors (hosts hashed over them); ~1 per 20 nodes
    workers: Optional[int] = None  # shard workers (Ray actors, 1 CPU each); null: every CPU of the cluster
    # smallest original width / height kept (upright, before resizing); smaller images get status too_small
    min_width: int = 0
    min_height: int = 0  # see min_width
    # largest long-side / short-side ratio kept (strips, banners); beyond it status too_small; null: any
    max_aspect_ratio: Optional[float] = None

    # Upper bounds: an image is decoded at full size (max_pixels x 3 bytes) by each of fetch_threads threads.
    RANGES = {
        "min_width": Range(0, 100_000),
        "min_height": Range(0, 100_000),
        "max_aspect_ratio": Range(1, 1_000),
        "image_size": Range(16, 8192),
        "per_host_connections": Range(1, 256),
        "per_host_requests_per_second": Range(0, 100_000, low_open=True),  # local mirrors: 10_000
        "timeout_s": Range(0, 3600, low_open=True),
        "max_bytes": Range(1, 2_000_000_000),
        "max_pixels": Range(1, 1_000_000_000),
        "max_redirects": Range(0, 20),
        "retries": Range(0, 20),
        "backoff_base_s": Range(0, 3600),
        "backoff_max_s": Range(0, 86_400),
        "circuit_breaker_failures": Range(1, 1_000_000),
        "quality": Range(1, 100),
        "shard_size": Range(1, 1_000_000),
        "fetch_threads": Range(1, 256),
        "circuit_breaker_cooldown_s": Range(0, 86_400),
        "limiter_actors": Range(1, 1024),
        "workers": Range(1, 100_000),
    }

    def check(self):
        if self.backoff_max_s < self.backoff_base_s:
            yield "backoff_max_s", "backoff needs 0 <= backoff_base_s <= backoff_max_s"
        if not self.user_agent.strip() or any(c in self.user_agent for c in "\r\n"):
            yield "user_agent", "must be a non-empty single line"


@dataclass
class EmbedConfig:
    # a torchvision model name, efficientnet_lite0 (packaged ImageNet weights), open_clip:<arch> (CLIP, e.g.
    # open_clip:ViT-B-32; text queries) or timm:<name> (e.g. timm:vit_small_patch14_dinov2.lvd142m)
    model: str = "resnet50"
    # torchvision weights name, imagenet (efficientnet_lite0), an open_clip pretrained tag (laion2b_s34b_b79k),
    # hub (timm), artifact URI, or null = random init; open_clip/timm weights download into HF_HOME per node
    weights: Optional[str] = None
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

    RANGES = {
        "batch_size": Range(1, 8192),
        "num_actors": Range(1, 4096),
        "num_gpus": Range(0, 64),
        "seed": Range(0, SEED_MAX),
        "image_size": Range(16, 4096),
        "torch_threads": Range(1, 1024),
        "cpus_per_actor": Range(0, 1024),
        "preprocess_concurrency": Range(1, 100_000),
        "rows_per_file": Range(1, 10_000_000),
    }


# The values mine.strategies and mine.term_fields accept; artsim/mine/ implements exactly these (tested). Kept
# here so that reading a config never imports a stage.
STRATEGIES = ("shared_terms", "same_creator", "text", "annotations", "hard_negatives")
TERM_FIELDS = ("subjects", "concepts", "object_type", "medium")


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

    RANGES = {
        "num_triplets": Range(1, 100_000_000),
        "strategies": Range(0, 1_000_000),  # each weight
        "seed": Range(0, SEED_MAX),
        "text_neighbors": Range(1, 1000),
        "text_min_similarity": Range(-1, 1),
        "hard_negative_k": Range(1, 10_000),
        "max_objects": Range(3, 100_000_000),  # a triplet names three objects
    }

    def check(self):
        for name in self.strategies:
            if name not in STRATEGIES:
                yield f"strategies.{name}", f"unknown strategy; expected one of {', '.join(STRATEGIES)}"
        if not any(w > 0 for w in self.strategies.values()):
            yield "strategies", "at least one strategy needs a weight above 0"
        for i, name in enumerate(self.term_fields):
            if name not in TERM_FIELDS:
                yield f"term_fields.{i}", f"unknown field {name!r}; expected some of {', '.join(TERM_FIELDS)}"


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
    head_dim: int = 256  # projection: output dimension; residual: rank of the adapter (output = backbone's)
    # residual: x + up(down(x)) with up = 0 at start, so epoch 0 is the backbone's own embedding and a run that
    # cannot beat it exports it unchanged; projection: a (centred) linear/MLP map to head_dim (random at start)
    head_type: Literal["residual", "projection"] = "residual"
    # what picks the exported epoch, on held-out creators (artsim.train.selection): "every_metric" = no validation
    # metric (criteria recall, same-creator recall, recall per kind of criterion) below the start, then the best
    # mean; "criteria_and_creator" = mean of the criteria and same-creator recalls; "criteria" = the criteria alone
    select_by: Literal["every_metric", "criteria_and_creator", "criteria"] = "every_metric"
    validation_fraction: float = 0.2  # share of objects held out (whole creators; see docs/similarity.md)
    # weight of a loss term that keeps each batch's pairwise cosine similarities where the start (pretrained)
    # model put them: the triplets move what the criteria join, other neighbourhoods stay; 0 = off
    preserve_neighbourhoods: float = 0.0
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

    RANGES = {
        "num_workers": Range(1, 4096),
        "epochs": Range(1, 100_000),
        "batch_size": Range(2, 65_536),
        "learning_rate": Range(0, 10, low_open=True),
        "margin": Range(0, 2, low_open=True, high_open=True),  # cosine distance
        "head_dim": Range(1, 65_536),
        "validation_fraction": Range(0, 1, high_open=True),
        "preserve_neighbourhoods": Range(0, 1000),
        "seed": Range(0, SEED_MAX),
        "head_hidden_dims": Range(1, 65_536),  # each dimension
        "backbone_learning_rate": Range(0, 10),
        "cpus_per_worker": Range(1, 1024),
        "recall_k": Range(1, 10_000),
        "max_failures": Range(-1, 1000),  # -1: unlimited
        "keep_checkpoints": Range(1, 1000),
        "steps_per_epoch": Range(1, 1_000_000_000),
    }

    def check(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            yield "name", "must be a plain directory name"


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

    RANGES = {
        "num_shards": Range(1, 4096),
        "memory_budget_gb": Range(0, 65_536, low_open=True),
        "target_recall": Range(0, 1, low_open=True),
        "exact_max_vectors": Range(0, 100_000_000_000),
        "train_sample": Range(1000, 100_000_000),
        "tuning_queries": Range(10, 1_000_000),
        "seed": Range(0, SEED_MAX),
    }


@dataclass
class LinksConfig:
    k: int = 10  # neighbours per work and target collection
    include_own_collection: bool = False  # also link within a work's own collection (never to itself)
    name: Optional[str] = None  # index/<name>/ to read and links/<name>/ to write; default: as the index stage
    batch_size: int = 1024  # queries per batched search
    num_tasks: Optional[int] = None  # parallel Ray tasks; null: one per available CPU (at most one per batch)

    RANGES = {"k": Range(1, 10_000), "batch_size": Range(1, 65_536), "num_tasks": Range(1, 100_000)}


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

    RANGES = {
        "example_queries": Range(0, 1000),
        "latent_walks": Range(0, 1000),
        "max_works": Range(3, 10_000_000),  # the map and clusters need 3 works
        "tag_text_weight": Range(0, 1),
    }

    def check(self):
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
    ingest: IngestConfig = field(default_factory=IngestConfig)
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
    return _short(value) if isinstance(value, str) else f"{type(value).__name__} {_short(value)}"


def _short(value: Any, limit: int = 40) -> str:
    """repr() of a value for an error message, cut to ``limit`` characters (a 10,000-digit integer is one line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ranges(obj: Any, path: str) -> None:
    """Every number of a section against the section's ``RANGES``; lists and mappings are checked per element."""
    ranges = getattr(type(obj), "RANGES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, list):
            items = [(f"{f.name}.{i}", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            items = [(f"{f.name}.{k}", v) for k, v in value.items()]
        else:
            items = [(f.name, value)]
        allowed = ranges.get(f.name)
        for key, number in items:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if allowed is not None and not allowed.contains(number):  # NaN is in no range
                raise ConfigError(_join(path, key), f"{allowed.describe()}, got {_short(number)}")
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(_join(path, key), f"must be a finite number, got {_short(number)}")


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
        if isinstance(value, str) and _YAML11_MISSED_FLOAT.match(value):
            value = float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string; YAML 1.2 and people read a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {_describe(value)}")
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float: kept, so that the range check names it
            return value
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
    _check_ranges(obj, path)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, message in check():
            raise ConfigError(_join(path, key), message)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# exponent notation without a dot (3e-4, 1E+5), which YAML 1.1 does not take for a float; nothing else is converted
_YAML11_MISSED_FLOAT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


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
        raise ConfigError(key_path, f"--set value {_short(raw)} is not valid YAML: {_yaml_problem(exc)}") from None
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


MAX_CONFIG_BYTES = 10_000_000  # configs are typed by people; a larger file is a mistake (or an attack on the parser)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from a YAML parser error: what is wrong and where (line and column, 1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    import copy

    tree = copy.deepcopy(tree) if tree else {}
    for assignment in overrides:
        apply_override(tree, assignment)
    return _build(Config, tree, "")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file (local path) and apply ``--set`` overrides; raises ConfigError on any problem."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(str(path), "is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(str(path), "config file not found" if not p.exists() else "not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), f"{len(data)} bytes; a config file is at most {MAX_CONFIG_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
                                     f"(byte offset {exc.start})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:  # [[[[...]]]] nested deeper than the parser's stack
        raise ConfigError(str(path), "not valid YAML: nested too deeply") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(str(path), "the top level must be a mapping")
    tree = tree or {}
    # Relative source paths are relative to the working directory (as `ray job submit --working-dir .` expects).
    return config_from_dict(tree, overrides)
