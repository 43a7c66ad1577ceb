"""`artsim plan N -c CONFIG`: what a run of N works would take on the config's cluster, before paying for it.

Per stage: where it runs (the driver, CPU workers or GPU workers of the cluster file), how many nodes, the projected
wall time, node-hours and cost. Rates come from the summaries that earlier runs recorded (`summaries/<stage>.json`,
whose `_run` says how long the stage took and on how many CPUs/GPUs), normalised per CPU, per GPU or per driver;
where no run recorded a stage, a stated default is used. Every assumption is printed with the table.

Plain functions, no Ray: the projection is arithmetic on recorded numbers (tests/test_plan.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from artsim.errors import ArtsimError

# Stated defaults, per unit of work per second, used where no recorded run measured a stage. Orders of magnitude
# from this repository's measurements on small machines (README/docs), rounded down; replace them with a real
# run's rates by running a sample (e.g. 10,000 works) on the cluster first.
DEFAULT_RATES = {
    # stage: (units per second, per what)
    "ingest": (20_000.0, "driver"),
    "download": (4.0, "cpu"),  # latency-bound fetches; politeness caps apply on top
    "embed_gpu": (400.0, "gpu"),
    "embed_cpu": (8.0, "cpu"),
    "mine": (5_000.0, "driver"),
    "train_gpu": (20_000.0, "worker"),  # triplet-epochs
    "train_cpu": (2_000.0, "worker"),
    "index": (20_000.0, "cpu"),
    "links": (2_000.0, "cpu"),
    "report": (50_000.0, "driver"),
}

# On-demand USD per hour (AWS eu-west-1, Linux, as listed when this was written); --price TYPE=USD overrides.
DEFAULT_PRICES = {
    "m6i.2xlarge": 0.428, "m6i.4xlarge": 0.856, "c6i.4xlarge": 0.768, "c6i.8xlarge": 1.536, "c6i.16xlarge": 3.072,
    "g6.2xlarge": 1.075, "g6.4xlarge": 1.454, "g6.12xlarge": 5.075, "g5.4xlarge": 1.793, "p4d.24xlarge": 35.39,
}
STARTUP_SECONDS = 180.0  # per stage that needs workers: the autoscaler launching nodes and pulling the image


@dataclass
class NodeType:
    name: str
    cpus: float
    gpus: float
    max_workers: int
    instance: str = ""
    spot: bool = False


@dataclass
class Cluster:
    head: NodeType
    workers: list[NodeType]
    source: str

    def pick(self, gpu: bool) -> Optional[NodeType]:
        """The worker type a stage runs on: the largest enabled GPU type, or the largest enabled CPU-only type."""
        kinds = [w for w in self.workers if w.max_workers > 0 and (w.gpus > 0) == gpu]
        return max(kinds, key=lambda w: (w.gpus, w.cpus), default=None)


@dataclass
class Rate:
    per_second: float  # units per second per `per`
    per: str  # "cpu", "gpu", "worker" or "driver"
    source: str  # where the number comes from
    units_measured: Optional[float] = None  # how much work the recorded run did (None: a default)


@dataclass
class StagePlan:
    stage: str
    runs_on: str
    nodes: int
    units: float
    unit: str
    rate: Rate
    seconds: float
    node_hours: float
    cost: Optional[float]
    notes: list[str] = field(default_factory=list)


def cluster_from_launcher_yaml(doc: dict, source: str) -> Cluster:
    """The node types of a Ray cluster-launcher file (cluster.yaml)."""
    types = doc.get("available_node_types") or {}
    head_name = doc.get("head_node_type")
    if not types or head_name not in types:
        raise ArtsimError(f"{source}: no available_node_types/head_node_type (a Ray cluster-launcher file?)")

    def node(name, t) -> NodeType:
        res = t.get("resources") or {}
        cfg = t.get("node_config") or {}
        return NodeType(name, float(res.get("CPU", 0)), float(res.get("GPU", 0)), int(t.get("max_workers", 0)),
                        cfg.get("InstanceType", ""),
                        (cfg.get("InstanceMarketOptions") or {}).get("MarketType") == "spot")

    head = node(head_name, types[head_name])
    workers = [node(n, t) for n, t in types.items() if n != head_name]
    return Cluster(head, workers, source)


def local_cluster(cpus: int) -> Cluster:
    """No cluster file: the config's private Ray on this machine (one node, no price)."""
    return Cluster(NodeType("this machine", float(cpus), 0.0, 0), [NodeType("this machine", float(cpus), 0.0, 1)],
                   "this machine (no cluster file)")


