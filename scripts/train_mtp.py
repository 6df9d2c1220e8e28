#!/usr/bin/env python
"""Train a small Qwen3.5-MoE checkpoint (main model + MTP head) on CPU, on the standard library's source.

Writes a checkpoint folder in the real layout (text config with `mtp_num_hidden_layers: 1`;
`model.language_model.*`, `lm_head.weight` and `mtp.*` in sharded safetensors with an index, fused
experts, fp32; generation_config.json; a byte-level tokenizer) that `LocalModel.load` serves, so that
speculative-decoding acceptance can be measured on a model whose drafts can be right.
Training runs a thin autograd forward over leaf tensors named as in the checkpoint, built from the
model_shards block functions (zero-centred and gated RMSNorm, MRoPE, l2norm, routing, shared expert,
grouped expert FFN + slot combine). model_shards' mixers write KV/state pools in place and its chunked
delta rule updates saved buffers in place (`k_beta.mul_`, `_exp_lower`), which autograd rejects, so
attention (SDPA, causal, no cache), the causal conv and the chunked delta rule (op for op as
`delta_rule.chunk_gated_delta_rule`, out of place) are written here. The folder is then loaded back
with LocalModel, which must reproduce the training forward's logits (max diff printed), and it
measures held-out accuracy and k=1 greedy MTP acceptance. Usage: scripts/README-train_mtp.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from model_shards.batch import SeqChunk, StepBatch
from model_shards.config import FULL_ATTENTION, LINEAR_ATTENTION, ModelConfig, from_hf_config
from model_shards.delta_rule import CHUNK, l2norm
from model_shards.experts import ExpertShard, LayerExperts, local_routed_experts
from model_shards.model import LocalModel
from model_shards.moe import SharedMoEWeights, route, shared_expert
from model_shards.norms import rms_norm_gated, rms_norm_zc
from model_shards.rope import apply_partial_rope, inv_frequencies, mrope_cos_sin
from model_shards.tiny_checkpoint import _write_shards
from model_shards.tokenizer import TOKENIZER_CONFIG_JSON, TOKENIZER_JSON
from model_shards.tokenizer import Tokenizer as ServingTokenizer
from model_shards.tokenizer_files import byte_to_unicode, chat_template_text
from model_shards.weights import MULTIMODAL_PREFIX, expected_tensors

# Byte-level vocabulary: token id b is byte b; special tokens follow; the embedding is padded to 264 rows.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOT, IM_END = 256, 258
VOCAB_SIZE = 264
P = MULTIMODAL_PREFIX

# Corpus: stdlib *.py outside test folders; every HELDOUT_EVERY-th file (sorted path order) is held out.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
MAX_FILE_BYTES = 400_000  # skips data-like modules (pydoc_data/topics.py)
HELDOUT_EVERY = 10

AUX_COEF = 0.01  # Switch-style load-balancing loss on every router
WARMUP_STEPS = 20
BLOCK_SIZE = 64  # KV block size used for the LocalModel passes


def text_config() -> dict:
    """config.json: a bare `qwen3_5_moe_text` config (no vision tower), 3:1 linear/full layers, MTP."""
    layers = [LINEAR_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(8)]
    return {
        "architectures": ["Qwen3_5MoeForCausalLM"],
        "model_type": "qwen3_5_moe_text",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "num_hidden_layers": 8,
        "layer_types": layers,
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attn_output_gate": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 8,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "mamba_ssm_dtype": "float32",
        "router_aux_loss_coef": AUX_COEF,
        "output_router_logits": False,
        "use_cache": True,
        "initializer_range": 0.02,
        "eos_token_id": EOT,
        "pad_token_id": EOT,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


GENERATION_CONFIG = {
    "bos_token_id": EOT,
    "do_sample": True,
    "eos_token_id": [IM_END, EOT],
    "pad_token_id": EOT,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
}


# ------------------------------------------------------------------------------ corpus
def stdlib_files() -> list[Path]:
    """The standard library's *.py files (outside test folders, at most MAX_FILE_BYTES), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and 0 < p.stat().st_size <= MAX_FILE_BYTES
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def token_stream(files: list[Path]) -> torch.Tensor:
    """[N] int16: the files' bytes (= token ids), each file followed by <|endoftext|>."""
    eot = torch.tensor([EOT], dtype=torch.int16)
    parts = []
    for f in files:
        parts += [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8).to(torch.int16), eot]
    return torch.cat(parts)


