"""The vision tower (ViT) of Qwen3.5-MoE: patches in merge-block order -> one text-width vector per 2x2 block.

Owns: `VisionWeights` and `load_vision` (the `model.visual.*` tensors, shapes checked against
model_shards.weights' table) and `VisionTower.encode` (model_spec §4.1): patch embed (a Conv3d
whose kernel equals its stride and its input), the learned position grid resampled bilinearly
(align_corners) to each item's grid, 2-D rotary on (row, col), `depth` pre-LayerNorm blocks with
bidirectional attention inside each frame, then the 2x2 merger. Mirrors transformers'
`Qwen3_5MoeVisionModel` with eager attention. Must not: know token ids or text positions
(model_shards/mm_positions.py) or decode pixels (model_shards/image_processing.py).
The position rows and rotary tables of each frame shape are made on the weights' device and kept there
(`VisionTower._frame_tables`, up to FRAME_TABLES_KEPT shapes): an encode copies only its pixels in.
Legend: N patches, D vision hidden, H heads, K head dim, M merged tokens (N / merge^2), E text hidden.
Tests: tests/model_shards/test_vision.py (against transformers; the position grid against F.interpolate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model_shards.checkpoint_files import CheckpointError, CheckpointReader
from model_shards.config import ModelConfig, VisionConfig
from model_shards.weights import FLOAT_DTYPES, VISION_PREFIX, _vision_specs

LAYER_NORM_EPS = 1e-6  # every vision LayerNorm (blocks and merger); not a config field in HF either
ATTENTION_IMPLS = ("eager", "sdpa")
SUPPORTED_ACTS = ("gelu_pytorch_tanh",)

Grid = tuple[int, int, int]  # (t, h, w) in patches
FRAME_TABLES_KEPT = 64  # frame shapes whose position / rotary tables a tower keeps on its device


@dataclass
class VisionBlockWeights:
    """One ViT block. Linear weights are [out, in] with biases; LayerNorms are affine (w, b)."""

    norm1_w: torch.Tensor  # [D]
    norm1_b: torch.Tensor
    qkv_w: torch.Tensor  # [3D, D], output rows (q | k | v), each head-major [H, K]
    qkv_b: torch.Tensor  # [3D]
    proj_w: torch.Tensor  # [D, D]
    proj_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor  # [I, D]
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor  # [D, I]
    fc2_b: torch.Tensor


@dataclass
class VisionWeights:
    """The whole tower. `patch_embed_w` keeps the checkpoint's Conv3d layout [D, C, T, P, P]."""

    patch_embed_w: torch.Tensor  # [D, C, T, P, P]
    patch_embed_b: torch.Tensor  # [D]
    pos_embed: torch.Tensor  # [side * side, D] learned grid, row-major
    blocks: list[VisionBlockWeights]
    merger_norm_w: torch.Tensor  # [D] (per patch, before the 2x2 concat)
    merger_norm_b: torch.Tensor
    merger_fc1_w: torch.Tensor  # [4D, 4D]
    merger_fc1_b: torch.Tensor
    merger_fc2_w: torch.Tensor  # [E, 4D]
    merger_fc2_b: torch.Tensor


