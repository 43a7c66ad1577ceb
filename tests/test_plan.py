"""`artsim plan N -c CONFIG`: projections from recorded per-stage rates (summaries/*.json `_run`) or stated
defaults, on the node types of a cluster-launcher file; assumptions printed. No Ray."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from artsim.config import config_from_dict
from artsim.plan import DEFAULT_RATES, cluster_from_launcher_yaml, plan_run
from conftest import REPO

CLUSTER = cluster_from_launcher_yaml(yaml.safe_load((REPO / "cluster.yaml").read_text()), "cluster.yaml")
PRICES = {"m6i.2xlarge": 0.5, "c6i.8xlarge": 1.5, "g6.4xlarge": 1.5}


def config(**over):
    base = {"pipeline": {"stages": ["download", "embed", "index"]}, "embed": {"num_gpus": 1},
            "download": {"per_host_requests_per_second": 1000, "per_host_connections": 64},
            "sources": [{"kind": "table", "path": "x.csv", "collection": "c"}]}
    for key, value in over.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


def recorded_embed(images=10_000, seconds=50.0, gpus=2):
    return {"embedded": images, "_run": {"wall_seconds": seconds, "cluster": {"cpus": 32, "gpus": gpus},
                                         "finished": "2026-11-30T10:00:00Z"}}


def test_recorded_rate_is_used_and_scaled_to_the_cluster():
    # 10,000 images in 50 s on 2 GPUs = 100 images/s per GPU; cluster.yaml: 4 GPU nodes x 1 GPU
    plans, _ = plan_run(1_000_000, config(), CLUSTER, {"embed": [recorded_embed()]}, PRICES, ok_fraction=1.0,
                        hosts=10)
    embed = {p.stage: p for p in plans}["embed"]
    assert embed.rate.per == "gpu" and embed.rate.per_second == pytest.approx(100.0)
    assert embed.nodes == 4 and "g6.4xlarge" in embed.runs_on
    assert embed.seconds == pytest.approx(1_000_000 / 400 + 180)
    assert embed.cost == pytest.approx(4 * embed.seconds / 3600 * 1.5)
    assert embed.rate.source.startswith("recorded 2026-11-30")


def test_defaults_are_stated_when_nothing_was_recorded():
    plans, assumptions = plan_run(1_000_000, config(), CLUSTER, {}, PRICES, ok_fraction=0.5, hosts=10)
    by = {p.stage: p for p in plans}
    assert all(p.rate.source == "default (no recorded run)" for p in plans)
    assert by["download"].rate.per_second == DEFAULT_RATES["download"][0]
    assert by["index"].units == 500_000  # only ok downloads are embedded and indexed
    assert any("DEFAULT_RATES" in a for a in assumptions)


def test_download_is_capped_by_politeness_and_needs_fewer_nodes():
    cfg = config(download={"per_host_requests_per_second": 10})
    plans, assumptions = plan_run(1_000_000, cfg, CLUSTER, {}, PRICES, ok_fraction=1.0, hosts=2)
    download = {p.stage: p for p in plans}["download"]
    assert download.nodes == 1 and download.seconds == pytest.approx(1_000_000 / 20 + 180)
    assert "politeness-bound" in download.notes[0]


def test_cpu_embedding_runs_on_cpu_workers():
    plans, _ = plan_run(10_000, config(embed={"num_gpus": 0}), CLUSTER, {}, PRICES, ok_fraction=1.0, hosts=10)
    embed = {p.stage: p for p in plans}["embed"]
    assert embed.rate.per == "cpu" and "c6i.8xlarge" in embed.runs_on


def test_cli_prints_table_rates_and_assumptions(tmp_path):
    run = tmp_path / "run"
    (run / "summaries").mkdir(parents=True)
    (run / "summaries" / "embed.json").write_text(json.dumps(recorded_embed()))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"root": str(run)}, "pipeline": {"stages": ["download", "embed", "index"]},
                                   "embed": {"num_gpus": 1},
                                   "sources": [{"kind": "table", "path": "x.csv", "collection": "c"}]}))
    proc = subprocess.run([sys.executable, "-m", "artsim.cli", "plan", "2000000", "-c", str(cfg), "--cluster",
                           str(REPO / "cluster.yaml"), "--price", "g6.4xlarge=2"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "plan: 2,000,000 works" in out and "cluster.yaml" in out
    for stage in ("download", "embed", "index"):
        assert any(line.startswith(stage) for line in out.splitlines()), out
    assert "embed: recorded 2026-11-30" in out and "download: default (no recorded run)" in out
    assert "assumptions:" in out and "total:" in out and "$" in out


def test_cli_bad_n_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "artsim.cli", "plan", "0", "-c", str(REPO / "configs" / "demo.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "N must be at least 1" in proc.stderr
