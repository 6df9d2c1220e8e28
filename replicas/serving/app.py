"""`build_app(args)`: the one entry point of the Serve app (serve.run, `epserve serve`, KubeRay import_path).

Deployments: `EpserveIngress` (HTTP, autoscaled on ongoing requests) -> `EpserveEngine` (one
replica = one expert-parallel group; its placement group holds the replica in bundle 0 and
every rank after it, so the engine scales in whole groups). A `MetricsHub` actor per app sums
every replica's metrics for /metrics. Tests: tests/replicas/test_serving.py.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from cluster.placement import plan_placement
from cluster.topology import GroupShape, Topology
from replicas.api.ingress import Ingress, build_api, default_model_name
from replicas.serving.app_args import AppArgs
from replicas.serving.engine_deployment import EngineServer
from replicas.serving.metrics import MetricsHub

ENGINE_REPLICA_BUNDLE = {"CPU": 1.0}
INGRESS_CPUS = 1.0


def _engine_bundles(a: AppArgs) -> Any:  # noqa: ANN401  # cluster.placement.GroupPlacement
    shape = GroupShape(a.trunk_ranks, a.expert_ranks)
    return plan_placement(
        shape,
        Topology(
            nodes=a.group_nodes or 1,
            gpus_per_node=shape.world_size if a.gpus else 0,
            gpu_memory_gib=1.0 if a.gpus else 0,
        ),
        replica_bundle=ENGINE_REPLICA_BUNDLE,
        cpus_per_rank=a.cpus_per_rank,
        rank_nodes=a.group_rank_nodes(),
    )


def resource_demand(a: AppArgs, *, at_max: bool) -> dict[str, float]:
    """Ray resources the app needs: its minimum replicas (to become ready) or its maximum (to scale).

    `epserve serve` sizes a local cluster by it and checks a cluster it joins against it, so a layout
    that cannot be placed is named at start instead of waiting forever."""
    engines = a.engine_autoscaling.max_replicas if at_max else a.engine_autoscaling.min_replicas
    ingresses = a.ingress_autoscaling.max_replicas if at_max else a.ingress_autoscaling.min_replicas
    total: dict[str, float] = {"CPU": ingresses * INGRESS_CPUS}
    for bundle in _engine_bundles(a).bundles:
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + engines * float(v)
    return total


# A stopping ingress replica outlives the engine's drain by this much: when the engine replica is stopped at its
# `graceful_shutdown_timeout_s`, the ingress still has time to end the streams left with an error event and [DONE].
INGRESS_SHUTDOWN_MARGIN_S = 5.0
SHUTDOWN_WAIT_LOOP_S = 0.5  # how often a stopping replica looks whether its requests are done


def metrics_hub(model_name: str) -> Any:  # noqa: ANN401  # a Ray actor handle
    """The hub of the app serving `model_name` (created on first use; detached so it outlives any one replica)."""
    return (
        ray.remote(num_cpus=0)(MetricsHub)
        .options(
            name=f"epserve-metrics-{model_name}",
            get_if_exists=True,
            lifetime="detached",
            namespace="epserve",
        )
        .remote(model_name)
    )


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """Build the application from `AppArgs` (a dict from YAML, or the model itself)."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    plain = a.model_dump(mode="json")
    if a.api_key is not None:
        plain["api_key"] = a.api_key.get_secret_value()  # model_dump masks secrets
    hub = metrics_hub(a.served_model_name or default_model_name(a.model))
    placement = _engine_bundles(a)
    engine = (
        serve.deployment(EngineServer)  # type: ignore[attr-defined]  # Serve's overloads miss deployment(cls)
        .options(
            name="EpserveEngine",
            autoscaling_config=a.engine_autoscaling.serve_config(),
            max_ongoing_requests=a.engine_max_ongoing_requests,
            placement_group_bundles=[dict(b) for b in placement.bundles],
            placement_group_strategy=placement.strategy,
            ray_actor_options={"num_cpus": ENGINE_REPLICA_BUNDLE["CPU"]},
            health_check_period_s=5.0,
            health_check_timeout_s=30.0,
            graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s,
            graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
            request_router_config=RequestRouterConfig(
                request_router_class="replicas.serving.engine_router:AvailableGroupRouter",  # type: ignore[arg-type]  # read as a dict
                request_routing_stats_period_s=1.0,  # type: ignore[arg-type]  # by mypy's pydantic plugin
                request_routing_stats_timeout_s=5.0,  # type: ignore[arg-type]  # (Serve's own model)
            ),
        )
        .bind(plain, hub)
    )
    ingress = (
        serve.deployment(serve.ingress(build_api)(Ingress))  # type: ignore[attr-defined]  # as above
        .options(
            name="EpserveIngress",
            autoscaling_config=a.ingress_autoscaling.serve_config(),
            max_ongoing_requests=a.ingress_max_ongoing_requests,
            max_queued_requests=a.ingress_max_queued_requests,
            ray_actor_options={"num_cpus": INGRESS_CPUS},
            health_check_period_s=5.0,
            graceful_shutdown_timeout_s=a.graceful_shutdown_timeout_s + INGRESS_SHUTDOWN_MARGIN_S,
            graceful_shutdown_wait_loop_s=SHUTDOWN_WAIT_LOOP_S,
        )
        .bind(engine, plain, hub)
    )
    return ingress
