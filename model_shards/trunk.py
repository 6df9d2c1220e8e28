"""The trunk: embeddings, every decoder layer's mixer + router + shared expert, final norm, lm_head.

A trunk runs the whole forward pass of a step except the routed experts, which it reaches
through `routed` (a callable: local shard in one process, an all-to-all across ranks).
Top level (model_spec §2.1): x = embed(ids); per layer h = x + Mixer(norm(x)),
x = h + MoE(norm(h)); logits = lm_head(norm(x)). Pre-norm residuals, untied lm_head.
Tests: tests/model_shards/test_model_parity.py (against transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from model_shards.batch import StepBatch
from model_shards.cache import CachePools
from model_shards.config import FULL_ATTENTION, ModelConfig
from model_shards.gated_attention import ATTENTION_IMPLS, AttentionWeights, attention_forward
from model_shards.gated_deltanet import DeltaNetWeights, deltanet_forward
from model_shards.moe import Routing, SharedMoEWeights, route_and_shared
from model_shards.norms import rms_norm_zc_scaled, zc_scale
from model_shards.quant import Weight, linear
from model_shards.rope import inv_frequencies, mrope_cos_sin

# (moe_layer, x_TD, routing) -> routed output [T, D] (weighted, slot-summed; shared expert excluded)
RoutedExperts = Callable[[int, torch.Tensor, Routing], torch.Tensor]


@dataclass
class LayerWeights:
    """NOTE: the fp32 (1 + w) norm scales are computed on first use and kept; replace the
    object rather than assigning new norm weights to it."""

    input_norm: torch.Tensor  # [D] zero-centred
    post_norm: torch.Tensor  # [D] zero-centred
    mixer: DeltaNetWeights | AttentionWeights
    moe: SharedMoEWeights

    @cached_property
    def input_scale(self) -> torch.Tensor:
        return zc_scale(self.input_norm)

    @cached_property
    def post_scale(self) -> torch.Tensor:
        return zc_scale(self.post_norm)


@dataclass
class MtpWeights:
    """The multi-token-prediction head (model_spec §3.1); reuses embed_tokens and lm_head."""

    fc: Weight  # [D, 2D] input [embedding | hidden]
    pre_fc_norm_embedding: torch.Tensor
    pre_fc_norm_hidden: torch.Tensor
    norm: torch.Tensor
    layers: list[LayerWeights]  # full-attention decoder layers


@dataclass
class TrunkWeights:
    embed: torch.Tensor  # [vocab, D]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [D]
    lm_head: Weight  # [vocab, D] (the embedding itself when tied)
    mtp: MtpWeights | None = None

    @cached_property
    def final_scale(self) -> torch.Tensor:
        """fp32 (1 + final_norm), kept after first use (as LayerWeights' scales)."""
        return zc_scale(self.final_norm)


@dataclass(frozen=True)
class TrunkOutput:
    """hidden_TD: final-normed hidden state of every new token (what lm_head and MTP read);
    logits_RV: fp32 logits of the batch's logit rows."""

    hidden_TD: torch.Tensor
    logits_RV: torch.Tensor


class Trunk:
    """Holds trunk weights and runs steps against cache pools and a routed-experts callable.

    `attention` picks the attention back-end (gated_attention.ATTENTION_IMPLS): "paged" serves,
    "eager" is HF's eager math bit for bit (the oracle HF bit-parity tests name).
    """

    def __init__(
        self, weights: TrunkWeights, cfg: ModelConfig, *, dtype: torch.dtype, attention: str = "paged"
    ) -> None:
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        self.w = weights
        self.cfg = cfg
        self.dtype = dtype
        self.attention = attention
        # on the weights' device, so a step's rope tables are built there (no per-step copy)
        self.inv_freq = inv_frequencies(rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta).to(weights.embed.device)

    def forward(self, batch: StepBatch, *, pools: CachePools, routed: RoutedExperts) -> TrunkOutput:
        """Run every layer for the step's tokens; update caches in place; logits for logit rows."""
        x = F.embedding(batch.token_ids_T, self.w.embed)
        if batch.embeds_override is not None:
            rows, embeds = batch.embeds_override
            x = x.index_copy(0, rows, embeds.to(x.dtype))
        cos, sin = mrope_cos_sin(
            batch.positions_3T, inv_freq=self.inv_freq, mrope_section=self.cfg.mrope_section, dtype=x.dtype
        )
        for i, lw in enumerate(self.w.layers):
            x = self.decoder_layer(x, lw, layer=i, batch=batch, pools=pools, routed=routed, cos=cos, sin=sin)
        hidden = rms_norm_zc_scaled(x, scale=self.w.final_scale, eps=self.cfg.rms_norm_eps)
        return TrunkOutput(hidden_TD=hidden, logits_RV=self.logits(hidden[batch.logit_rows]))

    def logits(self, hidden_RD: torch.Tensor) -> torch.Tensor:
        return linear(hidden_RD, self.w.lm_head).float()

    def decoder_layer(
        self,
        x: torch.Tensor,
        lw: LayerWeights,
        *,
        layer: int,
        batch: StepBatch,
        pools: CachePools,
        routed: RoutedExperts,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """One pre-norm decoder layer. `layer` indexes caches and experts (MTP layers follow the
        decoder layers)."""
        cfg = self.cfg
        h_in = rms_norm_zc_scaled(x, scale=lw.input_scale, eps=cfg.rms_norm_eps)
        if isinstance(lw.mixer, AttentionWeights):
            k_pool, v_pool = pools.kv(layer)
            mixed = attention_forward(
                h_in,
                w=lw.mixer,
                cfg=cfg,
                batch=batch,
                cos=cos,
                sin=sin,
                k_pool=k_pool,
                v_pool=v_pool,
                impl=self.attention,
            )
        else:
            conv, rec = pools.state(layer)
            mixed = deltanet_forward(
                h_in,
                w=lw.mixer,
                cfg=cfg,
                batch=batch,
                conv_state=conv,
                recurrent_state=rec,
                spec_state=pools.spec_state(layer),
            )
        h = x + mixed
        m_in = rms_norm_zc_scaled(h, scale=lw.post_scale, eps=cfg.rms_norm_eps)
        return h + self.moe(m_in, lw.moe, layer=layer, routed=routed)

    def moe(self, x_TD: torch.Tensor, w: SharedMoEWeights, *, layer: int, routed: RoutedExperts) -> torch.Tensor:
        routing, shared = route_and_shared(x_TD, w=w, top_k=self.cfg.num_experts_per_tok)
        return routed(layer, x_TD, routing) + shared

    def is_attention(self, layer: int) -> bool:
        return layer >= self.cfg.num_layers or self.cfg.layer_types[layer] == FULL_ATTENTION
