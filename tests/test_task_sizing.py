"""Tasks fit the nodes that exist: sized by the largest node, never by the cluster's total; a task that can fit
nowhere fails at once with the config key to change (tested on a real multi-raylet cluster of 1-CPU nodes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from artsim.errors import ConfigError
from artsim.runtime import largest_node, size_task
from conftest import REPO

ONE_CPU_NODES = [{"CPU": 1.0, "memory": 2e9}, {"CPU": 1.0, "memory": 2e9}]
MIXED = [{"CPU": 0.0}, {"CPU": 32.0}, {"CPU": 16.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 2.0}]


def test_capped_by_the_largest_node_not_the_cluster_total():
    assert size_task(ONE_CPU_NODES, want_cpus=8, what="t", key="k") == 1  # the cluster has 2, no node has 2
    assert size_task(MIXED, want_cpus=8, what="t", key="k") == 8
    assert size_task(MIXED, want_cpus=64, what="t", key="k") == 32


def test_gpu_tasks_are_sized_by_the_nodes_that_have_the_gpus():
    assert size_task(MIXED, want_cpus=8, gpus=1, what="t", key="k") == 8  # the 16-CPU GPU node
    assert size_task(MIXED, want_cpus=32, gpus=2, what="t", key="k") == 4  # only the 2-GPU node has 2
    assert largest_node(MIXED) == (32.0, 2.0)


def test_nothing_fits_fails_with_the_key_and_the_largest_node():
    with pytest.raises(ConfigError, match=r"^train.cpus_per_worker: .*needs 2 CPU.*largest such node has 1 CPUs"):
        size_task(ONE_CPU_NODES, want_cpus=2, min_cpus=2, what="a Ray Train worker", key="train.cpus_per_worker")
    with pytest.raises(ConfigError, match=r"^embed.num_gpus: .*needs 3 GPU.*largest node has 2 GPUs"):
        size_task(MIXED, want_cpus=1, gpus=3, what="an embed model actor", key="embed.num_gpus")
    with pytest.raises(ConfigError, match="needs 1 GPU"):
        size_task(ONE_CPU_NODES, want_cpus=1, gpus=1, what="t", key="k")


@pytest.mark.slow
def test_index_on_a_cluster_of_one_cpu_nodes_finishes(tmp_path):
    """The known hang: index asked for min(cluster CPUs, 8) = 2 CPUs in one task on 1-CPU nodes and waited forever
    ("No available node types can fulfill resource request {'CPU': 2.0}")."""
    ray_tmp = tempfile.mkdtemp(prefix="arn-", dir="/tmp")  # private: the Cluster records its address there
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "small_nodes_job.py"), "--root",
                             str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its raylets (its own session); nothing else
        stdout, stderr = proc.communicate()
        pytest.fail(f"the index stage did not finish on 1-CPU nodes within 300 s (a task waiting for a node that "
                    f"does not exist?)\n{stderr[-4000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("SMALL_NODES_RESULT ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    result = json.loads(lines[-1].split(" ", 1)[1])
    assert result["nodes"] == 2 and result["cluster_cpus"] == 2
    assert result["largest_node"] == [1.0, 0.0] and result["fit_8"] == 1
    assert result["fit_2_strict"].startswith("train.cpus_per_worker: a 2-CPU task needs 2 CPU(s)")
    assert result["fit_2_strict_s"] < 5  # at once, not after a wait
    assert "index_error" not in result, result.get("index_error")
    assert result["index"]["vectors"] == 3000 and result["index"]["shards"] == 2
    print(f"\nindex on 2 x 1-CPU raylets: {result['index_s']:.1f} s")
