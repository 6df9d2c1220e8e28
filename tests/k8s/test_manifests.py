"""Offline checks of everything under k8s/: RayServices, NetworkPolicies, the model-volume Job, the Dockerfile.

No cluster, no Docker, no network. RayServices are validated against the real KubeRay CRD schemas, read in
place from ../shared/kuberay-crds beside the checkout (tests that need them skip, saying so, when that folder
is absent); serveConfigV2 with Ray's own `ServeDeploySchema` and the app's `AppArgs`; everything else with
the rules of docs/kubernetes.md, reliability.md S1-S4 and design.md (placement). Each rule is a function
that returns a list of problems: `test_*` assert the files in k8s/ have none, and
`test_rule_catches_a_broken_manifest` breaks a copy in memory for every rule to show that each one fails.
Loading and accessors: tests/k8s/manifests.py; rules: tests/k8s/rules_cluster.py (the RayServices),
rules_network.py (Services, NetworkPolicies), rules_artifacts.py (Job, PVC, images, Dockerfile).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import (
    GPU,
    NODE_TYPE,
    RAYSERVICE_CRD,
    UPGRADE_TYPES,
    Docs,
    app_args,
    crd_schema,
    docs,
    ray_container,
    serve_config,
    source,
)
from tests.k8s.rules_artifacts import (
    dockerfile_inputs,
    dockerfile_problems,
    image_problems,
    job_problems,
)
from tests.k8s.rules_cluster import (
    accelerator_problems,
    auth_problems,
    crd_problems,
    head_problems,
    kuberay_rule_problems,
    memory_problems,
    placement_problems,
    probe_problems,
    security_problems,
    serve_problems,
    shm_problems,
    shutdown_problems,
    upgrade_problems,
)
from tests.k8s.rules_network import (
    exposure_problems,
    netpol_problems,
)


def test_every_document_is_a_kind_we_check() -> None:
    d = docs()
    assert set(d) <= {"RayService", "NetworkPolicy", "Job", "PersistentVolumeClaim", "Service", "Ingress"}, set(d)
    assert len(d["RayService"]) == 2 and d["NetworkPolicy"] and d["Job"] and d["PersistentVolumeClaim"]
    for doc in (x for kind in d.values() for x in kind):
        assert doc.get("apiVersion") and doc["metadata"].get("name"), source(doc)
    for p in d["NetworkPolicy"]:
        assert p["apiVersion"] == "networking.k8s.io/v1" and "podSelector" in p["spec"], source(p)
        assert set(p["spec"].get("policyTypes", [])) <= {"Ingress", "Egress"} and p["spec"]["policyTypes"], source(p)
    apps = {app_args(rs).gpus: rs for rs in d["RayService"]}
    assert set(apps) == {True, False}, "one GPU RayService and one CPU-only (tiny model) RayService"
    assert app_args(apps[False]).model is None, "the CPU RayService serves the embedded tiny model"


def test_rayservices_match_the_kuberay_crd_schemas() -> None:
    assert crd_problems(docs()) == []


def test_upgrade_strategy_is_one_kuberay_accepts() -> None:
    assert upgrade_problems(docs()) == []


def test_crd_agrees_with_our_upgrade_types() -> None:
    """The CRD leaves upgradeStrategy.type a free string (no enum, and this copy carries no description text
    at all), so UPGRADE_TYPES comes from KubeRay's ValidateRayServiceSpec. Should a newer CRD gain an enum or
    a description naming the values, they must be the same ones."""
    schema = crd_schema(RAYSERVICE_CRD)["properties"]["spec"]["properties"]["upgradeStrategy"]
    field = schema["properties"]["type"]
    assert field.get("type") == "string"
    assert field.get("enum") is None or set(field["enum"]) == UPGRADE_TYPES
    text = f"{schema.get('description', '')} {field.get('description', '')}"
    named = {t for t in UPGRADE_TYPES | {"IncrementalUpgrade", "Recreate"} if re.search(rf"`?\b{t}\b`?", text)}
    assert not named or named == UPGRADE_TYPES, named
    # This CRD version knows the incremental upgrade (its options), so all three values are current.
    assert "clusterUpgradeOptions" in schema["properties"]


def test_rayservices_pass_kuberays_own_validation() -> None:
    assert kuberay_rule_problems(docs()) == []


def test_serve_config_parses_with_ray_and_app_args() -> None:
    assert serve_problems(docs()) == []


def test_placement_fits_the_worker_groups() -> None:
    assert placement_problems(docs()) == []


def test_gpu_caches_fit_the_smallest_gpu() -> None:
    assert memory_problems(docs()) == []


def test_head_holds_no_gpu_and_no_replica() -> None:
    assert head_problems(docs()) == []


def test_gpu_workers_get_gpus_rdma_ipc_lock_and_nccl_env_and_cpu_app_none() -> None:
    assert accelerator_problems(docs()) == []


def test_replica_drain_ends_before_the_pod_is_killed() -> None:
    assert shutdown_problems(docs()) == []


def test_pods_are_non_root_and_drop_all_capabilities() -> None:
    assert security_problems(docs()) == []


def test_dev_shm_is_a_memory_volume() -> None:
    assert shm_problems(docs()) == []


def test_token_auth_and_api_key_from_a_secret() -> None:
    assert auth_problems(docs()) == []


def test_probes_and_start_up_budget() -> None:
    assert probe_problems(docs()) == []


def test_no_control_port_is_exposed() -> None:
    assert exposure_problems(docs()) == []


def test_network_policies() -> None:
    assert netpol_problems(docs()) == []


def test_job_fills_the_volume_and_runs_epserve_inspect() -> None:
    assert job_problems(docs()) == []


def test_one_pinned_image() -> None:
    assert image_problems(docs()) == []


def test_dockerfile() -> None:
    assert dockerfile_problems(*dockerfile_inputs()) == []


# ------------------------------------------------------------------------------ every rule can fail
def _rs(d: Docs, gpu: bool) -> dict[str, Any]:
    return next(rs for rs in d["RayService"] if app_args(rs).gpus is gpu)


def _gpu_group(d: Docs) -> dict[str, Any]:
    return _rs(d, True)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def _gpu_worker(d: Docs) -> dict[str, Any]:
    return ray_container(_gpu_group(d)["template"])


def _head(d: Docs, gpu: bool = True) -> dict[str, Any]:
    return _rs(d, gpu)["spec"]["rayClusterConfig"]["headGroupSpec"]


def _set_args(d: Docs, gpu: bool, **changes: Any) -> None:  # noqa: ANN401
    rs = _rs(d, gpu)
    cfg = serve_config(rs)
    cfg["applications"][0]["args"].update(changes)
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)


def _set_serve(d: Docs, key: str, value: Any) -> None:  # noqa: ANN401
    rs = _rs(d, True)
    cfg = serve_config(rs)
    cfg[key] = value
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)


def _policy(d: Docs, name: str) -> dict[str, Any]:
    return next(p for p in d["NetworkPolicy"] if p["metadata"]["name"] == name)


def _inspect_container(d: Docs) -> dict[str, Any]:
    return d["Job"][0]["spec"]["template"]["spec"]["containers"][0]


BREAKAGES: list[tuple[str, Callable[[Docs], Any], Callable[[Docs], list[str]]]] = [
    ("misspelt numOfHosts", lambda d: _gpu_group(d).update(numOfHost=_gpu_group(d).pop("numOfHosts")), crd_problems),
    ("replicas as text", lambda d: _gpu_group(d).update(replicas="two"), crd_problems),
    ("unknown top-level spec field", lambda d: _rs(d, False)["spec"].update(serveConfig="x"), crd_problems),
    (
        "bad authOptions mode",
        lambda d: _rs(d, True)["spec"]["rayClusterConfig"]["authOptions"].update(mode="on"),
        crd_problems,
    ),
    (
        "typo in upgrade type",
        lambda d: _rs(d, True)["spec"]["upgradeStrategy"].update(type="NewClusters"),
        upgrade_problems,
    ),
    ("no upgrade strategy", lambda d: _rs(d, False)["spec"].pop("upgradeStrategy"), upgrade_problems),
    (
        "deprecated threshold",
        lambda d: _rs(d, True)["spec"].update(serviceUnhealthySecondThreshold=900),
        kuberay_rule_problems,
    ),
    (
        "token auth on old Ray",
        lambda d: _rs(d, True)["spec"]["rayClusterConfig"].update(rayVersion="2.50.0"),
        kuberay_rule_problems,
    ),
    (
        "restartPolicy with autoscaler v2",
        lambda d: _gpu_group(d)["template"]["spec"].update(restartPolicy="Always"),
        kuberay_rule_problems,
    ),
    (
        "bad initializing-timeout",
        lambda d: _rs(d, True)["metadata"]["annotations"].update({"ray.io/initializing-timeout": "two hours"}),
        kuberay_rule_problems,
    ),
    ("unknown AppArgs field", lambda d: _set_args(d, True, trunk_rank=8), serve_problems),
    ("serve config typo", lambda d: _set_serve(d, "grpc_option", {}), serve_problems),
    ("gRPC servicer missing", lambda d: _set_serve(d, "grpc_options", {"port": 9000}), serve_problems),
    ("proxy body cap not the app's", lambda d: _set_args(d, False, max_request_body_mb=4), serve_problems),
    ("EP group larger than the node pair", lambda d: _set_args(d, True, trunk_ranks=9), placement_problems),
    ("engine scales past the GPU group", lambda d: _gpu_group(d).update(maxReplicas=1), placement_problems),
    ("tiny app asks for GPUs", lambda d: _set_args(d, False, gpus=True), placement_problems),
    ("KV cache too big for an H100", lambda d: _set_args(d, True, num_kv_blocks=200000), memory_problems),
    ("head schedules replicas", lambda d: _head(d)["rayStartParams"].pop("num-cpus"), head_problems),
    (
        "head with a GPU",
        lambda d: ray_container(_head(d)["template"])["resources"]["limits"].update({GPU: "1"}),
        head_problems,
    ),
    (
        "GPU worker without RDMA",
        lambda d: [r.pop("rdma/ib") for r in _gpu_worker(d)["resources"].values()],
        accelerator_problems,
    ),
    (
        "GPU worker adds SYS_ADMIN",
        lambda d: _gpu_worker(d)["securityContext"]["capabilities"].update(add=["IPC_LOCK", "SYS_ADMIN"]),
        accelerator_problems,
    ),
    (
        "no NCCL_IB_HCA",
        lambda d: _gpu_worker(d).update(env=[e for e in _gpu_worker(d)["env"] if e["name"] != "NCCL_IB_HCA"]),
        accelerator_problems,
    ),
    (
        "drain past the pod's grace period",
        lambda d: _set_args(d, False, graceful_shutdown_timeout_s=60),
        shutdown_problems,
    ),
    (
        "watchdog below the collective deadline",
        lambda d: _set_args(d, True, collective_deadline_s=300),
        accelerator_problems,
    ),
    (
        "tiny worker with a GPU",
        lambda d: ray_container(_rs(d, False)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"])[
            "resources"
        ]["limits"].update({GPU: "1"}),
        accelerator_problems,
    ),
    (
        "root pod",
        lambda d: _head(d, False)["template"]["spec"]["securityContext"].update(runAsNonRoot=False),
        security_problems,
    ),
    ("capabilities kept", lambda d: _gpu_worker(d)["securityContext"]["capabilities"].pop("drop"), security_problems),
    (
        "privilege escalation in the Job",
        lambda d: _inspect_container(d)["securityContext"].update(allowPrivilegeEscalation=True),
        security_problems,
    ),
    (
        "autoscaler sidecar as root",
        lambda d: _rs(d, True)["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"].update(
            runAsNonRoot=False
        ),
        security_problems,
    ),
    (
        "/dev/shm on disk",
        lambda d: [
            v["emptyDir"].pop("medium") for v in _gpu_group(d)["template"]["spec"]["volumes"] if v["name"] == "dshm"
        ],
        shm_problems,
    ),
    ("no token auth", lambda d: _rs(d, False)["spec"]["rayClusterConfig"].pop("authOptions"), auth_problems),
    (
        "API key in the manifest",
        lambda d: _gpu_worker(d).update(
            env=[
                {"name": "EPSERVE_API_KEY", "value": "secret"} if e["name"] == "EPSERVE_API_KEY" else e
                for e in _gpu_worker(d)["env"]
            ]
        ),
        auth_problems,
    ),
    (
        "liveness on the Serve proxy",
        lambda d: _gpu_worker(d)["livenessProbe"].update(httpGet={"path": "/-/healthz", "port": 8000}),
        probe_problems,
    ),
    ("no readiness probe", lambda d: ray_container(_head(d, False)["template"]).pop("readinessProbe"), probe_problems),
    (
        "start-up budget below the load timeout",
        lambda d: _rs(d, True)["metadata"]["annotations"].update({"ray.io/initializing-timeout": "30m"}),
        probe_problems,
    ),
    ("GPU worker restarts fast", lambda d: _gpu_worker(d)["livenessProbe"].update(failureThreshold=3), probe_problems),
    ("head Service as LoadBalancer", lambda d: _head(d).update(serviceType="LoadBalancer"), exposure_problems),
    (
        "dashboard on the serve Service",
        lambda d: _rs(d, True)["spec"]["serveService"]["spec"]["ports"].append({"name": "dash", "port": 8265}),
        exposure_problems,
    ),
    (
        "NodePort to the GCS",
        lambda d: d.setdefault("Service", []).append(
            {
                "kind": "Service",
                "metadata": {"name": "gcs", "annotations": {}},
                "spec": {"type": "NodePort", "ports": [{"port": 6379}]},
            }
        ),
        exposure_problems,
    ),
    ("no default deny", lambda d: d["NetworkPolicy"].remove(_policy(d, "default-deny-all")), netpol_problems),
    (
        "dashboard open to all",
        lambda d: _policy(d, "qwen35-397b-fp8-serve-ports")["spec"]["ingress"][0]["ports"].append(
            {"port": 8265, "protocol": "TCP"}
        ),
        netpol_problems,
    ),
    (
        "operator into a worker",
        lambda d: _policy(d, "epserve-tiny-head-control-plane")["spec"]["podSelector"]["matchLabels"].pop(NODE_TYPE),
        netpol_problems,
    ),
    (
        "no intra-cluster rule",
        lambda d: d["NetworkPolicy"].remove(_policy(d, "qwen35-397b-fp8-intra-cluster")),
        netpol_problems,
    ),
    (
        "workers egress anywhere",
        lambda d: _rs(d, True)["spec"]["rayClusterConfig"]["networkPolicy"]["worker"]["egressRules"].append(
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
        ),
        netpol_problems,
    ),
    (
        "GCS open in the managed policy",
        lambda d: _rs(d, False)["spec"]["rayClusterConfig"]["networkPolicy"]["head"]["ingressRules"][1]["ports"].append(
            {"port": 6379}
        ),
        netpol_problems,
    ),
    ("Job runs no inspect", lambda d: _inspect_container(d).update(args=["ls /models"]), job_problems),
    (
        "inspect failure ignored",
        lambda d: _inspect_container(d).update(args=["epserve inspect /models/$MODEL_NAME || true"]),
        job_problems,
    ),
    (
        "Job inspects another folder",
        lambda d: _inspect_container(d).update(
            env=[{"name": "MODEL_NAME", "value": "other"}, *_inspect_container(d)["env"][1:]]
        ),
        job_problems,
    ),
    (
        "no configurable source",
        lambda d: d["Job"][0]["spec"]["template"]["spec"]["initContainers"][0].update(env=[]),
        job_problems,
    ),
    (
        "PVC single-node",
        lambda d: d["PersistentVolumeClaim"][0]["spec"].update(accessModes=["ReadWriteOnce"]),
        job_problems,
    ),
    (
        "model mounted writable",
        lambda d: [m.pop("readOnly") for m in _gpu_worker(d)["volumeMounts"] if m["name"] == "models"],
        job_problems,
    ),
    ("unpinned image", lambda d: _gpu_worker(d).update(image="registry.example.com/epserve:latest"), image_problems),
]


@pytest.mark.parametrize(("what", "breaks", "rule"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_rule_catches_a_broken_manifest(
    what: str, breaks: Callable[[Docs], Any], rule: Callable[[Docs], list[str]]
) -> None:
    d = docs()
    assert rule(d) == [], f"{rule.__name__} must pass on the files before '{what}'"
    breaks(d)
    assert rule(d), f"{rule.__name__} did not notice: {what}"


DOCKERFILE_BREAKAGES = [
    ("runs as root", lambda t: t.replace("USER ${EPSERVE_UID}:${EPSERVE_UID}", "USER root")),
    ("no USER", lambda t: re.sub(r"^USER .*$", "", t, flags=re.M)),
    ("stubs not copied", lambda t: re.sub(r"^COPY replicas/.*$", "", t, flags=re.M)),
    ("epserve not installed", lambda t: t.replace('pip install -e "/opt/epserve[gpu]"', "pip list")),
    ("no gpu extra", lambda t: t.replace('"/opt/epserve[gpu]"', "/opt/epserve")),
    (
        "CPU torch",
        lambda t: t.replace(
            '"torch==${TORCH_VERSION}"', '--index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"'
        ),
    ),
    ("other Ray", lambda t: t.replace("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0")),
    ("model baked in", lambda t: t + "\nCOPY models/ /models/\n"),
    ("no wget", lambda t: t.replace(" wget ", " ")),
    ("no RDMA user space", lambda t: t.replace("libibverbs1 ", "")),
]


@pytest.mark.parametrize(("what", "breaks"), DOCKERFILE_BREAKAGES, ids=[b[0] for b in DOCKERFILE_BREAKAGES])
def test_dockerfile_rule_catches(what: str, breaks: Callable[[str], str]) -> None:
    text, ignore, versions = dockerfile_inputs()
    broken = breaks(text)
    assert broken != text, f"the breakage '{what}' no longer applies to k8s/Dockerfile"
    assert dockerfile_problems(broken, ignore, versions), what


def test_dockerignore_rule_catches() -> None:
    text, ignore, versions = dockerfile_inputs()
    assert dockerfile_problems(text, ignore + "\nreplicas/proto\n", versions)
    assert dockerfile_problems(text, ignore.replace("!replicas\n", ""), versions)
