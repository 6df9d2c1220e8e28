"""`from_hf_config` and `tiny()`: the 397B configs give model_spec §1.1's dims; bad configs fail clearly.

Proves: the reconstructed Qwen3.5-397B-A17B config.json files (BF16 and FP8, multimodal
wrapper) map to the documented dims, including FP8 block size and the file's own
`modules_to_not_convert`; a bare text config and a config without `layer_types` work;
unsupported inputs raise `ConfigError` naming the offending field; `tiny()` keeps the
structural ratios that hide bugs. Reads ../shared/configs next to the repository.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from model_shards.config import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    ConfigError,
    ModelConfig,
    from_hf_config,
    tiny,
)

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"
BF16_FILE = CONFIGS / "qwen3.5-397b-a17b.config.json"
FP8_FILE = CONFIGS / "qwen3.5-397b-a17b-fp8.config.json"

needs_configs = pytest.mark.skipif(
    not (BF16_FILE.exists() and FP8_FILE.exists()),
    reason=f"the reconstructed 397B config.json files are not at {CONFIGS} (shared/ folder absent)",
)


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _check_397b_dims(cfg: ModelConfig) -> None:
    """model_spec §1.1 / §2 dims of Qwen3.5-397B-A17B."""
    assert cfg.num_layers == 60
    assert cfg.attention_layers == tuple(range(3, 60, 4)) and len(cfg.attention_layers) == 15
    assert len(cfg.linear_layers) == 45 and cfg.linear_layers[:4] == (0, 1, 2, 4)
    assert (cfg.vocab_size, cfg.hidden_size) == (248320, 4096)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 2, 256)
    assert cfg.rotary_dim == 64 and cfg.mrope_section == (11, 11, 10) and cfg.rope_theta == 1e7
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (16, 64)
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim) == (128, 128, 4)
    assert (cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_conv_dim) == (2048, 8192, 12288)
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (512, 10)
    assert (cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (1024, 1024)
    assert cfg.rms_norm_eps == 1e-6 and cfg.max_position_embeddings == 262144
    assert cfg.mtp_num_hidden_layers == 1 and cfg.num_moe_layers == 61
    assert cfg.tie_word_embeddings is False and cfg.dtype == "bfloat16"
    assert cfg.eos_token_ids == (248044,)


# ============================================================================== real configs
@needs_configs
def test_397b_bf16_config() -> None:
    cfg = from_hf_config(BF16_FILE)
    _check_397b_dims(cfg)
    assert cfg.model_type == "qwen3_5_moe" and cfg.quant is None
    assert cfg.vision is not None and (cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.out_hidden_size) == (
        27,
        1152,
        4096,
    )
    assert (cfg.image_token_id, cfg.video_token_id) == (248056, 248057)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (248053, 248054)


@needs_configs
def test_397b_fp8_config_reads_block_size_and_unconverted_modules_from_the_file() -> None:
    raw = _load(FP8_FILE)
    cfg = from_hf_config(FP8_FILE)
    _check_397b_dims(cfg)
    assert cfg.quant is not None
    assert (cfg.quant.block_rows, cfg.quant.block_cols) == (128, 128)
    assert cfg.quant.activation_scheme == "dynamic"
    assert cfg.quant.modules_to_not_convert == tuple(raw["quantization_config"]["modules_to_not_convert"])
    # read, not hard-coded: a different list in the file comes through as is
    raw["quantization_config"]["modules_to_not_convert"] = ["lm_head", "something.else"]
    assert from_hf_config(raw).quant.modules_to_not_convert == ("lm_head", "something.else")


@needs_configs
def test_config_folder_and_dict_give_the_same_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(BF16_FILE.read_text())
    assert from_hf_config(tmp_path) == from_hf_config(_load(BF16_FILE)) == from_hf_config(BF16_FILE)


@needs_configs
def test_bare_text_config() -> None:
    """The text_config on its own (model_type qwen3_5_moe_text, as Qwen3_5MoeForCausalLM saves it)."""
    cfg = from_hf_config(copy.deepcopy(_load(BF16_FILE)["text_config"]))
    _check_397b_dims(cfg)
    assert cfg.model_type == "qwen3_5_moe_text"
    assert cfg.vision is None and cfg.image_token_id is None and cfg.quant is None


@needs_configs
@pytest.mark.parametrize("interval,layers", [(4, 60), (2, 6)], ids=["interval4-60layers", "interval2-6layers"])
def test_layer_types_absent_follow_full_attention_interval(interval: int, layers: int) -> None:
    raw = _load(BF16_FILE)
    text = raw["text_config"]
    del text["layer_types"]
    text["full_attention_interval"] = interval
    text["num_hidden_layers"] = layers
    cfg = from_hf_config(raw)
    want = tuple(FULL_ATTENTION if (i + 1) % interval == 0 else LINEAR_ATTENTION for i in range(layers))
    assert cfg.layer_types == want
    assert cfg.attention_layers == tuple(range(interval - 1, layers, interval))


def test_transformers_text_config_round_trip() -> None:
    """A config transformers itself writes (Qwen3_5MoeTextConfig.to_dict) maps field for field."""
    from transformers import Qwen3_5MoeTextConfig

    hf = Qwen3_5MoeTextConfig(
        vocab_size=1024,
        hidden_size=128,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=1e7,
            partial_rotary_factor=0.25,
            mrope_section=[3, 3, 2],
            mrope_interleaved=True,
        ),
    )
    cfg = from_hf_config(hf.to_dict())
    assert cfg.layer_types == tuple(hf.layer_types)
    assert cfg.attention_layers == (3, 7)
    assert cfg.rotary_dim == 16 and cfg.mrope_section == (3, 3, 2)
    assert (cfg.linear_conv_dim, cfg.num_experts, cfg.num_experts_per_tok) == (2 * 64 + 8 * 48, 16, 4)


# ============================================================================== errors
def _text(**changes: Any) -> dict[str, Any]:  # noqa: ANN401
    """A valid bare text config (tiny dims), with changes; a value of None deletes the key."""
    base: dict[str, Any] = dict(
        model_type="qwen3_5_moe_text",
        vocab_size=1024,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=48,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=1e7,
            partial_rotary_factor=0.25,
            mrope_section=[3, 3, 2],
            mrope_interleaved=True,
        ),
    )
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def _fp8(**changes: Any) -> dict[str, Any]:  # noqa: ANN401
    q = dict(
        quant_method="fp8",
        fmt="e4m3",
        activation_scheme="dynamic",
        weight_block_size=[128, 128],
        modules_to_not_convert=["lm_head"],
    )
    q.update(changes)
    return {k: v for k, v in q.items() if v is not None}


def test_valid_base_config_builds() -> None:
    assert from_hf_config(_text()).num_layers == 4
    assert from_hf_config(_text(quantization_config=_fp8())).quant.block_rows == 128


@pytest.mark.parametrize(
    "raw,match",
    [
        (_text(model_type="llama"), r"unknown model_type 'llama'"),
        (_text(model_type=None), r"unknown model_type None"),
        (_text(quantization_config=_fp8(quant_method="awq")), r"quantization method 'awq' is not supported"),
        (
            _text(quantization_config=_fp8(weight_block_size=None)),
            r"weight_block_size must be \[rows, cols\].*per-tensor FP8 scales are not supported",
        ),
        (_text(quantization_config=_fp8(fmt="e5m2")), r"FP8 format 'e5m2' is not supported"),
        (
            _text(rope_parameters=dict(rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[3, 3, 3])),
            r"mrope_section \[3, 3, 3\] must have 3 entries summing to rotary_dim/2 = 8",
        ),
        (
            _text(num_attention_heads=6, num_key_value_heads=4),
            r"num_attention_heads 6 is not a multiple of num_key_value_heads 4",
        ),
        (_text(linear_num_key_heads=3), r"linear_num_value_heads 8 is not a multiple of linear_num_key_heads 3"),
        (_text(hidden_size=None), r"missing the required field 'hidden_size'"),
        (_text(num_experts=None), r"missing the required field 'num_experts'"),
        ({"model_type": "qwen3_5_moe"}, r"needs a text_config"),
        (
            {"model_type": "qwen3_5_moe", "text_config": _text(vocab_size=None)},
            r"text_config is missing the required field 'vocab_size'",
        ),
        (_text(layer_types=["linear_attention"] * 3), r"layer_types has 3 entries but num_hidden_layers is 4"),
        (
            _text(layer_types=["linear_attention"] * 3 + ["sliding_attention"]),
            r"layer_types has unknown entries \['sliding_attention'\]",
        ),
        (_text(num_experts_per_tok=17), r"num_experts_per_tok 17 exceeds num_experts 16"),
        (_text(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    ],
    ids=[
        "unknown-model-type",
        "missing-model-type",
        "awq-quant",
        "per-tensor-fp8",
        "fp8-e5m2",
        "mrope-sum",
        "attention-heads-not-divisible",
        "linear-heads-not-divisible",
        "missing-hidden-size",
        "missing-num-experts",
        "wrapper-without-text-config",
        "wrapper-missing-field",
        "layer-types-length",
        "layer-types-unknown",
        "top-k-above-experts",
        "hidden-act",
    ],
)
def test_config_errors_name_the_field(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_hf_config(copy.deepcopy(raw))


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config.json at"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        from_hf_config(tmp_path)


# ============================================================================== tiny()
def test_tiny_keeps_the_structural_ratios() -> None:
    cfg = tiny()
    assert cfg.layer_types[:4] == (LINEAR_ATTENTION,) * 3 + (FULL_ATTENTION,)
    assert cfg.attention_layers == (3, 7)
    assert cfg.num_attention_heads // cfg.num_key_value_heads == 4  # GQA 4:1
    assert cfg.linear_num_value_heads // cfg.linear_num_key_heads == 4  # value heads = 4 x key heads
    assert cfg.linear_key_head_dim != cfg.linear_value_head_dim
    assert 0 < cfg.rotary_dim < cfg.head_dim and sum(cfg.mrope_section) == cfg.rotary_dim // 2
    assert cfg.shared_expert_intermediate_size != cfg.moe_intermediate_size
    assert cfg.num_experts_per_tok > 1 and cfg.num_experts % 4 == 0
    assert cfg.has_mtp
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        tiny(num_key_value_heads=3)
