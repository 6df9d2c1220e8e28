"""Multi-GPU check (driver of scripts/nccl_check.sh): an expert-parallel group on NCCL vs the single process.

For users with 2+ GPUs and Ray installed. Stages, each written to OUT/nccl_check.json and
OUT/nccl_check.md as it ends:
- group_vs_local: greedy tokens of an EP group D = 1 x X = 1 (a trunk rank and an expert rank, one GPU
  each, NCCL) against the single-process model (the reference), on a random checkpoint; equal or failed.
- exchange: two processes, one GPU each, `all_to_all_single` of the decode-sized exchange (C + 1 rows of
  hidden floats per peer, tokens per trunk 1 / 8 / 32 / 128): median ms per exchange and GB/s. The
  protocol-level figures (dispatch + combine bookkeeping, gloo) are benchmarks/bench_ep.py's.
`--device cpu` is the dry run CI performs: the same stages on gloo with tiny sizes.
Usage: python scripts/nccl_check.py OUT [--device cuda|cpu] [--tokens 16]
Tests: tests/packaging/test_gpu_check.py (the gloo dry run, slow).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  # after the sys.path line above

from scripts.gpu_check import Report, Skipped, run_stage  # noqa: E402

EXCHANGE_TOKENS = (1, 8, 32, 128)
TOP_K = 8


class NcclReport(Report):
    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": self.meta, "stages": self.stages}
        (self.out / "nccl_check.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
        lines = [f"# NCCL check ({self.meta['device']})", "", "| stage | status | seconds | summary |"]
        lines.append("|---|---|---|---|")
        for name, st in self.stages.items():
            lines.append(f"| {name} | {st['status']} | {st['seconds']:.1f} | {st.get('summary', '')} |")
        rows = self.stages.get("exchange", {}).get("rows", [])
        if rows:
            lines += ["", "| tokens per trunk | bytes per peer | ms per exchange | GB/s |", "|---|---|---|---|"]
            lines += [f"| {r['tokens']} | {r['bytes']} | {r['ms']:.3f} | {r['gb_s']:.2f} |" for r in rows]
        (self.out / "nccl_check.md").write_text("\n".join(lines) + "\n")


def _request(prompt: list[int], n: int):  # noqa: ANN202  # GenerateRequest
    from model_shards.sampling import SamplingParams
    from replicas.engine.engine_types import GenerateRequest

    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=0)
    return GenerateRequest(request_id="nccl-check", prompt_ids=tuple(prompt), params=params, max_tokens=n)


def stage_group_vs_local(device: torch.device, tokens: int, tmp: Path) -> dict[str, Any]:
    from cluster.local_cluster import start_local_cluster
    from cluster.topology import GroupShape
    from model_shards.config import from_hf_config
    from model_shards.model import LocalModel
    from replicas.ep.group import ExpertParallelGroup, GroupConfig
    from replicas.ep.local_runner import LocalRunner
    from replicas.ep.offline_generate import cache_sizes, offline_generate
    from tests.hf_oracle import save_random_hf_checkpoint

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs, torch sees {torch.cuda.device_count()}")
    folder = save_random_hf_checkpoint(tmp / "ckpt", seed=0)
    vocab = from_hf_config(folder).vocab_size
    prompt = torch.randint(0, min(vocab, 1000), (24,), generator=torch.Generator().manual_seed(3)).tolist()
    caches = cache_sizes(len(prompt), tokens, spec_tokens=0, block_size=16)
    runner = LocalRunner(LocalModel.load(folder, dtype="float32"), caches)
    try:
        local = offline_generate(runner, _request(prompt, tokens), spec_tokens=0, vocab_size=vocab).token_ids
    finally:
        runner.close()
    gpus = device.type == "cuda"
    cluster = start_local_cluster(1, cpus_per_node=4)
    try:
        group = ExpertParallelGroup(
            GroupConfig(model_dir=str(folder), shape=GroupShape(1, 1), dtype="float32", caches=caches, gpus=gpus)
        )
        try:
            group.start()
            grouped = offline_generate(group, _request(prompt, tokens), spec_tokens=0, vocab_size=vocab).token_ids
        finally:
            group.shutdown()
    finally:
        cluster.shutdown()
    same = list(grouped) == list(local)
    return {
        "status": "passed" if same else "failed",
        "backend": "nccl" if gpus else "gloo",
        "local": list(local),
        "group": list(grouped),
        "summary": f"D=1 x X=1 on {'nccl' if gpus else 'gloo'}: {len(local)} greedy tokens "
        f"{'equal' if same else 'DIFFER'} to the single process",
    }


def _exchange_worker(rank: int, world: int, backend: str, port: int, hidden: int, reps: int, q: Any) -> None:  # noqa: ANN401  # a multiprocessing queue
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world)
    rows = []
    for t in EXCHANGE_TOKENS:
        cap = max(1, int(2.0 * t * TOP_K / world)) + 1  # C + 1 rows per peer, as the FIXED plan sizes it
        send = torch.randn(world * cap, hidden, device=dev)
        recv = torch.empty_like(send)
        times = []
        for r in range(reps + 2):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if r >= 2:
                times.append(time.perf_counter() - t0)
        ms = 1e3 * statistics.median(times)
        nbytes = cap * hidden * send.element_size()
        rows.append({"tokens": t, "bytes": nbytes, "ms": ms, "gb_s": nbytes * (world - 1) / (ms * 1e-3) / 1e9})
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def stage_exchange(device: torch.device, hidden: int, reps: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from cluster.process_groups import free_port

    if device.type == "cuda" and torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs, torch sees {torch.cuda.device_count()}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_exchange_worker, args=(r, 2, backend, port, hidden, reps, q)) for r in range(2)]
    for p in procs:
        p.start()
    rows = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"exchange workers exited with {[p.exitcode for p in procs]}")
    return {"backend": backend, "hidden": hidden, "rows": rows, "summary": f"{backend}, hidden {hidden}, 2 ranks"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for nccl_check.json / nccl_check.md")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the gloo dry run, tiny sizes")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens compared (default 16)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device; --device cpu dry-runs on gloo")
    dry = device.type == "cpu"
    report = NcclReport(args.out, {"device": args.device, "mode": "dry" if dry else "check"})
    report.write()
    with tempfile.TemporaryDirectory(prefix="nccl_check_") as tmp:
        run_stage(report, "group_vs_local", lambda: stage_group_vs_local(device, 4 if dry else args.tokens, Path(tmp)))
        run_stage(report, "exchange", lambda: stage_exchange(device, 64 if dry else 4096, 3 if dry else 50))
    failed = [n for n, st in report.stages.items() if st["status"] in ("failed", "error")]
    print(f"[nccl_check] wrote {args.out / 'nccl_check.json'} and nccl_check.md; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
