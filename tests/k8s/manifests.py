"""Loading k8s/ and the KubeRay CRD schemas, and small accessors shared by the rule modules.

The CRDs are read in place from ../shared/kuberay-crds beside the checkout (never copied into the
project); `crd_schema` skips the calling test, saying so, when that folder is absent.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT / ".." / "shared" / "kuberay-crds"
CONFIG_DIR = ROOT / ".." / "shared" / "configs"
RAYSERVICE_CRD = "ray.io_rayservices.yaml"
RAYCLUSTER_CRD = "ray.io_rayclusters.yaml"

SERVE_PORTS = {8000, 9000}
# GCS, dashboard, Ray client, dashboard agent, metrics: never reachable from outside the Ray cluster.
CONTROL_PORTS = {6379, 8265, 10001, 52365, 8080}
# ValidateRayServiceSpec (kuberay ray-operator/controllers/ray/utils/validation.go): "only
# NewClusterWithIncrementalUpgrade, NewCluster, and None are valid upgradeType". The CRD has no enum.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
DEPRECATED_RAYSERVICE_FIELDS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
GPU = "nvidia.com/gpu"
APP_LABEL = "epserve.io/app"
NODE_TYPE = "ray.io/node-type"
OPERATOR_POD = {"app.kubernetes.io/component": "kuberay-operator"}
KUBE_DNS_POD = {"k8s-app": "kube-dns"}
FILL_JOB_LABEL = ("epserve.io/role", "fill-model-volume")
NCCL_ENV = (
    "NCCL_SOCKET_IFNAME",
    "GLOO_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
)
# Memory of the GPUs the GPU manifest may land on (nodeAffinity values of nvidia.com/gpu.product).
GPU_MEMORY_GIB = {"NVIDIA-H200": 140.0, "NVIDIA-H100-80GB-HBM3": 80.0}
MAX_RAYSERVICE_NAME = 47  # KubeRay: MaxRayClusterNameLength (53) - 6
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Docs = dict[str, list[dict[str, Any]]]


# ------------------------------------------------------------------------------ loading
@lru_cache(maxsize=1)
def _manifests() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("*.yml")]):
        for doc in yaml.load_all(path.read_text(), Loader=Loader):
            if doc:
                out.append((path.name, doc))
    return tuple(out)


def docs() -> Docs:
    """Every YAML document in k8s/, by kind (deep copies: tests may break them)."""
    by_kind: Docs = {}
    for name, doc in _manifests():
        d = copy.deepcopy(doc)
        d.setdefault("metadata", {}).setdefault("annotations", {})
        d["metadata"]["annotations"]["test/source-file"] = name
        by_kind.setdefault(d.get("kind", "<no kind>"), []).append(d)
    return by_kind


def source(doc: dict[str, Any]) -> str:
    return f"{doc['metadata']['annotations'].get('test/source-file')}:{doc.get('kind')}/{doc['metadata'].get('name')}"


@lru_cache(maxsize=2)
def crd_schema(filename: str) -> dict[str, Any]:
    path = CRD_DIR / filename
    if not path.is_file():
        pytest.skip(
            f"KubeRay CRD schemas not found at {CRD_DIR.resolve()} (expected ../shared/kuberay-crds beside "
            "the checkout); CRD schema checks skipped"
        )
    crd = yaml.load(path.read_text(), Loader=Loader)
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def to_json_schema(node: Any) -> Any:  # noqa: ANN401
    """OpenAPI v3 (structural CRD schema) -> plain JSON Schema: drop x-kubernetes-* keys, and make
    `x-kubernetes-int-or-string` an integer-or-string. Field names under `properties` are never keywords."""
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif not key.startswith("x-kubernetes-"):
            out[key] = to_json_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    return out


@lru_cache(maxsize=4)
def _validator(filename: str, *path: str) -> jsonschema.Draft7Validator:
    schema = crd_schema(filename)
    for key in path:
        schema = schema["properties"][key]
    return jsonschema.Draft7Validator(to_json_schema(schema))


def unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:  # noqa: ANN401
    """Keys of `doc` the schema does not declare. The CRD never sets additionalProperties: false (the API
    server prunes unknown fields silently), so a misspelt field would otherwise pass."""
    problems: list[str] = []
    if isinstance(doc, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in doc.items():
            if props is not None and key in props:
                problems += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                problems.append(f"{path}.{key}: unknown field (not in the CRD schema)")
    elif isinstance(doc, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(doc):
            problems += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return problems


def schema_problems(doc: dict[str, Any], filename: str, *path: str) -> list[str]:
    schema = crd_schema(filename)
    for key in path:
        schema = schema["properties"][key]
    problems = unknown_fields(doc, schema, "." + ".".join(path) if path else "")
    for err in _validator(filename, *path).iter_errors(doc):
        where = ".".join(str(p) for p in err.absolute_path) or "<root>"
        problems.append(f"{'.'.join(path) + '.' if path else ''}{where}: {err.message}")
    return problems


# ------------------------------------------------------------------------------ accessors
def pod_templates(rs: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, group spec, pod template) for the head and every worker group."""
    cluster = rs["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"], cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group['groupName']}", group, group["template"]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first one


def resources(container: dict[str, Any]) -> dict[str, Any]:
    res = container.get("resources", {})
    return {**res.get("requests", {}), **res.get("limits", {})}


def has_gpu(container: dict[str, Any]) -> bool:
    return any(key == GPU for key in resources(container))


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def quantity(value: str | int | float) -> float:
    """Kubernetes quantity -> number (CPU cores or bytes)."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


def serve_config(rs: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def app_args(rs: dict[str, Any]):  # noqa: ANN201  # -> AppArgs
    from replicas.serving.app_args import AppArgs

    (app,) = serve_config(rs)["applications"]
    return AppArgs.model_validate(app.get("args") or {})


def duration_s(text: str) -> float:
    """A Go duration ("2h", "90m", "1h30m") or integer seconds, as KubeRay parses ray.io/initializing-timeout."""
    if re.fullmatch(r"\d+", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[u] for n, u in parts)


def probe_ports(probe: dict[str, Any]) -> set[int]:
    ports = set()
    for handler in ("httpGet", "tcpSocket", "grpc"):
        if handler in probe and isinstance(probe[handler].get("port"), int):
            ports.add(probe[handler]["port"])
    command = " ".join(probe.get("exec", {}).get("command", []))
    ports |= {int(p) for p in re.findall(r"localhost:(\d+)", command)}
    return ports
