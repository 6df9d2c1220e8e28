"""How many KV blocks and state slots a trunk rank's pools hold on a GPU: sized from free device memory.

On cuda the pools are sized after the weights load (vLLM's `--gpu-memory-utilization`): the rank may use
`utilization x total` bytes of the device; what the weights (and anything else) already use is subtracted,
and so is a workspace estimate for a step's activations. The requested state slots (running sequences) are
kept when they fit; the prefix cache's state checkpoints (each one slot's DeltaNet state) are carved out of
what is left, at most `PREFIX_STATE_SHARE` of it and never below one KV block per slot, so asking for them never
turns a fitting configuration away (they only take KV blocks); every remaining byte becomes KV blocks. On cpu the
fixed counts stay (the caller
does not call this). `pool_counts_for_memory` is pure arithmetic; `pool_counts_on_device` reads the device's
memory (`torch.cuda.mem_get_info`) and the model's per-block and per-slot bytes, for
replicas/ep/local_runner.py and replicas/ep/actors.py.
Tests: tests/model_shards/test_cache_sizing.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.cache import CachePools
from model_shards.config import ModelConfig

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# The prefix cache's saved DeltaNet states take at most this share of the cache memory left after the slots: a
# state is worth something only with the KV blocks of its prefix, so most of the memory stays KV.
PREFIX_STATE_SHARE = 0.25


@dataclass(frozen=True)
class PoolCounts:
    num_blocks: int
    num_slots: int
    num_checkpoints: int = 0


def pool_counts_for_memory(
    *,
    free_bytes: int,
    total_bytes: int,
    utilization: float,
    bytes_per_block: int,
    bytes_per_slot: int,
    max_slots: int,
    workspace_bytes: int = 0,
    reserved_blocks: int = 0,
    reserved_slots: int = 0,
    max_checkpoints: int = 0,
    bytes_per_checkpoint: int = 0,
) -> PoolCounts:
    """Blocks and slots that fit in the device memory this rank may still take.

    Args:
        free_bytes, total_bytes: the device's free and total memory now (after the weights loaded).
        utilization: the fraction of `total_bytes` this rank may use, weights included (0 < u <= 1).
        bytes_per_block: one KV block of every attention layer (K and V); bytes_per_slot: one state slot of
            every DeltaNet layer (speculation's per-token states included).
        max_slots: the running sequences asked for (`--max-num-seqs`): at most this many slots.
        workspace_bytes: kept free for a step's activations.
        reserved_blocks, reserved_slots: allocated beyond the counts returned (the canary's), paid from the budget.
        max_checkpoints, bytes_per_checkpoint: the prefix cache's state checkpoints asked for, and one's size.
    Returns:
        The counts the engine hands out (the reserves apart): slots = max_slots where that leaves at least one
        block per slot, else as many slots as fit with one block each; checkpoints = at most max_checkpoints, in
        `PREFIX_STATE_SHARE` of the bytes the slots leave, keeping one block per slot; blocks = every remaining
        byte.
    Raises:
        ValueError: bad arguments, or not even one slot and one block fit (the message gives the numbers).
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu memory utilization must be in (0, 1], got {utilization}")
    if bytes_per_block <= 0 or bytes_per_slot <= 0 or max_slots < 1 or free_bytes < 0 or total_bytes <= 0:
        raise ValueError("block and slot sizes, max_slots and total memory must be positive")
    used = total_bytes - free_bytes
    budget = int(total_bytes * utilization) - used - workspace_bytes
    budget -= reserved_blocks * bytes_per_block + reserved_slots * bytes_per_slot
    pair = bytes_per_block + bytes_per_slot
    if budget < pair:
        gib = 1 << 30
        raise ValueError(
            f"no room for the KV cache: {utilization:.2f} x {total_bytes / gib:.2f} GiB allowed, "
            f"{used / gib:.2f} GiB in use, {workspace_bytes / gib:.2f} GiB step workspace; one block and one slot "
            f"need {pair} bytes (raise --gpu-memory-utilization, or use a smaller model or dtype)"
        )
    slots = min(max_slots, budget // pair)
    rest = budget - slots * bytes_per_slot
    ckpts = 0
    if max_checkpoints > 0 and bytes_per_checkpoint > 0:
        room = min(int(rest * PREFIX_STATE_SHARE), rest - slots * bytes_per_block)
        ckpts = max(0, min(max_checkpoints, room // bytes_per_checkpoint))
    blocks = (rest - ckpts * bytes_per_checkpoint) // bytes_per_block
    return PoolCounts(num_blocks=int(blocks), num_slots=int(slots), num_checkpoints=int(ckpts))


def pool_counts_on_device(
    cfg: ModelConfig,
    *,
    device: torch.device,
    dtype: torch.dtype,
    block_size: int,
    max_slots: int,
    utilization: float,
    spec_tokens: int = 0,
    with_mtp: bool = False,
    max_step_tokens: int = 2048,
    reserved: int = 0,
    max_checkpoints: int = 0,
) -> PoolCounts:
    """`pool_counts_for_memory` for a cuda device now (call it after the weights load).

    The step workspace is an estimate: ~32 activations of the model width per token of the largest step,
    plus fp32 logits (and a softmax copy) for every row that samples or verifies.
    """
    free, total = torch.cuda.mem_get_info(device)
    width = torch.tensor([], dtype=dtype).element_size()
    per_ckpt = CachePools.bytes_per_slot(cfg, dtype_bytes=width)  # a checkpoint: one state, no speculation buffers
    per_slot = per_ckpt * (1 + (spec_tokens + 1 if spec_tokens else 0))
    rows = max_slots * (spec_tokens + 1)
    workspace = max_step_tokens * cfg.hidden_size * width * 32 + rows * cfg.vocab_size * 4 * 3
    return pool_counts_for_memory(
        free_bytes=int(free),
        total_bytes=int(total),
        utilization=utilization,
        bytes_per_block=CachePools.bytes_per_block(cfg, block_size=block_size, dtype_bytes=width, with_mtp=with_mtp),
        bytes_per_slot=per_slot,
        max_slots=max_slots,
        workspace_bytes=workspace,
        reserved_blocks=reserved,
        reserved_slots=reserved,
        max_checkpoints=max_checkpoints,
        bytes_per_checkpoint=per_ckpt,
    )
