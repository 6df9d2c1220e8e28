"""Writes a small random-weight Qwen3.5-MoE checkpoint in exactly the real layout.

The embedded default model: real vocabulary (248320 rows, the Qwen3.5 tokenizer), small
hidden size, every part present (text, vision tower, MTP head), config.json with
text_config + vision_config, sharded safetensors with an index, generation_config.json,
tokenizer files with our ChatML template, and Qwen3.5's published
preprocessor_config.json / video_preprocessor_config.json. Tensor names and shapes come from the one table
in model_shards/weights.py. Experts fused (the BF16 release) or per expert (the FP8
release and HF saves); `fp8=True` stores block-quantised e4m3 weights with bf16 scales.
Tests: tests/model_shards/test_tiny_checkpoint.py (transformers loads it, zero missing keys).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_shards.config import FULL_ATTENTION, LINEAR_ATTENTION, from_hf_config
from model_shards.preprocessor_config import (
    IMAGE_FILE,
    QWEN35_IMAGE_PREPROCESSOR,
    QWEN35_VIDEO_PREPROCESSOR,
    VIDEO_FILE,
)
from model_shards.quant import quantize_blockwise
from model_shards.weights import MULTIMODAL_PREFIX, SCALE_SUFFIX, expected_tensors

# Bump when the written weights or files change: caches of the embedded model key on it.
GENERATOR_VERSION = "3"
SHARD_BYTES = 48 * 2**20

# The real Qwen3.5 FP8 release keeps these modules unquantised (read back from the config, never hard-coded).
FP8_NOT_CONVERTED = [
    "lm_head",
    "model.language_model.embed_tokens",
    "mlp.gate",
    "mlp.shared_expert_gate",
    "linear_attn.in_proj_a",
    "linear_attn.in_proj_b",
    "linear_attn.conv1d",
    "model.visual",
    "mtp.fc",
]


REAL_VOCAB = 248320  # the Qwen3.5 tokenizer's rows: a smaller vocabulary would cut off its (and the special) ids


@dataclass(frozen=True)
class CheckpointSizes:
    """The dims `epserve tiny-checkpoint` lets a user grow (defaults: the embedded model). Attention
    and DeltaNet head shapes stay fixed; every third linear layer is followed by a full-attention one."""

    layers: int = 8
    hidden_size: int = 128
    num_experts: int = 16
    moe_intermediate_size: int = 64
    shared_expert_intermediate_size: int = 128
    vocab_size: int = REAL_VOCAB

    def __post_init__(self) -> None:
        for name in ("layers", "hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts < TOP_K:
            raise ValueError(f"num_experts must be >= the top-k ({TOP_K}), got {self.num_experts}")
        if self.vocab_size < REAL_VOCAB:
            raise ValueError(f"vocab_size must be >= {REAL_VOCAB} (the tokenizer's ids), got {self.vocab_size}")


TOP_K = 4
# What `--target-gib` grows from when no dim is given: experts are added until the size is reached.
LARGE = CheckpointSizes(hidden_size=1024, moe_intermediate_size=512, shared_expert_intermediate_size=1024)


def tiny_config_dict(*, fp8: bool = False, sizes: CheckpointSizes | None = None) -> dict:
    """config.json of the embedded model: real vocabulary and special ids, small dims (or `sizes`)."""
    z = sizes or CheckpointSizes()
    layers = [LINEAR_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(z.layers)]
    cfg: dict = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "vocab_size": z.vocab_size,
            "hidden_size": z.hidden_size,
            "num_hidden_layers": z.layers,
            "layer_types": layers,
            "full_attention_interval": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "attn_output_gate": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 8,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "num_experts": z.num_experts,
            "num_experts_per_tok": TOP_K,
            "moe_intermediate_size": z.moe_intermediate_size,
            "shared_expert_intermediate_size": z.shared_expert_intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000000,
                "partial_rotary_factor": 0.25,
                "mrope_section": [3, 3, 2],
                "mrope_interleaved": True,
            },
            "mtp_num_hidden_layers": 1,
            "mtp_use_dedicated_embeddings": False,
            "mamba_ssm_dtype": "float32",
            "router_aux_loss_coef": 0.001,
            "output_router_logits": False,
            "use_cache": True,
            "initializer_range": 0.02,
            "eos_token_id": 248044,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
        },
        "vision_config": {
            "model_type": "qwen3_5_moe",
            "depth": 2,
            "hidden_size": 64,
            "num_heads": 4,
            "intermediate_size": 128,
            "hidden_act": "gelu_pytorch_tanh",
            "patch_size": 16,
            "temporal_patch_size": 2,
            "spatial_merge_size": 2,
            "in_channels": 3,
            "num_position_embeddings": 64,
            "out_hidden_size": z.hidden_size,
            "deepstack_visual_indexes": [],
            "initializer_range": 0.02,
        },
        "image_token_id": 248056,
        "video_token_id": 248057,
        "vision_start_token_id": 248053,
        "vision_end_token_id": 248054,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    if fp8:
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": list(FP8_NOT_CONVERTED),
        }
    return cfg


# max_thinking_tokens (read by model_shards/generation_config.py): random weights never write `</think>`, so
# without a budget every chat answer with thinking on would be reasoning only.
GENERATION_CONFIG = {
    "bos_token_id": 248044,
    "do_sample": True,
    "eos_token_id": [248046, 248044],
    "pad_token_id": 248044,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "max_thinking_tokens": 16,
}


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values by role: zero-centred norms near 0 (perturbed so `w` vs `1+w` shows),
    the gated norm near 1, DeltaNet decay parameters in HF's ranges, linears N(0, 0.02)."""

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    if name.endswith("linear_attn.norm.weight"):
        return 1.0 + normal(0.1)
    if name.endswith("A_log"):
        return torch.log(torch.rand(shape, generator=gen) * 15.99 + 0.01)
    if name.endswith("dt_bias"):
        return 1.0 + normal(0.2)
    if name.endswith("conv1d.weight"):
        return normal(0.3)
    if name.endswith(".bias"):
        return normal(0.02)
    if "norm" in name.rsplit(".", 2)[-2] and len(shape) == 1:
        # vision LayerNorms are plain w (init 1); text RMSNorms are zero-centred (init 0)
        return (1.0 + normal(0.1)) if name.startswith("model.visual.") else normal(0.1)
    return normal(0.02)


