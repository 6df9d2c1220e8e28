"""The trunk: embeddings, every decoder layer's mixer + router + shared expert, final norm, lm_head.

A trunk runs the whole forward pass of a step except the routed experts, which it reaches
through `routed` (a callable: local shard in one process, an all-to-all across ranks).
Top level (model_spec §2.1): x = embed(ids); per layer h = x + Mixer(norm(x)),
x = h + MoE(norm(h)); logits = lm_head(norm(x)). Pre-norm residuals, untied lm_head.
Tests: tests/model_shards/test_model_parity.py (against transformers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

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


class PendingRouted(Protocol):
    """A routed-experts call in flight: `wait()` gives its output [T, D]."""

    def wait(self) -> torch.Tensor: ...


class SplitRouted(Protocol):
    """The routed seam for ping-pong micro-batches: `start` issues a layer's routed experts for some tokens and
    returns at once, so the trunk can compute another micro-batch while they run elsewhere."""

    def start(self, layer: int, x_TD: torch.Tensor, routing: Routing) -> PendingRouted: ...


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
        x, cos, sin = self._embed(batch)
        for i, lw in enumerate(self.w.layers):
            x = self.decoder_layer(x, lw, layer=i, batch=batch, pools=pools, routed=routed, cos=cos, sin=sin)
        return self._head(x, batch)

    def forward_split(
        self, batch: StepBatch, parts: Sequence[StepBatch | None], *, pools: CachePools, routed: SplitRouted
    ) -> TrunkOutput:
        """`forward` in ping-pong micro-batches: `parts` are the batch's sequences in consecutive groups (their
        rows back to back in `batch`; None: an empty micro-batch, which still makes its routed calls with no
        rows). Per layer, micro-batch i's routed experts run (elsewhere) while micro-batch i + 1's mixer runs
        here; the result is `forward`'s, per token (each sequence's math is its own)."""
        x, cos, sin = self._embed(batch)
        bounds = [0]
        for part in parts:
            bounds.append(bounds[-1] + (int(part.token_ids_T.shape[0]) if part is not None else 0))
        if bounds[-1] != x.shape[0]:
            raise ValueError(f"micro-batches hold {bounds[-1]} tokens, the step has {x.shape[0]}")
        xs = [x[a:b] for a, b in zip(bounds, bounds[1:])]
        trig = [(cos[a:b], sin[a:b]) for a, b in zip(bounds, bounds[1:])]
        pending: list[tuple[torch.Tensor, torch.Tensor, PendingRouted] | None] = [None] * len(parts)
        for i, lw in enumerate(self.w.layers):
            for j, part in enumerate(parts):
                held = pending[j]
                if held is not None:  # micro-batch j's previous layer: its routed output, waited on only now
                    xs[j] = held[0] + (held[2].wait() + held[1])  # as `moe`: h + (routed + shared)
                if part is None:
                    pending[j] = (xs[j], xs[j], routed.start(i, xs[j], self._no_routing(xs[j])))
                    continue
                h, m_in = self._mixer(xs[j], lw, layer=i, batch=part, pools=pools, cos=trig[j][0], sin=trig[j][1])
                routing, shared = route_and_shared(m_in, w=lw.moe, top_k=self.cfg.num_experts_per_tok)
                pending[j] = (h, shared, routed.start(i, m_in, routing))
        for j, held in enumerate(pending):
            if held is not None:
                xs[j] = held[0] + (held[2].wait() + held[1])  # as `moe`: h + (routed + shared)
        return self._head(torch.cat(xs), batch)

    def _no_routing(self, x_TD: torch.Tensor) -> Routing:
        k = self.cfg.num_experts_per_tok
        return Routing(torch.empty(0, k, dtype=torch.long, device=x_TD.device), x_TD.new_empty(0, k))

    def _embed(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.embedding(batch.token_ids_T, self.w.embed)
        if batch.embeds_override is not None:
            rows, embeds = batch.embeds_override
            x = x.index_copy(0, rows, embeds.to(x.dtype))
        cos, sin = mrope_cos_sin(
            batch.positions_3T, inv_freq=self.inv_freq, mrope_section=self.cfg.mrope_section, dtype=x.dtype
        )
        return x, cos, sin

    def _head(self, x: torch.Tensor, batch: StepBatch) -> TrunkOutput:
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
        h, m_in = self._mixer(x, lw, layer=layer, batch=batch, pools=pools, cos=cos, sin=sin)
        return h + self.moe(m_in, lw.moe, layer=layer, routed=routed)

    def _mixer(
        self,
        x: torch.Tensor,
        lw: LayerWeights,
        *,
        layer: int,
        batch: StepBatch,
        pools: CachePools,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to its MoE: (h = x + mixer(norm(x)), the MoE's input norm(h))."""
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
        return h, rms_norm_zc_scaled(h, scale=lw.post_scale, eps=cfg.rms_norm_eps)

    def moe(self, x_TD: torch.Tensor, w: SharedMoEWeights, *, layer: int, routed: RoutedExperts) -> torch.Tensor:
        routing, shared = route_and_shared(x_TD, w=w, top_k=self.cfg.num_experts_per_tok)
        return routed(layer, x_TD, routing) + shared

    def is_attention(self, layer: int) -> bool:
        return layer >= self.cfg.num_layers or self.cfg.layer_types[layer] == FULL_ATTENTION
