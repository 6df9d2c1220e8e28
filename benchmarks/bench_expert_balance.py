"""Expert load balancing on a skewed router: static contiguous placement vs one rebalance (issue 18).

A tiny random checkpoint with 64 experts top-4 whose routers are biased so that, on random prompts, expert
popularity per MoE layer follows Zipf(1.1) under a random expert permutation per layer: every token's
embedding carries a constant in hidden dim 0, and each router row's dim-0 weight is calibrated (iterative
fitting on calibration prompts) so the measured share of routed slots matches the Zipf target. The shares
are then measured again on fresh prompts (reported, not assumed).

The expert side runs without a Ray cluster, through the serving code paths: the real model (trunk + router)
routes the prompts; each slot row goes to the expert rank that `AllToAllDispatcher._destinations` picks under
the map (copies of a replicated expert share tokens by token index, as in serving); each rank's shard is
loaded by `load_experts` (static) or built by the rebalance's move path (`ShardBuilder` fed by peers'
`export_experts`); its busy time is `ExpertShard.forward` on the rows it received, per MoE layer, one thread.
The new map is `cluster.expert_balance.rebalance` from the static map with R = 8, by the load measured on
window prompts; all figures are on held-out prompts.

Run: PYTHONPATH=. python benchmarks/bench_expert_balance.py [--out DIR] [--steps 8] [--tokens-per-step 512]
Tests: tests/cluster/test_expert_balance.py (the placement), tests/replicas/test_rebalance.py (moves).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from cluster.expert_balance import moved_slots, rebalance
from cluster.placement import ExpertMap
from cluster.topology import GroupShape
from model_shards.batch import SeqChunk, StepBatch
from model_shards.checkpoint_files import CheckpointReader
from model_shards.config import from_hf_config
from model_shards.model import LocalModel
from model_shards.moe import Routing
from model_shards.tiny_checkpoint import (
    MULTIMODAL_PREFIX,
    SCALE_SUFFIX,
    _init,
    _write_shards,
    expected_tensors,
    tiny_config_dict,
)
from model_shards.weights import load_experts
from replicas.ep.dispatch import AllToAllDispatcher
from replicas.ep.expert_moves import ShardBuilder, export_experts

E, TOP_K, X, R, ZIPF = 64, 4, 8, 8, 1.1
BLOCK = 16
DIM0 = 0.06  # (3x the embeddings' std) the constant in every embedding's hidden dim 0 the routers' bias reads


def write_checkpoint(out: Path, seed: int) -> Path:
    """The embedded tiny model's layout with 64 experts per MoE layer, routers scaled up (more routing noise
    for the calibration to shape) and hidden dim 0 of every embedding set to DIM0."""
    raw = tiny_config_dict()
    raw["text_config"]["num_experts"] = E
    raw["text_config"]["num_experts_per_tok"] = TOP_K
    raw["text_config"]["mtp_num_hidden_layers"] = 0
    cfg = from_hf_config(raw)
    specs = expected_tensors(cfg, prefix=MULTIMODAL_PREFIX, layout="fused", mtp_layout=None, vision=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in specs.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        value = _init(name, spec.shape, gen)
        if name.endswith("mlp.gate.weight"):
            value = value * 4.0
        if name.endswith("embed_tokens.weight"):
            value[:, 0] = DIM0
        tensors[name] = value.float() if name.endswith("A_log") else value.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, tensors)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def router_names(model: LocalModel) -> list[str]:
    return [f"{MULTIMODAL_PREFIX}layers.{i}.mlp.gate.weight" for i in range(model.cfg.num_layers)]


class Capture:
    """Wraps the model's routed-experts call: per MoE layer, the rows (normed hidden) and top-k ids."""

    def __init__(self, model: LocalModel) -> None:
        self.model, self.inner = model, model.routed
        self.x: dict[int, list[torch.Tensor]] = {}
        self.ids: dict[int, list[torch.Tensor]] = {}
        model.routed = self  # type: ignore[method-assign]  # the benchmark's hook on the routed-experts seam

    def __call__(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        self.x.setdefault(layer, []).append(x_TD.clone())
        self.ids.setdefault(layer, []).append(routing.topk_ids_Tk.clone())
        return self.inner(layer, x_TD, routing)

    def reset(self) -> None:
        self.x, self.ids = {}, {}


def run_prompts(model: LocalModel, cap: Capture, seed: int, n_seqs: int, length: int) -> None:
    """Prefill `n_seqs` random prompts of `length` tokens, one step (caches fresh each call)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    nb = -(-length // BLOCK)
    pools = model.allocate(num_blocks=n_seqs * nb, block_size=BLOCK, num_slots=n_seqs)
    chunks = [
        SeqChunk(
            token_ids=tuple(torch.randint(0, vocab, (length,), generator=g).tolist()),
            context_len=0,
            state_slot=i,
            block_table=tuple(range(i * nb, (i + 1) * nb)),
        )
        for i in range(n_seqs)
    ]
    model.forward(StepBatch.build(chunks, block_size=BLOCK), pools)


def shares(cap: Capture, layers: int) -> torch.Tensor:
    """[layers, E] share of routed slots per expert."""
    out = torch.zeros(layers, E, dtype=torch.float64)
    for layer in range(layers):
        ids = torch.cat(cap.ids[layer]).reshape(-1)
        out[layer] = torch.bincount(ids, minlength=E).to(torch.float64) / ids.numel()
    return out


def calibrate(model: LocalModel, targets: torch.Tensor, rounds: int, log: list) -> None:
    """Fit each router row's dim-0 weight so measured slot shares match `targets` (per layer): each round runs
    the model once on calibration prompts, then fits the routers on the captured router inputs (top-k of
    x @ W^T, as `model_shards.moe.route`) with a shrinking step; the next round's forward sees the new routing
    (later layers' inputs shift with it) and records the fit still left (total variation, worst layer)."""
    cap = Capture(model)
    for r in range(rounds + 1):
        cap.reset()
        run_prompts(model, cap, seed=1000 + r, n_seqs=32, length=64)
        got = shares(cap, model.cfg.num_layers)
        log.append(round(float(((got - targets).abs().sum(dim=1) / 2).max()), 4))
        if r == rounds:
            break
        for layer in range(model.cfg.num_layers):
            x = torch.cat(cap.x[layer])
            x0 = float(x[:, 0].mean())
            router = model.trunk.w.layers[layer].moe.router
            for i in range(80):
                ids = torch.topk(x @ router.T, TOP_K, dim=-1).indices.reshape(-1)
                share = torch.bincount(ids, minlength=E).to(torch.float64) / ids.numel()
                eta = 0.5 / (1 + i / 10)
                router[:, 0] += (eta * (torch.log(targets[layer] + 1e-4) - torch.log(share + 1e-4)) / x0).to(
                    router.dtype
                )
    model.routed = cap.inner  # type: ignore[method-assign]  # unhook


def zipf_targets(layers: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([1.0 / (i + 1) ** ZIPF for i in range(E)], dtype=torch.float64)
    base /= base.sum()
    out = torch.zeros(layers, E, dtype=torch.float64)
    for layer in range(layers):
        out[layer, torch.randperm(E, generator=g)] = base
    return out


def fitted_exponent(share: torch.Tensor) -> float:
    """Least-squares slope of log share vs log rank (experts with any share), negated."""
    s = torch.sort(share, descending=True).values
    s = s[s > 0]
    lx = torch.log(torch.arange(1, len(s) + 1, dtype=torch.float64))
    ly = torch.log(s)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(-(lx * ly).sum() / (lx * lx).sum())


def destinations(expert_map: ExpertMap, layer: int, ids_Tk: torch.Tensor) -> torch.Tensor:
    """The serving dispatcher's choice of expert rank per slot row (its own code, on a bare holder)."""
    holder = SimpleNamespace(shape=GroupShape(1, X))
    AllToAllDispatcher.set_map(holder, expert_map)  # type: ignore[arg-type]  # only reads .shape, sets tables
    routing = Routing(ids_Tk, torch.ones_like(ids_Tk, dtype=torch.float32))
    return AllToAllDispatcher._destinations(holder, layer, routing)  # type: ignore[arg-type]  # same holder


def measure(
    maps: dict[str, tuple[ExpertMap, list]], steps: list[tuple[dict, dict]], layers: int, repeats: int
) -> dict[str, dict[str, object]]:
    """Rows per rank per layer and busy seconds per rank per step on held-out steps, for each (map, shards);
    the maps' timings interleave (same step, layer, rank back to back) so a busy machine slows both alike."""
    rows = {k: torch.zeros(layers, X, dtype=torch.float64) for k in maps}
    busy = {k: torch.zeros(len(steps), X, dtype=torch.float64) for k in maps}
    torch.set_num_threads(1)
    for s, (xs, ids) in enumerate(steps):
        for layer in range(layers):
            flat_ids = ids[layer].reshape(-1)
            token = torch.arange(flat_ids.numel()) // TOP_K
            work = {}
            for k, (expert_map, _) in maps.items():
                dest = destinations(expert_map, layer, ids[layer])
                for j in range(X):
                    mask = dest == j
                    rows[k][layer, j] += int(mask.sum())
                    work[(k, j)] = (xs[layer][token[mask]], flat_ids[mask])
            best = dict.fromkeys(work, math.inf)
            for _ in range(repeats):
                for (k, j), (x_rows, e_rows) in work.items():
                    t0 = time.perf_counter()
                    maps[k][1][j].forward(layer, x_rows, e_rows)
                    best[(k, j)] = min(best[(k, j)], time.perf_counter() - t0)
            for (k, j), secs in best.items():
                busy[k][s, j] += secs
    out = {}
    for k in maps:
        per_layer = rows[k] / len(steps)
        imb = per_layer.max(dim=1).values / per_layer.mean(dim=1)
        busiest = busy[k].max(dim=1).values
        out[k] = {
            "max_mean_per_layer": [round(v, 3) for v in imb.tolist()],
            "max_mean_worst_layer": round(float(imb.max()), 3),
            "max_mean_mean_over_layers": round(float(imb.mean()), 3),
            "rows_per_layer_busiest_rank": round(float(per_layer.max(dim=1).values.mean()), 1),
            "rows_per_layer_mean_rank": round(float(per_layer.mean()), 1),
            "rows_per_step_by_rank": [round(v, 1) for v in per_layer.sum(dim=0).tolist()],
            "busiest_rank_busy_ms_per_step": round(1000 * float(busiest.median()), 2),
            "mean_rank_busy_ms_per_step": round(1000 * float(busy[k].mean()), 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="held-out steps measured")
    ap.add_argument("--window-seqs", type=int, default=48, help="prompts of the load window the rebalance reads")
    ap.add_argument("--seqs-per-step", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats per (step, rank, layer): the best")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    folder = args.out or Path(tempfile.mkdtemp(prefix="eplb-bench-"))
    t0 = time.monotonic()
    write_checkpoint(folder, args.seed)
    model = LocalModel.load(folder, dtype="float32", with_mtp=False)
    layers = model.cfg.num_layers
    targets = zipf_targets(layers, args.seed + 1)
    fit_log: list[float] = []
    calibrate(model, targets, args.calibration_rounds, fit_log)
    # the calibrated routers go into the checkpoint (bf16, as stored): everything below reads it from disk
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        t = load_file(str(f))
        changed = False
        for layer, name in enumerate(router_names(model)):
            if name in t:
                t[name] = model.trunk.w.layers[layer].moe.router.to(torch.bfloat16).contiguous()
                changed = True
        if changed:
            save_file(t, str(f), metadata={"format": "pt"})
    model = LocalModel.load(folder, dtype="float32", with_mtp=False)
    cap = Capture(model)
    # the load window (what a rebalance reads) and held-out steps are different prompts
    run_prompts(model, cap, seed=7, n_seqs=args.window_seqs, length=args.prompt_len)
    window = shares(cap, layers)
    steps = []
    for s in range(args.steps):
        cap.reset()
        run_prompts(model, cap, seed=100 + s, n_seqs=args.seqs_per_step, length=args.prompt_len)
        steps.append(({lay: torch.cat(cap.x[lay]) for lay in cap.x}, {lay: torch.cat(cap.ids[lay]) for lay in cap.ids}))
    cap.reset()
    held_out = torch.zeros(layers, E, dtype=torch.float64)
    for _, ids in steps:
        for lay in range(layers):
            held_out[lay] += torch.bincount(ids[lay].reshape(-1), minlength=E).to(torch.float64)
    held_out /= held_out.sum(dim=1, keepdim=True)
    tv = ((held_out - targets).abs().sum(dim=1) / 2).tolist()

    static = ExpertMap.contiguous(num_experts=E, num_moe_layers=layers, expert_ranks=X)
    t_alg = time.monotonic()
    new = rebalance(window.tolist(), num_ranks=X, redundant=R, current=static, tolerance=0.05)
    alg_s = time.monotonic() - t_alg
    moved, total = moved_slots(static, new), sum(len(r) for layer in new.owners for r in layer)

    reader = CheckpointReader(folder)
    cfg = from_hf_config(folder)
    static_shards = [
        load_experts(reader, cfg, expert_ids=static.experts_of(j), dtype=torch.float32, with_mtp=False)
        for j in range(X)
    ]
    reader.close()
    new_shards = []
    peer_copies = 0
    for j in range(X):  # the rebalance's move path: what a rank lacks comes from a rank that holds it
        b = ShardBuilder(static_shards[j], new.experts_of(j))
        for layer, e in b.needed:
            holder = static.owners[layer][e][0]
            peer_copies += b.add(layer, export_experts(static_shards[holder], [(layer, e)])[layer])
        new_shards.append(b.build())
    figures = measure({"static": (static, static_shards), "rebalanced": (new, new_shards)}, steps, layers, args.repeats)
    result = {
        "checkpoint": {"experts": E, "top_k": TOP_K, "moe_layers": layers, "hidden": cfg.hidden_size},
        "expert_ranks": X,
        "redundant_slots": R,
        "calibration_tv_by_round": fit_log,
        "popularity_zipf_exponent_fitted_per_layer": [
            round(fitted_exponent(held_out[lay]), 3) for lay in range(layers)
        ],
        "popularity_total_variation_vs_zipf_per_layer": [round(v, 4) for v in tv],
        "top_expert_share_per_layer": [round(float(held_out[lay].max()), 4) for lay in range(layers)],
        "held_out_tokens_per_step": args.seqs_per_step * args.prompt_len,
        "held_out_steps": args.steps,
        "moved_slots": moved,
        "total_slots": total,
        "moved_fraction": round(moved / total, 4),
        "peer_copies": peer_copies,
        "rebalance_algorithm_s": round(alg_s, 3),
        **figures,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
