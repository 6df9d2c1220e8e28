"""Token sampling from fp32 logits, batched on the logits' device, per sequence parameters, reproducible by seed.

Order (vLLM's): min_tokens bans and grammar masks -> repetition / frequency / presence penalties -> greedy if
temperature == 0, else temperature -> min_p -> top_k -> top_p -> draw. Returned logprobs are those of the raw
model distribution (log_softmax of the logits before any processing), as vLLM returns by default.

Batched: every step is a constant number of tensor ops over groups of rows chosen on the host from the rows'
parameters (simple greedy, processed greedy, top-k, top-p only, plain), never a loop over rows of torch ops.
The draw is an exponential race, argmax(x_v - log E_v), E_v = -log(1 - U_v), which picks v with probability
softmax(x)_v; U_v comes from a counter-based hash of (request seed, output position, stream, vocabulary id)
computed with integer tensor ops, so a draw depends only on its sequence's own seed, position and filtered
distribution: not on batch composition, row order, preemption or which rank samples, and with no random
generator per row. Host syncs: none until `SampleOutput.to_host`, the step's one device-to-host transfer.
Penalty histories come as host rows uploaded for the call (`prompt_ids` / `output_ids`), or as rows a rank keeps
on the device (`history`, model_shards/penalty_history.py), to which `sample` appends the chosen tokens in place.
Tests: tests/model_shards/test_sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling settings (already resolved against generation_config defaults).

    Attributes:
        temperature: 0 means greedy.
        top_k: 0 or -1 disables. top_p: 1 disables. min_p: 0 disables.
        seed: per-request seed; the engine assigns one when the client gives none.
        logprobs: None for no logprobs; n >= 0 for the chosen token's plus n top alternatives.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


@dataclass(frozen=True)
class DeviceHistory:
    """The penalty histories of a step's rows on the sampling device (model_shards/penalty_history.py's rows).

    Attributes:
        ids: int32 [P, W] token ids, padded with ids >= V; W must exceed every row's length (room for the append).
        rows, lens, prompt_lens: per row of `sample` (params order): its row of `ids` (read for rows with a
            penalty only), the ids it holds, how many of them are the prompt. `sample` writes each such row's
            chosen token at ids[row, len], on the device (the caller counts it as fed when it feeds it back).
    """

    ids: torch.Tensor
    rows: list[int]
    lens: list[int]
    prompt_lens: list[int]


@dataclass(frozen=True)
class HostSample:
    """A step's sampled tokens on the host: token ids; chosen-token logprobs and top-n (ids, logprobs) per row
    (None where no row asked)."""

    token_ids: list[int]
    logprob: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


@dataclass(frozen=True)
class SampleOutput:
    """token_ids [B]; logprob [B] of the chosen tokens; top_ids / top_logprobs [B, n] (n = max asked), all on
    the logits' device. Rows that asked for no logprobs hold NaN / zeros there."""

    token_ids: torch.Tensor
    logprob: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None

    def to_host(self) -> HostSample:
        """The sampler's one device-to-host transfer (and its one host sync): every output in one go."""
        parts = [t for t in (self.token_ids, self.logprob, self.top_ids, self.top_logprobs) if t is not None]
        if self.token_ids.device.type == "cuda":
            parts = [t.to("cpu", non_blocking=True) for t in parts]  # pinned staging; the sync below covers all
            if torch.cuda.is_available():  # a fake device (the device-path tests) has no stream to wait on
                torch.cuda.current_stream(self.token_ids.device).synchronize()
        lists = [t.tolist() for t in parts]
        tokens = lists.pop(0)
        logprob = lists.pop(0) if self.logprob is not None else None
        top_ids = lists.pop(0) if self.top_ids is not None else None
        top_logprobs = lists.pop(0) if self.top_logprobs is not None else None
        return HostSample(tokens, logprob, top_ids, top_logprobs)


