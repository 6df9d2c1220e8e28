"""`epserve serve`: run the app on a local Ray cluster (or join one) until Ctrl-C.

Flags override `--config app.yaml`, whose keys are exactly the `AppArgs` of build_app (the
same args a KubeRay serveConfigV2 passes). Without --model the embedded tiny checkpoint is
written once (cached) and served. On Ctrl-C / SIGTERM: new requests are refused, in-flight ones get
`graceful_shutdown_timeout_s` to finish (the rest end with an error event and [DONE], gRPC UNAVAILABLE),
then Serve shuts down, and a cluster this command started is shut down with it (no Ray process left behind).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from epserve.cli import UserError
from epserve.prefix_flags import add_prefix_cache_flags


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
    p.add_argument(
        "--speculative-tokens",
        type=int,
        metavar="K",
        help="draft K tokens per step with the checkpoint's MTP head (default 0 = off)",
    )
    p.add_argument(
        "--max-thinking-tokens",
        type=int,
        metavar="N",
        help="default thinking budget of chat requests: </think> is written after N reasoning tokens "
        "(default: the checkpoint's generation_config.json, 16 for the embedded model; else none)",
    )
    p.add_argument(
        "--rebalance-interval-steps",
        type=int,
        metavar="N",
        help="rebalance the experts by measured load every N engine steps (default off; needs --expert-ranks)",
    )
    p.add_argument(
        "--rebalance-imbalance-threshold",
        type=float,
        metavar="T",
        help="rebalance when the measured max/mean rows per expert rank exceeds T (> 1; default off)",
    )
    p.add_argument(
        "--redundant-experts",
        type=int,
        metavar="R",
        help="extra expert copies per MoE layer that rebalances place on the hottest experts (default 0)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        metavar="F",
        help="with gpus: fraction of each trunk rank's GPU memory to use; its KV blocks (and at most max_num_seqs "
        "state slots) fill what the weights leave (default 0.9; CPU ranks keep num_kv_blocks)",
    )
    p.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_const",
        const=False,
        help="AppArgs cuda_graph: no CUDA-graph decode (it applies to the in-process runner only; group trunk "
        "ranks run decode eagerly, see replicas/ep/decode_graphs.py)",
    )
    p.add_argument(
        "--micro-batches",
        type=int,
        metavar="M",
        help="ping-pong micro-batches per trunk rank: trunk ranks compute one while the expert ranks run another's "
        "FFN (default 2 with GPUs, 1 with CPU ranks; 1 = off)",
    )
    add_prefix_cache_flags(p)
    p.set_defaults(run=run)


def load_args(args: argparse.Namespace):  # noqa: ANN201  # -> AppArgs
    import yaml
    from pydantic import ValidationError

    from replicas.serving.app_args import AppArgs

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
    overrides = {
        "model": args.model,
        "trunk_ranks": args.trunk_ranks,
        "expert_ranks": args.expert_ranks,
        "api_key": args.api_key,
        "served_model_name": args.served_model_name,
        "speculative_tokens": args.speculative_tokens,
        "max_thinking_tokens": args.max_thinking_tokens,
        "rebalance_interval_steps": args.rebalance_interval_steps,
        "rebalance_imbalance_threshold": args.rebalance_imbalance_threshold,
        "redundant_experts": args.redundant_experts,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "micro_batches": args.micro_batches,
        "cuda_graph": args.cuda_graph,
        "prefix_cache": args.prefix_cache,
        "prefix_state_slots": args.prefix_state_slots,
        "prefix_states_per_path": args.prefix_states_per_path,
        "prefix_probe_interval": args.prefix_probe_interval,
    }
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
    check_model_folder(Path(app_args.model or ""))
    if app_args.speculative_tokens:
        from model_shards.config import from_hf_config

        if not from_hf_config(Path(app_args.model or "")).has_mtp:
            raise UserError(
                f"--speculative-tokens needs an MTP head: {app_args.model}'s config has mtp_num_hidden_layers 0"
            )
    if args.address is None:
        app_args = fit_to_machine(app_args)
    stop = threading.Event()
    local = None
    drained = False
    # Until the app is up, Ctrl-C and SIGTERM interrupt the start (the finally below cleans up);
    # once it serves they only ask for the drain, which then runs uninterrupted.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        from replicas.serving.app import build_app, resource_demand

        if args.address is None:
            from cluster.local_cluster import cluster_cpus, local_gpus, start_local_cluster

            # What this machine lacks is known before any Ray process starts.
            check_resources(
                resource_demand(app_args, at_max=False), {"GPU": float(local_gpus())}, local=True, only=("GPU",)
            )
            nodes = args.nodes or 1
            local = start_local_cluster(
                nodes, cpus_per_node=cluster_cpus(resource_demand(app_args, at_max=True)["CPU"] / nodes)
            )
        else:
            _join(args.address)
        import ray
        from ray import serve

        # ray.init installs its own SIGTERM handler (log and abort, which would orphan the cluster's
        # workers): ours again.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        check_resources(resource_demand(app_args, at_max=False), ray.cluster_resources(), local=local is not None)
        grpc_port = args.grpc_port or args.port + 1000
        from replicas.api.proxy_options import serve_start_options

        serve.start(
            http_options={"host": args.host, "port": args.port},
            grpc_options=_grpc_options(grpc_port),
            **serve_start_options(app_args),
        )  # body / message limits in the proxies
        # Serve logs "Connecting to existing Serve app ... will not be applied" for the controller
        # serve.start just made with exactly these options: not news to the user.
        serve_log = logging.getLogger("ray.serve")
        level = serve_log.level
        serve_log.setLevel(logging.WARNING)
        try:
            serve.run_many(
                [serve.RunTarget(target=build_app(app_args), name=APP_NAME, route_prefix="/")],
                wait_for_applications_running=False,
            )
        finally:
            serve_log.setLevel(level)
        wait_until_running(APP_NAME)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        name = app_args.served_model_name or Path(app_args.model or "").name
        print(f"epserve is serving model '{name}'", flush=True)
        print(
            f"  OpenAI API: http://{args.host}:{args.port}/v1  (try: curl http://{args.host}:{args.port}/v1/models)",
            flush=True,
        )
        print(f"  gRPC: {args.host}:{grpc_port}", flush=True)
        print("  Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping...", flush=True)
        _drain_app(APP_NAME, app_args.graceful_shutdown_timeout_s)
        drained = True
    except KeyboardInterrupt as exc:
        print("interrupted during start-up: stopping...", file=sys.stderr, flush=True)
        return 128 + (signal.SIGTERM if str(exc) == "SIGTERM" else signal.SIGINT)
    finally:
        # A second Ctrl-C must not cut the clean-up short (it would leave Ray processes behind).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        _shutdown(local, drained=drained)
    return 0


APP_NAME = "epserve"


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _join(address: str) -> None:
    import ray

    from cluster.ray_auth import RayAuthError, enable_token_auth

    try:
        enable_token_auth(generate=False)
    except RayAuthError as exc:
        raise UserError(str(exc)) from None
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)


def _shutdown(local, *, drained: bool) -> None:  # noqa: ANN001  # LocalCluster | None
    """Stop Serve, then the cluster we started. Interrupted during start-up, a local cluster has nothing
    to drain and goes down whole at once (Serve's shutdown would wait out replicas still loading).
    After a drain, Serve's shutdown also ends the handles the drain used: left running, their threads
    would start a new Ray connection (to any cluster on the machine) once ours is gone."""
    import ray

    if local is not None and not drained:
        local.shutdown()
        return
    if not ray.is_initialized():
        return
    from ray import serve

    try:
        serve.shutdown()
    finally:
        if local is not None:
            local.shutdown()
        else:
            ray.shutdown()


def check_model_folder(folder: Path) -> None:
    """What `epserve inspect` checks, before any Ray process starts: a broken folder is named in a second."""
    from model_shards.checkpoint_summary import summarise

    if not folder.is_dir():
        raise UserError(f"--model {folder} is not a folder")
    summary = summarise(folder)
    problems = list(summary.problems)
    if not summary.files.get("tokenizer.json", False):
        problems.append(f"no tokenizer.json in {folder}: serving needs the tokenizer (text prompts and chat)")
    if problems:
        lines = "\n  ".join(problems)
        raise UserError(
            f"--model {folder} cannot be served:\n  {lines}\n(`epserve inspect {folder}` shows the whole report)"
        )


def fit_to_machine(app_args):  # noqa: ANN001, ANN201  # AppArgs -> AppArgs
    """On a local cluster, give each rank a fraction of a CPU when the layout has more ranks than the
    machine has cores (unless cpus_per_rank was set): the ranks share the cores, one BLAS thread each."""
    if "cpus_per_rank" in app_args.model_fields_set:
        return app_args
    cores = os.cpu_count() or 1
    world = app_args.trunk_ranks + app_args.expert_ranks
    if world <= cores:
        return app_args
    return app_args.model_copy(update={"cpus_per_rank": max(0.1, round(cores / world, 3))})


def check_resources(
    need: dict[str, float], have: dict[str, float], *, local: bool, only: tuple[str, ...] | None = None
) -> None:
    """Name what the layout lacks. A cluster we started cannot grow, so that is an error; a cluster we
    joined may autoscale, so there it is a warning (wait_until_running then reports Serve's view)."""
    missing = {
        k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v and (only is None or k in only)
    }
    if not missing:
        return
    text = ", ".join(f"{k} {need[k]:g} (the cluster has {have.get(k, 0.0):g})" for k in sorted(missing))
    msg = f"the layout needs {text}"
    if "GPU" in missing:
        msg += "; with gpus: true every rank takes one GPU (D + X per engine replica)"
    if local:
        raise UserError(msg)
    print(f"epserve serve: warning: {msg}; waiting for the cluster to provide them", file=sys.stderr, flush=True)


def wait_until_running(app: str, *, report_every_s: float = 30.0) -> None:
    """Poll Serve until the app runs; a replica that cannot start ends the command with its own error."""
    import time

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    started = last_report = time.monotonic()
    while True:
        status = serve.status().applications.get(app)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise UserError(startup_failure(status))
        now = time.monotonic()
        if now - last_report >= report_every_s:
            last_report = now
            print(
                f"still starting after {now - started:.0f} s (loading weights, forming groups)",
                file=sys.stderr,
                flush=True,
            )
            for name, dep in status.deployments.items() if status is not None else ():
                if dep.message:
                    print(f"  {name}: {dep.message.strip().splitlines()[0]}", file=sys.stderr, flush=True)
        time.sleep(0.25)


def startup_failure(status) -> str:  # noqa: ANN001  # ray.serve.schema.ApplicationStatusOverview
    """The replica's own error (the last line of its traceback) instead of Serve's 25-line wrapper."""
    for name, dep in status.deployments.items():
        if dep.message and "Error" in dep.message:
            lines = [ln.strip() for ln in dep.message.strip().splitlines() if ln.strip()]
            cause = next((ln for ln in reversed(lines) if "Error" in ln.split(":")[0]), lines[-1])
            return f"{name} failed to start: {cause}"
    return f"the app failed to deploy: {status.message}"


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
    if _until_all_report_zero(
        engine.drain, grace_s, replicas=_running(deployments, "EpserveEngine"), deadline=deadline, stop=again
    ):
        _until_all_report_zero(
            ingress.stream_count, replicas=_running(deployments, "EpserveIngress"), deadline=deadline, stop=again
        )
        again.wait(1.0)  # the proxies send what the ingress handed them


def _running(deployments: dict, name: str) -> int:
    states = deployments[name].replica_states if name in deployments else {}
    return max(1, sum(n for state, n in states.items() if state == "RUNNING"))


def _until_all_report_zero(method, *args, replicas: int, deadline: float, stop: threading.Event) -> bool:  # noqa: ANN001, ANN002
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
    """gRPC ingress options when the gRPC service is built in (see replicas/api/grpc_service.py)."""
    try:
        from replicas.api.grpc_service import grpc_options
    except ImportError:
        return None
    return grpc_options(port)