def random_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[n, length] int64 windows at random offsets."""
    starts = torch.randint(0, stream.numel() - length, (n,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


def spread_windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """[n, length] int64 windows at evenly spaced offsets (deterministic held-out set)."""
    starts = torch.linspace(0, stream.numel() - length, n).long()
    return torch.stack([stream[s : s + length] for s in starts.tolist()]).long()


# ------------------------------------------------------------------------------ checkpoint files
def write_tokenizer(out: Path) -> None:
    """A `tokenizers` ByteLevel BPE with no merges (id = byte value) plus SPECIAL_TOKENS, and its config."""
    to_unicode = byte_to_unicode()
    tok = Tokenizer(BPE({to_unicode[b]: b for b in range(256)}, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != EOT + i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {EOT + i}")
    tok.save(str(out / TOKENIZER_JSON))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": chat_template_text(),
        "added_tokens_decoder": {
            str(EOT + i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    (out / TOKENIZER_CONFIG_JSON).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def write_checkpoint(out: Path, params: dict[str, torch.Tensor], raw_config: dict) -> None:
    """Shards + index (model_shards.tiny_checkpoint's writer), config, generation config, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, {name: p.detach().clone() for name, p in params.items()})
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    write_tokenizer(out)


# ------------------------------------------------------------------------------ parameters
def init_params(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Leaf fp32 tensors requiring grad, one per checkpoint tensor (names from `expected_tensors`).

    Zero-centred norms start at 0 (scale 1), the gated norm at 1, A_log = log U(1, 16) and dt_bias =
    softplus^-1 of a log-uniform dt in [1e-3, 0.1] (HF's init), conv U(+-1/sqrt(kernel)), linears
    N(0, 0.02) with output projections scaled by 1/sqrt(2 * layers).
    """
    specs = expected_tensors(cfg, prefix=P, layout="fused", mtp_layout="fused", vision=False)
    out_std = 0.02 / math.sqrt(2 * (cfg.num_layers + cfg.mtp_num_hidden_layers))
    params = {}
    for name, spec in specs.items():
        shape = spec.shape
        if name.endswith("linear_attn.norm.weight"):
            value = torch.ones(shape)
        elif name.endswith("A_log"):
            value = torch.log(1 + 15 * torch.rand(shape, generator=gen))
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.rand(shape, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            value = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("conv1d.weight"):
            bound = shape[-1] ** -0.5
            value = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        elif len(shape) == 1:
            value = torch.zeros(shape)
        elif name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight", "experts.down_proj")):
            value = torch.randn(shape, generator=gen) * out_std
        else:
            value = torch.randn(shape, generator=gen) * 0.02
        params[name] = value.float().requires_grad_()
    return params


# ------------------------------------------------------------------------------ training forward
def chunk_delta_rule(
    q_BTHK: torch.Tensor, *, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, g_BTH: torch.Tensor, beta_BTH: torch.Tensor
) -> torch.Tensor:
    """`delta_rule.chunk_gated_delta_rule` from a zero state, out of place so autograd can run through it.

    Same ops in the same order (chunk-major layout, UT transform by solve_triangular, q scaled by
    K**-0.5, q/k on key heads broadcast over value heads). Returns out [B, T, H, V] fp32.
    """
    b, t, hk, kd = q_BTHK.shape
    h, vd = v_BTHV.shape[2:]
    r = h // hk
    pad = (CHUNK - t % CHUNK) % CHUNK
    n = (t + pad) // CHUNK

    def chunk_major(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, heads, D] -> [n, B, heads, C, D]
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.reshape(b, n, CHUNK, heads, -1).permute(1, 0, 3, 2, 4).float().contiguous()

    q = (l2norm(chunk_major(q_BTHK, hk)) * kd**-0.5).unsqueeze(3)  # [n, B, Hk, 1, C, K]
    k = l2norm(chunk_major(k_BTHK, hk)).unsqueeze(3)
    v = chunk_major(v_BTHV, h).view(n, b, hk, r, CHUNK, vd)
    beta = chunk_major(beta_BTH.unsqueeze(-1), h).view(n, b, hk, r, CHUNK, 1)
    gamma = chunk_major(g_BTH.unsqueeze(-1), h).view(n, b, hk, r, CHUNK).cumsum(dim=-1)
    v_beta, k_beta = v * beta, k * beta
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool).triu(1)
    decay = (gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    a_mat = (k_beta @ k.transpose(-1, -2)) * decay
    qk = (q @ k.transpose(-1, -2)) * decay
    gamma_exp = gamma.exp().unsqueeze(-1)
    u = torch.linalg.solve_triangular(a_mat, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(a_mat, k_beta * gamma_exp, upper=False, unitriangular=True)
    state = q.new_zeros(b, hk, r, kd, vd)
    q = q * gamma_exp
    k_t = (k * (gamma[..., -1:] - gamma).exp().unsqueeze(-1)).transpose(-1, -2)
    chunk_decay = gamma[..., -1].exp()[..., None, None]
    outs = []
    for i in range(n):
        v_new = u[i] - w[i] @ state
        outs.append(q[i] @ state + qk[i] @ v_new)
        state = state * chunk_decay[i] + k_t[i] @ v_new
    out = torch.stack(outs).view(n, b, h, CHUNK, vd).permute(1, 0, 3, 2, 4).reshape(b, n * CHUNK, h, vd)
    return out[:, :t]


class TrainForward:
    """The model's forward (trunk and MTP head) with autograd over `params` (checkpoint names -> leaf tensors).

    Args:
        params: from `init_params`; updated in place by the optimiser.
        cfg: the model config.
        seq_len: tokens per window (RoPE tables are built once for positions 0..seq_len-1).
    """

    def __init__(self, params: dict[str, torch.Tensor], cfg: ModelConfig, *, seq_len: int) -> None:
        self.p, self.cfg = params, cfg
        inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        positions = torch.arange(seq_len).expand(3, seq_len)
        self.cos, self.sin = mrope_cos_sin(
            positions, inv_freq=inv_freq, mrope_section=cfg.mrope_section, dtype=torch.float32
        )
        moe_prefixes = [f"{P}layers.{i}.mlp." for i in range(cfg.num_layers)] + ["mtp.layers.0.mlp."]
        every = tuple(range(cfg.num_experts))
        self.experts = ExpertShard(
            [
                LayerExperts(every, params[f"{m}experts.gate_up_proj"], params[f"{m}experts.down_proj"])
                for m in moe_prefixes
            ],
            num_experts=cfg.num_experts,
        )

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return rms_norm_zc(x, weight=self.p[name], eps=self.cfg.rms_norm_eps)

    def trunk(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final-normed hidden [B, T, D] of every token and the summed router balance loss."""
        x = F.embedding(ids_BT, self.p[f"{P}embed_tokens.weight"])
        aux = x.new_zeros(())
        for i, kind in enumerate(self.cfg.layer_types):
            x, a = self.layer(x, f"{P}layers.{i}.", moe_layer=i, attention=kind == FULL_ATTENTION)
            aux = aux + a
        return self.norm(x, f"{P}norm.weight"), aux

    def mtp(self, hidden_BTD: torch.Tensor, next_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP-normed output [B, T, D] at slot t from (h_t, x_{t+1}), position t (model_spec §3.2)."""
        e = F.embedding(next_ids_BT, self.p[f"{P}embed_tokens.weight"])
        u_in = torch.cat(
            [self.norm(e, "mtp.pre_fc_norm_embedding.weight"), self.norm(hidden_BTD, "mtp.pre_fc_norm_hidden.weight")],
            dim=-1,
        )
        u, aux = self.layer(
            F.linear(u_in, self.p["mtp.fc.weight"]), "mtp.layers.0.", moe_layer=self.cfg.num_layers, attention=True
        )
        return self.norm(u, "mtp.norm.weight"), aux

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.p["lm_head.weight"])

    def layer(
        self, x: torch.Tensor, base: str, *, moe_layer: int, attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm decoder layer (trunk.py's `decoder_layer`); returns its output and router balance loss."""
        h_in = self.norm(x, f"{base}input_layernorm.weight")
        h = x + (self.attention(h_in, f"{base}self_attn.") if attention else self.deltanet(h_in, f"{base}linear_attn."))
        m_in = self.norm(h, f"{base}post_attention_layernorm.weight")
        y, aux = self.moe(m_in.reshape(-1, x.shape[-1]), f"{base}mlp.", moe_layer)
        return h + y.view_as(h), aux

    def attention(self, x: torch.Tensor, a: str) -> torch.Tensor:
        """Gated attention (gated_attention.py's math) over whole windows: causal SDPA, no cache."""
        cfg, p = self.cfg, self.p
        b, t, _ = x.shape
        h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        query, gate = F.linear(x, p[f"{a}q_proj.weight"]).view(b, t, h, 2 * hd).chunk(2, dim=-1)
        q = self.norm(query, f"{a}q_norm.weight")
        k = self.norm(F.linear(x, p[f"{a}k_proj.weight"]).view(b, t, hkv, hd), f"{a}k_norm.weight")
        v = F.linear(x, p[f"{a}v_proj.weight"]).view(b, t, hkv, hd)
        q = apply_partial_rope(q, cos=self.cos[:t], sin=self.sin[:t])
        k = apply_partial_rope(k, cos=self.cos[:t], sin=self.sin[:t])
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=hd**-0.5, enable_gqa=True
        )  # q head j reads kv head j // (h/hkv)
        o = o.transpose(1, 2).reshape(b, t, h * hd) * torch.sigmoid(gate.reshape(b, t, h * hd))
        return F.linear(o, p[f"{a}o_proj.weight"])

    def deltanet(self, x: torch.Tensor, g: str) -> torch.Tensor:
        """Gated DeltaNet (gated_deltanet.py's math) from a fresh state: conv with zero left context."""
        cfg, p = self.cfg, self.p
        b, t, _ = x.shape
        qkv = F.linear(x, p[f"{g}in_proj_qkv.weight"])
        z = F.linear(x, p[f"{g}in_proj_z.weight"])
        beta = F.linear(x, p[f"{g}in_proj_b.weight"]).sigmoid()
        decay = -p[f"{g}A_log"].exp() * F.softplus(F.linear(x, p[f"{g}in_proj_a.weight"]) + p[f"{g}dt_bias"])
        window = F.pad(qkv.transpose(1, 2), (cfg.linear_conv_kernel_dim - 1, 0))
        mixed = F.silu(F.conv1d(window, p[f"{g}conv1d.weight"], groups=qkv.shape[-1])).transpose(1, 2)
        q, k, v = mixed.split([cfg.linear_key_dim, cfg.linear_key_dim, cfg.linear_value_dim], dim=-1)
        hk, kd, vd = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
        core = chunk_delta_rule(
            q.reshape(b, t, hk, kd),
            k_BTHK=k.reshape(b, t, hk, kd),
            v_BTHV=v.reshape(b, t, -1, vd),
            g_BTH=decay,
            beta_BTH=beta,
        )
        normed = rms_norm_gated(
            core.reshape(-1, vd), gate=z.reshape(-1, vd), weight=p[f"{g}norm.weight"], eps=cfg.rms_norm_eps
        )
        return F.linear(normed.reshape(b, t, -1), p[f"{g}out_proj.weight"])

    def moe(self, x_TD: torch.Tensor, m: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed experts (grouped FFN + combine) + gated shared expert, and E * sum_e f_e * P_e."""
        p, e = self.p, self.cfg.num_experts
        router = p[f"{m}gate.weight"]
        routing = route(x_TD, router=router, top_k=self.cfg.num_experts_per_tok)
        shared = SharedMoEWeights(
            router=router,
            shared_gate_proj=p[f"{m}shared_expert.gate_proj.weight"],
            shared_up_proj=p[f"{m}shared_expert.up_proj.weight"],
            shared_down_proj=p[f"{m}shared_expert.down_proj.weight"],
            shared_expert_gate=p[f"{m}shared_expert_gate.weight"],
        )
        y = local_routed_experts(self.experts, layer, x_TD, routing) + shared_expert(x_TD, w=shared)
        ids = routing.topk_ids_Tk.reshape(-1)
        frac = torch.bincount(ids, minlength=e).float() / ids.numel()
        mean_prob = torch.softmax(F.linear(x_TD, router), dim=-1).mean(dim=0)
        return y, e * (frac * mean_prob).sum()


# ------------------------------------------------------------------------------ training
def losses(model: TrainForward, x_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token CE of the main model on x[:, :-2] -> x[:, 1:-1]; MTP CE of x[:, t+2] from (h_t, x[:, t+1]);
    router balance. h_t is not detached: the MTP loss also trains the trunk."""
    hidden, aux = model.trunk(x_BL[:, :-2])
    main = F.cross_entropy(model.logits(hidden).flatten(0, 1), x_BL[:, 1:-1].flatten())
    mtp_hidden, mtp_aux = model.mtp(hidden, x_BL[:, 1:-1])
    mtp = F.cross_entropy(model.logits(mtp_hidden).flatten(0, 1), x_BL[:, 2:].flatten())
    return main, mtp, aux + mtp_aux


def train(
    model: TrainForward,
    params: dict[str, torch.Tensor],
    stream: torch.Tensor,
    args: argparse.Namespace,
    *,
    until: float,
) -> list[tuple[float, float, float]]:
    """AdamW until the monotonic time `until`: linear warmup, cosine decay to 10% over the time budget.

    Returns:
        (elapsed s, main loss, MTP loss) per step.
    """
    matrices = [p for p in params.values() if p.ndim >= 2]
    vectors = [p for p in params.values() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.monotonic()
    history: list[tuple[float, float, float]] = []
    next_log = start
    while time.monotonic() < until:
        frac = (time.monotonic() - start) / max(until - start, 1e-9)
        lr = args.lr * min(1.0, (len(history) + 1) / WARMUP_STEPS) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        main, mtp, aux = losses(model, random_windows(stream, args.batch, args.seq_len + 2, gen))
        opt.zero_grad(set_to_none=True)
        (main + args.mtp_weight * mtp + AUX_COEF * aux).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        now = time.monotonic()
        history.append((now - start, main.item(), mtp.item()))
        if now >= next_log:
            recent = history[-10:]
            print(
                f"  step {len(history):5d}  {now - start:6.0f}s  lr {lr:.2e}  main {_mean(recent, 1):.3f}"
                f"  mtp {_mean(recent, 2):.3f}  aux {aux.item():.3f}",
                flush=True,
            )
            next_log = now + max(15.0, (until - start) / 12)
    return history


def _mean(rows: list[tuple[float, float, float]], col: int) -> float:
    return sum(r[col] for r in rows) / max(len(rows), 1)


def print_curve(history: list[tuple[float, float, float]]) -> None:
    """Mean losses over ten equal stretches of steps."""
    n = len(history)
    print(f"training: {n} steps in {history[-1][0]:.0f} s ({history[-1][0] / n:.2f} s/step)")
    print("  steps          main    mtp")
    for i in range(min(10, n)):
        part = history[i * n // min(10, n) : (i + 1) * n // min(10, n)]
        lo = i * n // min(10, n) + 1
        print(f"  {lo:5d}-{lo + len(part) - 1:<5d}  {_mean(part, 1):6.3f} {_mean(part, 2):6.3f}")


# ------------------------------------------------------------------------------ evaluation (LocalModel)
def local_logits(model: LocalModel, x_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main logits of x[:, :T] and MTP logits of (h_t, x[:, t+1]), T = L - 2, each [B, T, V], fresh caches."""
    b, t = x_BL.shape[0], x_BL.shape[1] - 2
    nb = -(-t // BLOCK_SIZE)
    pools = model.allocate(num_blocks=b * nb, block_size=BLOCK_SIZE, num_slots=b)
    tables = [tuple(range(i * nb, (i + 1) * nb)) for i in range(b)]

    def batch(offset: int) -> StepBatch:
        return StepBatch.build(
            [SeqChunk(tuple(x_BL[i, offset : offset + t].tolist()), 0, i, tables[i], logits="all") for i in range(b)],
            block_size=BLOCK_SIZE,
        )

    out = model.forward(batch(0), pools)
    mtp = model.mtp(out.hidden_TD, batch(1), pools)
    return out.logits_RV.view(b, t, -1), mtp.logits_RV.view(b, t, -1)


def heldout_metrics(model: LocalModel, windows: torch.Tensor, *, batch: int, until: float) -> dict[str, float]:
    """Teacher-forced metrics over held-out windows (stops early, and says so, past `until`).

    acceptance: fraction of t with argmax MTP(h_t, x_{t+1}) == argmax main(x_{<=t+1}), the greedy k=1 draft check.
    """
    sums = dict(nll=0.0, acc=0.0, mtp_nll=0.0, mtp_acc=0.0, accept=0.0)
    n_pos = n_acc = done = 0
    for i in range(0, windows.shape[0], batch):
        if time.monotonic() > until:
            print(f"  (time budget: evaluated {done} of {windows.shape[0]} windows)")
            break
        x = windows[i : i + batch]
        main, mtp = local_logits(model, x)
        main_pred, mtp_pred = main.argmax(-1), mtp.argmax(-1)
        sums["nll"] += F.cross_entropy(main.flatten(0, 1), x[:, 1:-1].flatten(), reduction="sum").item()
        sums["mtp_nll"] += F.cross_entropy(mtp.flatten(0, 1), x[:, 2:].flatten(), reduction="sum").item()
        sums["acc"] += (main_pred == x[:, 1:-1]).sum().item()
        sums["mtp_acc"] += (mtp_pred == x[:, 2:]).sum().item()
        sums["accept"] += (mtp_pred[:, :-1] == main_pred[:, 1:]).sum().item()
        n_pos += main_pred.numel()
        n_acc += mtp_pred[:, :-1].numel()
        done += x.shape[0]
    out = {k: v / max(n_acc if k == "accept" else n_pos, 1) for k, v in sums.items()}
    return {**out, "windows": done, "positions": n_pos}


def greedy_acceptance(model: LocalModel, prompts_BP: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Generate greedily (prefill + one-token decode steps), then the k=1 acceptance greedy speculative
    decoding would see on that output: draft MTP(h_t, x_{t+1}) == the generated x_{t+2}.

    Returns:
        (acceptance, [B, P + new_tokens] prompt + generated ids).
    """
    b, plen = prompts_BP.shape
    nb = -(-(plen + new_tokens) // BLOCK_SIZE)
    pools = model.allocate(num_blocks=b * nb, block_size=BLOCK_SIZE, num_slots=b)
    tables = [tuple(range(i * nb, (i + 1) * nb)) for i in range(b)]
    seqs = [SeqChunk(tuple(prompts_BP[i].tolist()), 0, i, tables[i]) for i in range(b)]
    tok = model.forward(StepBatch.build(seqs, block_size=BLOCK_SIZE), pools).logits_RV.argmax(-1)
    generated = [tok]
    for step in range(new_tokens - 1):
        seqs = [SeqChunk((int(tok[i]),), plen + step, i, tables[i]) for i in range(b)]
        tok = model.forward(StepBatch.build(seqs, block_size=BLOCK_SIZE), pools).logits_RV.argmax(-1)
        generated.append(tok)
    seq = torch.cat([prompts_BP, torch.stack(generated, dim=1)], dim=1)
    _, mtp = local_logits(model, seq)
    drafts = mtp.argmax(-1)[:, plen - 1 :]  # drafts[:, j] proposes seq[:, plen + 1 + j]
    return (drafts == seq[:, plen + 1 :]).float().mean().item(), seq


@torch.no_grad()
def verify_against_training(model: LocalModel, train_model: TrainForward, x_BL: torch.Tensor) -> str:
    """Compare LocalModel on the written folder with the training forward, main and MTP logits.

    NOTE: the two differ by ~1e-5 (SDPA vs eager attention, stacked vs separate GEMMs), except where a
    router's k-th and (k+1)-th probabilities are tied to ~1e-6: the expert choice can flip there
    (seen after 1 minute of training, not after 8), so positions off by > 1e-3 are counted too.
    """
    main, mtp = local_logits(model, x_BL)
    hidden, _ = train_model.trunk(x_BL[:, :-2])
    mtp_hidden, _ = train_model.mtp(hidden, x_BL[:, 1:-1])
    parts = []
    for name, ours, ref in (("main", main, train_model.logits(hidden)), ("mtp", mtp, train_model.logits(mtp_hidden))):
        diff = (ours - ref).abs().amax(dim=-1)
        agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
        parts.append(
            f"{name} max {diff.max().item():.2e} ({int((diff > 1e-3).sum())} of {diff.numel()} positions "
            f"> 1e-3, argmax agreement {agree:.4f})"
        )
    return "; ".join(parts)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget, evaluation included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared, loaded machine 2 OpenMP threads stall at barriers)",
    )
    ap.add_argument("--batch", type=int, default=8, help="windows per step")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens (bytes) per training window")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    ap.add_argument("--mtp-weight", type=float, default=0.5, help="weight of the MTP loss")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows for the teacher-forced metrics")
    ap.add_argument("--gen-tokens", type=int, default=64, help="greedy tokens per prompt for on-policy acceptance")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.monotonic()
    budget = args.minutes * 60
    hard_end = t0 + budget + 45  # evaluation stops early past this
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    files = stdlib_files()
    heldout = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train_files = [f for i, f in enumerate(files) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    train_stream, heldout_stream = token_stream(train_files), token_stream(heldout)
    print(
        f"corpus: {sysconfig.get_paths()['stdlib']}: {len(train_files)} train files ({train_stream.numel():,} "
        f"bytes), {len(heldout)} held-out files ({heldout_stream.numel():,} bytes); byte-level tokens"
    )

    raw = text_config()
    cfg = from_hf_config(raw)
    params = init_params(cfg, torch.Generator().manual_seed(args.seed))
    n_mtp = sum(p.numel() for n, p in params.items() if n.startswith("mtp."))
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_layers} layers {''.join(t[0] for t in cfg.layer_types)} "
        f"(l=DeltaNet {cfg.linear_num_key_heads}k/{cfg.linear_num_value_heads}v heads x "
        f"{cfg.linear_key_head_dim}/{cfg.linear_value_head_dim}, f=attention {cfg.num_attention_heads}q/"
        f"{cfg.num_key_value_heads}kv heads x {cfg.head_dim}), {cfg.num_experts} experts x "
        f"{cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok} + shared {cfg.shared_expert_intermediate_size}, "
        f"MTP 1 layer, vocab {VOCAB_SIZE}; {sum(p.numel() for p in params.values()):,} params ({n_mtp:,} in mtp.*)"
    )
    train_model = TrainForward(params, cfg, seq_len=args.seq_len)
    reserve = min(max(0.05 * budget, 20.0), 90.0)  # writing + evaluation took ~5 s at load 5 on 2 cores
    print(
        f"training for {budget - reserve - (time.monotonic() - t0):.0f} s: batch {args.batch} x {args.seq_len}, "
        f"AdamW lr {args.lr}, MTP weight {args.mtp_weight} (h_t not detached), seed {args.seed}",
        flush=True,
    )
    history = train(train_model, params, train_stream, args, until=t0 + budget - reserve)
    print_curve(history)

    write_checkpoint(args.out, params, raw)
    model = LocalModel.load(args.out)
    tokenizer = ServingTokenizer.from_dir(args.out)
    sample = files[0].read_text(encoding="utf-8")[:2000]
    if tokenizer.encode(sample) != list(sample.encode("utf-8")):
        raise RuntimeError("the written tokenizer does not map text to its UTF-8 bytes")
    print(f"wrote {args.out} (LocalModel and Tokenizer.from_dir load it; tokenizer vocab {tokenizer.vocab_size})")

    windows = spread_windows(heldout_stream, args.eval_windows, args.seq_len + 2)
    print(f"LocalModel vs training forward, |logit diff|: {verify_against_training(model, train_model, windows[:8])}")
    m = heldout_metrics(model, windows, batch=args.batch, until=hard_end)
    print(
        f"held-out ({m['windows']} windows, {m['positions']:,} positions, LocalModel): "
        f"main loss {m['nll']:.3f}, next-token accuracy {m['acc']:.3f}; "
        f"MTP loss {m['mtp_nll']:.3f}, MTP accuracy on x_t+2 {m['mtp_acc']:.3f}"
    )
    print(
        f"k=1 greedy draft acceptance (teacher-forced, argmax MTP(h_t, x_t+1) == argmax main at t+1): {m['accept']:.3f}"
    )
    if time.monotonic() < hard_end - 20:
        accept, seq = greedy_acceptance(model, windows[: args.batch, :64], args.gen_tokens)
        print(
            f"k=1 acceptance on the model's own greedy output ({args.batch} prompts x {args.gen_tokens} tokens): "
            f"{accept:.3f}"
        )
        print(f"sample: {tokenizer.decode(seq[0, :64].tolist())!r} -> {tokenizer.decode(seq[0, 64:].tolist())!r}")
    print(f"total {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
