"""The MTP (multi-token prediction) head's forward (model_spec §3.2).

Given the target model's final-normed hidden h_t and the next token x_{t+1}:
u = fc([norm_e(embed(x_{t+1})) | norm_h(h_t)]) (embedding first), one full-attention
decoder layer with its own KV cache (pool row `num_layers + j`) and MoE experts (expert
layer `num_layers + j`) at position t, then logits = lm_head(norm(u)). Mirrors vLLM/SGLang's
`qwen3_5_mtp.py`; transformers drops `mtp.*`, so tests build a reference from its layer
classes (tests/model_shards/test_mtp.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_shards.batch import StepBatch
from model_shards.cache import CachePools
from model_shards.norms import rms_norm_zc
from model_shards.quant import linear
from model_shards.rope import mrope_cos_sin
from model_shards.trunk import RoutedExperts, Trunk, TrunkOutput


def mtp_forward(
    trunk: Trunk,
    hidden_TD: torch.Tensor,
    *,
    batch: StepBatch,
    pools: CachePools,
    routed: RoutedExperts,
    step: int = 0,
) -> TrunkOutput:
    """One MTP draft step for a packed batch.

    Args:
        hidden_TD: [T, D] final-normed hidden states h_t of the target (or the previous MTP
            step's normed output for recursive drafts).
        batch: token_ids_T are the *next* tokens x_{t+1}; positions are those of t.
        step: draft step index; layer used = step % mtp_num_hidden_layers.
    Returns:
        hidden_TD: MTP-normed outputs (the next draft step's h); logits of the logit rows.
    """
    cfg = trunk.cfg
    w = trunk.w.mtp
    if w is None:
        raise ValueError("this checkpoint has no MTP head (no mtp.* tensors); run without speculative decoding")
    j = step % cfg.mtp_num_hidden_layers
    e = F.embedding(batch.token_ids_T, trunk.w.embed)
    u = linear(
        torch.cat(
            [
                rms_norm_zc(e, weight=w.pre_fc_norm_embedding, eps=cfg.rms_norm_eps),
                rms_norm_zc(hidden_TD.to(e.dtype), weight=w.pre_fc_norm_hidden, eps=cfg.rms_norm_eps),
            ],
            dim=-1,
        ),
        w.fc,
    )
    cos, sin = mrope_cos_sin(
        batch.positions_3T, inv_freq=trunk.inv_freq, mrope_section=cfg.mrope_section, dtype=u.dtype
    )
    u = trunk.decoder_layer(
        u, w.layers[j], layer=cfg.num_layers + j, batch=batch, pools=pools, routed=routed, cos=cos, sin=sin
    )
    normed = rms_norm_zc(u, weight=w.norm, eps=cfg.rms_norm_eps)
    return TrunkOutput(hidden_TD=normed, logits_RV=trunk.logits(normed[batch.logit_rows]))
