"""Published Qwen3.5-MoE models by name: their dimensions as our own data, so planning needs no download.

`epserve plan --model Qwen3.5-397B-A17B-FP8` builds the `ModelConfig` from this table instead of a
config.json. The numbers are the published architecture facts (model cards, the Hugging Face
configs, the parameter counts they imply); the FP8 releases add block-wise e4m3 weights with
128 x 128 blocks and the modules that stay bf16. Qwen3.5-122B-A10B is not listed: its DeltaNet head
counts, KV heads and shared-expert width could not be confirmed from public sources here.
Must not: read files or the network. Tests: tests/model_shards/test_published_models.py (field by
field against ../shared/configs where those exist; parameter totals against the published sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from model_shards.config import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    MULTIMODAL_MODEL_TYPE,
    ModelConfig,
    QuantConfig,
    VisionConfig,
)

# Modules the FP8 releases keep in bf16 (routers, DeltaNet's small projections and conv, embeddings,
# lm_head, the vision tower, the MTP fusion layer); matched as substrings of tensor names.
FP8_RELEASE_NOT_CONVERTED = (
    "lm_head",
    "model.language_model.embed_tokens",
    "mlp.gate",
    "mlp.shared_expert_gate",
    "linear_attn.in_proj_a",
    "linear_attn.in_proj_b",
    "linear_attn.conv1d",
    "model.visual",
    "mtp.fc",
)
FP8_RELEASE_BLOCK = (128, 128)
FP8_SUFFIX = "-FP8"
ORG_PREFIX = "Qwen/"


@dataclass(frozen=True)
class PublishedDims:
    """The dimensions that differ between the family's models (the rest is shared, see `_config`)."""

    total_params_b: float  # the published size, e.g. 397 for 397B (checked against the arithmetic in tests)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int


PUBLISHED: dict[str, PublishedDims] = {
    "Qwen3.5-397B-A17B": PublishedDims(
        total_params_b=397,
        hidden_size=4096,
        num_layers=60,
        num_attention_heads=32,
        num_key_value_heads=2,
        linear_num_key_heads=16,
        linear_num_value_heads=64,
        num_experts=512,
        num_experts_per_tok=10,
        moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024,
    ),
    "Qwen3.5-35B-A3B": PublishedDims(
        total_params_b=35,
        hidden_size=2048,
        num_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        num_experts=256,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    ),
}


def published_names() -> list[str]:
    """Every name `published_config` takes (BF16 and FP8 releases), without the `Qwen/` prefix."""
    return [n + suffix for n in PUBLISHED for suffix in ("", FP8_SUFFIX)]


def lookup(name: str) -> tuple[PublishedDims, bool] | None:
    """(dims, is FP8) for a published name (case-insensitive, `Qwen/` prefix optional), else None."""
    key = name.strip()
    if key.lower().startswith(ORG_PREFIX.lower()):
        key = key[len(ORG_PREFIX) :]
    fp8 = key.upper().endswith(FP8_SUFFIX)
    if fp8:
        key = key[: -len(FP8_SUFFIX)]
    for known, dims in PUBLISHED.items():
        if known.lower() == key.lower():
            return dims, fp8
    return None


def published_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a published model.

    Raises:
        KeyError: not a published name; the message lists the names.
    """
    found = lookup(name)
    if found is None:
        raise KeyError(f"{name!r} is not a published Qwen3.5-MoE model known here ({', '.join(published_names())})")
    return _config(*found)


def _config(d: PublishedDims, fp8: bool) -> ModelConfig:
    # Shared by the whole family: the Qwen3.5 tokenizer (vocabulary and special ids), 3 DeltaNet
    # layers then 1 gated-attention layer, 256-dim attention heads with a quarter rotary (MRoPE
    # 11/11/10), 128-dim DeltaNet heads, one MTP layer, 262144 positions, the 27-block vision tower.
    layer_types = tuple(LINEAR_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(d.num_layers))
    vision = VisionConfig(
        depth=27,
        hidden_size=1152,
        num_heads=16,
        intermediate_size=4304,
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        num_position_embeddings=2304,
        out_hidden_size=d.hidden_size,
    )
    quant = (
        QuantConfig(
            block_rows=FP8_RELEASE_BLOCK[0],
            block_cols=FP8_RELEASE_BLOCK[1],
            modules_to_not_convert=FP8_RELEASE_NOT_CONVERTED,
        )
        if fp8
        else None
    )
    return ModelConfig(
        vocab_size=248320,
        hidden_size=d.hidden_size,
        layer_types=layer_types,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads,
        head_dim=256,
        linear_num_key_heads=d.linear_num_key_heads,
        linear_num_value_heads=d.linear_num_value_heads,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        linear_conv_kernel_dim=4,
        num_experts=d.num_experts,
        num_experts_per_tok=d.num_experts_per_tok,
        moe_intermediate_size=d.moe_intermediate_size,
        shared_expert_intermediate_size=d.shared_expert_intermediate_size,
        rms_norm_eps=1e-6,
        rope_theta=10_000_000.0,
        partial_rotary_factor=0.25,
        mrope_section=(11, 11, 10),
        max_position_embeddings=262144,
        tie_word_embeddings=False,
        mtp_num_hidden_layers=1,
        eos_token_ids=(248044,),
        dtype="bfloat16",
        model_type=MULTIMODAL_MODEL_TYPE,
        vision=vision,
        image_token_id=248056,
        video_token_id=248057,
        vision_start_token_id=248053,
        vision_end_token_id=248054,
        quant=quant,
        extra={"mtp_use_dedicated_embeddings": False},
    )