# ---------------------------------------------------------------------------- counter-based random numbers
# lowbias32 (Chris Wellons' hash-prospector): a bijection on [0, 2**32) with low avalanche bias, whose
# multipliers are below 2**31, so x * c of a 32-bit x fits int64 without overflow.
_MIX = (0x21F0AAAD, 0x735A2D97)
_GOLDEN = 0x61C88647  # 2**32 / phi, below 2**31: ids * _GOLDEN fits int64 for any id < 2**32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 x in [0, 2**32), in place (x must be a fresh tensor)."""
    x.bitwise_xor_(x >> 16).mul_(_MIX[0]).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(_MIX[1]).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def _mix32_int(x: int) -> int:
    x = ((x ^ (x >> 16)) * _MIX[0]) & _M32
    x = ((x ^ (x >> 15)) * _MIX[1]) & _M32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """Two 32-bit keys per row from (seed, output position, stream): int64 [R, 2].

    Args:
        seeds: int64 [R] in [0, 2**63); positions: int64 [R] (>= 0); stream: separates independent draws at
            one position (speculative decoding's draft / accept / residual draws).
    """
    salt = _mix32_int((stream * _GOLDEN + 0x7F4A7C15) & _M32)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    t = _mix32((positions & _M32) ^ salt)
    k0 = _mix32(lo ^ t)
    k1 = _mix32(hi ^ _mix32((k0 + 0x632BE5AB) & _M32))
    return torch.stack([k0, k1], dim=-1)


