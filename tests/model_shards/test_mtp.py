"""The MTP head against a reference built from transformers' own Qwen3.5 classes (model_spec §3.2).

transformers drops `mtp.*` on load, so the reference is assembled here from its decoder-layer,
RMSNorm and rotary classes: e = embed(x_{t+1}); u = fc([norm_e(e) | norm_h(h_t)]); one
full-attention MoE decoder layer at position t; logits = lm_head(norm(u)). Its random weights are
written into a transformers-saved checkpoint under the `mtp.` names, which our loader reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_shards.batch import SeqChunk, StepBatch
from model_shards.mtp import mtp_forward
from tests.hf_oracle import hf_causal_lm, save_random_hf_checkpoint

SEQ = 23


class _HfMtp(torch.nn.Module):
    """The MTP module from transformers' building blocks, named like the checkpoint's `mtp.*`."""

    def __init__(self, text_cfg) -> None:  # noqa: ANN001  # transformers Qwen3_5MoeTextConfig
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
            Qwen3_5MoeDecoderLayer,
            Qwen3_5MoeRMSNorm,
        )

        super().__init__()
        d = text_cfg.hidden_size
        full = text_cfg.layer_types.index("full_attention")  # the MTP layer is a full-attention layer
        self.fc = torch.nn.Linear(2 * d, d, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(d, eps=text_cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(d, eps=text_cfg.rms_norm_eps)
        self.norm = Qwen3_5MoeRMSNorm(d, eps=text_cfg.rms_norm_eps)
        self.layers = torch.nn.ModuleList([Qwen3_5MoeDecoderLayer(text_cfg, full)])

    def randomize(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:  # zero-centred norms: noise around 0 so `w` vs `1 + w` matters
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                elif name.endswith("mlp.gate.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # spread router logits
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def forward(self, h_TD: torch.Tensor, next_ids_T: torch.Tensor, embed, lm_head, rotary) -> torch.Tensor:  # noqa: ANN001
        e = embed(next_ids_T)[None]
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(e), self.pre_fc_norm_hidden(h_TD[None])], dim=-1))
        t = u.shape[1]
        position_ids = torch.arange(t)[None]
        cos_sin = rotary(u, position_ids)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        u = self.layers[0](u, position_embeddings=cos_sin, attention_mask=mask, position_ids=position_ids)
        return lm_head(self.norm(u))[0]


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = save_random_hf_checkpoint(tmp_path_factory.mktemp("mtp_hf"), seed=3)
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"]["mtp_num_hidden_layers"] = 1
    cfg["text_config"]["mtp_use_dedicated_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _reference(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(MTP logits of positions 0..T-2, the target's final-normed hidden, the MTP tensors to save)."""
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeTextRotaryEmbedding

    hf = hf_causal_lm(folder)
    text_cfg = hf.config
    text_cfg._attn_implementation = "eager"
    with torch.no_grad():
        hidden = hf.model(input_ids=ids[None, :-1]).last_hidden_state[0]  # final-normed (what lm_head reads)
        mtp = _HfMtp(text_cfg).eval()
        mtp.randomize(torch.Generator().manual_seed(11))
        logits = mtp(hidden, ids[1:], hf.model.embed_tokens, hf.lm_head, Qwen3_5MoeTextRotaryEmbedding(text_cfg))
    tensors = {f"mtp.{k}": v.detach().clone().contiguous() for k, v in mtp.state_dict().items()}
    return logits, hidden, tensors


def test_mtp_logits_equal_transformers_reference(mtp_checkpoint: Path) -> None:
    from model_shards.model import LocalModel
    from replicas.ep.dispatch import LocalDispatcher

    ids = torch.randint(0, 1000, (SEQ + 1,), generator=torch.Generator().manual_seed(5))
    ref_logits, ref_hidden, tensors = _reference(mtp_checkpoint, ids)
    # the fused expert layout ([E, 2I, D] gate_up_proj) is how the BF16 release stores mtp experts
    assert "mtp.layers.0.mlp.experts.gate_up_proj" in tensors
    shard = mtp_checkpoint / "model.safetensors"
    save_file({**load_file(str(shard)), **tensors}, str(shard), metadata={"format": "pt"})

    model = LocalModel.load(mtp_checkpoint, dtype="float32")
    assert model.trunk.w.mtp is not None
    pools = model.allocate(num_blocks=4, block_size=16, num_slots=1)
    table = (0, 1, 2, 3)
    routed = LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
    # target pass over x_0..x_{T-1}, then one MTP pass over (h_t, x_{t+1}) for every t, split in two
    # chunks so the MTP layer's own KV cache carries the first chunk's keys into the second
    target = model.trunk.forward(
        StepBatch.build([SeqChunk(tuple(ids[:-1].tolist()), 0, 0, table, logits="none")], block_size=16),
        pools=pools,
        routed=routed,
    )
    torch.testing.assert_close(target.hidden_TD, ref_hidden, rtol=1e-4, atol=1e-4)
    cut = 9
    parts = []
    for lo, hi in ((0, cut), (cut, SEQ)):
        batch = StepBatch.build(
            [SeqChunk(tuple(ids[lo + 1 : hi + 1].tolist()), lo, 0, table, logits="all")], block_size=16
        )
        parts.append(
            mtp_forward(model.trunk, target.hidden_TD[lo:hi], batch=batch, pools=pools, routed=routed).logits_RV
        )
    ours = torch.cat(parts)
    scale = ref_logits.abs().max()
    assert float((ours - ref_logits).abs().max() / scale) <= 1e-4
    assert torch.equal(ours.argmax(-1), ref_logits.argmax(-1))


def test_mtp_embedding_goes_first(mtp_checkpoint: Path) -> None:
    """Can fail: swapping the fc halves (hidden first) must change the logits well beyond tolerance."""
    ids = torch.randint(0, 1000, (SEQ + 1,), generator=torch.Generator().manual_seed(5))
    ref_logits, hidden, tensors = _reference(mtp_checkpoint, ids)
    from model_shards.model import LocalModel
    from replicas.ep.dispatch import LocalDispatcher

    shard = mtp_checkpoint / "model.safetensors"
    save_file({**load_file(str(shard)), **tensors}, str(shard), metadata={"format": "pt"})
    model = LocalModel.load(mtp_checkpoint, dtype="float32")
    w = model.trunk.w.mtp
    d = model.cfg.hidden_size
    assert isinstance(w.fc, torch.Tensor)
    w.fc.copy_(torch.cat([w.fc[:, d:], w.fc[:, :d]], dim=1))
    pools = model.allocate(num_blocks=4, block_size=16, num_slots=1)
    routed = LocalDispatcher(model.experts, num_moe_layers=model.cfg.num_moe_layers)
    batch = StepBatch.build([SeqChunk(tuple(ids[1:].tolist()), 0, 0, (0, 1, 2, 3), logits="all")], block_size=16)
    swapped = mtp_forward(model.trunk, hidden, batch=batch, pools=pools, routed=routed).logits_RV
    assert float((swapped - ref_logits).abs().max() / ref_logits.abs().max()) > 1e-2
