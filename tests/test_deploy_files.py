"""The files that put artsim on a cluster are accepted by what reads them and agree with each other.

- cluster.yaml: Ray's own cluster-launcher `prepare_config` + `validate_config` (what `ray up` runs first).
- docker/Dockerfile (CPU) and docker/Dockerfile.gpu: the same pins as requirements.txt (no docker engine here:
  the files are parsed), faiss-gpu at faiss-cpu's version in the GPU image.
- k8s/rayjob.yaml: a KubeRay RayJob whose entrypoint, config and images exist and match the rest.
"""
from __future__ import annotations

import re
import shlex

import pytest
import yaml

from conftest import REPO

CPU_DOCKERFILE = REPO / "docker" / "Dockerfile"
GPU_DOCKERFILE = REPO / "docker" / "Dockerfile.gpu"


def requirement_pins(path=REPO / "requirements.txt") -> dict[str, str]:
    """name (lower case, extras dropped) -> exact version."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.txt: {line!r} is not pinned"
        pins[re.sub(r"\[.*\]", "", name).strip().lower()] = version.strip()
    return pins


def dockerfile(path) -> tuple[str, list[str], str]:
    """(base image, RUN commands with continuations joined, the image name its build comment tags)."""
    text = path.read_text()
    logical = re.sub(r"\\\n", " ", text)
    lines = [line.strip() for line in logical.splitlines()]
    base = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(base) == 1, f"{path}: expected one FROM"
    runs = [line[4:] for line in lines if line.startswith("RUN ")]
    tag = re.search(r"docker build -f docker/\S+ -t (\S+) \.", text)
    assert tag, f"{path}: the header names no `docker build ... -t IMAGE .`"
    return base[0], runs, tag.group(1)


def explicit_pins(runs: list[str]) -> dict[str, str]:
    pins = {}
    for run in runs:
        for word in shlex.split(run.replace("&&", " ")):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s'\"]+)", word)
            if m:
                pins[m.group(1).lower()] = m.group(3)
    return pins


# -- cluster.yaml ------------------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # raises on anything `ray up` would refuse

    types = config["available_node_types"]
    assert config["provider"]["type"] == "aws"
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    cpu_types = {n: t for n, t in types.items() if n != config["head_node_type"] and n not in gpu_types}
    assert gpu_types and cpu_types
    for name, t in gpu_types.items():  # >= 8 vCPUs per GPU for decoding
        assert t["resources"]["CPU"] >= 8 * t["resources"]["GPU"], name
    for name, t in {**gpu_types, **cpu_types}.items():  # autoscaling bounds
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    spot = {n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert spot & set(gpu_types) and spot & set(cpu_types)  # a spot option for both kinds
    # S3 through an instance profile on every node, no keys in the file
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())
    assert "AWS_SECRET_ACCESS_KEY" not in (REPO / "cluster.yaml").read_text()
    # images: the CPU image everywhere, the GPU image on GPU nodes, as the Dockerfiles build them
    cpu_image, gpu_image = dockerfile(CPU_DOCKERFILE)[2], dockerfile(GPU_DOCKERFILE)[2]
    assert config["docker"]["image"] == cpu_image
    assert all(t["docker"]["worker_image"] == gpu_image for t in gpu_types.values())
    assert all(t.get("docker", {}).get("worker_image", cpu_image) == cpu_image for t in cpu_types.values())


def test_validate_config_refuses_node_types_without_resources():
    """The check above can fail: the old cluster.yaml shape (worker types without resources) is refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    del raw["available_node_types"]["gpu_worker"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="resources"):
        validate_config(prepare_config(raw))


# -- Dockerfiles --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CPU_DOCKERFILE, GPU_DOCKERFILE], ids=["cpu", "gpu"])
def test_dockerfiles_pin_what_requirements_pin(path):
    pins = requirement_pins()
    base, runs, _ = dockerfile(path)
    # the base image carries Ray: its tag is the pinned Ray version and a Python the code supports
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-\w+)?", base)
    assert m, base
    assert m.group(1) == pins["ray"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"{m.group(2)}.{m.group(3)}" in pyproject or "requires-python" not in pyproject
    # requirements.txt is installed, and every version written out in the file is the pinned one
    assert any("-r requirements.txt" in r or "-r /tmp/requirements-gpu.txt" in r for r in runs)
    explicit = explicit_pins(runs)
    for name, version in explicit.items():
        expected = pins["faiss-cpu"] if name == "faiss-gpu" else pins.get(name)
        assert expected is not None, f"{path.name} pins {name}, which requirements.txt does not"
        assert version == expected, f"{path.name}: {name}=={version}, requirements.txt: {expected}"


def test_gpu_image_swaps_faiss_cpu_for_faiss_gpu_and_keeps_cuda_torch():
    base, runs, _ = dockerfile(GPU_DOCKERFILE)
    assert base.endswith("-gpu") or re.search(r"-cu\d+$", base)
    text = " ".join(runs)
    assert "grep -v '^faiss-cpu=='" in text  # faiss-cpu left out (both ship the `faiss` module)
    assert explicit_pins(runs)["faiss-gpu"] == requirement_pins()["faiss-cpu"]
    assert "download.pytorch.org/whl/cpu" not in text  # PyPI's torch wheels are the CUDA builds


def test_cpu_image_uses_cpu_torch_at_the_pinned_versions():
    _, runs, _ = dockerfile(CPU_DOCKERFILE)
    explicit, pins = explicit_pins(runs), requirement_pins()
    assert explicit["torch"] == pins["torch"] and explicit["torchvision"] == pins["torchvision"]
    assert "faiss-gpu" not in " ".join(runs)


# -- KubeRay RayJob -----------------------------------------------------------------------------------------------------


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_rayjob_manifest_names_real_job_files_config_and_images():
    from artsim.config import load_config

    job = yaml.safe_load((REPO / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == requirement_pins()["ray"]

    # the entrypoint runs a job file that exists, with a config that loads and joins the submitted-to cluster
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file() and argv[1].startswith("jobs/")
    config_path = argv[argv.index("-c") + 1]
    config = load_config(REPO / config_path)
    assert config.ray.address is None
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    cpu_image, gpu_image = dockerfile(CPU_DOCKERFILE)[2], dockerfile(GPU_DOCKERFILE)[2]
    assert "WORKDIR " + runtime_env["working_dir"] in CPU_DOCKERFILE.read_text()  # the code is where the job runs
    assert "COPY jobs ./jobs" in CPU_DOCKERFILE.read_text() and "COPY configs ./configs" in CPU_DOCKERFILE.read_text()

    head = cluster["headGroupSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert [c["image"] for c in _containers(head["template"])] == [cpu_image]
    gpu_groups = [g for g in groups.values()
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in _containers(g["template"]))]
    cpu_groups = [g for g in groups.values() if g not in gpu_groups]
    assert gpu_groups and cpu_groups
    for g in gpu_groups:
        for c in _containers(g["template"]):
            assert c["image"] == gpu_image
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert int(c["resources"]["limits"]["cpu"]) >= 8 * gpus
    for g in cpu_groups:
        assert all(c["image"] == cpu_image for c in _containers(g["template"]))
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True

    # S3 credentials from a Secret in every Ray container (and none written in the manifest)
    all_containers = _containers(head["template"]) + [c for g in groups.values() for c in _containers(g["template"])]
    for c in all_containers:
        secret_refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert secret_refs, c["name"]
    assert "AWS_SECRET_ACCESS_KEY:" not in (REPO / "k8s" / "rayjob.yaml").read_text()
