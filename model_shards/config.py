"""The model configuration: one frozen dataclass built from a checkpoint's config.json.

Owns: mapping every HuggingFace key we use to a typed field (explicit defaults for absent
keys), validation with messages that name the offending value, and the `tiny()` factory
that keeps the structural ratios that catch bugs. Nothing else reads config.json.
Must not: import Ray or torch.distributed. Tests: tests/model_shards/test_config.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"
MULTIMODAL_MODEL_TYPE = "qwen3_5_moe"
TEXT_MODEL_TYPE = "qwen3_5_moe_text"
SUPPORTED_MODEL_TYPES = (MULTIMODAL_MODEL_TYPE, TEXT_MODEL_TYPE)


class ConfigError(ValueError):
    """A config.json that this code cannot serve; the message names the field and the fix."""


@dataclass(frozen=True)
class QuantConfig:
    """Block-wise FP8 weights (`quant_method: fp8`, e4m3, `weight_scale_inv` per block).

    `modules_to_not_convert` is read from the checkpoint, never hard-coded: a tensor whose
    name contains one of these module paths stays in the checkpoint dtype.
    """

    block_rows: int
    block_cols: int
    modules_to_not_convert: tuple[str, ...]
    activation_scheme: str = "dynamic"


@dataclass(frozen=True)
class VisionConfig:
    """The ViT tower (`vision_config`); see model_spec §4.1."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    num_position_embeddings: int
    out_hidden_size: int
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        side = int(round(self.num_position_embeddings**0.5))
        if side * side != self.num_position_embeddings:
            raise ConfigError(
                f"vision_config.num_position_embeddings {self.num_position_embeddings} is not a square grid"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3.5-MoE text model (plus optional vision/MTP/quantisation parts).

    Field names follow the math; `from_hf_config` maps the HuggingFace keys onto them.
    """

    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    mtp_num_hidden_layers: int = 0
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    model_type: str = MULTIMODAL_MODEL_TYPE
    vision: VisionConfig | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    quant: QuantConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- derived dims
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the causal conv: [q | k | v] of the DeltaNet mixer."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION)

    @property
    def num_moe_layers(self) -> int:
        """MoE blocks whose experts an expert rank holds: every decoder layer, plus the MTP layers."""
        return self.num_layers + self.mtp_num_hidden_layers

    @property
    def has_mtp(self) -> bool:
        return self.mtp_num_hidden_layers > 0

    # ----------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in (
            "vocab_size",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(len(self.layer_types) > 0, "layer_types is empty: the model has no layers")
        bad = sorted({t for t in self.layer_types if t not in (FULL_ATTENTION, LINEAR_ATTENTION)})
        need(not bad, f"layer_types has unknown entries {bad}; expected '{FULL_ATTENTION}' or '{LINEAR_ATTENTION}'")
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads {self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {self.num_key_value_heads}",
        )
        need(
            self.linear_num_value_heads % self.linear_num_key_heads == 0,
            f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
            f"linear_num_key_heads {self.linear_num_key_heads}",
        )
        need(
            self.num_experts_per_tok <= self.num_experts,
            f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_experts {self.num_experts}",
        )
        need(
            0.0 < self.partial_rotary_factor <= 1.0, f"partial_rotary_factor {self.partial_rotary_factor} not in (0, 1]"
        )
        need(self.rotary_dim % 2 == 0, f"rotary dim {self.rotary_dim} (head_dim x partial_rotary_factor) must be even")
        need(
            len(self.mrope_section) == 3 and sum(self.mrope_section) == self.rotary_dim // 2,
            f"mrope_section {list(self.mrope_section)} must have 3 entries summing to rotary_dim/2 = "
            f"{self.rotary_dim // 2}",
        )
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.mtp_num_hidden_layers >= 0, f"mtp_num_hidden_layers must be >= 0, got {self.mtp_num_hidden_layers}")
        need(
            self.dtype in ("bfloat16", "float16", "float32"),
            f"dtype {self.dtype!r} is not supported; expected bfloat16, float16 or float32",
        )

    # ----------------------------------------------------------------- helpers
    def with_overrides(self, **changes: Any) -> ModelConfig:  # noqa: ANN401
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# --------------------------------------------------------------------------- construction
def load_config_dict(path: str | Path) -> dict[str, Any]:
    """Read config.json from a checkpoint folder or a config file path."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise ConfigError(f"no config.json at {p}: a model is a local folder with config.json, tokenizer and weights")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON: {exc}") from exc