# -- what earlier runs recorded -------------------------------------------------------------------------------------


def _units_done(stage: str, summary: dict) -> Optional[float]:
    """The work a recorded stage did, in the unit its rate is counted in."""
    if stage == "ingest":
        return summary.get("records")
    if stage == "download":
        return (summary.get("this_run") or {}).get("records")
    if stage == "embed":
        return summary.get("embedded")
    if stage == "mine":
        return summary.get("triplets")
    if stage == "train":
        sessions = summary.get("sessions") or []
        epochs = summary.get("epochs") or 0
        train_triplets = (summary.get("data") or {}).get("train_triplets")
        return train_triplets * epochs if train_triplets and epochs and sessions is not None else None
    if stage == "index":
        return summary.get("vectors")
    if stage in ("links", "report"):
        return summary.get("works")
    return None


def recorded_rate(stage: str, summary: dict, gpu: bool, train_workers: int) -> Optional[Rate]:
    """A rate from one recorded summary, normalised per CPU/GPU/worker/driver; None when it cannot be."""
    run = summary.get("_run")
    units = _units_done(stage, summary)
    if not run or not units or not run.get("wall_seconds"):
        return None
    seconds = float(run["wall_seconds"])
    cluster = run.get("cluster") or {}
    per = _per(stage, gpu)
    if per == "driver":
        amount = 1.0
    elif per == "worker":
        amount = float(train_workers)
    elif per == "gpu":
        amount = float(cluster.get("gpus") or 0)
    else:
        amount = float(cluster.get("cpus") or 0)
    if amount <= 0:
        return None
    when = run.get("finished", "?")
    return Rate(units / seconds / amount, per, f"recorded {when}: {units:g} in {seconds:.1f} s on "
                                                f"{cluster.get('cpus', 0):g} CPUs/{cluster.get('gpus', 0):g} GPUs",
                float(units))


def _per(stage: str, gpu: bool) -> str:
    if stage in ("embed",):
        return "gpu" if gpu else "cpu"
    return {"ingest": "driver", "mine": "driver", "report": "driver", "train": "worker"}.get(stage, "cpu")


def default_rate(stage: str, gpu: bool) -> Rate:
    key = f"{stage}_{'gpu' if gpu else 'cpu'}" if stage in ("embed", "train") else stage
    per_second, per = DEFAULT_RATES[key]
    return Rate(per_second, per, "default (no recorded run)")


# -- the projection ---------------------------------------------------------------------------------------------------


def plan_run(n_works: int, config, cluster: Cluster, summaries: dict[str, list[dict]],
             prices: dict[str, float], ok_fraction: Optional[float] = None,
             hosts: Optional[int] = None) -> tuple[list[StagePlan], list[str]]:
    """Projects each configured stage for ``n_works`` works. ``summaries``: stage -> recorded summaries (newest
    first). Returns the per-stage plans and the assumptions made."""
    if n_works < 1:
        raise ArtsimError("plan: N must be at least 1")
    assumptions: list[str] = []
    plans: list[StagePlan] = []
    if ok_fraction is None:
        ok_fraction = _recorded_ok_fraction(summaries.get("download") or [])
        assumptions.append(f"{ok_fraction:.0%} of downloads end ok (embed and index count only those)"
                           + (" [recorded]" if summaries.get("download") else " [default]"))
    if hosts is None:
        hosts = _recorded_hosts(summaries.get("download") or []) or max(1, len(config.sources))
        assumptions.append(f"images come from {hosts} host(s); politeness caps each at "
                           f"{config.download.per_host_requests_per_second:g} requests/s and "
                           f"{config.download.per_host_connections} connections (download.*)")
    for stage in config.pipeline.stages:
        plans.append(_plan_stage(stage, n_works, config, cluster, summaries.get(stage) or [], prices,
                                 ok_fraction, hosts))
    small = [p.stage for p in plans if p.rate.units_measured is not None and p.rate.units_measured < 10_000]
    if small:
        assumptions.append(f"recorded rates of {', '.join(small)} come from runs of < 10,000 units, whose wall time "
                           "is mostly start-up: they understate throughput (the projection is pessimistic)")
    if any(p.rate.source.startswith("default") for p in plans):
        assumptions.append("stages marked 'default' use stated rates (artsim/plan.py DEFAULT_RATES), not a "
                           "measurement: run a sample on the cluster first and plan again from its summaries")
    assumptions.append(f"each stage on workers adds {STARTUP_SECONDS:.0f} s for nodes to start and pull the image; "
                       "stages run one after another; the autoscaler scales a stage's node type to max_workers "
                       "unless fewer nodes suffice")
    assumptions.append(f"the head ({cluster.head.instance or cluster.head.name}) runs for the whole pipeline")
    if any(p.cost is None for p in plans):
        assumptions.append("no price for some instance types: pass --price TYPE=USD_PER_HOUR")
    return plans, assumptions


