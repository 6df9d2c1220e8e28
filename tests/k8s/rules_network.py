"""Rules for what the network can reach: Services/Ingresses (reliability.md S1) and NetworkPolicies,
both k8s/networkpolicy.yaml and the KubeRay-managed rayClusterConfig.networkPolicy (S3).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.k8s.manifests import (
    APP_LABEL,
    CONTROL_PORTS,
    FILL_JOB_LABEL,
    KUBE_DNS_POD,
    NODE_TYPE,
    OPERATOR_POD,
    SERVE_PORTS,
    Docs,
    pod_templates,
    source,
)


def exposure_problems(d: Docs) -> list[str]:
    """S1: no LoadBalancer/NodePort/Ingress route reaches GCS, dashboard, client, agent or metrics; the serve
    Service carries the Serve ports only."""
    problems = []
    public = {"LoadBalancer", "NodePort"}
    for rs in d.get("RayService", []):
        where, spec = source(rs), rs["spec"]
        head = spec["rayClusterConfig"]["headGroupSpec"]
        if head.get("serviceType") in public or head.get("headService", {}).get("spec", {}).get("type") in public:
            problems.append(f"{where}: the head Service (6379, 8265, 10001, ...) must be ClusterIP")
        if head.get("enableIngress"):
            problems.append(f"{where}: enableIngress exposes the dashboard")
        serve_svc = spec.get("serveService", {}).get("spec", {})
        ports = {p.get("targetPort", p["port"]) for p in serve_svc.get("ports", [])} | {
            p["port"] for p in serve_svc.get("ports", [])
        }
        if not ports or not ports <= SERVE_PORTS:
            problems.append(
                f"{where}: serveService ports {sorted(ports)} must be the Serve ports {sorted(SERVE_PORTS)}"
            )
    for svc in d.get("Service", []):
        if svc["spec"].get("type") in public:
            ports = {p["port"] for p in svc["spec"]["ports"]} | {p.get("targetPort") for p in svc["spec"]["ports"]}
            if ports & CONTROL_PORTS:
                problems.append(f"{source(svc)}: {svc['spec']['type']} exposes {sorted(ports & CONTROL_PORTS)}")
    for ing in d.get("Ingress", []):
        text = yaml.safe_dump(ing["spec"])
        hits = {int(p) for p in re.findall(r"number: (\d+)", text)} & CONTROL_PORTS
        if hits:
            problems.append(f"{source(ing)}: Ingress routes to {sorted(hits)}")
    return problems


def _peer_kind(peer: dict[str, Any]) -> str:
    if "ipBlock" in peer:
        return "external"
    ns, pod = peer.get("namespaceSelector"), peer.get("podSelector")
    pod_labels = (pod or {}).get("matchLabels", {})
    if ns is None and pod is not None and set(pod_labels) == {APP_LABEL} and not pod.get("matchExpressions"):
        return f"app:{pod_labels[APP_LABEL]}"
    if ns is not None and ns.get("matchLabels", {}).get("kubernetes.io/metadata.name") and pod_labels == OPERATOR_POD:
        return "operator"
    if (
        ns is not None
        and ns.get("matchLabels", {}).get("kubernetes.io/metadata.name") == "kube-system"
        and pod_labels == KUBE_DNS_POD
    ):
        return "dns"
    return "external"


def _ports(rule: dict[str, Any]) -> set[int] | None:
    """Ports a rule opens (None = every port)."""
    return {int(p["port"]) for p in rule["ports"]} if rule.get("ports") else None


def _policy_problems(
    name: str, selected: dict[str, str], ingress: list[dict[str, Any]] | None, egress: list[dict[str, Any]] | None
) -> list[str]:
    """One policy's rules, classified by peer: same-app pods (any port), the KubeRay operator (8265 on the
    head only), DNS (53), and the outside world (Serve ports in; API server / object store out only)."""
    problems = []
    app, is_head = selected.get(APP_LABEL), selected.get(NODE_TYPE) == "head"
    is_fill = selected.get(FILL_JOB_LABEL[0]) == FILL_JOB_LABEL[1]
    for rule in ingress or []:
        ports = _ports(rule)
        for kind in {_peer_kind(p) for p in rule.get("from", [])} or {"external"}:
            if kind.startswith("app:"):
                if kind != f"app:{app}":
                    problems.append(f"{name}: admits pods of {kind} into {app}")
            elif kind == "operator":
                if not is_head or ports != {8265}:
                    problems.append(f"{name}: the operator may reach 8265 on the head only (got {ports})")
            elif ports is None or not ports <= SERVE_PORTS:
                problems.append(f"{name}: opens {sorted(ports) if ports else 'every port'} to outside the cluster")
    for rule in egress or []:
        ports = _ports(rule)
        for kind in {_peer_kind(p) for p in rule.get("to", [])} or {"external"}:
            if kind.startswith("app:"):
                if kind != f"app:{app}":
                    problems.append(f"{name}: lets {app} reach pods of {kind}")
            elif kind == "dns":
                if ports != {53}:
                    problems.append(f"{name}: DNS egress must be port 53 only")
            elif kind == "external":
                allowed = {443, 6443} if is_head else {443} if is_fill else set()
                if ports is None or not ports <= allowed:
                    problems.append(f"{name}: egress to outside on {sorted(ports) if ports else 'every port'}")
            else:
                problems.append(f"{name}: egress to {kind}")
    return problems


def netpol_problems(d: Docs) -> list[str]:
    """S1/S3: a namespace default-deny; per RayService (pod label epserve.io/app) all traffic between its own
    pods, the Serve ports from outside, the operator to the head's dashboard; nothing else in, and only DNS
    / API server / object store out. The same for the KubeRay-managed rayClusterConfig.networkPolicy."""
    problems = []
    policies = d.get("NetworkPolicy", [])
    if not any(
        p["spec"].get("podSelector") == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        problems.append("k8s/networkpolicy.yaml: no namespace default-deny (podSelector {}, Ingress+Egress, no rules)")
    for p in policies:
        spec = p["spec"]
        selected = spec.get("podSelector", {}).get("matchLabels", {})
        problems += _policy_problems(source(p), selected, spec.get("ingress"), spec.get("egress"))
    apps = {
        t.get("metadata", {}).get("labels", {}).get(APP_LABEL)
        for rs in d.get("RayService", [])
        for _, _, t in pod_templates(rs)
    }
    for rs in d.get("RayService", []):
        labels = {t.get("metadata", {}).get("labels", {}).get(APP_LABEL) for _, _, t in pod_templates(rs)}
        if len(labels) != 1 or None in labels:
            problems.append(f"{source(rs)}: every pod template needs the same {APP_LABEL} label")
    for app in sorted(a for a in apps if a):
        mine = [
            p["spec"] for p in policies if p["spec"].get("podSelector", {}).get("matchLabels", {}).get(APP_LABEL) == app
        ]
        intra = any(
            r.get("from") and {_peer_kind(x) for x in r["from"]} == {f"app:{app}"} and not r.get("ports")
            for s in mine
            for r in s.get("ingress", [])
        )
        intra_out = any(
            r.get("to") and {_peer_kind(x) for x in r["to"]} == {f"app:{app}"} and not r.get("ports")
            for s in mine
            for r in s.get("egress", [])
        )
        serve = any(not r.get("from") and _ports(r) == SERVE_PORTS for s in mine for r in s.get("ingress", []))
        operator = any(
            {_peer_kind(x) for x in r.get("from", [])} == {"operator"}
            for s in mine
            if s["podSelector"]["matchLabels"].get(NODE_TYPE) == "head"
            for r in s.get("ingress", [])
        )
        for ok, what in (
            (intra and intra_out, "traffic between its own pods"),
            (serve, "the Serve ports 8000/9000"),
            (operator, "the operator to the head's dashboard"),
        ):
            if not ok:
                problems.append(f"k8s/networkpolicy.yaml: nothing allows {what} for {app}")
    for job in d.get("Job", []):
        pod_labels = job["spec"]["template"]["metadata"].get("labels", {})
        if not any(
            p["spec"].get("podSelector", {}).get("matchLabels")
            and p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
            and p["spec"].get("egress")
            for p in policies
        ):
            problems.append(f"{source(job)}: no NetworkPolicy gives the Job its egress")
    for rs in d.get("RayService", []):
        cluster = rs["spec"]["rayClusterConfig"]
        managed = cluster.get("networkPolicy")
        if managed is None:
            continue
        if managed.get("mode", "DenyAll") != "DenyAll":
            problems.append(f"{source(rs)}: rayClusterConfig.networkPolicy.mode must be DenyAll")
        app = cluster["headGroupSpec"]["template"]["metadata"]["labels"].get(APP_LABEL)
        for part, selected in (("head", {APP_LABEL: app, NODE_TYPE: "head"}), ("worker", {APP_LABEL: app})):
            rules = managed.get(part, {})
            problems += _policy_problems(
                f"{source(rs)} networkPolicy.{part}", selected, rules.get("ingressRules"), rules.get("egressRules")
            )
        head_in = managed.get("head", {}).get("ingressRules", [])
        if not any({_peer_kind(x) for x in r.get("from", [])} == {"operator"} for r in head_in):
            problems.append(
                f"{source(rs)}: networkPolicy.head must admit the operator to 8265 (KubeRay no longer does)"
            )
    return problems