def from_hf_config(src: str | Path | dict[str, Any]) -> ModelConfig:
    """Build the config from a HuggingFace config.json (multimodal wrapper or bare text config).

    Args:
        src: a checkpoint folder, a path to config.json, or the parsed dict.
    Returns:
        The validated `ModelConfig`.
    Raises:
        ConfigError: unknown model_type, unsupported quantisation, missing or inconsistent fields.
    """
    raw = src if isinstance(src, dict) else load_config_dict(src)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"unknown model_type {model_type!r}: epserve serves {', '.join(SUPPORTED_MODEL_TYPES)} "
            "(Qwen3.5-MoE) checkpoints"
        )
    if model_type == MULTIMODAL_MODEL_TYPE:
        if not isinstance(raw.get("text_config"), dict):
            raise ConfigError("model_type qwen3_5_moe needs a text_config object in config.json")
        text = raw["text_config"]
        vision = _vision_from_hf(raw["vision_config"]) if isinstance(raw.get("vision_config"), dict) else None
        wrapper = raw
    else:
        text, vision, wrapper = raw, None, {}
    return _text_from_hf(text, wrapper=wrapper, vision=vision, model_type=model_type)


def _req(d: dict[str, Any], key: str, where: str) -> Any:  # noqa: ANN401
    if key not in d:
        raise ConfigError(f"config.json {where} is missing the required field {key!r}")
    return d[key]


def _text_from_hf(
    text: dict[str, Any], *, wrapper: dict[str, Any], vision: VisionConfig | None, model_type: str
) -> ModelConfig:
    where = "text_config" if wrapper else "(top level)"
    num_layers = int(_req(text, "num_hidden_layers", where))
    layer_types = text.get("layer_types")
    if layer_types is None:
        # HF default: every `full_attention_interval`-th layer is full attention.
        interval = int(text.get("full_attention_interval", 4))
        layer_types = [LINEAR_ATTENTION if (i + 1) % interval else FULL_ATTENTION for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ConfigError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is {num_layers}")
    if text.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {text.get('hidden_act')!r} is not supported; Qwen3.5-MoE uses 'silu'")
    if text.get("attention_bias", False):
        raise ConfigError("attention_bias=true is not supported; Qwen3.5-MoE attention has no biases")
    if text.get("attn_output_gate", True) is not True:
        raise ConfigError("attn_output_gate=false is not supported; Qwen3.5-MoE gates every attention output")

    rope = dict(text.get("rope_parameters") or {})
    # Older configs keep rope keys at the top level of text_config.
    for key in ("rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved", "rope_type"):
        if key not in rope and key in text:
            rope[key] = text[key]
    if isinstance(text.get("rope_scaling"), dict):
        for key, value in text["rope_scaling"].items():
            rope.setdefault(key, value)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only the default MRoPE of Qwen3.5)")
    if rope.get("mrope_interleaved", True) is not True:
        raise ConfigError("mrope_interleaved=false is not supported; Qwen3.5 interleaves the MRoPE axes")
    mrope_section = tuple(int(x) for x in rope.get("mrope_section", (11, 11, 10)))

    eos = text.get("eos_token_id", wrapper.get("eos_token_id"))
    eos_ids = tuple(int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    tie = bool(text.get("tie_word_embeddings", wrapper.get("tie_word_embeddings", False)))
    dtype = (
        text.get("dtype") or text.get("torch_dtype") or wrapper.get("dtype") or wrapper.get("torch_dtype") or "bfloat16"
    )

    return ModelConfig(
        vocab_size=int(_req(text, "vocab_size", where)),
        hidden_size=int(_req(text, "hidden_size", where)),
        layer_types=tuple(layer_types),
        num_attention_heads=int(_req(text, "num_attention_heads", where)),
        num_key_value_heads=int(_req(text, "num_key_value_heads", where)),
        # HF default head_dim is 256 for this family.
        head_dim=int(text.get("head_dim", 256)),
        linear_num_key_heads=int(_req(text, "linear_num_key_heads", where)),
        linear_num_value_heads=int(_req(text, "linear_num_value_heads", where)),
        linear_key_head_dim=int(_req(text, "linear_key_head_dim", where)),
        linear_value_head_dim=int(_req(text, "linear_value_head_dim", where)),
        linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
        num_experts=int(_req(text, "num_experts", where)),
        num_experts_per_tok=int(_req(text, "num_experts_per_tok", where)),
        moe_intermediate_size=int(_req(text, "moe_intermediate_size", where)),
        shared_expert_intermediate_size=int(_req(text, "shared_expert_intermediate_size", where)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", 10_000_000)),
        # HF assigns 0.25 when the key is absent (backward compatibility).
        partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.25)),
        mrope_section=mrope_section,  # type: ignore[arg-type]  # length checked in __post_init__
        max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
        tie_word_embeddings=tie,
        # Absent means the checkpoint ships no MTP head.
        mtp_num_hidden_layers=int(text.get("mtp_num_hidden_layers", 0)),
        eos_token_ids=eos_ids,
        dtype=str(dtype),
        model_type=model_type,
        vision=vision,
        image_token_id=wrapper.get("image_token_id"),
        video_token_id=wrapper.get("video_token_id"),
        vision_start_token_id=wrapper.get("vision_start_token_id"),
        vision_end_token_id=wrapper.get("vision_end_token_id"),
        quant=_quant_from_hf(wrapper.get("quantization_config") or text.get("quantization_config")),
        extra={"mtp_use_dedicated_embeddings": bool(text.get("mtp_use_dedicated_embeddings", False))},
    )


