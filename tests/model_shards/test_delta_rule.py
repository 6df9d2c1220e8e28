"""The gated delta rule: chunked and recurrent forms against the per-token reference and transformers.

Proves: both forms equal `reference.gated_delta_rule_reference` (outputs and final states)
at lengths around the 64-token chunk; hand-built known answers (delta rule, decay, value
head -> key head grouping) hold for all three; a state carried across calls equals one call
(bit-identical at 64-token splits); right-padding to batch sequences changes nothing (bit
for bit, fp32 and bf16); transformers' own torch delta rules give bit-identical results in
fp32 and bf16.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from model_shards.delta_rule import CHUNK, chunk_gated_delta_rule, recurrent_gated_delta_rule
from model_shards.reference import gated_delta_rule_reference

# The chunked form re-associates the per-token sums (UT transform over 64-token blocks) and the
# recurrent form sums S^T k elementwise instead of by matmul: fp32 rounding only. Outputs are
# O(0.3) and states O(1); measured max |diff| <= 7e-7, so 5e-6 leaves ~7x headroom.
FP32_ATOL = 5e-6

LENGTHS = (1, 63, 64, 65, 150)
H, HK, K, V = 8, 2, 32, 48  # model_shards.config.tiny(): value heads = 4 x key heads, K != V
Rule = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RULES: dict[str, Rule] = {"chunk": chunk_gated_delta_rule, "recurrent": recurrent_gated_delta_rule}  # name -> our rule


def _report(got: torch.Tensor, want: torch.Tensor) -> str:
    d = (got.float() - want.float()).abs()
    return f"max |diff| {d.max().item():.3g}, mean |diff| {d.mean().item():.3g}"


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol, rtol=0, msg=lambda _: f"{what}: {_report(got, want)} (atol {atol:g})"
    )


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert torch.equal(got, want), f"{what} not bit-identical: {_report(got, want)}"


def _inputs(b: int, t: int, *, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random q/k/v (model dtype), g <= 0 with slow decay (state matters across chunks), beta in (0, 1),
    and a non-zero incoming state (fp32)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        q_BTHK=torch.randn(b, t, HK, K, generator=gen).to(dtype),
        k_BTHK=torch.randn(b, t, HK, K, generator=gen).to(dtype),
        v_BTHV=torch.randn(b, t, H, V, generator=gen).to(dtype),
        g_BTH=-0.1 * F.softplus(torch.randn(b, t, H, generator=gen)),
        beta_BTH=torch.rand(b, t, H, generator=gen).to(dtype),
        state_BHKV=0.5 * torch.randn(b, H, K, V, generator=gen),
    )


def _slice(
    inp: dict[str, torch.Tensor],
    *,
    rows: slice = slice(None),
    start: int = 0,
    stop: int | None = None,
    state: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    out = {name: x[rows, start:stop] for name, x in inp.items() if name != "state_BHKV"}
    out["state_BHKV"] = inp["state_BHKV"][rows] if state is None else state
    return out


def _call(rule: Rule, inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """rule(q, *, k=..., v=..., g=..., beta=..., state=...): every rule here shares that signature."""
    return rule(inp["q_BTHK"], **{name: x for name, x in inp.items() if name != "q_BTHK"})


# ------------------------------------------------------------------------------ known answers
def _unit(n: int, i: int) -> torch.Tensor:
    e = torch.zeros(n)
    e[i] = 1.0
    return e


@pytest.mark.parametrize("rule", ["reference", "chunk", "recurrent"])
def test_known_answer_write_decay_read_and_head_grouping(rule: str) -> None:
    """Hand-built 3 tokens, 2 key heads, 4 value heads (K = 4, V = 3), zero initial state.

    t0: key head 0 writes e0, key head 1 writes e1 (beta 1, no decay); value head j writes v_j = (j+1) * [1, 2, 3].
    t1: the same keys write the same values again (beta 1): a delta rule writes v - S^T k = 0, so S is unchanged
        (a Hebbian rule would double it). Decay g = log(1/2) first halves S, so u = v - v/2 restores it.
    t2: no write (beta 0), decay 1/2, query e0 on both key heads: value heads 0, 1 (key head 0 = j // 2) read
        (1/2) v_j / sqrt(K); value heads 2, 3 (key head 1, which stored along e1) read 0.
    """
    kd, vd, hk, h = 4, 3, 2, 4
    q = torch.zeros(1, 3, hk, kd)
    k = torch.zeros(1, 3, hk, kd)
    v = torch.zeros(1, 3, h, vd)
    for t in (0, 1):
        k[0, t, 0], k[0, t, 1] = _unit(kd, 0), _unit(kd, 1)
        q[0, t, :] = _unit(kd, 2)  # orthogonal to every key: reads 0
        for j in range(h):
            v[0, t, j] = (j + 1) * torch.tensor([1.0, 2.0, 3.0])
    q[0, 2, :] = _unit(kd, 0)
    k[0, 2, :] = _unit(kd, 3)
    beta = torch.tensor([[1.0, 1.0, 0.0]]).unsqueeze(-1).expand(1, 3, h).contiguous()
    g = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]]).unsqueeze(-1).expand(1, 3, h).contiguous()
    state0 = torch.zeros(1, h, kd, vd)

    fn = gated_delta_rule_reference if rule == "reference" else RULES[rule]
    out, state = fn(q, k_BTHK=k, v_BTHV=v, g_BTH=g, beta_BTH=beta, state_BHKV=state0)

    want_out = torch.zeros(1, 3, h, vd)
    want_state = torch.zeros(1, h, kd, vd)
    for j in range(h):
        want_state[0, j, j // 2] = 0.5 * v[0, 0, j]  # written once, kept at t1, halved at t2
        if j // 2 == 0:
            want_out[0, 2, j] = 0.5 * v[0, 0, j] / math.sqrt(kd)
    # l2norm puts eps = 1e-6 inside the root: |k| = 1 -> k / sqrt(1 + 1e-6), a 5e-7 relative change.
    _assert_close(out, want_out, 1e-5, f"{rule} outputs")
    _assert_close(state, want_state, 1e-5, f"{rule} final state")


# ------------------------------------------------------------------------------ reference parity
@pytest.mark.parametrize("t", LENGTHS, ids=[f"len{n}" for n in LENGTHS])
@pytest.mark.parametrize("rule", list(RULES))
def test_matches_reference_fp32(rule: str, t: int) -> None:
    """Outputs and final state against the per-token reference, from a non-zero incoming state."""
    inp = _inputs(2, t, seed=t)
    want_out, want_state = _call(gated_delta_rule_reference, inp)
    got_out, got_state = _call(RULES[rule], inp)
    assert got_out.dtype == torch.float32 and got_state.dtype == torch.float32
    _assert_close(got_out, want_out, FP32_ATOL, f"{rule} outputs, T={t}")
    _assert_close(got_state, want_state, FP32_ATOL, f"{rule} final state, T={t}")


def test_recurrent_keep_states_are_the_prefix_states() -> None:
    """`keep_states` (speculative-decoding rollback) returns, at token i, the state after tokens 0..i."""
    inp = _inputs(1, 5, seed=11)
    _, kept = _call(lambda q, **kw: recurrent_gated_delta_rule(q, keep_states=True, **kw), inp)
    assert kept.shape == (1, 5, H, K, V)
    for i in range(5):
        _, state = _call(recurrent_gated_delta_rule, _slice(inp, stop=i + 1))
        _assert_equal(kept[:, i], state, f"kept state after token {i}")


# ------------------------------------------------------------------------------ state carry
@pytest.mark.parametrize("split", [64, 128], ids=["split64", "split128"])
def test_chunked_split_at_chunk_multiple_is_bit_identical(split: int) -> None:
    """Prefill resumed from the carried state at a multiple of 64 == one call, bit for bit (model_spec §8)."""
    assert split % CHUNK == 0
    inp = _inputs(1, 150, seed=5)
    whole_out, whole_state = _call(chunk_gated_delta_rule, inp)
    first_out, mid_state = _call(chunk_gated_delta_rule, _slice(inp, stop=split))
    rest_out, end_state = _call(chunk_gated_delta_rule, _slice(inp, start=split, state=mid_state))
    _assert_equal(torch.cat([first_out, rest_out], dim=1), whole_out, f"outputs split at {split}")
    _assert_equal(end_state, whole_state, f"final state split at {split}")


@pytest.mark.parametrize("split", [1, 50, 100, 149], ids=lambda s: f"split{s}")
def test_chunked_split_unaligned_within_tolerance(split: int) -> None:
    """Unaligned splits regroup the chunks, so only fp32-close (and close to the reference)."""
    inp = _inputs(1, 150, seed=6)
    want_out, want_state = _call(gated_delta_rule_reference, inp)
    first_out, mid_state = _call(chunk_gated_delta_rule, _slice(inp, stop=split))
    rest_out, end_state = _call(chunk_gated_delta_rule, _slice(inp, start=split, state=mid_state))
    _assert_close(torch.cat([first_out, rest_out], dim=1), want_out, FP32_ATOL, f"outputs split at {split}")
    _assert_close(end_state, want_state, FP32_ATOL, f"final state split at {split}")


@pytest.mark.parametrize("split", [1, 50, 64], ids=lambda s: f"split{s}")
def test_recurrent_split_anywhere_is_bit_identical(split: int) -> None:
    """The recurrent form is a per-token loop, so any split point gives the same bits."""
    inp = _inputs(1, 80, seed=7)
    whole_out, whole_state = _call(recurrent_gated_delta_rule, inp)
    first_out, mid_state = _call(recurrent_gated_delta_rule, _slice(inp, stop=split))
    rest_out, end_state = _call(recurrent_gated_delta_rule, _slice(inp, start=split, state=mid_state))
    _assert_equal(torch.cat([first_out, rest_out], dim=1), whole_out, f"outputs split at {split}")
    _assert_equal(end_state, whole_state, f"final state split at {split}")


# ------------------------------------------------------------------------------ batching
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", list(RULES))
def test_right_padded_batch_equals_each_sequence_alone(rule: str, dtype: torch.dtype) -> None:
    """Sequences of lengths 1..150 right-padded into one batch (q = k = v = 0, g = beta = 0 on the padding,
    the varlen layout a batched caller uses) give the same outputs and final states as each sequence run
    alone: bit-identical (a padded step decays by exp(0) = 1 and writes 0; extra all-padding chunks too)."""
    lens = LENGTHS
    inp = _inputs(len(lens), max(lens), seed=3, dtype=dtype)
    for i, n in enumerate(lens):
        for name, x in inp.items():
            if name != "state_BHKV":
                x[i, n:] = 0
    batch_out, batch_state = _call(RULES[rule], inp)
    for i, n in enumerate(lens):
        alone_out, alone_state = _call(RULES[rule], _slice(inp, rows=slice(i, i + 1), stop=n))
        _assert_equal(batch_out[i : i + 1, :n], alone_out, f"{rule} outputs of the length-{n} sequence")
        _assert_equal(batch_state[i : i + 1], alone_state, f"{rule} final state of the length-{n} sequence")


# ------------------------------------------------------------------------------ transformers
@pytest.mark.parametrize("t", [1, 150], ids=["len1", "len150"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rule", list(RULES))
def test_bit_identical_to_transformers_torch_rules(rule: str, dtype: torch.dtype, t: int) -> None:
    """transformers' own `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`
    (l2norm in kernel, initial state, final state) give exactly our bits."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as hf

    hf_rule = hf.torch_chunk_gated_delta_rule if rule == "chunk" else hf.torch_recurrent_gated_delta_rule
    inp = _inputs(2, t, seed=20 + t, dtype=dtype)
    got_out, got_state = _call(RULES[rule], inp)
    want_out, want_state = hf_rule(
        inp["q_BTHK"],
        inp["k_BTHK"],
        inp["v_BTHV"],
        g=inp["g_BTH"],
        beta=inp["beta_BTH"],
        initial_state=inp["state_BHKV"],
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    assert got_out.dtype == want_out.dtype == dtype
    _assert_equal(got_out, want_out, f"{rule} outputs vs transformers ({dtype})")
    _assert_equal(got_state, want_state, f"{rule} final state vs transformers ({dtype})")
