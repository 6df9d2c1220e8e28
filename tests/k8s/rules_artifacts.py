"""Rules for the model-volume Job and its PVC, the image references, and k8s/Dockerfile."""

from __future__ import annotations

import re

from tests.k8s.manifests import (
    K8S,
    Docs,
    app_args,
    docs,
    env_of,
    pod_templates,
    ray_container,
    source,
)


def job_problems(d: Docs) -> list[str]:
    """The Job copies the checkpoint from a configurable source into the PVC the GPU RayService mounts, then
    runs `epserve inspect` on exactly the folder the app serves, failing on a broken checkpoint."""
    problems = []
    pvcs = {p["metadata"]["name"]: p for p in d.get("PersistentVolumeClaim", [])}
    for pvc in pvcs.values():
        if pvc.get("apiVersion") != "v1" or not set(pvc["spec"].get("accessModes", [])) & {
            "ReadWriteMany",
            "ReadOnlyMany",
        }:
            problems.append(f"{source(pvc)}: the model PVC is mounted by many pods: ReadWriteMany/ReadOnlyMany")
        if "storage" not in pvc["spec"].get("resources", {}).get("requests", {}):
            problems.append(f"{source(pvc)}: no storage request")
    served = [(rs, app_args(rs)) for rs in d.get("RayService", []) if app_args(rs).model]
    jobs = d.get("Job", [])
    if served and not jobs:
        problems.append("k8s/: a RayService serves a model volume but no Job fills it")
    for job in jobs:
        where, spec = source(job), job["spec"]
        pod = spec["template"]["spec"]
        if job.get("apiVersion") != "batch/v1":
            problems.append(f"{where}: apiVersion must be batch/v1")
        if pod.get("restartPolicy") not in ("Never", "OnFailure") or "backoffLimit" not in spec:
            problems.append(f"{where}: needs restartPolicy Never/OnFailure and an explicit backoffLimit")
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        if not claims or not set(claims.values()) <= set(pvcs):
            problems.append(f"{where}: must mount the PVC defined beside it ({sorted(pvcs)}), got {claims}")
        copiers = [c for c in pod.get("initContainers", []) if "MODEL_SOURCE" in env_of(c)]
        if not copiers:
            problems.append(f"{where}: no init container with a configurable MODEL_SOURCE")
        elif not any(m["name"] in claims and not m.get("readOnly") for m in copiers[0].get("volumeMounts", [])):
            problems.append(f"{where}: the copy step must mount the model volume writable")
        inspectors = []
        for c in pod["containers"]:
            script = " ".join(c.get("command", []) + c.get("args", []))
            for name, e in env_of(c).items():
                script = script.replace("${" + name + "}", str(e.get("value"))).replace("$" + name, str(e.get("value")))
            if "epserve inspect" in script:
                inspectors.append((c, script))
        if not inspectors:
            problems.append(f"{where}: no container runs `epserve inspect`")
            continue
        container, script = inspectors[0]
        if "|| true" in script or not re.search(r"set -[a-z]*e|^\s*exec epserve inspect", script, re.M):
            problems.append(f"{where}: a failing `epserve inspect` must fail the Job (set -e, no `|| true`)")
        if not any(m["name"] in claims for m in container.get("volumeMounts", [])):
            problems.append(f"{where}: the inspect container does not mount the model volume")
        for rs, a in served:
            if a.model not in script:
                problems.append(f"{where}: inspects something else than {a.model}, which {source(rs)} serves")
            rs_claims = {
                v["persistentVolumeClaim"]["claimName"]
                for _, _, t in pod_templates(rs)
                for v in t["spec"].get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            if not rs_claims or not rs_claims <= set(claims.values()):
                problems.append(f"{source(rs)}: mounts {sorted(rs_claims)}, the Job fills {sorted(claims.values())}")
    for rs, a in served:
        for where, _, template in pod_templates(rs):
            if where == "head":
                continue
            mounts = [
                m
                for m in ray_container(template).get("volumeMounts", [])
                if a.model.startswith(m["mountPath"].rstrip("/") + "/")
            ]
            if not mounts or not mounts[0].get("readOnly"):
                problems.append(f"{source(rs)} {where}: {a.model} must be on a read-only volume mount")
    return problems


def image_problems(d: Docs) -> list[str]:
    """One pinned epserve image (built from k8s/Dockerfile) everywhere the project's code runs."""
    images = set()
    for rs in d.get("RayService", []):
        images |= {c["image"] for _, _, t in pod_templates(rs) for c in t["spec"]["containers"]}
    for job in d.get("Job", []):
        images |= {c["image"] for c in job["spec"]["template"]["spec"]["containers"]}
    problems = [
        f"image {i} must carry a pinned tag" for i in images if ":" not in i.rsplit("/", 1)[-1] or i.endswith(":latest")
    ]
    if len(images) != 1:
        problems.append(f"expected one epserve image everywhere, got {sorted(images)}")
    return problems


def dockerfile_problems(text: str, ignore: str, ray_versions: set[str]) -> list[str]:
    """CUDA torch, the pinned Ray, epserve installed with its committed gRPC stubs (COPY'd, not ignored,
    import-checked at build), bash/wget for KubeRay, RDMA user space for NCCL, non-root, no model inside."""
    problems = []
    joined = re.sub(r"\\\n", " ", text)
    code = "\n".join(line for line in joined.splitlines() if not line.lstrip().startswith("#"))
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", code, re.M))
    runs = "\n".join(re.findall(r"^RUN (.*)$", code, re.M))
    if not re.search(r"^FROM \S+", code, re.M):
        problems.append("Dockerfile: no FROM")
    users = re.findall(r"^USER (\S+)", code, re.M)
    last = users[-1] if users else ""
    user = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), last).split(":")[0]
    if not user or user in ("root", "0") or (user.isdigit() and int(user) == 0) or "$" in user:
        problems.append(f"Dockerfile: the final USER must be a non-root user (got {user or 'none'})")
    if not re.search(r"pip install[^\n]*(-e\s+\S*epserve|\s\.(\s|$))", runs):
        problems.append("Dockerfile: epserve is not pip-installed")
    if not re.search(r"pip install[^\n]*epserve\[[^\]]*\bgpu\b", runs):
        problems.append("Dockerfile: epserve's `gpu` extra (the CUDA kernels) is not installed")
    if not re.search(r"^COPY\s+replicas/", code, re.M):
        problems.append("Dockerfile: replicas/ (with the gRPC stubs in replicas/proto) is not copied")
    if "replicas.proto.epserve_pb2_grpc" not in runs:
        problems.append("Dockerfile: the build does not check that the gRPC stubs import")
    if "torch.version.cuda" not in runs or "whl/cpu" in code:
        problems.append("Dockerfile: torch must be a CUDA build, checked at build time")
    pinned = args.get("RAY_VERSION")
    if not re.search(r"ray\[[^\]]*serve[^\]]*\]==\$\{?RAY_VERSION", runs) or {pinned} != ray_versions:
        problems.append(
            f"Dockerfile: Ray must be pinned to the manifests' rayVersion {sorted(ray_versions)} (got {pinned})"
        )
    for package in ("bash", "wget", "libibverbs1"):
        if not re.search(rf"apt-get install[^\n]*\b{re.escape(package)}\b", runs):
            problems.append(f"Dockerfile: {package} is not installed")
    if re.search(r"safetensors|snapshot_download|huggingface-cli|hf download|^COPY\s+\S*models", code, re.M | re.I):
        problems.append("Dockerfile: a model must not be baked into the image")
    lines = [ln.strip() for ln in ignore.splitlines() if ln.strip() and not ln.startswith("#")]
    if any(not ln.startswith("!") and re.search(r"proto|pb2|^replicas", ln) for ln in lines):
        problems.append("Dockerfile.dockerignore excludes the gRPC stubs")
    if "*" in lines and "!replicas" not in lines:
        problems.append("Dockerfile.dockerignore ignores everything but does not re-include replicas/")
    if not any(re.fullmatch(r"\.venv/?|\*", ln) for ln in lines):
        problems.append("Dockerfile.dockerignore must keep .venv out of the build context")
    return problems


def dockerfile_inputs() -> tuple[str, str, set[str]]:
    versions = {str(rs["spec"]["rayClusterConfig"]["rayVersion"]) for rs in docs().get("RayService", [])}
    ignore = K8S / "Dockerfile.dockerignore"
    return (K8S / "Dockerfile").read_text(), ignore.read_text() if ignore.is_file() else "", versions
