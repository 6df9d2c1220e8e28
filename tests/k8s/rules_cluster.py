"""Rules for the RayServices themselves: CRD schema, KubeRay admission checks, serveConfigV2 and
AppArgs, placement and memory arithmetic, head/GPU/CPU roles, pod security, /dev/shm, auth, probes.

Each rule takes the documents of k8s/ by kind and returns a list of problems (empty = fine).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.k8s.manifests import (
    CONFIG_DIR,
    DEPRECATED_RAYSERVICE_FIELDS,
    DNS1035,
    DNS1123_LABEL,
    GPU,
    GPU_MEMORY_GIB,
    MAX_RAYSERVICE_NAME,
    NCCL_ENV,
    RAYCLUSTER_CRD,
    RAYSERVICE_CRD,
    SERVE_PORTS,
    UPGRADE_TYPES,
    Docs,
    app_args,
    duration_s,
    env_of,
    has_gpu,
    pod_templates,
    probe_ports,
    quantity,
    ray_container,
    resources,
    schema_problems,
    serve_config,
    source,
)


def crd_problems(d: Docs) -> list[str]:
    """Each RayService against the RayService CRD, its rayClusterConfig also against the RayCluster CRD's spec."""
    problems = []
    for rs in d.get("RayService", []):
        body = {k: v for k, v in rs.items() if k != "metadata"} | {"metadata": {"name": rs["metadata"]["name"]}}
        problems += [f"{source(rs)}: {p}" for p in schema_problems(body, RAYSERVICE_CRD)]
        problems += [
            f"{source(rs)} (as RayCluster): {p}"
            for p in schema_problems(rs["spec"]["rayClusterConfig"], RAYCLUSTER_CRD, "spec")
        ]
    for rc in d.get("RayCluster", []):
        problems += [f"{source(rc)}: {p}" for p in schema_problems(rc, RAYCLUSTER_CRD)]
    return problems


def upgrade_problems(d: Docs) -> list[str]:
    problems = []
    for rs in d.get("RayService", []):
        strategy = rs["spec"].get("upgradeStrategy")
        if not strategy or "type" not in strategy:
            problems.append(f"{source(rs)}: no upgradeStrategy.type (choose one and say why)")
        elif strategy["type"] not in UPGRADE_TYPES:
            problems.append(f"{source(rs)}: upgradeStrategy.type {strategy['type']!r} not in {sorted(UPGRADE_TYPES)}")
        elif strategy["type"] == "NewClusterWithIncrementalUpgrade" and not strategy.get("clusterUpgradeOptions"):
            problems.append(f"{source(rs)}: NewClusterWithIncrementalUpgrade needs clusterUpgradeOptions")
    return problems


def kuberay_rule_problems(d: Docs) -> list[str]:
    """What KubeRay's admission checks (ValidateRayServiceMetadata/Spec, ValidateRayClusterSpec) would refuse."""
    problems = []
    for rs in d.get("RayService", []):
        where, spec, name = source(rs), rs["spec"], rs["metadata"]["name"]
        cluster = spec["rayClusterConfig"]
        if not DNS1035.match(name) or len(name) > MAX_RAYSERVICE_NAME:
            problems.append(f"{where}: name must be a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters")
        timeout = rs["metadata"].get("annotations", {}).get("ray.io/initializing-timeout")
        if timeout is not None:
            try:
                if duration_s(str(timeout)) <= 0:
                    problems.append(f"{where}: ray.io/initializing-timeout must be positive")
            except ValueError as exc:
                problems.append(f"{where}: ray.io/initializing-timeout: {exc}")
        if DEPRECATED_RAYSERVICE_FIELDS & set(spec):
            problems.append(
                f"{where}: {sorted(DEPRECATED_RAYSERVICE_FIELDS & set(spec))} are ignored since KubeRay "
                "1.1 (kuberay#1685); the start-up budget is ray.io/initializing-timeout"
            )
        if cluster.get("authOptions", {}).get("mode") == "token":
            version = tuple(int(x) for x in str(cluster.get("rayVersion", "0")).split(".")[:2])
            if version < (2, 52):
                problems.append(f"{where}: token auth needs rayVersion >= 2.52")
        v2 = cluster.get("enableInTreeAutoscaling") and cluster.get("autoscalerOptions", {}).get("version") == "v2"
        if cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            problems.append(f"{where}: headService.metadata.name must not be set in a RayService")
        for group_where, group, template in pod_templates(rs):
            restart = template["spec"].get("restartPolicy")
            if v2 and restart not in (None, "Never"):
                problems.append(f"{where} {group_where}: restartPolicy must be Never or unset with autoscaler v2")
            params = group.get("rayStartParams", {})
            if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
                problems.append(f"{where} {group_where}: resources set both in rayStartParams and `resources`")
            if group_where == "head":
                continue
            if group.get("idleTimeoutSeconds") is not None and not v2:
                problems.append(f"{where} {group_where}: idleTimeoutSeconds needs autoscaler v2")
            if cluster.get("networkPolicy") and not DNS1123_LABEL.match(group["groupName"]):
                problems.append(f"{where} {group_where}: group name must be a DNS-1123 label with networkPolicy")
            lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
            if not lo <= group.get("replicas", lo) <= hi:
                problems.append(f"{where} {group_where}: need minReplicas <= replicas <= maxReplicas")
    return problems


