"""`epserve rebalance`: re-place a running server's experts by their measured load, now (admin; no HTTP route).

Joins the server's Ray cluster (`--address`, the address `epserve serve` printed), reaches every engine
replica of the app through its Serve handle, and prints each replica's before/after max/mean rank load and
the slots moved. `--save-load FILE` writes the measured load instead (the file an initial placement reads).
Tests: tests/replicas/test_rebalance.py.
"""

from __future__ import annotations

import argparse
import json
import time

from epserve.cli import UserError

ENGINE = "EpserveEngine"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rebalance", help="rebalance a running server's experts by measured load (admin)")
    p.add_argument("--address", required=True, help="the server's Ray cluster address (host:port)")
    p.add_argument("--app", default="epserve", help="Serve application name (default epserve)")
    p.add_argument(
        "--redundant-experts", type=int, default=0, metavar="R", help="extra expert copies per MoE layer (default 0)"
    )
    p.add_argument(
        "--save-load", metavar="FILE", help="write one engine replica's measured load to FILE (on that replica's node)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all replicas (default 600)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.redundant_experts < 0:
        raise UserError(f"--redundant-experts must be >= 0, got {args.redundant_experts}")
    from epserve.serve_cmd import _join

    _join(args.address)
    from ray import serve

    try:
        app = serve.status().applications[args.app]
        handle = serve.get_deployment_handle(ENGINE, app_name=args.app)
    except KeyError:
        raise UserError(f"no Serve application {args.app!r} on {args.address}") from None
    states = app.deployments[ENGINE].replica_states if ENGINE in app.deployments else {}
    replicas = max(1, sum(n for state, n in states.items() if state == "RUNNING"))
    if args.save_load:
        print(json.dumps(handle.save_expert_load.remote(args.save_load).result(timeout_s=args.timeout)), flush=True)
        return 0
    done: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout
    # calls are routed, not addressed: repeat, each replica answering once (those done only say so)
    while len(done) < replicas and time.monotonic() < deadline:
        out = handle.rebalance.remote(args.redundant_experts, list(done)).result(timeout_s=args.timeout)
        if out.get("skipped"):
            continue
        done[out["replica"]] = out
        print(_line(out), flush=True)
    failed = [r for r in done.values() if "error" in r]
    if len(done) < replicas:
        print(f"epserve rebalance: {len(done)} of {replicas} replicas answered before the timeout", flush=True)
        return 1
    return 1 if failed else 0


def _line(r: dict) -> str:
    if "error" in r:
        return f"replica {r['replica']}: rebalance failed: {r['error']}"
    return (
        f"replica {r['replica']}: map v{r['version']}, max/mean rank load {r['max_imbalance_before']:.3f} -> "
        f"{r['max_imbalance_after']:.3f} (worst layer), {r['moved_slots']} of {r['total_slots']} slots moved "
        f"({r.get('from_peer', 0)} copied from peers, in {r.get('pieces', 1)} pieces between steps), "
        f"{r['load_s']:.2f} s"
    )
