"""Cache pools a trunk holds: paged KV blocks for attention layers, DeltaNet state slots.

Owns the tensors only; which block or slot belongs to which sequence is the engine's
business (it sends indices in each `StepBatch`). The MTP layer's attention gets its own
row in the KV pool and shares the main model's block tables (same token positions).
Sizes per token / per slot: model_spec §1.5. Tests: tests/model_shards/test_model_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.config import ModelConfig


@dataclass
class CachePools:
    """KV blocks and DeltaNet state slots for one trunk.

    Attributes:
        k, v: [L_attn, num_blocks, block_size, Hkv, head_dim] in the compute dtype
            (post-norm, post-RoPE keys). Row i belongs to `attn_layer_rows[layer]`.
        conv: [L_lin, num_slots, conv_dim, kernel - 1] the last pre-conv qkv inputs.
        recurrent: [L_lin, num_slots, Hv, Kd, Vd] fp32 delta-rule state.
        spec_conv, spec_recurrent: with speculation, the states after each of up to k + 1 verified
            tokens ([L_lin, num_slots, k + 1, ...]), so a slot rolls back to its last accepted token.
        ckpt_conv, ckpt_recurrent: the prefix cache's state checkpoints ([L_lin, num_checkpoints, ...], same
            dtypes as conv / recurrent): a slot's DeltaNet state saved at a 64-aligned prompt position, copied
            back into a new sequence's slot on a cache hit. Empty (0 rows) without a prefix cache.
    """

    k: torch.Tensor
    v: torch.Tensor
    conv: torch.Tensor
    recurrent: torch.Tensor
    block_size: int
    attn_layer_rows: dict[int, int]
    linear_layer_rows: dict[int, int]
    spec_conv: torch.Tensor | None = None
    spec_recurrent: torch.Tensor | None = None
    ckpt_conv: torch.Tensor | None = None
    ckpt_recurrent: torch.Tensor | None = None

    @staticmethod
    def allocate(
        cfg: ModelConfig,
        *,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        with_mtp: bool = False,
        spec_tokens: int = 0,
        num_checkpoints: int = 0,
    ) -> CachePools:
        """Zero-filled pools (zeros keep masked-out attention reads finite); `spec_tokens` = k > 0 adds
        the per-token state buffers verification needs; `num_checkpoints` rows of saved DeltaNet states for the
        prefix cache (each the size of one slot, `bytes_per_slot`)."""
        if num_checkpoints < 0:
            raise ValueError(f"num_checkpoints must be >= 0, got {num_checkpoints}")
        attn_layers = list(cfg.attention_layers)
        if with_mtp:
            attn_layers += [cfg.num_layers + i for i in range(cfg.mtp_num_hidden_layers)]
        lin_layers = list(cfg.linear_layers)
        kv_shape = (len(attn_layers), num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        conv_shape = (cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1)
        rec_shape = (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        return CachePools(
            k=torch.zeros(kv_shape, dtype=dtype, device=device),
            v=torch.zeros(kv_shape, dtype=dtype, device=device),
            conv=torch.zeros(
                (len(lin_layers), num_slots, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1),
                dtype=dtype,
                device=device,
            ),
            recurrent=torch.zeros(
                (
                    len(lin_layers),
                    num_slots,
                    cfg.linear_num_value_heads,
                    cfg.linear_key_head_dim,
                    cfg.linear_value_head_dim,
                ),
                dtype=torch.float32,
                device=device,
            ),
            block_size=block_size,
            attn_layer_rows={layer: i for i, layer in enumerate(attn_layers)},
            linear_layer_rows={layer: i for i, layer in enumerate(lin_layers)},
            spec_conv=torch.zeros(
                (len(lin_layers), num_slots, spec_tokens + 1, cfg.linear_conv_dim, cfg.linear_conv_kernel_dim - 1),
                dtype=dtype,
                device=device,
            )
            if spec_tokens
            else None,
            spec_recurrent=torch.zeros(
                (
                    len(lin_layers),
                    num_slots,
                    spec_tokens + 1,
                    cfg.linear_num_value_heads,
                    cfg.linear_key_head_dim,
                    cfg.linear_value_head_dim,
                ),
                dtype=torch.float32,
                device=device,
            )
            if spec_tokens
            else None,
            ckpt_conv=torch.zeros((len(lin_layers), num_checkpoints, *conv_shape), dtype=dtype, device=device),
            ckpt_recurrent=torch.zeros(
                (len(lin_layers), num_checkpoints, *rec_shape), dtype=torch.float32, device=device
            ),
        )

    @property
    def num_blocks(self) -> int:
        return int(self.k.shape[1])

    @property
    def num_slots(self) -> int:
        return int(self.conv.shape[1])

    @property
    def num_checkpoints(self) -> int:
        return 0 if self.ckpt_conv is None else int(self.ckpt_conv.shape[1])

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.attn_layer_rows[layer]
        return self.k[row], self.v[row]

    def state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.linear_layer_rows[layer]
        return self.conv[row], self.recurrent[row]

    def spec_state(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's per-token state buffers ([num_slots, k + 1, ...] each), or None without speculation."""
        if self.spec_conv is None or self.spec_recurrent is None:
            return None
        row = self.linear_layer_rows[layer]
        return self.spec_conv[row], self.spec_recurrent[row]

    def rollback(self, slot: int, *, keep: int) -> None:
        """Set a slot's DeltaNet states to those after verified token `keep` (0 = the first token)."""
        if self.spec_conv is None or self.spec_recurrent is None:
            raise ValueError("these pools were allocated without speculation (spec_tokens = 0)")
        self.conv[:, slot] = self.spec_conv[:, slot, keep]
        self.recurrent[:, slot] = self.spec_recurrent[:, slot, keep]

    def rollback_many(self, slots: torch.Tensor, keep: torch.Tensor) -> None:
        """`rollback` of many slots at once, with the kept token per slot on the device (int64 [S] each): two
        gathers and two scatters for any number of sequences, and no host read of `keep`."""
        if self.spec_conv is None or self.spec_recurrent is None:
            raise ValueError("these pools were allocated without speculation (spec_tokens = 0)")
        self.conv.index_copy_(1, slots, self.spec_conv[:, slots, keep])
        self.recurrent.index_copy_(1, slots, self.spec_recurrent[:, slots, keep])

    def copy_slot(self, src: int, dst: int) -> None:
        """Duplicate a sequence's DeltaNet state (n > 1 sampling forks a prompt's state)."""
        self.conv[:, dst] = self.conv[:, src]
        self.recurrent[:, dst] = self.recurrent[:, src]

    def _check_ckpt(self, ckpt: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ckpt_conv is None or self.ckpt_recurrent is None or not 0 <= ckpt < self.num_checkpoints:
            raise ValueError(f"state checkpoint {ckpt} out of range (the pool holds {self.num_checkpoints})")
        return self.ckpt_conv, self.ckpt_recurrent

    def save_state(self, slot: int, ckpt: int) -> None:
        """Copy a slot's DeltaNet state into a checkpoint (device copies, no host sync)."""
        ckpt_conv, ckpt_recurrent = self._check_ckpt(ckpt)
        ckpt_conv[:, ckpt] = self.conv[:, slot]
        ckpt_recurrent[:, ckpt] = self.recurrent[:, slot]

    def restore_state(self, ckpt: int, slot: int) -> None:
        """Copy a checkpoint into a slot: the slot then holds the state after the checkpoint's prefix."""
        ckpt_conv, ckpt_recurrent = self._check_ckpt(ckpt)
        self.conv[:, slot] = ckpt_conv[:, ckpt]
        self.recurrent[:, slot] = ckpt_recurrent[:, ckpt]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, *, block_size: int, dtype_bytes: int, with_mtp: bool = False) -> int:
        layers = len(cfg.attention_layers) + (cfg.mtp_num_hidden_layers if with_mtp else 0)
        return 2 * layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes

    @staticmethod
    def bytes_per_slot(cfg: ModelConfig, *, dtype_bytes: int) -> int:
        lin = len(cfg.linear_layers)
        conv = cfg.linear_conv_dim * (cfg.linear_conv_kernel_dim - 1) * dtype_bytes
        rec = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
        return lin * (conv + rec)
