"""The whole model in one process: a trunk plus every routed expert (the single-process layout).

This is `--expert-ranks 0` and the reference every distributed layout is compared with.
Owns: loading both halves from a folder and wiring the local routed-experts path.
Tests: tests/model_shards/test_model_parity.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model_shards.batch import StepBatch
from model_shards.cache import CachePools
from model_shards.checkpoint_files import CheckpointReader
from model_shards.config import ModelConfig, from_hf_config
from model_shards.experts import ExpertShard, local_routed_experts
from model_shards.moe import Routing
from model_shards.mtp import mtp_forward
from model_shards.trunk import Trunk, TrunkOutput
from model_shards.weights import load_experts, load_trunk, validate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: ModelConfig, requested: str = "auto") -> torch.dtype:
    """`auto` = the checkpoint's dtype (FP8 checkpoints compute in bfloat16)."""
    if requested == "auto":
        return DTYPES[cfg.dtype]
    if requested not in DTYPES:
        raise ValueError(f"--dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[requested]


class LocalModel:
    """Trunk and all experts in-process.

    Args:
        trunk: the trunk with its weights.
        experts: a shard holding every expert of every MoE layer.
    """

    def __init__(self, trunk: Trunk, experts: ExpertShard) -> None:
        self.trunk = trunk
        self.experts = experts
        self.cfg = trunk.cfg
        self.dtype = trunk.dtype
        self.device = trunk.w.embed.device  # where the weights are: caches and batches are made there too

    @staticmethod
    def load(
        folder: str | Path,
        *,
        dtype: str = "auto",
        with_mtp: bool = True,
        attention: str = "paged",
        device: torch.device | str = "cpu",
    ) -> LocalModel:
        """Validate the checkpoint (headers only), then load trunk and all experts onto `device`. `attention`:
        "paged" (serving) or "eager" (HF's eager attention bit for bit, the parity oracle)."""
        cfg = from_hf_config(folder)
        reader = CheckpointReader(folder)
        layout = validate(reader, cfg)
        torch_dtype = resolve_dtype(cfg, dtype)
        trunk_w = load_trunk(reader, cfg, dtype=torch_dtype, with_mtp=with_mtp, layout=layout, device=device)
        experts = load_experts(
            reader,
            cfg,
            expert_ids=range(cfg.num_experts),
            dtype=torch_dtype,
            with_mtp=with_mtp,
            layout=layout,
            device=device,
        )
        reader.close()
        return LocalModel(Trunk(trunk_w, cfg, dtype=torch_dtype, attention=attention), experts)

    def routed(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        return local_routed_experts(self.experts, layer, x_TD, routing)

    def allocate(
        self, *, num_blocks: int, block_size: int, num_slots: int, spec_tokens: int = 0, num_checkpoints: int = 0
    ) -> CachePools:
        return CachePools.allocate(
            self.cfg,
            num_blocks=num_blocks,
            block_size=block_size,
            num_slots=num_slots,
            dtype=self.dtype,
            device=self.device,
            with_mtp=self.trunk.w.mtp is not None,
            spec_tokens=spec_tokens,
            num_checkpoints=num_checkpoints,
        )

    @torch.inference_mode()
    def forward(self, batch: StepBatch, pools: CachePools) -> TrunkOutput:
        return self.trunk.forward(batch, pools=pools, routed=self.routed)

    @torch.inference_mode()
    def mtp(self, hidden_TD: torch.Tensor, batch: StepBatch, pools: CachePools, *, step: int = 0) -> TrunkOutput:
        return mtp_forward(self.trunk, hidden_TD, batch=batch, pools=pools, routed=self.routed, step=step)
