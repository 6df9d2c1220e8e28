"""Test oracle helpers: random Qwen3.5-MoE checkpoints that transformers itself saves.

transformers is imported here, in tests only (model and serving code never import it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# model_spec §7.1 tiny config, with DeltaNet key dim != value dim and shared width != expert width.
TEXT = dict(
    vocab_size=1024,
    hidden_size=256,
    num_hidden_layers=8,
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
    rope_parameters=dict(
        rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25, mrope_section=[3, 3, 2], mrope_interleaved=True
    ),
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    eos_token_id=1,
)
VISION = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,
    intermediate_size=128,
    out_hidden_size=256,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=64,
)


def save_random_hf_checkpoint(out: Path, *, seed: int = 0, text_overrides: dict | None = None) -> Path:
    """Build a random `Qwen3_5MoeForConditionalGeneration`, perturb what init leaves degenerate, save it.

    Zero-centred norms init to 0 (hides `w` vs `1 + w`) and the gated norm to 1: both get noise;
    A_log / dt_bias too. Saved with transformers' own `save_pretrained` (per-expert names).
    """
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    text = {**TEXT, **(text_overrides or {})}
    cfg = Qwen3_5MoeConfig(
        text_config=text,
        vision_config=VISION,
        image_token_id=1001,
        video_token_id=1002,
        vision_start_token_id=1003,
        vision_end_token_id=1004,
        tie_word_embeddings=False,
    )
    model = Qwen3_5MoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name and p.ndim == 1) or "A_log" in name or "dt_bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)  # spread router logits: no near-ties in top-k
    model.save_pretrained(out)
    return out


def fuse_experts(src: Path, dst: Path) -> Path:
    """Rewrite a per-expert checkpoint into the fused layout (experts.gate_up_proj / down_proj)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    e = cfg["text_config"]["num_experts"]
    out, layers = {}, set()
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            layers.add(name.split(".mlp.experts.")[0])
        else:
            out[name] = t
    for base in layers:
        x = f"{base}.mlp.experts."
        out[f"{x}gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{x}{j}.gate_proj.weight"], tensors[f"{x}{j}.up_proj.weight"]]) for j in range(e)]
        )
        out[f"{x}down_proj"] = torch.stack([tensors[f"{x}{j}.down_proj.weight"] for j in range(e)])
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "generation_config.json"):
        if (src / f).exists():
            (dst / f).write_text((src / f).read_text())
    return dst


def hf_causal_lm(folder: Path, *, dtype: torch.dtype = torch.float32, experts: str = "eager"):  # noqa: ANN201
    """transformers' text model on the folder, eager attention (the bit-parity reference)."""
    from transformers import Qwen3_5MoeForCausalLM

    return Qwen3_5MoeForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager", experts_implementation=experts
    ).eval()