def checkpoint_bytes(sizes: CheckpointSizes, *, fp8: bool = False) -> int:
    """Bytes of the tensors `write_tiny_checkpoint` writes for these sizes (headers and tokenizer aside)."""
    cfg = from_hf_config(tiny_config_dict(fp8=fp8, sizes=sizes))
    total = 0
    for name, spec in expected_tensors(
        cfg, prefix=MULTIMODAL_PREFIX, layout="fused", mtp_layout="fused", vision=True
    ).items():
        n = math.prod(spec.shape)
        total += n * (4 if name.endswith("A_log") else 1 if spec.fp8 else 2)  # scales: bf16, listed as their own names
    return total


def sizes_for_target(target_gib: float, base: CheckpointSizes = LARGE, *, fp8: bool = False) -> CheckpointSizes:
    """`base` with the fewest experts (a multiple of 8, so expert ranks divide them) whose checkpoint
    holds at least `target_gib` GiB (bytes grow linearly in the expert count)."""
    one, two = (checkpoint_bytes(replace(base, num_experts=e), fp8=fp8) for e in (TOP_K, TOP_K + 1))
    per_expert = two - one
    need = max(TOP_K, TOP_K + math.ceil((target_gib * 2**30 - one) / per_expert))
    return replace(base, num_experts=-(-need // 8) * 8)


def write_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    expert_layout: str = "fused",
    fp8: bool = False,
    tokenizer: bool = True,
    cache_dir: str | Path | None = None,
    sizes: CheckpointSizes | None = None,
) -> Path:
    """Write the checkpoint folder and return its path.

    Args:
        expert_layout: "fused" or "per-expert".
        fp8: quantise linears (block 128 x 128, e4m3, bf16 scales) except `FP8_NOT_CONVERTED`.
        tokenizer: also write tokenizer.json / tokenizer_config.json (Qwen3.5 vocabulary).
        cache_dir: where the built tokenizer.json is cached (see model_shards/tokenizer_files.py).
        sizes: larger dims (default: the embedded model's). Shards are written as they fill, so memory
            stays near one shard whatever the total.
    """
    if expert_layout not in ("fused", "per-expert"):
        raise ValueError(f"expert layout must be 'fused' or 'per-expert', got {expert_layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw = tiny_config_dict(fp8=fp8, sizes=sizes)
    cfg = from_hf_config(raw)
    specs = expected_tensors(cfg, prefix=MULTIMODAL_PREFIX, layout=expert_layout, mtp_layout=expert_layout, vision=True)
    gen = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(out)
    for name, spec in specs.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        value = _init(name, spec.shape, gen)
        if name.endswith("A_log"):
            writer.add(name, value.float())  # the release stores A_log in F32
        elif spec.fp8:
            data, scale = quantize_blockwise(value, block=(128, 128))
            writer.add(name, data)
            writer.add(name + SCALE_SUFFIX, scale)
        else:
            writer.add(name, value.to(torch.bfloat16))
    writer.close()
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out / IMAGE_FILE).write_text(json.dumps(QWEN35_IMAGE_PREPROCESSOR, indent=2) + "\n")
    (out / VIDEO_FILE).write_text(json.dumps(QWEN35_VIDEO_PREPROCESSOR, indent=2) + "\n")
    if tokenizer:
        from model_shards.tokenizer_files import write_tokenizer_files

        write_tokenizer_files(out, cache_dir=cache_dir)
    return out


def _write_shards(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Shards of about SHARD_BYTES in name order, plus model.safetensors.index.json."""
    writer = _ShardWriter(out)
    for name in sorted(tensors):
        writer.add(name, tensors[name])
    writer.close()


class _ShardWriter:
    """Writes tensors into shards of about SHARD_BYTES as they come (one shard in memory at a time), then
    names the shards `model-0000i-of-0000n` and writes model.safetensors.index.json."""

    def __init__(self, out: Path) -> None:
        for old in out.glob("model*.safetensors*"):
            old.unlink()
        self.out = out
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > SHARD_BYTES:
            self._flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.out / f".shard-{len(self.shards):05d}.safetensors.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            path.rename(self.out / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def cache_root(explicit: str | Path | None = None) -> Path:
    """Where generated artefacts are cached: the argument, else $EPSERVE_CACHE_DIR, else ~/.cache/epserve."""
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("EPSERVE_CACHE_DIR") or Path.home() / ".cache" / "epserve")


def embedded_model(cache_dir: str | Path | None = None) -> Path:
    """The embedded default model, written once per generator version and reused."""
    root = cache_root(cache_dir)
    target = root / f"tiny-qwen3.5-moe-v{GENERATOR_VERSION}"
    if (target / ".complete").exists():
        return target
    tmp = root / f".tiny-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_checkpoint(tmp, seed=0, cache_dir=root)
    (tmp / ".complete").write_text(GENERATOR_VERSION + "\n")
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)  # atomic: concurrent writers each finish a whole folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | None, cache_dir: str | Path | None = None) -> str:
    """A checkpoint folder given by the user, or (None) the embedded model, written on first use.

    Every process that needs the embedded model resolves it itself: on another node the cached copy
    is written there (deterministic: same seed, same bytes)."""
    return str(embedded_model(cache_dir)) if model is None else str(model)