# ------------------------------------------------------------------------------ loading
def load_vision(
    reader: CheckpointReader, cfg: ModelConfig, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> VisionWeights:
    """Read every `model.visual.*` tensor, check its shape against the table, cast to `dtype`.

    Args:
        reader: the checkpoint folder.
        cfg: a config with a `vision` part.
        dtype: compute dtype (HF casts the tower to the load dtype too).
        device: where every tensor is placed as it is read.
    Raises:
        ValueError: the config has no vision tower. NotImplementedError: unsupported activation.
        CheckpointError: a tensor is missing, has the wrong shape or is not a float tensor.
    """
    if cfg.vision is None:
        raise ValueError("this config has no vision_config: the checkpoint is text-only, images cannot be encoded")
    if cfg.vision.hidden_act not in SUPPORTED_ACTS:
        raise NotImplementedError(
            f"vision_config.hidden_act {cfg.vision.hidden_act!r} is not supported; expected one of {SUPPORTED_ACTS}"
        )
    specs = _vision_specs(cfg)

    def read(suffix: str) -> torch.Tensor:
        name = VISION_PREFIX + suffix
        info = reader.tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor {name}: the checkpoint has no complete vision tower")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} is {info.dtype}, expected one of {'/'.join(FLOAT_DTYPES)}")
        t = reader.read(name)
        want = specs[name][0]
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(want)}")
        return t.to(device=device, dtype=dtype)

    blocks = []
    for b in range(cfg.vision.depth):
        p = f"blocks.{b}."
        blocks.append(
            VisionBlockWeights(
                norm1_w=read(p + "norm1.weight"),
                norm1_b=read(p + "norm1.bias"),
                qkv_w=read(p + "attn.qkv.weight"),
                qkv_b=read(p + "attn.qkv.bias"),
                proj_w=read(p + "attn.proj.weight"),
                proj_b=read(p + "attn.proj.bias"),
                norm2_w=read(p + "norm2.weight"),
                norm2_b=read(p + "norm2.bias"),
                fc1_w=read(p + "mlp.linear_fc1.weight"),
                fc1_b=read(p + "mlp.linear_fc1.bias"),
                fc2_w=read(p + "mlp.linear_fc2.weight"),
                fc2_b=read(p + "mlp.linear_fc2.bias"),
            )
        )
    return VisionWeights(
        patch_embed_w=read("patch_embed.proj.weight"),
        patch_embed_b=read("patch_embed.proj.bias"),
        pos_embed=read("pos_embed.weight"),
        blocks=blocks,
        merger_norm_w=read("merger.norm.weight"),
        merger_norm_b=read("merger.norm.bias"),
        merger_fc1_w=read("merger.linear_fc1.weight"),
        merger_fc1_b=read("merger.linear_fc1.bias"),
        merger_fc2_w=read("merger.linear_fc2.weight"),
        merger_fc2_b=read("merger.linear_fc2.bias"),
    )


# ------------------------------------------------------------------------------ per-patch geometry
def check_grids(grid_thw: Sequence[Grid], *, merge: int) -> list[Grid]:
    """Grids as int triples; each needs t >= 1 and h, w positive multiples of `merge`."""
    out = []
    for g in grid_thw:
        t, h, w = (int(x) for x in g)
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(f"grid (t, h, w) = {(t, h, w)} is invalid: t >= 1 and h, w multiples of {merge} needed")
        out.append((t, h, w))
    return out


