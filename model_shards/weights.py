"""HF checkpoint names -> our weights: one table, validation, and shard-by-shard loading.

Owns: the full list of tensors a Qwen3.5-MoE checkpoint must hold (`expected_tensors`, by
part: trunk, experts, mtp, vision, with shapes and FP8 companions), and the loaders that
read only what a rank needs: `load_trunk` (everything but routed experts), `load_experts`
(given expert ids of every MoE layer). Both expert layouts are read: fused
`mlp.experts.gate_up_proj` [E, 2I, D] (gate rows then up rows) / `down_proj` [E, D, I], and
per-expert `mlp.experts.N.{gate,up,down}_proj.weight`, which are concatenated (gate, up)
and stacked here. FP8 weights stay FP8 (`Fp8Weight`). Plain trunk weights that multiply the
same input are stacked at load for one GEMM each (in_proj_qkv | in_proj_z; q | k | v proj;
router | shared gate | shared up), the per-tensor fields becoming row views of the stack (no
extra memory). Tests: tests/model_shards/test_model_parity.py (loaded models equal transformers),
tests/model_shards/test_inspect.py (loaders read only what a rank needs), tests/model_shards/test_bad_checkpoints.py
(validation names the tensor).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_shards.checkpoint_files import CheckpointError, CheckpointReader
from model_shards.config import FULL_ATTENTION, ModelConfig
from model_shards.experts import ExpertShard, LayerExperts
from model_shards.gated_attention import AttentionWeights
from model_shards.gated_deltanet import DeltaNetWeights
from model_shards.moe import SharedMoEWeights
from model_shards.quant import FP8_DTYPE, Fp8Weight, Weight, concat_rows, stack
from model_shards.trunk import LayerWeights, MtpWeights, TrunkWeights

MULTIMODAL_PREFIX = "model.language_model."
TEXT_PREFIX = "model."
VISION_PREFIX = "model.visual."
MTP_PREFIX = "mtp."
SCALE_SUFFIX = "_scale_inv"
PARTS = ("trunk", "experts", "mtp", "vision")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")  # what an unquantised tensor (or an FP8 scale) may be stored as


@dataclass(frozen=True)
class TensorSpec:
    """What one checkpoint tensor must be: its shape, the part it belongs to, whether it is FP8."""

    shape: tuple[int, ...]
    part: str
    fp8: bool = False


# ------------------------------------------------------------------------------ naming
def text_prefix(reader: CheckpointReader) -> str:
    """`model.language_model.` (multimodal and HF text saves) or `model.` (older text-only files)."""
    for prefix in (MULTIMODAL_PREFIX, TEXT_PREFIX):
        if reader.has(f"{prefix}embed_tokens.weight"):
            return prefix
    raise CheckpointError(
        f"missing tensor {MULTIMODAL_PREFIX}embed_tokens.weight: not a Qwen3.5-MoE checkpoint (no embedding found)"
    )


def expert_layout(reader: CheckpointReader, moe_prefix: str) -> str:
    """'fused' when `{moe_prefix}experts.gate_up_proj` exists, else 'per-expert'."""
    return "fused" if reader.has(f"{moe_prefix}experts.gate_up_proj") else "per-expert"


def is_fp8(cfg: ModelConfig, name: str) -> bool:
    """Whether a linear weight is stored FP8: quantised config and not under `modules_to_not_convert`."""
    if cfg.quant is None:
        return False
    module = name.removesuffix(".weight")
    return not any(pattern in module for pattern in cfg.quant.modules_to_not_convert)


def _scale_shape(cfg: ModelConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    assert cfg.quant is not None
    br, bc = cfg.quant.block_rows, cfg.quant.block_cols
    return (*shape[:-2], -(-shape[-2] // br), -(-shape[-1] // bc))


def _layer_specs(cfg: ModelConfig, base: str, *, attention: bool, part: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Names -> (shape, is_linear) of one decoder layer except its routed experts."""
    d = cfg.hidden_size
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        f"{base}input_layernorm.weight": ((d,), False),
        f"{base}post_attention_layernorm.weight": ((d,), False),
    }
    if attention:
        h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        a = f"{base}self_attn."
        out.update(
            {
                f"{a}q_proj.weight": ((h * hd * 2, d), True),
                f"{a}k_proj.weight": ((hkv * hd, d), True),
                f"{a}v_proj.weight": ((hkv * hd, d), True),
                f"{a}o_proj.weight": ((d, h * hd), True),
                f"{a}q_norm.weight": ((hd,), False),
                f"{a}k_norm.weight": ((hd,), False),
            }
        )
    else:
        c, hv, vd = cfg.linear_conv_dim, cfg.linear_num_value_heads, cfg.linear_value_head_dim
        g = f"{base}linear_attn."
        out.update(
            {
                f"{g}in_proj_qkv.weight": ((c, d), True),
                f"{g}in_proj_z.weight": ((hv * vd, d), True),
                f"{g}in_proj_b.weight": ((hv, d), True),
                f"{g}in_proj_a.weight": ((hv, d), True),
                f"{g}conv1d.weight": ((c, 1, cfg.linear_conv_kernel_dim), False),
                f"{g}dt_bias": ((hv,), False),
                f"{g}A_log": ((hv,), False),
                f"{g}norm.weight": ((vd,), False),
                f"{g}out_proj.weight": ((d, hv * vd), True),
            }
        )
    m, i_s = f"{base}mlp.", cfg.shared_expert_intermediate_size
    out.update(
        {
            f"{m}gate.weight": ((cfg.num_experts, d), True),
            f"{m}shared_expert.gate_proj.weight": ((i_s, d), True),
            f"{m}shared_expert.up_proj.weight": ((i_s, d), True),
            f"{m}shared_expert.down_proj.weight": ((d, i_s), True),
            f"{m}shared_expert_gate.weight": ((1, d), True),
        }
    )
    return out