def _vision_from_hf(v: dict[str, Any]) -> VisionConfig:
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(_req(v, "depth", "vision_config")),
        hidden_size=int(_req(v, "hidden_size", "vision_config")),
        num_heads=int(_req(v, "num_heads", "vision_config")),
        intermediate_size=int(_req(v, "intermediate_size", "vision_config")),
        hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
        patch_size=int(v.get("patch_size", 16)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        in_channels=int(v.get("in_channels", 3)),
        num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
        out_hidden_size=int(_req(v, "out_hidden_size", "vision_config")),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


def _quant_from_hf(q: dict[str, Any] | None) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(
            f"quantization method {method!r} is not supported; epserve loads block-wise FP8 "
            "(quant_method 'fp8', e4m3, weight_scale_inv) or unquantised checkpoints"
        )
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"FP8 format {fmt!r} is not supported; only e4m3 (float8_e4m3fn) weights are")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(
            f"quantization_config.weight_block_size must be [rows, cols] (e.g. [128, 128]), got {block!r}; "
            "per-tensor FP8 scales are not supported"
        )
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"FP8 activation_scheme {scheme!r} is not supported; only 'dynamic'")
    return QuantConfig(
        block_rows=block[0],
        block_cols=block[1],
        modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()),
        activation_scheme=scheme,
    )


# --------------------------------------------------------------------------- factories
def tiny(**overrides: Any) -> ModelConfig:  # noqa: ANN401
    """A small config that keeps every structural ratio that hides bugs in the real one.

    Linear:full = 3:1 layers, GQA 4:1, DeltaNet value heads = 4 x key heads with key dim !=
    value dim, partial rotary (16 of 64 dims, MRoPE [3, 3, 2]), shared expert wider than a
    routed expert, top-4 of 16 experts (divisible by expert-parallel sizes 1, 2, 4), MTP.
    """
    base = dict(
        vocab_size=1024,
        hidden_size=128,
        layer_types=tuple(LINEAR_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(8)),
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        linear_conv_kernel_dim=4,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        rms_norm_eps=1e-6,
        rope_theta=1e7,
        partial_rotary_factor=0.25,
        mrope_section=(3, 3, 2),
        max_position_embeddings=4096,
        mtp_num_hidden_layers=1,
        eos_token_ids=(1,),
        dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]  # keys above are the dataclass fields
