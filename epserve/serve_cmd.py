"""`epserve serve`: run the app on a local Ray cluster (or join one) until Ctrl-C.

Flags override `--config app.yaml`, whose keys are exactly the `AppArgs` of build_app (the
same args a KubeRay serveConfigV2 passes). Without --model the embedded tiny checkpoint is
written once (cached) and served. On Ctrl-C / SIGTERM: new requests are refused, in-flight ones get
`graceful_shutdown_timeout_s` to finish (the rest end with an error event and [DONE], gRPC UNAVAILABLE),
then Serve shuts down, and a cluster this command started is shut down with it (no Ray process left behind).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from epserve.cli import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI HTTP (and gRPC) API on a local or existing Ray cluster")
    p.add_argument("--model", help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--config", help="YAML file with build_app's args (flags below override it)")
    p.add_argument("--trunk-ranks", type=int, help="trunk ranks D per group")
    p.add_argument("--expert-ranks", type=int, help="expert ranks X per group (0 = experts in the trunk)")
    p.add_argument("--nodes", type=int, help="nodes of the local Ray cluster to start (default 1)")
    p.add_argument("--address", help="join an existing Ray cluster instead of starting one")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: HTTP port + 1000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set it in the config)")
    p.add_argument("--served-model-name", help="model name clients use")
    p.add_argument("--speculative-tokens", type=int, metavar="K",
                   help="draft K tokens per step with the checkpoint's MTP head (default 0 = off)")
    p.set_defaults(run=run)


def load_args(args: argparse.Namespace):  # noqa: ANN201  # -> AppArgs
    import yaml
    from pydantic import ValidationError

    from replicas.app_args import AppArgs

    raw: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.exists():
            raise UserError(f"--config {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"--config {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise UserError(f"--config {path} must be a mapping of build_app args")
    overrides = {"model": args.model, "trunk_ranks": args.trunk_ranks, "expert_ranks": args.expert_ranks,
                 "api_key": args.api_key, "served_model_name": args.served_model_name,
                 "speculative_tokens": args.speculative_tokens}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AppArgs.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"invalid app args: {exc}") from None


def run(args: argparse.Namespace) -> int:
    app_args = load_args(args)
    if app_args.model is None:
        from model_shards.tiny_checkpoint import embedded_model

        app_args = app_args.model_copy(update={"model": str(embedded_model())})
        print(f"serving the embedded tiny model from {app_args.model}", flush=True)
    elif not Path(app_args.model).is_dir():
        raise UserError(f"--model {app_args.model} is not a folder")
    if app_args.speculative_tokens:
        from model_shards.config import from_hf_config

        if not from_hf_config(Path(app_args.model)).has_mtp:
            raise UserError(f"--speculative-tokens needs an MTP head: {app_args.model}'s config has "
                            "mtp_num_hidden_layers 0")
    local = None
    if args.address is None:
        from cluster.local_cluster import start_local_cluster

        local = start_local_cluster(args.nodes or 1, cpus_per_node=max(4, os.cpu_count() or 4))
    import ray
    from ray import serve

    if local is None:
        ray.init(address=args.address, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        from replicas.app import build_app

        grpc_port = args.grpc_port or args.port + 1000
        serve.start(http_options={"host": args.host, "port": args.port}, grpc_options=_grpc_options(grpc_port))
        serve.run(build_app(app_args), name="epserve", route_prefix="/", blocking=False)
        name = app_args.served_model_name or Path(app_args.model or "").name
        print(f"epserve is serving model '{name}'", flush=True)
        print(f"  OpenAI API: http://{args.host}:{args.port}/v1  (try: curl http://{args.host}:{args.port}/v1/models)",
              flush=True)
        print("  Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping...", flush=True)
        _drain_app("epserve", app_args.graceful_shutdown_timeout_s)
    finally:
        try:
            serve.shutdown()
        finally:
            if local is not None:
                local.shutdown()
            else:
                ray.shutdown()
    return 0


def _drain_app(name: str, grace_s: float) -> None:
    """Drain the app before Serve shuts down, so in-flight streams end properly.

    Each engine replica stops admitting (new requests get a retriable 503 / UNAVAILABLE) and lets its
    streams run for `grace_s`; those still running then end with a retriable error event and [DONE]
    (gRPC: UNAVAILABLE). Then we wait until the ingress replicas have sent their last events through the
    proxies, which are still up. Only then `serve.shutdown()`, which kills the proxies at once: alone it
    cuts every stream mid-body (and `serve.delete` first drops the proxies' handles, stalling the streams
    they carry). A second Ctrl-C / SIGTERM stops waiting.
    """
    import time

    from ray import serve

    again = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: again.set())
    print(f"letting in-flight requests finish (up to {grace_s:g} s; Ctrl-C again to stop now)", flush=True)
    try:
        deployments = serve.status().applications[name].deployments
        engine = serve.get_deployment_handle("EpserveEngine", app_name=name)
        ingress = serve.get_app_handle(name)
    except Exception:  # noqa: BLE001  # no app (a failed start-up): nothing to drain
        return
    deadline = time.monotonic() + grace_s + 15
    if _until_all_report_zero(engine.drain, grace_s, replicas=_running(deployments, "EpserveEngine"),
                              deadline=deadline, stop=again):
        _until_all_report_zero(ingress.stream_count, replicas=_running(deployments, "EpserveIngress"),
                               deadline=deadline, stop=again)
        again.wait(1.0)  # the proxies send what the ingress handed them


def _running(deployments: dict, name: str) -> int:  # noqa: ANN001
    states = deployments[name].replica_states if name in deployments else {}
    return max(1, sum(n for state, n in states.items() if state == "RUNNING"))


def _until_all_report_zero(method, *args, replicas: int, deadline: float, stop: threading.Event) -> bool:  # noqa: ANN001
    """Call a handle method returning (replica id, open requests) until every replica reported 0.

    Calls are routed, not addressed, so they repeat (a draining engine replica reports itself
    unavailable, which steers the router to the others). False when the deadline passed first.
    """
    import time

    counts: dict[str, int] = {}
    while time.monotonic() < deadline and not stop.is_set():
        try:
            rid, n = method.remote(*args).result(timeout_s=10)
        except Exception as exc:  # noqa: BLE001  # a replica going away; shutdown follows either way
            print(f"while draining: {exc}", flush=True)
            return False
        counts[rid] = n
        if len(counts) >= replicas and not any(counts.values()):
            return True
        stop.wait(0.2)
    return False


def _grpc_options(port: int) -> dict | None:
    """gRPC ingress options when the gRPC service is built in (see replicas/grpc_service.py)."""
    try:
        from replicas.grpc_service import grpc_options
    except ImportError:
        return None
    return grpc_options(port)