def _expert_specs(cfg: ModelConfig, moe_prefix: str, layout: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    x = f"{moe_prefix}experts."
    if layout == "fused":
        return {f"{x}gate_up_proj": ((e, 2 * i, d), True), f"{x}down_proj": ((e, d, i), True)}
    out: dict[str, tuple[tuple[int, ...], bool]] = {}
    for j in range(e):
        out[f"{x}{j}.gate_proj.weight"] = ((i, d), True)
        out[f"{x}{j}.up_proj.weight"] = ((i, d), True)
        out[f"{x}{j}.down_proj.weight"] = ((d, i), True)
    return out


def _vision_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    v = cfg.vision
    assert v is not None
    h, p = v.hidden_size, VISION_PREFIX
    merged = h * v.spatial_merge_size**2
    out: dict[str, tuple[tuple[int, ...], bool]] = {
        f"{p}patch_embed.proj.weight": ((h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), False),
        f"{p}patch_embed.proj.bias": ((h,), False),
        f"{p}pos_embed.weight": ((v.num_position_embeddings, h), False),
        f"{p}merger.norm.weight": ((h,), False),
        f"{p}merger.norm.bias": ((h,), False),
        f"{p}merger.linear_fc1.weight": ((merged, merged), False),
        f"{p}merger.linear_fc1.bias": ((merged,), False),
        f"{p}merger.linear_fc2.weight": ((v.out_hidden_size, merged), False),
        f"{p}merger.linear_fc2.bias": ((v.out_hidden_size,), False),
    }
    for b in range(v.depth):
        q = f"{p}blocks.{b}."
        out.update(
            {
                f"{q}norm1.weight": ((h,), False),
                f"{q}norm1.bias": ((h,), False),
                f"{q}norm2.weight": ((h,), False),
                f"{q}norm2.bias": ((h,), False),
                f"{q}attn.qkv.weight": ((3 * h, h), False),
                f"{q}attn.qkv.bias": ((3 * h,), False),
                f"{q}attn.proj.weight": ((h, h), False),
                f"{q}attn.proj.bias": ((h,), False),
                f"{q}mlp.linear_fc1.weight": ((v.intermediate_size, h), False),
                f"{q}mlp.linear_fc1.bias": ((v.intermediate_size,), False),
                f"{q}mlp.linear_fc2.weight": ((h, v.intermediate_size), False),
                f"{q}mlp.linear_fc2.bias": ((h,), False),
            }
        )
    return out


def expected_tensors(
    cfg: ModelConfig, *, prefix: str, layout: str, mtp_layout: str | None, vision: bool
) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint must hold, FP8 scale companions included.

    Args:
        prefix: text-model prefix (`text_prefix`). layout: expert layout of the decoder layers.
        mtp_layout: expert layout of the MTP layers, None when the checkpoint has no MTP head.
        vision: whether `model.visual.*` tensors are expected.
    """
    raw: dict[str, tuple[tuple[int, ...], bool, str]] = {}

    def add(specs: dict[str, tuple[tuple[int, ...], bool]], part: str) -> None:
        for name, (shape, linear) in specs.items():
            raw[name] = (shape, linear, part)

    d, v = cfg.hidden_size, cfg.vocab_size
    add({f"{prefix}embed_tokens.weight": ((v, d), False), f"{prefix}norm.weight": ((d,), False)}, "trunk")
    if not cfg.tie_word_embeddings:
        add({"lm_head.weight": ((v, d), True)}, "trunk")
    for i, kind in enumerate(cfg.layer_types):
        base = f"{prefix}layers.{i}."
        add(_layer_specs(cfg, base, attention=kind == FULL_ATTENTION, part="trunk"), "trunk")
        add(_expert_specs(cfg, f"{base}mlp.", layout), "experts")
    if mtp_layout is not None:
        add(
            {
                f"{MTP_PREFIX}fc.weight": ((d, 2 * d), True),
                f"{MTP_PREFIX}pre_fc_norm_embedding.weight": ((d,), False),
                f"{MTP_PREFIX}pre_fc_norm_hidden.weight": ((d,), False),
                f"{MTP_PREFIX}norm.weight": ((d,), False),
            },
            "mtp",
        )
        for j in range(cfg.mtp_num_hidden_layers):
            base = f"{MTP_PREFIX}layers.{j}."
            add(_layer_specs(cfg, base, attention=True, part="mtp"), "mtp")
            add(_expert_specs(cfg, f"{base}mlp.", mtp_layout), "mtp")
    if vision and cfg.vision is not None:
        add(_vision_specs(cfg), "vision")

    out: dict[str, TensorSpec] = {}
    for name, (shape, linear, part) in raw.items():
        fp8 = linear and is_fp8(cfg, name)
        out[name] = TensorSpec(shape=shape, part=part, fp8=fp8)
        if fp8:
            out[name + SCALE_SUFFIX] = TensorSpec(shape=_scale_shape(cfg, shape), part=part)
    return out


@dataclass(frozen=True)
class CheckpointLayout:
    """What a folder holds, decided from its tensor names once."""

    prefix: str
    layout: str
    mtp_layout: str | None
    has_vision: bool

    @staticmethod
    def detect(reader: CheckpointReader, cfg: ModelConfig) -> CheckpointLayout:
        prefix = text_prefix(reader)
        mtp = None
        if cfg.has_mtp and any(n.startswith(MTP_PREFIX) for n in reader.tensors):
            mtp = expert_layout(reader, f"{MTP_PREFIX}layers.0.mlp.")
        has_vision = cfg.vision is not None and any(n.startswith(VISION_PREFIX) for n in reader.tensors)
        return CheckpointLayout(
            prefix=prefix, layout=expert_layout(reader, f"{prefix}layers.0.mlp."), mtp_layout=mtp, has_vision=has_vision
        )

    def expected(self, cfg: ModelConfig) -> dict[str, TensorSpec]:
        return expected_tensors(
            cfg, prefix=self.prefix, layout=self.layout, mtp_layout=self.mtp_layout, vision=self.has_vision
        )


@dataclass(frozen=True)
class CheckpointProblems:
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    wrong_shape: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (name, expected, found)
    wrong_dtype: tuple[tuple[str, str], ...]  # (name, found dtype) for FP8 weights not stored as F8_E4M3
    # (name, found dtype) for tensors the config keeps unquantised but stored FP8/integer (no scales to apply)
    not_float: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype or self.not_float)

    def message(self) -> str:
        lines = []
        if self.missing:
            lines.append(
                f"missing tensor(s): {', '.join(self.missing[:8])}" + (" ..." if len(self.missing) > 8 else "")
            )
        if self.unexpected:
            lines.append(
                f"unexpected tensor(s): {', '.join(self.unexpected[:8])}" + (" ..." if len(self.unexpected) > 8 else "")
            )
        for name, want, got in self.wrong_shape[:8]:
            lines.append(f"tensor {name} has shape {list(got)}, expected {list(want)}")
        for name, dt in self.wrong_dtype[:8]:
            lines.append(f"tensor {name} is {dt}, expected F8_E4M3 (the config declares FP8 weights)")
        for name, dt in self.not_float[:8]:
            lines.append(f"tensor {name} is {dt}, expected {'/'.join(FLOAT_DTYPES)} (the config does not quantise it)")
        return "; ".join(lines)


def check_checkpoint(reader: CheckpointReader, cfg: ModelConfig, layout: CheckpointLayout) -> CheckpointProblems:
    """Compare the folder's tensor headers with the expected table (reads no tensor data)."""
    expected = layout.expected(cfg)
    found = reader.tensors
    missing = tuple(sorted(n for n in expected if n not in found))
    unexpected = tuple(sorted(n for n in found if n not in expected))
    wrong_shape = tuple(
        (n, spec.shape, found[n].shape) for n, spec in expected.items() if n in found and found[n].shape != spec.shape
    )
    wrong_dtype = tuple(
        (n, found[n].dtype) for n, spec in expected.items() if spec.fp8 and n in found and found[n].dtype != "F8_E4M3"
    )
    not_float = tuple(
        (n, found[n].dtype)
        for n, spec in expected.items()
        if not spec.fp8 and n in found and found[n].dtype not in FLOAT_DTYPES
    )
    return CheckpointProblems(missing, unexpected, wrong_shape, wrong_dtype, not_float)


def validate(reader: CheckpointReader, cfg: ModelConfig) -> CheckpointLayout:
    """Detect the layout and raise `CheckpointError` naming every problem found."""
    layout = CheckpointLayout.detect(reader, cfg)
    problems = check_checkpoint(reader, cfg, layout)
    if not problems.ok:
        raise CheckpointError(f"checkpoint {reader.folder} is broken: {problems.message()}")
    return layout


# ------------------------------------------------------------------------------ loading
class _Loader:
    """Reads named tensors, checks their shapes against the table, casts to the compute dtype."""

    def __init__(
        self,
        reader: CheckpointReader,
        cfg: ModelConfig,
        layout: CheckpointLayout,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.reader, self.cfg, self.dtype = reader, cfg, dtype
        self.device = torch.device(device)
        self.specs = layout.expected(cfg)
        self.layout = layout

    def _spec(self, name: str) -> TensorSpec:
        if name not in self.specs:
            raise CheckpointError(f"tensor {name} is not part of this checkpoint's layout")
        return self.specs[name]

    def _check(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")

    def tensor(self, name: str) -> torch.Tensor:
        spec = self._spec(name)
        t = self.reader.read(name)
        self._check(name, t, spec.shape)
        return t.to(device=self.device, dtype=self.dtype)  # one tensor at a time: no host copy of the whole model

    def weight(self, name: str, rows: Sequence[int] | None = None) -> Weight:
        """A linear weight (or rows of a stacked one), FP8 kept as `Fp8Weight`."""
        spec = self._spec(name)
        read = (lambda n: self.reader.read(n)) if rows is None else (lambda n: self.reader.read_rows(n, list(rows)))
        data = read(name)
        shape = spec.shape if rows is None else (len(rows), *spec.shape[1:])
        self._check(name, data, shape)
        if not spec.fp8:
            return data.to(device=self.device, dtype=self.dtype)
        if data.dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor {name} is {data.dtype}, expected float8_e4m3fn (the config declares FP8)")
        scale = read(name + SCALE_SUFFIX)
        sshape = self.specs[name + SCALE_SUFFIX].shape
        self._check(name + SCALE_SUFFIX, scale, sshape if rows is None else (len(rows), *sshape[1:]))
        assert self.cfg.quant is not None
        return Fp8Weight(
            data.to(self.device), scale.to(self.device), (self.cfg.quant.block_rows, self.cfg.quant.block_cols)
        )


def _stack_rows(weights: list[Weight]) -> tuple[torch.Tensor | None, list[Weight]]:
    """Weights [N_i, D] that multiply the same input, as one [sum N_i, D] stack plus row views of it
    that replace them (the originals are freed). FP8 or mixed dtypes: (None, the weights unchanged).

    NOTE: one GEMM over the stack gives the same bits as one GEMM per weight on CPU for these
    shapes (fp32 and bf16, 1 to 2048 rows), except that a GEMM with a handful of output columns
    (in_proj_a/b, shared_expert_gate) takes another fp32 kernel: those stay unstacked.
    """
    tensors = [w for w in weights if isinstance(w, torch.Tensor)]
    if len(tensors) != len(weights) or len({w.dtype for w in tensors}) != 1:
        return None, weights
    stacked = torch.cat(tensors)
    return stacked, list(stacked.split([w.shape[0] for w in weights]))


def _layer_weights(ld: _Loader, base: str, *, attention: bool) -> LayerWeights:
    if attention:
        a = f"{base}self_attn."
        qkv, (q, k, v) = _stack_rows([ld.weight(f"{a}{p}_proj.weight") for p in "qkv"])
        mixer: DeltaNetWeights | AttentionWeights = AttentionWeights(
            q_proj=q,
            k_proj=k,
            v_proj=v,
            o_proj=ld.weight(f"{a}o_proj.weight"),
            q_norm=ld.tensor(f"{a}q_norm.weight"),
            k_norm=ld.tensor(f"{a}k_norm.weight"),
            qkv_proj=qkv,
        )
    else:
        g = f"{base}linear_attn."
        qkvz, (in_qkv, z) = _stack_rows([ld.weight(f"{g}in_proj_qkv.weight"), ld.weight(f"{g}in_proj_z.weight")])
        # HF casts every parameter (A_log and dt_bias too) to the load dtype; we mirror it.
        mixer = DeltaNetWeights(
            in_proj_qkv=in_qkv,
            in_proj_z=z,
            in_proj_b=ld.weight(f"{g}in_proj_b.weight"),
            in_proj_a=ld.weight(f"{g}in_proj_a.weight"),
            conv1d=ld.tensor(f"{g}conv1d.weight").squeeze(1),
            dt_bias=ld.tensor(f"{g}dt_bias"),
            A_log=ld.tensor(f"{g}A_log"),
            norm=ld.tensor(f"{g}norm.weight"),
            out_proj=ld.weight(f"{g}out_proj.weight"),
            in_proj_qkvz=qkvz,
        )
    m = f"{base}mlp."
    router = ld.weight(f"{m}gate.weight")
    gate = ld.weight(f"{m}shared_expert_gate.weight")
    if isinstance(router, Fp8Weight) or isinstance(gate, Fp8Weight):
        raise CheckpointError(
            f"{m}gate / shared_expert_gate must stay unquantised (list them in modules_to_not_convert)"
        )
    router_gate_up, (router, shared_gate, shared_up) = _stack_rows(
        [router, ld.weight(f"{m}shared_expert.gate_proj.weight"), ld.weight(f"{m}shared_expert.up_proj.weight")]
    )
    return LayerWeights(
        input_norm=ld.tensor(f"{base}input_layernorm.weight"),
        post_norm=ld.tensor(f"{base}post_attention_layernorm.weight"),
        mixer=mixer,
        moe=SharedMoEWeights(
            router=router,  # type: ignore[arg-type]  # plain: checked above, and stacking keeps it a tensor
            shared_gate_proj=shared_gate,
            shared_up_proj=shared_up,
            shared_down_proj=ld.weight(f"{m}shared_expert.down_proj.weight"),
            shared_expert_gate=gate,
            router_gate_up=router_gate_up,
        ),
    )


def load_trunk(
    reader: CheckpointReader,
    cfg: ModelConfig,
    *,
    dtype: torch.dtype,
    with_mtp: bool = True,
    layout: CheckpointLayout | None = None,
    device: torch.device | str = "cpu",
) -> TrunkWeights:
    """Everything a trunk rank holds: embeddings, mixers, routers, shared experts, norms, lm_head,
    and the MTP head's non-expert tensors when present and asked for. Reads no routed expert.
    Every tensor is placed on `device` as it is read."""
    layout = layout or CheckpointLayout.detect(reader, cfg)
    ld = _Loader(reader, cfg, layout, dtype, device)
    p = layout.prefix
    embed = ld.tensor(f"{p}embed_tokens.weight")
    layers = [
        _layer_weights(ld, f"{p}layers.{i}.", attention=kind == FULL_ATTENTION)
        for i, kind in enumerate(cfg.layer_types)
    ]
    lm_head: Weight = embed if cfg.tie_word_embeddings else ld.weight("lm_head.weight")
    mtp = None
    if with_mtp and layout.mtp_layout is not None:
        mtp = MtpWeights(
            fc=ld.weight(f"{MTP_PREFIX}fc.weight"),
            pre_fc_norm_embedding=ld.tensor(f"{MTP_PREFIX}pre_fc_norm_embedding.weight"),
            pre_fc_norm_hidden=ld.tensor(f"{MTP_PREFIX}pre_fc_norm_hidden.weight"),
            norm=ld.tensor(f"{MTP_PREFIX}norm.weight"),
            layers=[
                _layer_weights(ld, f"{MTP_PREFIX}layers.{j}.", attention=True) for j in range(cfg.mtp_num_hidden_layers)
            ],
        )
    return TrunkWeights(embed=embed, layers=layers, final_norm=ld.tensor(f"{p}norm.weight"), lm_head=lm_head, mtp=mtp)


def moe_layer_prefixes(cfg: ModelConfig, layout: CheckpointLayout, *, with_mtp: bool) -> list[tuple[str, str]]:
    """(mlp prefix, expert layout) of every MoE layer an expert shard covers, in MoE-layer order."""
    out = [(f"{layout.prefix}layers.{i}.mlp.", layout.layout) for i in range(cfg.num_layers)]
    if with_mtp and layout.mtp_layout is not None:
        out += [(f"{MTP_PREFIX}layers.{j}.mlp.", layout.mtp_layout) for j in range(cfg.mtp_num_hidden_layers)]
    return out


def load_experts(
    reader: CheckpointReader,
    cfg: ModelConfig,
    *,
    expert_ids: Sequence[Sequence[int]] | Sequence[int],
    dtype: torch.dtype,
    with_mtp: bool = True,
    layout: CheckpointLayout | None = None,
    device: torch.device | str = "cpu",
) -> ExpertShard:
    """The routed experts an expert rank holds, for every MoE layer (MTP layers after the decoder layers).

    Args:
        expert_ids: global expert ids, either one list for every layer or one list per MoE layer.
    Reads only those experts: per-expert tensors by name, fused tensors by `get_slice` rows; each is placed
    on `device` as it is read.
    """
    layout = layout or CheckpointLayout.detect(reader, cfg)
    ld = _Loader(reader, cfg, layout, dtype, device)
    prefixes = moe_layer_prefixes(cfg, layout, with_mtp=with_mtp)
    ids_list: list[Any] = list(expert_ids)  # one list of ids or one per layer, told apart here
    flat = not ids_list or isinstance(ids_list[0], int)
    per_layer = [list(ids_list)] * len(prefixes) if flat else [list(ids) for ids in ids_list]
    if len(per_layer) != len(prefixes):
        raise ValueError(f"expert_ids has {len(per_layer)} layer lists, the model has {len(prefixes)} MoE layers")
    layers = []
    for (mlp, kind), ids in zip(prefixes, per_layer):
        ids = sorted(set(ids))
        bad = [e for e in ids if not 0 <= e < cfg.num_experts]
        if bad:
            raise ValueError(f"expert ids {bad} out of range [0, {cfg.num_experts})")
        layers.append(_layer_experts(ld, mlp, kind, ids))
    return ExpertShard(layers, num_experts=cfg.num_experts)


def _layer_experts(ld: _Loader, mlp: str, kind: str, ids: list[int]) -> LayerExperts:
    x = f"{mlp}experts."
    if not ids:
        d, i = ld.cfg.hidden_size, ld.cfg.moe_intermediate_size
        return LayerExperts(
            (),
            torch.zeros(0, 2 * i, d, dtype=ld.dtype, device=ld.device),
            torch.zeros(0, d, i, dtype=ld.dtype, device=ld.device),
        )
    if kind == "fused":
        return LayerExperts(tuple(ids), ld.weight(f"{x}gate_up_proj", rows=ids), ld.weight(f"{x}down_proj", rows=ids))
    gate_up, down = [], []
    for e in ids:
        g, u = ld.weight(f"{x}{e}.gate_proj.weight"), ld.weight(f"{x}{e}.up_proj.weight")
        gate_up.append(concat_rows([g, u]) if isinstance(g, Fp8Weight) else torch.cat([g, u], dim=0))  # type: ignore[list-item]  # gate and up share one format
        down.append(ld.weight(f"{x}{e}.down_proj.weight"))
    if isinstance(gate_up[0], Fp8Weight):
        return LayerExperts(tuple(ids), stack(gate_up), stack(down))  # type: ignore[arg-type]  # all FP8 here
    return LayerExperts(tuple(ids), torch.stack(gate_up), torch.stack(down))  # type: ignore[arg-type]  # all plain here


def part_of(name: str) -> str:
    """The part ('trunk', 'experts', 'mtp', 'vision') a checkpoint tensor name belongs to."""
    if name.startswith(VISION_PREFIX):
        return "vision"
    if name.startswith(MTP_PREFIX):
        return "mtp"
    if re.search(r"\.mlp\.experts\.", name):
        return "experts"
    return "trunk"