def _recorded_ok_fraction(downloads: list[dict]) -> float:
    for s in downloads:
        by_status = s.get("by_status") or {}
        total = sum(by_status.values())
        if total:
            return by_status.get("ok", 0) / total
    return 0.9


def _recorded_hosts(downloads: list[dict]) -> int:
    for s in downloads:
        if s.get("by_host"):
            return len(s["by_host"])
    return 0


def _plan_stage(stage, n_works, config, cluster: Cluster, recorded: list[dict], prices, ok_fraction,
                hosts) -> StagePlan:
    gpu = (stage == "embed" and config.embed.num_gpus > 0) or (stage == "train" and config.train.use_gpu)
    rate = next((r for r in (recorded_rate(stage, s, gpu, config.train.num_workers) for s in recorded) if r),
                None) or default_rate(stage, gpu)
    notes: list[str] = []
    if stage in ("ingest", "download", "links", "report"):
        units, unit = float(n_works), "works"
    elif stage in ("embed", "index"):
        units, unit = n_works * ok_fraction, "images" if stage == "embed" else "vectors"
    elif stage == "mine":
        units, unit = float(config.mine.num_triplets), "triplets"
    else:  # train
        units, unit = float(config.mine.num_triplets) * config.train.epochs, "triplet-epochs"

    if rate.per == "driver":
        node, nodes = cluster.head, 0
        throughput = rate.per_second
        runs_on = f"driver on the head ({cluster.head.instance or cluster.head.name})"
    else:
        node = cluster.pick(gpu)
        if node is None:
            raise ArtsimError(f"plan: {stage} needs {'GPU' if gpu else 'CPU'} workers, but {cluster.source} has "
                              f"no enabled {'GPU' if gpu else 'CPU-only'} worker type")
        per_node = {"cpu": node.cpus, "gpu": node.gpus}.get(rate.per, 0.0)
        if rate.per == "worker":  # Ray Train: a fixed number of workers, one GPU (or cpus_per_worker) each
            per_worker_slots = node.gpus if gpu else max(1.0, node.cpus // max(1, config.train.cpus_per_worker))
            nodes = min(node.max_workers, math.ceil(config.train.num_workers / max(1.0, per_worker_slots)))
            throughput = rate.per_second * config.train.num_workers
        else:
            nodes = node.max_workers
            throughput = rate.per_second * per_node * nodes
            if stage == "download":
                cap = hosts * config.download.per_host_requests_per_second
                if cap < throughput:
                    needed = max(1, math.ceil(cap / (rate.per_second * per_node)))
                    notes.append(f"politeness-bound: {hosts} host(s) x "
                                 f"{config.download.per_host_requests_per_second:g} req/s = {cap:g} works/s; "
                                 f"{needed} node(s) suffice")
                    nodes, throughput = min(nodes, needed), cap
        runs_on = f"{nodes} x {node.instance or node.name}{' (spot)' if node.spot else ''}"
    seconds = units / throughput if throughput > 0 else math.inf
    if rate.per != "driver":
        seconds += STARTUP_SECONDS
    node_hours = nodes * seconds / 3600
    price = prices.get(node.instance) if node.instance else (0.0 if not cluster.head.instance else None)
    cost = None if price is None else node_hours * price
    return StagePlan(stage, runs_on, nodes, units, unit, rate, seconds, node_hours, cost, notes)


def head_cost(plans: list[StagePlan], cluster: Cluster, prices) -> Optional[float]:
    if not cluster.head.instance:
        return 0.0
    price = prices.get(cluster.head.instance)
    return None if price is None else sum(p.seconds for p in plans) / 3600 * price


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- `artsim plan` ----------------------------------------------------------------------------------------------------


def read_summaries(storage, run_roots: list[str], stages) -> tuple[dict[str, list[dict]], list[str]]:
    """stage -> the summaries recorded under each run root's summaries/ (in the order given), and the run roots
    that could not be read (a plan is often made where the bucket's credentials are not: it says so, and goes on
    with what it has)."""
    from artsim.rundir.paths import RunPaths

    found: dict[str, list[dict]] = {}
    unreadable = []
    for root in run_roots:
        try:
            for stage in stages:
                uri = f"{RunPaths(root).summaries}/{stage}.json"
                if storage.exists(uri):
                    found.setdefault(stage, []).append(storage.read_json(uri))
        except Exception as exc:  # noqa: BLE001 - any storage failure: plan from defaults, say why
            unreadable.append(f"{root}: {type(exc).__name__}: {exc}")
    return found, unreadable


def parse_prices(items: list[str]) -> dict[str, float]:
    prices = dict(DEFAULT_PRICES)
    for item in items:
        name, sep, value = item.partition("=")
        try:
            prices[name.strip()] = float(value)
        except ValueError:
            raise ArtsimError(f"--price {item!r}: expected INSTANCE=USD_PER_HOUR") from None
        if not sep:
            raise ArtsimError(f"--price {item!r}: expected INSTANCE=USD_PER_HOUR")
    return prices


def run_plan(args) -> int:
    import os
    from pathlib import Path

    import yaml

    from artsim.config import load_config
    from artsim.console import table
    from artsim.storage import Storage

    config = load_config(args.config, args.overrides)
    cluster_path = args.cluster or ("cluster.yaml" if Path("cluster.yaml").exists() else None)
    if cluster_path:
        try:
            doc = yaml.safe_load(Path(cluster_path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ArtsimError(f"--cluster {cluster_path}: {exc}") from None
        cluster = cluster_from_launcher_yaml(doc or {}, cluster_path)
    else:
        cluster = local_cluster(config.ray.num_cpus or os.cpu_count() or 1)
    storage = Storage(config.storage)
    roots = [config.run.root, *args.runs]
    summaries, unreadable = read_summaries(storage, roots, config.pipeline.stages)
    prices = parse_prices(args.price)
    plans, assumptions = plan_run(args.works, config, cluster, summaries, prices, args.ok_fraction, args.hosts)
    assumptions += [f"could not read earlier runs at {u}" for u in unreadable]

    print(f"plan: {args.works:,} works, stages {', '.join(config.pipeline.stages)}, on {cluster.source}")
    rows = []
    for p in plans:
        rows.append([p.stage, p.runs_on, f"{p.units:,.0f} {p.unit}",
                     f"{_number(p.rate.per_second)}/s per {p.rate.per}",
                     "recorded" if p.rate.units_measured is not None else "default",
                     format_duration(p.seconds), f"{p.node_hours:,.1f}",
                     "?" if p.cost is None else f"${p.cost:,.2f}"])
    table(["stage", "runs on", "work", "rate", "rate from", "wall", "node-h", "cost"], rows)
    for p in plans:
        for note in p.notes:
            print(f"  {p.stage}: {note}")
    total_s = sum(p.seconds for p in plans)
    head = head_cost(plans, cluster, prices)
    worker_costs = [p.cost for p in plans]
    total_cost = None if head is None or None in worker_costs else head + sum(worker_costs)
    print(f"total: {format_duration(total_s)} wall; workers {sum(p.node_hours for p in plans):,.1f} node-h; "
          f"head {total_s / 3600:,.1f} h; cost "
          + ("? (see assumptions)" if total_cost is None else f"${total_cost:,.2f}"))
    print("rates used:")
    for p in plans:
        print(f"  {p.stage}: {p.rate.source}")
    print("assumptions:")
    for a in assumptions:
        print(f"  - {a}")
    return 0