def _hash(keys_R2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """32 random bits per (row key, id): int64 [R, N] in [0, 2**32) (two keyed rounds of lowbias32)."""
    k0, k1 = (k.unsqueeze(1) for k in keys_R2.unbind(1))
    h = _mix32((ids * _GOLDEN + k0).bitwise_and_(_M32))
    return _mix32(h.bitwise_xor_(k1))


def uniforms(keys_R2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform variates in (0, 1) at 2**-32 resolution near 0, one per (row key, id): float32 [R, N].

    Args:
        keys_R2: `row_keys`. ids: int64 [R, N] or [1, N] vocabulary ids (< 2**31).
    """
    return _hash(keys_R2, ids).to(torch.float32).add_(0.5).mul_(2.0**-32)


def exponentials(keys_R2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard exponential variates, one per (row key, id): float32 [R, N]. E = -log(1 - U) keeps full
    relative precision for small E (the race's winners); the clamp keeps E finite where float32 rounds U to 1."""
    return uniforms(keys_R2, ids).clamp_(max=1.0 - 2.0**-24).neg_().log1p_().neg_()


def race(x_RN: torch.Tensor, keys_R2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Index (into N) of a draw from softmax(x) per row: argmax(x - log E), E exponential per (key, id).
    -inf entries are never drawn (a row with nothing finite gets its first entry)."""
    return exponentials(keys_R2, ids).log_().neg_().add_(x_RN).argmax(dim=-1)


# ---------------------------------------------------------------------------- logits processing
def apply_penalties(
    logits_RV: torch.Tensor,
    *,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    prompt_RL: torch.Tensor,
    output_RL: torch.Tensor,
) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (divide positive logits, multiply negative), frequency
    (x count) and presence (once) penalties over output tokens only (OpenAI/vLLM), batched, in place: only the
    logits of the tokens in the history are read and written (cost O(history), plus a count table).

    Args:
        logits_RV: float [R, V], changed in place and returned. repetition, frequency, presence: float [R].
        prompt_RL, output_RL: int64 [R, L] token ids, padded with V (any id >= V is ignored).
    """
    ids = torch.cat([prompt_RL, output_RL], dim=1)
    is_output = (torch.arange(ids.shape[1], device=ids.device) >= prompt_RL.shape[1]).expand(ids.shape)
    return _penalise(logits_RV, repetition, frequency, presence, ids, is_output)


def apply_penalties_history(
    logits_RV: torch.Tensor,
    *,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    ids_RL: torch.Tensor,
    prompt_len: torch.Tensor,
) -> torch.Tensor:
    """`apply_penalties` over one history per row (model_shards/penalty_history.py's layout): the tokens fed, the
    first prompt_len of them the prompt, padded with ids >= V.

    Args:
        ids_RL: int64 [R, L]. prompt_len: int64 [R].
    """
    is_output = torch.arange(ids_RL.shape[1], device=ids_RL.device) >= prompt_len.unsqueeze(1)
    return _penalise(logits_RV, repetition, frequency, presence, ids_RL, is_output)


def _penalise(
    logits_RV: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    ids: torch.Tensor,
    is_output: torch.Tensor,
) -> torch.Tensor:
    r, vocab = logits_RV.shape
    if ids.shape[1] == 0:
        return logits_RV
    valid = ids < vocab
    # padding points at the row's smallest history id, so it writes the same value as that token's own entry
    # (a row with no history points at token 0 and writes its logit back unchanged)
    first = torch.where(valid, ids, vocab).amin(dim=1, keepdim=True)
    seen = first < vocab
    at = torch.where(valid, ids, first.clamp(max=vocab - 1))
    counts = torch.zeros(r, vocab + 1, dtype=logits_RV.dtype, device=logits_RV.device)
    counts.scatter_add_(1, ids.clamp(max=vocab), (is_output & valid).to(logits_RV.dtype))
    n = counts.gather(1, at)
    x = logits_RV.gather(1, at)
    rep = repetition.unsqueeze(1)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - frequency.unsqueeze(1) * n - presence.unsqueeze(1) * (n > 0).to(x.dtype)
    return logits_RV.scatter_(1, at, x)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place (pure torch, any device, one op chain per batch).

    Args:
        logits: float [V] or [B, V].
        bitmask: int32 [W] or [B, W] (the `GrammarMatcher.bitmask` layout); tokens at or past 32 * W are disallowed.

    Returns:
        `logits`.
    """
    if bitmask.dtype != torch.int32 or bitmask.dim() != logits.dim() or bitmask.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"bitmask must be int32 with the logits' leading shape, got {bitmask.dtype} "
            f"{tuple(bitmask.shape)} for logits {tuple(logits.shape)}"
        )
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1).flatten(-2).bool()  # [..., 32 * W]
    if allowed.shape[-1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[-1]), value=False)
    return logits.masked_fill_(allowed.narrow(-1, 0, vocab).logical_not(), _NEG_INF)


def _apply_bitmask_rows(logits_RV: torch.Tensor, bitmask_RW: torch.Tensor) -> None:
    """`apply_bitmask` for a batch, in place: llguidance's compiled helper on a real GPU (its torch.compile
    costs seconds on first use, worth it there), ours elsewhere (CPU, fake tensors)."""
    if logits_RV.device.type == "cuda" and torch.cuda.is_available():
        from llguidance.torch import apply_token_bitmask_inplace

        apply_token_bitmask_inplace(logits_RV, bitmask_RW)
    else:
        apply_bitmask(logits_RV, bitmask_RW)


def finite_support(x_RN: torch.Tensor) -> torch.Tensor:
    """Rows an extreme temperature or penalty overflowed: the +inf tokens tie (0, the rest -inf); NaN never
    wins. (A row with nothing finite left draws its first entry: the best-ranked one in sorted candidates.)"""
    posinf = torch.isposinf(x_RN)
    out = torch.nan_to_num(x_RN, nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
    return out.masked_fill_(posinf.any(dim=-1, keepdim=True), _NEG_INF).masked_fill_(posinf, 0.0)


def _top_p(sorted_RN: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix of the (descending) candidates whose renormalised mass reaches top_p."""
    probs = torch.softmax(sorted_RN, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop &= torch.arange(sorted_RN.shape[1], device=sorted_RN.device) > 0  # the top candidate always stays
    return sorted_RN.masked_fill(drop, _NEG_INF)


def min_p_filter(x_RN: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens below min_p times the top probability: x < x_max + log(min_p), softmax-free (0: -inf, off)."""
    return x_RN.masked_fill(x_RN < x_RN.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1), _NEG_INF)


def filter_sorted(
    vals_RK: torch.Tensor, temp: torch.Tensor, min_p: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature, min_p, top_k and top_p over each row's largest raw logits in descending order (the top-k
    set, or the whole sorted row); filtered-out entries become -inf.

    Args:
        vals_RK: raw logits, descending. temp, min_p, top_p: float [R]; top_k: int64 [R] (K or more: off).
    """
    x = min_p_filter(finite_support(vals_RK / temp.unsqueeze(1)), min_p)
    x = x.masked_fill(torch.arange(x.shape[1], device=x.device) >= top_k.unsqueeze(1), _NEG_INF)
    return _top_p(x, top_p)


def candidates(logits_V: torch.Tensor, *, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a non-greedy draw may pick and their tempered logits (descending), for one row: what
    speculative decoding keeps as a draft distribution. Same filters, order and support as `sample`.

    Returns:
        ids [C] int64, logits [C] float.
    """
    x = logits_V[None]
    k = params.top_k if 0 < params.top_k < x.shape[-1] else x.shape[-1]
    vals, ids = torch.topk(x, k, dim=-1) if k < x.shape[-1] else torch.sort(x, dim=-1, descending=True)
    one = torch.ones(1, dtype=torch.float32, device=x.device)
    vals = filter_sorted(
        vals, one * params.temperature, one * params.min_p, torch.full_like(one, k).long(), one * params.top_p
    )[0]
    keep = torch.isfinite(vals)  # a data-dependent shape: fine off the common path (one row, speculative)
    return ids[0][keep], vals[keep]


# ---------------------------------------------------------------------------- the batched sampler
def _real_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def upload_list(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Step inputs in: host values to the sampling device without a host sync (pinned, non-blocking on CUDA).
    Without a CUDA runtime but a non-CPU device (FakeTensorMode on a CPU-only build) only a factory call can
    make the tensor there."""
    if _real_cuda(device):
        return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, device=device)


def _upload_rows(
    rows: list[torch.Tensor | None], fill: int, dtype: torch.dtype, device: torch.device, width: int = 0
) -> torch.Tensor:
    """Host rows of different lengths (None: empty) as one [R, max(longest, width)] tensor on the device, padded
    with `fill`."""
    full = [r for r in rows if r is not None and r.numel()]
    n = max([width, *(r.numel() for r in full)])
    if device.type == "cpu" or _real_cuda(device):
        host = torch.full((len(rows), n), fill, dtype=dtype)
        for i, r in enumerate(rows):  # host copies only: the step's input rows into one staging tensor
            if r is not None and r.numel():
                host[i, : r.numel()] = r
        return host.pin_memory().to(device, non_blocking=True) if _real_cuda(device) else host
    values = [(r.tolist() if r is not None else []) for r in rows]
    return torch.tensor([v + [fill] * (n - len(v)) for v in values], dtype=dtype, device=device)


def sample(
    logits_BV: torch.Tensor,
    params: list[SamplingParams],
    *,
    prompt_ids: list[torch.Tensor] | None = None,
    output_ids: list[torch.Tensor] | None = None,
    positions: list[int] | None = None,
    banned: list[tuple[int, ...]] | None = None,
    allowed: list[torch.Tensor | None] | None = None,
    rows: list[int] | None = None,
    history: DeviceHistory | None = None,
) -> SampleOutput:
    """Choose one token per row, batched on the logits' device.

    Args:
        logits_BV: [B, V] fp32 logits (or [T, V] with `rows`).
        params: one `SamplingParams` per row.
        rows: the rows of `logits_BV` to sample from, one per params (default: all, in order).
        prompt_ids, output_ids: per-row int64 host token tensors (only read for rows with a penalty), uploaded
            for this call; or
        history: the rows' histories already on the device, appended to in place with the chosen tokens.
        positions: per-row index of the token being sampled in its output (seeds the draw).
        banned: per-row token ids that may not be drawn (min_tokens); logprobs stay those of the raw logits.
        allowed: per-row int32 bitmask of the tokens a grammar allows (structured output), or None.
    """
    if rows is not None and rows != list(range(logits_BV.shape[0])):
        logits_BV = logits_BV.index_select(0, upload_list(rows, torch.long, logits_BV.device))
    b = logits_BV.shape[0]
    if len(params) != b:
        raise ValueError(f"{len(params)} sampling params for {b} rows")
    tokens = logits_BV.argmax(dim=-1)  # exact greedy for every simple row (the others are overwritten)
    if (
        any(not p.greedy or p.has_penalties for p in params)
        or any(banned or ())
        or any(m is not None for m in allowed or ())
    ):
        rows_ = _Rows(logits_BV, params, prompt_ids, output_ids, positions, banned, allowed, history)
        rows_.sample_into(tokens)
        rows_.append_history(tokens)
    return _with_logprobs(logits_BV, tokens, params)


# On the CPU a data-dependent width costs nothing (there is no device to wait for), and dropping entries that
# are -inf leaves every draw unchanged (the race is hashed by vocabulary id): the group races over fewer entries.
def _cpu_prefix(x_RN: torch.Tensor, ids_RN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted candidates cut after the last finite entry of any row."""
    last = (torch.isfinite(x_RN) * torch.arange(1, x_RN.shape[1] + 1)).amax(dim=1)
    width = max(int(last.max()), 1)
    return x_RN.narrow(1, 0, width), ids_RN.narrow(1, 0, width)


def _cpu_shortlist(x_RV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The finite entries of each row (min_p leaves few), as the widest row's top entries with their ids."""
    width = max(int(torch.isfinite(x_RV).sum(dim=1).max()), 1)
    return torch.topk(x_RV, width, dim=-1)


class _Rows:
    """One step's rows that need more than an argmax of the raw logits, grouped on the host by what they need
    (processed greedy, top-k, top-p only, plain draw); each group is a constant number of batched ops."""

    def __init__(
        self,
        logits_BV: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[torch.Tensor] | None,
        output_ids: list[torch.Tensor] | None,
        positions: list[int] | None,
        banned: list[tuple[int, ...]] | None,
        allowed: list[torch.Tensor | None] | None,
        history: DeviceHistory | None = None,
    ) -> None:
        b, vocab = logits_BV.shape
        self.logits, self.dev, self.vocab = logits_BV, logits_BV.device, vocab
        self.banned = banned if banned is not None else [()] * b
        self.allowed = allowed if allowed is not None else [None] * b
        self.prompt_ids, self.output_ids, self.history = prompt_ids, output_ids, history
        bans = [i for i in range(b) if self.banned[i]]
        masked = [i for i in range(b) if self.allowed[i] is not None]
        pen = [i for i, p in enumerate(params) if p.has_penalties]
        special = set(bans) | set(masked) | set(pen)
        # rows processed (bans, masks, penalties) are copied into a work tensor; without any, work is the logits
        sel = [i for i, p in enumerate(params) if not p.greedy or i in special] if special else list(range(b))
        self.copy = bool(special)
        self.sel, self.bans, self.masked, self.pen = sel, bans, masked, pen
        self.ps = [params[i] for i in sel]
        self.local = local = {row: j for j, row in enumerate(sel)}
        ps = self.ps
        in_k = [not p.greedy and 0 < p.top_k < vocab for p in ps]
        self.groups = {
            "greedy": [j for j, p in enumerate(ps) if p.greedy and sel[j] in special],
            "top_k": [j for j, p in enumerate(ps) if in_k[j]],
            "top_p": [j for j, p in enumerate(ps) if not p.greedy and not in_k[j] and p.top_p < 1.0],
            "plain": [j for j, p in enumerate(ps) if not p.greedy and not in_k[j] and p.top_p >= 1.0],
        }
        lists = [
            sel,
            *self.groups.values(),
            [local[i] for i in masked],
            [local[i] for i in pen],
            [local[i] for i in bans for _ in self.banned[i]],
            [t for i in bans for t in self.banned[i]],
            [p.seed % 2**63 for p in ps],
            [positions[i] if positions else 0 for i in sel],
            [p.top_k if 0 < p.top_k < vocab else vocab for p in ps],
            pen,
            *self._history_lists(history, pen),
        ]
        # step inputs in: every index list and integer parameter in one transfer, the floats in another
        flat = upload_list([x for g in lists for x in g], torch.long, self.dev)
        parts = flat.split([len(g) for g in lists])
        self.sel_t = parts[0]
        self.group_t = dict(zip(self.groups, parts[1:5]))
        self.mask_t, self.pen_t, self.ban_r, self.ban_c, self.seeds, self.pos, self.top_k = parts[5:12]
        self.pen_b, self.h_row, self.h_len, self.h_prompt = parts[12:]
        f = upload_list(
            [
                [p.temperature or 1.0, p.top_p, p.min_p, p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
                for p in ps
            ],
            torch.float32,
            self.dev,
        ).reshape(-1, 6)
        self.temp, self.top_p, self.min_p, self.rep, self.freq, self.pres = f.unbind(1)

    @staticmethod
    def _history_lists(history: DeviceHistory | None, pen: list[int]) -> list[list[int]]:
        """Pool rows, lengths and prompt lengths of the rows with a penalty (uploaded with the step's inputs)."""
        if history is None:
            return [[], [], []]
        longest = max((history.lens[i] for i in pen), default=0)
        if longest >= history.ids.shape[1]:
            raise ValueError(f"penalty history of width {history.ids.shape[1]} has no room to append at {longest}")
        return [[history.rows[i] for i in pen], [history.lens[i] for i in pen], [history.prompt_lens[i] for i in pen]]

    def append_history(self, tokens: torch.Tensor) -> None:
        """Each penalised row's chosen token into its device history, at its length (no host value needed)."""
        h = self.history
        if h is not None and self.pen:
            h.ids.index_put_((self.h_row, self.h_len), tokens.index_select(0, self.pen_b).to(h.ids.dtype))

    def sample_into(self, tokens: torch.Tensor) -> None:
        """Write the rows' tokens into `tokens` [B]."""
        work = self._processed()
        for name, group in self.groups.items():
            if not group:
                continue
            idx = self.group_t[name]
            rows = work if len(group) == work.shape[0] else work.index_select(0, idx)
            if name == "greedy":
                tokens.index_copy_(0, self.sel_t.index_select(0, idx), rows.argmax(dim=-1))
                continue
            keys = row_keys(self.seeds.index_select(0, idx), self.pos.index_select(0, idx))
            temp, min_p = self.temp.index_select(0, idx), self.min_p.index_select(0, idx)
            if name == "plain":  # no top-k / top-p: race over the whole vocabulary, no sort
                x = min_p_filter(finite_support(rows / temp.unsqueeze(1)), min_p)
                if self.dev.type == "cpu" and all(self.ps[j].min_p > 0.0 for j in group):
                    x, ids = _cpu_shortlist(x)
                    chosen = ids.gather(1, race(x, keys, ids).unsqueeze(1)).squeeze(1)
                else:
                    chosen = race(x, keys, torch.arange(self.vocab, device=self.dev).unsqueeze(0))
            else:
                if name == "top_k":  # the k largest, sorted, for the group's widest k
                    vals, ids = torch.topk(rows, max(self.ps[j].top_k for j in group), dim=-1)
                else:
                    vals, ids = torch.sort(rows, dim=-1, descending=True)
                top_k, top_p = self.top_k.index_select(0, idx), self.top_p.index_select(0, idx)
                x = filter_sorted(vals, temp, min_p, top_k, top_p)
                if self.dev.type == "cpu":
                    x, ids = _cpu_prefix(x, ids)
                # hashed by vocabulary id, not rank: the draw does not depend on the group's k
                chosen = ids.gather(1, race(x, keys, ids).unsqueeze(1)).squeeze(1)
            tokens.index_copy_(0, self.sel_t.index_select(0, idx), chosen)

    def _device_history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalised rows' histories, read on the device: ids [R, longest] (past each row's length: V), and
        their prompt lengths."""
        assert self.history is not None
        width = max(self.history.lens[i] for i in self.pen)
        ids = self.history.ids.index_select(0, self.h_row).narrow(1, 0, width).long()
        ids.masked_fill_(torch.arange(width, device=self.dev) >= self.h_len.unsqueeze(1), self.vocab)
        return ids, self.h_prompt

    def _history_from_host(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalised rows' prompt and output ids from host rows, uploaded in one go (padded with V)."""
        n = len(self.pen)
        prompts = [self.prompt_ids[i] if self.prompt_ids is not None else None for i in self.pen]
        outputs = [self.output_ids[i] if self.output_ids is not None else None for i in self.pen]
        hist = _upload_rows([*prompts, *outputs], self.vocab, torch.long, self.dev)
        return hist.narrow(0, 0, n), hist.narrow(0, n, n)

    def _processed(self) -> torch.Tensor:
        """The selected rows after min_tokens bans, grammar masks and penalties ([R, V]; the logits themselves
        when no row needs any)."""
        if not self.copy:
            return self.logits
        dev, vocab = self.dev, self.vocab
        work = self.logits.index_select(0, self.sel_t)
        if self.bans:
            work.index_put_((self.ban_r, self.ban_c), torch.full((), _NEG_INF, device=dev))
        if self.masked:
            width = (vocab + 31) // 32  # short masks are padded with 0: the tokens past them are disallowed
            masks = _upload_rows([self.allowed[i] for i in self.masked], 0, torch.int32, dev, width).narrow(1, 0, width)
            rows = work.index_select(0, self.mask_t)
            _apply_bitmask_rows(rows, masks.contiguous())
            work.index_copy_(0, self.mask_t, rows)
        if self.pen:
            loc = self.pen_t
            rep, freq, pres = (t.index_select(0, loc) for t in (self.rep, self.freq, self.pres))
            rows = work.index_select(0, loc)
            if self.history is not None:
                ids, prompt_len = self._device_history()
                apply_penalties_history(
                    rows, repetition=rep, frequency=freq, presence=pres, ids_RL=ids, prompt_len=prompt_len
                )
            else:
                prompt_RL, output_RL = self._history_from_host()
                apply_penalties(
                    rows, repetition=rep, frequency=freq, presence=pres, prompt_RL=prompt_RL, output_RL=output_RL
                )
            work.index_copy_(0, loc, rows)
        return work


def _with_logprobs(logits_BV: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> SampleOutput:
    """Raw-model logprobs (log_softmax of the unprocessed logits) for the rows that asked, batched."""
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return SampleOutput(tokens, None, None, None)
    b, dev = logits_BV.shape[0], logits_BV.device
    idx = upload_list(want, torch.long, dev)
    logp = torch.log_softmax(logits_BV.index_select(0, idx).float(), dim=-1)
    chosen = torch.full((b,), float("nan"), device=dev).index_copy_(
        0, idx, logp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1)
    )
    n = max(params[i].logprobs or 0 for i in want)
    if n == 0:
        return SampleOutput(tokens, chosen, None, None)
    top = torch.topk(logp, n, dim=-1)
    top_ids = torch.zeros(b, n, dtype=torch.long, device=dev).index_copy_(0, idx, top.indices)
    top_lp = torch.full((b, n), float("nan"), device=dev).index_copy_(0, idx, top.values)
    return SampleOutput(tokens, chosen, top_ids, top_lp)
