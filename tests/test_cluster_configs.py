"""The cluster configs in cluster/: they parse, have the expected kinds, and ask for GPUs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAY_VERSION = "2.60.0"


def load(name: str) -> dict:
    data = yaml.safe_load((CLUSTER / name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def gpu_limits(cluster_spec: dict) -> list[int]:
    """nvidia.com/gpu limits of every container of every worker group."""
    return [
        int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in cluster_spec["workerGroupSpecs"]
        for container in group["template"]["spec"]["containers"]
    ]


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    containers = [*head["template"]["spec"]["containers"]]
    for group in spec["workerGroupSpecs"]:
        assert {"groupName", "replicas", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers += group["template"]["spec"]["containers"]
    for container in containers:
        # Pinned to the Ray version of the project (the driver and the cluster must match).
        assert container["image"].startswith(f"rayproject/ray:{RAY_VERSION}-")
    assert gpu_limits(spec) and all(n == 1 for n in gpu_limits(spec))
    for group in spec["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["requests"]["nvidia.com/gpu"] == 1


def test_kuberay_raycluster() -> None:
    doc = load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob() -> None:
    doc = load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/render_story.py"]
    assert "--workers" in argv and "--model" in argv and "--out" in argv
    # The entrypoint's options are ones the job script accepts.
    assert int(argv[argv.index("--workers") + 1]) <= sum(
        group["replicas"] for group in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    check_ray_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_parses_with_the_job_script(monkeypatch: pytest.MonkeyPatch) -> None:
    # The job scripts import their sibling _common, as `python jobs/render_story.py` allows.
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))
    import render_story

    argv = shlex.split(load("kuberay-rayjob.yaml")["spec"]["entrypoint"])[2:]
    args = render_story.build_parser().parse_args(argv)
    assert args.story == "examples/story.yaml" and args.workers == 2


def test_ray_up_config() -> None:
    doc = load("ray-up.yaml")
    assert doc["provider"]["type"] == "aws"
    assert doc["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    workers = [t for name, t in types.items() if name != doc["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"].startswith(("g5.", "g6", "p4", "p5")) for t in workers)
    head = " ".join(doc["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=0.0.0.0" in head
    worker = " ".join(doc["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker and "dashboard-host" not in worker
    assert "--env=RAY_AUTH_MODE=token" in doc["docker"]["run_options"]
    assert any("pip install" in command for command in doc["setup_commands"])


def test_ray_up_config_matches_rays_schema() -> None:
    import jsonschema  # a test dependency (pyproject.toml)
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(load("ray-up.yaml"), schema)