def serve_problems(d: Docs) -> list[str]:
    """serveConfigV2 through Ray's ServeDeploySchema (and no key it ignores), each app's import_path imports,
    its args pass AppArgs, and the gRPC options are the ones replicas/api/grpc_service.py builds."""
    from pydantic import ValidationError
    from ray.serve.schema import (
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    from replicas.api.grpc_service import grpc_options
    from replicas.api.proxy_options import proxy_env
    from replicas.serving.app_args import AppArgs

    problems = []
    for rs in d.get("RayService", []):
        where = source(rs)
        try:
            cfg = serve_config(rs)
            ServeDeploySchema.model_validate(cfg)
        except (yaml.YAMLError, ValidationError) as exc:
            problems.append(f"{where}: serveConfigV2 invalid: {exc}")
            continue
        # Serve's schema tolerates unknown keys; a typo there would be silently ignored.
        for section, model in (
            ((), ServeDeploySchema),
            (("http_options",), HTTPOptionsSchema),
            (("grpc_options",), gRPCOptionsSchema),
        ):
            body = cfg
            for key in section:
                body = body.get(key) or {}
            unknown = set(body) - set(model.model_fields)
            if unknown:
                part = ".".join(section) or "<top>"
                problems.append(f"{where}: serveConfigV2 {part}: unknown keys {sorted(unknown)}")
        http = cfg.get("http_options") or {}
        if http.get("port") != 8000 or http.get("host") != "0.0.0.0":
            problems.append(f"{where}: http_options must listen on 0.0.0.0:8000 (got {http})")
        grpc = cfg.get("grpc_options") or {}
        want = grpc_options(9000, request_timeout_s=grpc.get("request_timeout_s"))
        if grpc != {k: v for k, v in want.items() if v is not None}:
            problems.append(
                f"{where}: grpc_options {grpc} differ from replicas.api.grpc_service.grpc_options(9000) {want}"
            )
        for function in grpc.get("grpc_servicer_functions", []):
            module, _, attr = function.rpartition(".")
            try:
                getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                problems.append(f"{where}: gRPC servicer function {function} does not import: {exc}")
        for app in cfg.get("applications", []):
            unknown = set(app) - set(ServeApplicationSchema.model_fields)
            if unknown:
                problems.append(f"{where}: application {app.get('name')}: unknown keys {sorted(unknown)}")
            module, _, attr = app["import_path"].partition(":")
            try:
                builder = getattr(importlib.import_module(module), attr)
                assert callable(builder)
            except (ImportError, AttributeError, AssertionError) as exc:
                problems.append(f"{where}: import_path {app['import_path']} does not import: {exc}")
            if app["import_path"] != "replicas.serving.app:build_app":
                problems.append(f"{where}: import_path must be replicas.serving.app:build_app")
            try:
                args = AppArgs.model_validate(app.get("args") or {})
            except ValidationError as exc:
                problems.append(f"{where}: args rejected by AppArgs: {exc}")
                continue
            # Serve's proxies read the request limits from their environment (replicas/api/proxy_options.py)
            want_env = proxy_env(args)
            for group_where, _, template in pod_templates(rs):
                env = {e["name"]: e.get("value") for e in ray_container(template).get("env", [])}
                wrong = {k: env.get(k) for k, v in want_env.items() if env.get(k) != v}
                if wrong:
                    problems.append(f"{where} {group_where}: proxy limit env {wrong} differ from proxy_env {want_env}")
    return problems


def placement_problems(d: Docs) -> list[str]:
    """The engine's placement group (bundle 0 = the replica, then one bundle per rank, one GPU per GPU rank)
    against the worker groups: a GPU app needs one GPU group whose numOfHosts pods hold exactly one group's
    GPUs (so an EP group's nodes arrive together and none is left half-used) and its CPUs; engine
    max_replicas may not exceed what the group can scale to. A CPU app must not ask for GPUs."""
    from cluster.placement import plan_placement
    from cluster.topology import GroupShape, Topology
    from replicas.serving.app import ENGINE_REPLICA_BUNDLE

    problems = []
    for rs in d.get("RayService", []):
        where, a = source(rs), app_args(rs)
        shape = GroupShape(a.trunk_ranks, a.expert_ranks)
        topology = Topology(
            nodes=1, gpus_per_node=shape.world_size if a.gpus else 0, gpu_memory_gib=1.0 if a.gpus else 0
        )
        bundles = plan_placement(
            shape, topology, replica_bundle=ENGINE_REPLICA_BUNDLE, cpus_per_rank=a.cpus_per_rank
        ).bundles
        gpus = sum(b.get("GPU", 0) for b in bundles)
        cpus = sum(b.get("CPU", 0) for b in bundles)
        groups = [(g, ray_container(t)) for w, g, t in pod_templates(rs) if w != "head"]
        gpu_groups = [(g, c) for g, c in groups if has_gpu(c)]
        if not a.gpus:
            if gpu_groups:
                problems.append(f"{where}: a CPU app (gpus: false) with GPU worker groups")
            biggest = max(
                (quantity(resources(c).get("cpu", 0)) * g.get("maxReplicas", 0) for g, c in groups), default=0
            )
            if biggest < cpus:
                problems.append(f"{where}: the group needs {cpus} CPUs, the CPU workers reach {biggest}")
            continue
        fitting = [(g, c) for g, c in gpu_groups if g.get("numOfHosts", 1) * quantity(resources(c)[GPU]) == gpus]
        if len(fitting) != 1:
            problems.append(
                f"{where}: one EP group needs {gpus} GPUs (D={a.trunk_ranks} + X={a.expert_ranks}); "
                "want exactly one GPU worker group with numOfHosts x GPUs per pod equal to that"
            )
            continue
        group, container = fitting[0]
        hosts = group.get("numOfHosts", 1)
        if hosts * quantity(resources(container).get("cpu", 0)) < cpus:
            problems.append(f"{where}: one EP group needs {cpus} CPUs, {hosts} pods of {group['groupName']} give less")
        if a.engine_autoscaling.max_replicas > group["maxReplicas"]:
            problems.append(
                f"{where}: engine max_replicas {a.engine_autoscaling.max_replicas} > "
                f"{group['groupName']} maxReplicas {group['maxReplicas']} (one replica = one EP group)"
            )
        if a.engine_autoscaling.min_replicas > group["minReplicas"]:
            problems.append(f"{where}: engine min_replicas above {group['groupName']} minReplicas")
    return problems


def memory_problems(d: Docs) -> list[str]:
    """Per trunk rank: weights + reserve + num_kv_blocks KV blocks + max_num_seqs DeltaNet slots must fit
    the smallest GPU the GPU workers may land on (cluster/capacity.py arithmetic on the real config)."""
    from cluster.capacity import plan_capacity, sequence_bytes
    from cluster.topology import Topology
    from model_shards.config import from_hf_config

    problems = []
    for rs in d.get("RayService", []):
        a = app_args(rs)
        if not a.gpus:
            continue
        config = CONFIG_DIR / (
            "qwen3.5-397b-a17b-fp8.config.json" if "FP8" in (a.model or "").upper() else "qwen3.5-397b-a17b.config.json"
        )
        if not config.is_file():
            pytest.skip(f"{config} not found; memory arithmetic skipped")
        cfg = from_hf_config(str(config))
        for where, group, template in pod_templates(rs):
            container = ray_container(template)
            if not has_gpu(container):
                continue
            products = [
                v
                for term in template["spec"]["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                for expr in term["matchExpressions"]
                if expr["key"] == "nvidia.com/gpu.product"
                for v in expr["values"]
            ]
            unknown = [p for p in products if p not in GPU_MEMORY_GIB]
            if not products or unknown:
                problems.append(f"{source(rs)} {where}: GPU products {unknown or 'none'} have no known memory size")
                continue
            gib = min(GPU_MEMORY_GIB[p] for p in products)
            topo = Topology(
                nodes=group.get("numOfHosts", 1),
                gpus_per_node=int(quantity(resources(container)[GPU])),
                gpu_memory_gib=gib,
            )
            plan = plan_capacity(
                cfg,
                topo,
                weight_format="fp8" if "FP8" in (a.model or "").upper() else "bf16",
                trunk_ranks=a.trunk_ranks,
                expert_ranks=a.expert_ranks,
                max_model_len=a.max_model_len or 32768,
                block_size=a.block_size,
            )
            if not plan.fits:
                problems.append(f"{source(rs)}: the layout does not fit {gib} GiB GPUs: {plan.reason}")
                continue
            kv_token, slot, _ = sequence_bytes(
                cfg, max_model_len=plan.max_model_len, block_size=a.block_size, kv_dtype_bytes=2
            )
            need = a.num_kv_blocks * a.block_size * kv_token + a.max_num_seqs * slot
            if need > plan.trunk_cache_bytes:
                problems.append(
                    f"{source(rs)}: caches need {need / 2**30:.1f} GiB per trunk GPU, a {gib} GiB GPU "
                    f"has {plan.trunk_cache_bytes / 2**30:.1f} GiB left"
                )
    return problems


def head_problems(d: Docs) -> list[str]:
    """The head holds no GPU and no model actor or Serve replica: num-cpus 0 (and num-gpus 0)."""
    problems = []
    for rs in d.get("RayService", []):
        head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
        params = head.get("rayStartParams", {})
        if str(params.get("num-cpus")) != "0":
            problems.append(f'{source(rs)}: head rayStartParams num-cpus must be "0" (no replicas on the head)')
        if str(params.get("num-gpus", "0")) != "0" or "GPU" in head.get("resources", {}):
            problems.append(f"{source(rs)}: head must advertise no GPUs")
        if any(has_gpu(c) for c in head["template"]["spec"]["containers"]):
            problems.append(f"{source(rs)}: head pod requests GPUs")
    return problems


def accelerator_problems(d: Docs) -> list[str]:
    """GPU workers: GPUs + an RDMA device resource + IPC_LOCK (the only added capability) + NCCL/GLOO env
    with a watchdog timeout above the collective deadline. CPU apps: no GPU, RDMA or IPC_LOCK anywhere."""
    problems = []
    for rs in d.get("RayService", []):
        a = app_args(rs)
        for where, group, template in pod_templates(rs):
            for container in template["spec"].get("containers", []) + template["spec"].get("initContainers", []):
                tag = f"{source(rs)} {where} container {container['name']}"
                caps = set(container.get("securityContext", {}).get("capabilities", {}).get("add", []))
                rdma = [k for k in resources(container) if k.startswith("rdma/") or k == "nvidia.com/hostdev"]
                if not has_gpu(container):
                    if caps:
                        problems.append(f"{tag}: adds capabilities {sorted(caps)} without GPUs")
                    if rdma:
                        problems.append(f"{tag}: RDMA devices without GPUs")
                    continue
                if not a.gpus:
                    problems.append(f"{tag}: requests GPUs but the app runs with gpus: false")
                if caps != {"IPC_LOCK"}:
                    problems.append(f"{tag}: GPU workers add exactly IPC_LOCK, got {sorted(caps)}")
                if not rdma:
                    problems.append(f"{tag}: no RDMA device resource (rdma/* or nvidia.com/hostdev)")
                env = env_of(container)
                missing = [k for k in NCCL_ENV if k not in env]
                if missing:
                    problems.append(f"{tag}: NCCL environment missing {missing}")
                    continue
                if env["TORCH_NCCL_ASYNC_ERROR_HANDLING"].get("value") not in ("1", "2"):
                    problems.append(f"{tag}: TORCH_NCCL_ASYNC_ERROR_HANDLING must abort the communicator (1 or 2)")
                if float(env["TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC"]["value"]) <= a.collective_deadline_s:
                    problems.append(f"{tag}: TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC must exceed collective_deadline_s")
            params = group.get("rayStartParams", {})
            if not a.gpus and str(params.get("num-gpus", "0")) != "0":
                problems.append(f"{source(rs)} {where}: CPU app advertises GPUs in rayStartParams")
        if a.gpus and not 10 <= a.collective_deadline_s <= 120:
            problems.append(f"{source(rs)}: collective_deadline_s on GPUs should be tens of seconds")
    return problems


def _pod_specs(d: Docs) -> Iterator[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """(where, pod spec, every container incl. init containers and the autoscaler sidecar's securityContext)."""
    for rs in d.get("RayService", []):
        cluster = rs["spec"]["rayClusterConfig"]
        for where, _, template in pod_templates(rs):
            spec = template["spec"]
            extra = []
            if where == "head" and cluster.get("enableInTreeAutoscaling"):
                extra = [
                    {
                        "name": "autoscaler",
                        **{k: v for k, v in cluster.get("autoscalerOptions", {}).items() if k == "securityContext"},
                    }
                ]
            yield f"{source(rs)} {where}", spec, spec["containers"] + spec.get("initContainers", []) + extra
    for job in d.get("Job", []):
        spec = job["spec"]["template"]["spec"]
        yield source(job), spec, spec["containers"] + spec.get("initContainers", [])


def security_problems(d: Docs) -> list[str]:
    """S4: non-root, no privilege escalation, drop ALL, RuntimeDefault seccomp; no host namespaces, hostPath
    or privileged containers; read-only root filesystems."""
    problems = []
    for where, spec, containers in _pod_specs(d):
        pod_sc = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where}: {flag}")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            problems.append(f"{where}: hostPath volume")
        if pod_sc.get("runAsNonRoot") is not True or pod_sc.get("runAsUser") == 0:
            problems.append(f"{where}: the pod's securityContext must set runAsNonRoot: true (and no uid 0)")
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: the pod's seccompProfile must be RuntimeDefault")
        for c in containers:
            sc, tag = c.get("securityContext", {}), f"{where} container {c['name']}"
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{tag}: runAsNonRoot not true")
            if sc.get("runAsUser") == 0:
                problems.append(f"{tag}: runAsUser 0")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{tag}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                problems.append(f"{tag}: privileged")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{tag}: capabilities.drop must be [ALL]")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                problems.append(f"{tag}: seccompProfile must be RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{tag}: readOnlyRootFilesystem must be true")
    return problems


def shm_problems(d: Docs) -> list[str]:
    """Every Ray container mounts /dev/shm from a Memory emptyDir with a size limit (the default is 64 MB)."""
    problems = []
    for rs in d.get("RayService", []):
        for where, _, template in pod_templates(rs):
            volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
            mounts = [m for m in ray_container(template).get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            vol = volumes.get(mounts[0]["name"], {}) if mounts else {}
            empty = vol.get("emptyDir", {})
            if empty.get("medium") != "Memory" or not empty.get("sizeLimit"):
                problems.append(f"{source(rs)} {where}: /dev/shm must be a Memory emptyDir with a sizeLimit")
    return problems


def auth_problems(d: Docs) -> list[str]:
    """S2: Ray token auth on; the app's API key comes from a Secret into every worker that may run the ingress,
    never as a literal in the manifest."""
    problems = []
    for rs in d.get("RayService", []):
        where = source(rs)
        if rs["spec"]["rayClusterConfig"].get("authOptions", {}).get("mode") != "token":
            problems.append(f"{where}: rayClusterConfig.authOptions.mode must be token")
        a = app_args(rs)
        if a.api_key is not None or not a.api_key_env:
            problems.append(f"{where}: set api_key_env (a Secret-backed env var), never api_key")
            continue
        for group_where, _, template in pod_templates(rs):
            if group_where == "head":
                continue  # num-cpus 0: the ingress (1 CPU) never runs there
            env = env_of(ray_container(template)).get(a.api_key_env, {})
            if "secretKeyRef" not in env.get("valueFrom", {}):
                problems.append(f"{where} {group_where}: {a.api_key_env} must come from a secretKeyRef")
    return problems


def probe_problems(d: Docs) -> list[str]:
    """Readiness and liveness on every Ray container; liveness never depends on the Serve app (a model that
    loads for many minutes must not get its pod restarted) and tolerates a minute of failures; GPU workers
    get a startup probe and 5 minutes of liveness tolerance; the RayService start-up budget
    (ray.io/initializing-timeout) covers the app's load_timeout_s."""
    problems = []
    for rs in d.get("RayService", []):
        a, where = app_args(rs), source(rs)
        timeout = rs["metadata"].get("annotations", {}).get("ray.io/initializing-timeout")
        if timeout is None or duration_s(str(timeout)) < a.load_timeout_s:
            problems.append(
                f"{where}: ray.io/initializing-timeout ({timeout}) must cover load_timeout_s ({a.load_timeout_s} s)"
            )
        for group_where, _, template in pod_templates(rs):
            c, tag = ray_container(template), f"{where} {group_where}"
            for kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if not probe or not ({"httpGet", "exec", "tcpSocket", "grpc"} & set(probe)):
                    problems.append(f"{tag}: no {kind}")
            live = c.get("livenessProbe") or {}
            if probe_ports(live) & SERVE_PORTS:
                problems.append(f"{tag}: livenessProbe depends on the Serve proxy")
            tolerance = live.get("failureThreshold", 3) * live.get("periodSeconds", 10)
            if tolerance < 60:
                problems.append(f"{tag}: livenessProbe restarts after {tolerance} s of failures (< 60 s)")
            if has_gpu(c):
                if not c.get("startupProbe"):
                    problems.append(f"{tag}: GPU workers need a startupProbe")
                if tolerance < 300:
                    problems.append(f"{tag}: a GPU worker restart costs a weight reload; tolerate >= 300 s")
    return problems


def shutdown_problems(d: Docs) -> list[str]:
    """A stopping replica's drain (`graceful_shutdown_timeout_s`, the ingress's margin more) ends before the
    kubelet kills its pod (terminationGracePeriodSeconds, 30 s when unset), so streams end with an error event
    instead of being cut."""
    from replicas.serving.app import INGRESS_SHUTDOWN_MARGIN_S

    problems = []
    for rs in d.get("RayService", []):
        drain = app_args(rs).graceful_shutdown_timeout_s + INGRESS_SHUTDOWN_MARGIN_S
        for where, _, template in pod_templates(rs):
            grace = float(template["spec"].get("terminationGracePeriodSeconds", 30))
            if drain >= grace:
                problems.append(
                    f"{source(rs)} {where}: graceful_shutdown_timeout_s + {INGRESS_SHUTDOWN_MARGIN_S:g} s "
                    f"= {drain:g} s is not below terminationGracePeriodSeconds {grace:g}"
                )
    return problems