def merged_tokens(grid: Grid, *, merge: int) -> int:
    """Tokens the tower outputs for one item: t * (h / merge) * (w / merge)."""
    t, h, w = grid
    return t * (h // merge) * (w // merge)


def block_order_rows_cols(
    h: int, w: int, *, merge: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [h * w] of each patch of one frame, in merge-block order
    (block_row, block_col, in_row, in_col): every merge^2 consecutive patches form one block."""
    bh = torch.arange(h // merge, device=device).view(-1, 1, 1, 1)
    bw = torch.arange(w // merge, device=device).view(1, -1, 1, 1)
    ih = torch.arange(merge, device=device).view(1, 1, -1, 1)
    iw = torch.arange(merge, device=device).view(1, 1, 1, -1)
    shape = (h // merge, w // merge, merge, merge)
    return (bh * merge + ih).expand(shape).flatten(), (bw * merge + iw).expand(shape).flatten()


def _axis_taps(index: torch.Tensor, *, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (floor, floor + 1) into a `side`-long axis for positions 0..size-1 mapped with
    align_corners=True (0 -> 0, size-1 -> side-1), and their hat-kernel weights 1 - |src - tap|."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_embedding(pos_embed: torch.Tensor, *, grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """The learned [side, side] grid resampled to every frame of every item, in merge-block order.

    Same numbers as `F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)`,
    computed as 4 weighted taps per patch (what HF does) in fp32.
    Returns: [N, D] fp32.
    """
    return torch.cat([frame_position_embedding(pos_embed, h=h, w=w, merge=merge).repeat(t, 1) for t, h, w in grids])


def frame_position_embedding(pos_embed: torch.Tensor, *, h: int, w: int, merge: int) -> torch.Tensor:
    """`position_embedding` of one h x w frame: [h * w, D] fp32, built on the grid's device."""
    side = int(round(pos_embed.shape[0] ** 0.5))
    rows, cols = block_order_rows_cols(h, w, merge=merge, device=pos_embed.device)
    row_taps, row_w = _axis_taps(rows, size=h, side=side)
    col_taps, col_w = _axis_taps(cols, size=w, side=side)
    idx = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)  # [hw, 4]
    wts = (row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4)
    return (pos_embed[idx] * wts[:, :, None]).sum(1)  # [hw, D]


def rotary_cos_sin(
    grids: Sequence[Grid], *, head_dim: int, theta: float, merge: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary tables: angles [row * f | col * f] over f = theta^(-2i / (K/2)), i < K/4, duplicated to K.

    Returns: cos, sin [N, K] fp32 on `device` (applied with full-width rotate_half, in fp32).
    """
    frames = [frame_rotary(h, w, head_dim=head_dim, theta=theta, merge=merge, device=device) for _, h, w in grids]
    return (
        torch.cat([c.repeat(t, 1) for (t, _, _), (c, _) in zip(grids, frames)]),
        torch.cat([s.repeat(t, 1) for (t, _, _), (_, s) in zip(grids, frames)]),
    )


def frame_rotary(
    h: int, w: int, *, head_dim: int, theta: float, merge: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_cos_sin` of one h x w frame: cos, sin [h * w, K] fp32 (elementwise per patch, so a frame's
    rows are the same numbers wherever the frame sits in the batch)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial))
    rows, cols = block_order_rows_cols(h, w, merge=merge, device=device)
    freqs = torch.stack([rows, cols], dim=-1)[..., None].float() * inv_freq  # [hw, 2, K/4]
    angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [hw, K/2]
    angles = torch.cat([angles, angles], dim=-1)  # [hw, K]
    return angles.cos(), angles.sin()


def frame_lengths(grids: Sequence[Grid]) -> list[int]:
    """Attention segments: one per (item, temporal index), of h * w patches each."""
    return [h * w for t, h, w in grids for _ in range(t)]


# ------------------------------------------------------------------------------ the math
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_NHK: torch.Tensor, *, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the whole head dim, computed in fp32, cast back."""
    xf = x_NHK.float()
    return (xf * cos[:, None, :] + _rotate_half(xf) * sin[:, None, :]).to(x_NHK.dtype)


def frame_attention(
    q_NHK: torch.Tensor, k_NHK: torch.Tensor, v_NHK: torch.Tensor, *, lengths: Sequence[int], impl: str = "eager"
) -> torch.Tensor:
    """Bidirectional attention inside each segment (frame); no attention across segments.

    Args:
        q_NHK, k_NHK, v_NHK: [N, H, K], segments back to back.
        lengths: segment lengths, summing to N.
        impl: "eager" (reference: scores * K^-0.5, fp32 softmax cast back, PV; HF's eager path)
            or "sdpa" (torch's fused kernel per segment, not bit-equal to eager).
    Returns: [N, H, K].
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"vision attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
    scale = q_NHK.shape[-1] ** -0.5
    outs = []
    for q, k, v in zip(*(t.split(list(lengths)) for t in (q_NHK, k_NHK, v_NHK))):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, n, K]
        if impl == "eager":
            probs = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1, dtype=torch.float32).to(q.dtype)
            o = probs @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def vision_block(
    x_ND: torch.Tensor,
    w: VisionBlockWeights,
    *,
    num_heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lengths: Sequence[int],
    impl: str = "eager",
) -> torch.Tensor:
    """x += proj(FrameAttn(rope(qkv(LN1(x))))); x += fc2(gelu_tanh(fc1(LN2(x)))). [N, D] -> [N, D]."""
    n, d = x_ND.shape
    h = F.layer_norm(x_ND, (d,), w.norm1_w, w.norm1_b, eps=LAYER_NORM_EPS)
    q, k, v = F.linear(h, w.qkv_w, w.qkv_b).view(n, 3, num_heads, -1).unbind(1)  # [N, H, K] each
    q, k = apply_rotary(q, cos=cos, sin=sin), apply_rotary(k, cos=cos, sin=sin)
    o = frame_attention(q, k, v, lengths=lengths, impl=impl).reshape(n, d)
    x_ND = x_ND + F.linear(o, w.proj_w, w.proj_b)
    h = F.layer_norm(x_ND, (d,), w.norm2_w, w.norm2_b, eps=LAYER_NORM_EPS)
    return x_ND + F.linear(F.gelu(F.linear(h, w.fc1_w, w.fc1_b), approximate="tanh"), w.fc2_w, w.fc2_b)


def patch_merger(x_ND: torch.Tensor, w: VisionWeights, *, merge: int) -> torch.Tensor:
    """LayerNorm per patch, concat each merge^2 block ([M, merge^2 * D]), fc1, exact GELU, fc2 -> [M, E]."""
    d = x_ND.shape[-1]
    h = F.layer_norm(x_ND, (d,), w.merger_norm_w, w.merger_norm_b, eps=LAYER_NORM_EPS).view(-1, d * merge * merge)
    return F.linear(F.gelu(F.linear(h, w.merger_fc1_w, w.merger_fc1_b)), w.merger_fc2_w, w.merger_fc2_b)


class VisionTower:
    """Holds the tower's weights; `encode` turns preprocessed patches into text-width embeddings.

    Args:
        weights: from `load_vision`.
        cfg: the vision part of the model config.
        dtype: compute dtype (weights must already be in it).
        attention: "eager" (reference, HF parity) or "sdpa" (fused kernel per frame).
    """

    def __init__(
        self, weights: VisionWeights, cfg: VisionConfig, *, dtype: torch.dtype, attention: str = "eager"
    ) -> None:
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"vision attention {attention!r} is not one of {ATTENTION_IMPLS}")
        self.w, self.cfg, self.dtype, self.attention = weights, cfg, dtype, attention
        # per frame shape (h, w): (position rows [hw, D] fp32, cos, sin [hw, K] fp32), made on the weights'
        # device once and reused (no host tables copied in per encode); bounded, oldest shape dropped first
        self._frames: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _frame_tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tables = self._frames.get((h, w))
        if tables is None:
            v, merge = self.cfg, self.cfg.spatial_merge_size
            pos = frame_position_embedding(self.w.pos_embed, h=h, w=w, merge=merge)
            cos, sin = frame_rotary(
                h, w, head_dim=v.head_dim, theta=v.rope_theta, merge=merge, device=self.w.pos_embed.device
            )
            if len(self._frames) >= FRAME_TABLES_KEPT:
                self._frames.pop(next(iter(self._frames)))
            tables = self._frames[(h, w)] = (pos, cos, sin)
        return tables

    @torch.inference_mode()
    def encode(self, pixel_values_NP: torch.Tensor, grid_thw: Sequence[Grid] | torch.Tensor) -> torch.Tensor:
        """Embeddings of every merged 2x2 block of every item, items back to back.

        Args:
            pixel_values_NP: [N, C*T*P*P], rows (C, T, P, P) flattened, in merge-block order per
                frame (model_spec §4.1; what model_shards.image_processing produces). Any float dtype.
            grid_thw: per item (t, h, w) in patches; sum of t*h*w must be N.
        Returns:
            [M, E] in the tower's dtype, M = sum t*h*w / merge^2; item i's rows follow item i-1's.
        """
        v, merge = self.cfg, self.cfg.spatial_merge_size
        grids = check_grids(grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw, merge=merge)
        n = sum(t * h * w for t, h, w in grids)
        if tuple(pixel_values_NP.shape) != (n, v.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values_NP.shape)}, the grids {grids} need ({n}, {v.patch_dim})"
            )
        dev = self.w.pos_embed.device
        x = pixel_values_NP.to(device=dev, dtype=self.dtype).view(
            -1, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
        # Conv3d with kernel = stride = the whole input: one output vector per patch (HF's op, same rounding).
        x = F.conv3d(x, self.w.patch_embed_w, self.w.patch_embed_b, stride=self.w.patch_embed_w.shape[2:]).view(n, -1)
        frames = [(t, self._frame_tables(h, w)) for t, h, w in grids]
        x = x + torch.cat([pos.repeat(t, 1) for t, (pos, _, _) in frames]).to(x.dtype)
        cos = torch.cat([c.repeat(t, 1) for t, (_, c, _) in frames])
        sin = torch.cat([s.repeat(t, 1) for t, (_, _, s) in frames])
        lengths = frame_lengths(grids)
        for blk in self.w.blocks:
            x = vision_block(x, blk, num_heads=v.num_heads, cos=cos, sin=sin, lengths=lengths, impl=self.attention)
        return patch_merger(x, self.w, merge=merge)

    def split(self, embeds_ME: torch.Tensor, grid_thw: Sequence[Grid]) -> list[torch.Tensor]:
        """`encode`'s output cut into one [M_i, E] tensor per item."""
        merge = self.cfg.spatial_merge_size
        return list(embeds_ME.split([merged_tokens(g, merge=merge) for g in check_grids(grid_thw, merge=merge)]))
