"""Causal attention read straight from the paged KV pool, with no full score matrix (the serving path).

Online softmax (flash-attention style) over key tiles of `KEY_TILE` positions aligned to absolute
positions 0, KT, 2KT, ...; each tile's K/V are gathered from the pool through the block table, so a
call holds one tile's keys and one tile's scores at a time, never [queries x all keys].

Prefill: the new queries are cut into groups of `QUERY_TILE` absolute positions (aligned like the key
tiles and zero-padded to the full tile), and every (query group, key tile) product has the same
shape, so a query row's arithmetic depends only on its own position, its sequence's keys and the
tile sizes, never on where the prompt was split into chunks: a prefill resumed at any position
gives the same bits as a one-shot prefill (key tiles past a row's position are fully masked and
leave its running max, sum and accumulator exactly unchanged: exp(-inf) = 0, alpha = exp(0) = 1).
Decode: one query per row; the rows that still have keys in tile j are gathered through their block
tables tile by tile (no copy padded to the longest context).
Fixed-width decode (`fixed_decode_attention`, what a CUDA graph captures): every row reads the same number
of key tiles, its key count a device tensor; tiles past a row's keys are fully masked, which leaves its
running max, sum and accumulator exactly unchanged, so each row gets the bits `decode_attention` gives it.
No shape depends on a value and nothing is read on the host.

Numerics: scores q.k in the compute dtype, then fp32 scale, max, exp and sums; probabilities are cast
to the compute dtype for the P.V matmul (as eager does) and accumulated in fp32. The compute dtype is
the input dtype on accelerators and fp32 on CPU, where bf16 GEMMs run ~10x slower than fp32 ones
(inputs upcast exactly, one tile at a time).
Equal to eager attention within fp32 round-off (fp32) or bf16 tolerance (bf16), not bit for bit: the
HF bit-parity tests select eager (`ATTENTION_IMPLS`). Works unchanged on CUDA tensors (only Python
ints from the batch metadata steer the loops). Tests: tests/model_shards/test_paged_attention.py.
"""

from __future__ import annotations

import torch

QUERY_TILE = 128  # query positions per group (prefill); fixed so GEMM shapes never depend on chunking
KEY_TILE = 512  # key positions per tile (rounded to whole blocks); bounds the per-tile scores / K/V copy


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 on CPU (no fast bf16 GEMM there), else the tensor's own dtype."""
    return torch.float32 if t.device.type == "cpu" else t.dtype


def key_tile(block_size: int) -> int:
    """Key positions per tile: KEY_TILE rounded down to whole blocks (at least one block)."""
    return block_size * max(1, KEY_TILE // block_size)


def prefill_attention(
    q_NHD: torch.Tensor,
    *,
    table_N: torch.Tensor,
    context_len: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of n new queries (positions context_len..context_len+n-1) over the sequence's
    context_len + n keys in the pool.

    Args:
        q_NHD: [n, H, hd] queries (post-norm, post-RoPE).
        table_N: [>= ceil((context_len + n) / block_size)] the sequence's block ids (extra entries ignored).
        k_pool, v_pool: [num_blocks, block_size, Hkv, hd], already holding this chunk's keys.
    Returns:
        [n, H, hd] in q's dtype.
    """
    n, h, hd = q_NHD.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    g = h // hkv
    s = context_len + n
    qt, kt = QUERY_TILE, key_tile(bs)
    dev, cdt = q_NHD.device, compute_dtype(q_NHD)
    first = context_len // qt * qt  # absolute start of the first query group
    groups = -(-(s - first) // qt)
    # Zero-padded queries of every group, laid out [group, Hkv, G * QT, hd] (row = g * QT + offset).
    q_pad = q_NHD.new_zeros(groups * qt, h, hd)
    q_pad[context_len - first : s - first] = q_NHD
    q_all = q_pad.view(groups, qt, hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(groups, hkv, g * qt, hd)
    del q_pad
    # Block ids of every key tile the call reads; entries past the table point at block 0 (masked).
    tiles = -(-s // kt)
    per_tile = kt // bs
    blocks = torch.zeros(tiles * per_tile, dtype=torch.long, device=dev)
    used = min(table_N.shape[0], tiles * per_tile)
    blocks[:used] = table_N[:used]
    blocks = blocks.view(tiles, per_tile)
    offsets = torch.arange(qt, device=dev).repeat(g)  # [G * QT] query offset within its group
    key_offsets = torch.arange(kt, device=dev)
    out = q_NHD.new_empty(groups * qt, h, hd)
    out_view = out.view(groups, qt, hkv, g, hd)
    for gi in range(groups):
        a = first + gi * qt
        last_key = min(a + qt, s) - 1  # the group's rows see keys 0..last_key at most
        q_pos = offsets + a
        m = torch.full((hkv, g * qt), float("-inf"), device=dev)
        den = torch.zeros(hkv, g * qt, device=dev)
        acc = torch.zeros(hkv, g * qt, hd, device=dev)
        q = q_all[gi].to(cdt)
        for ti in range(last_key // kt + 1):
            k0 = ti * kt
            k = k_pool.index_select(0, blocks[ti]).view(kt, hkv, hd).to(cdt)
            v = v_pool.index_select(0, blocks[ti]).view(kt, hkv, hd).to(cdt)
            mask = None
            if k0 + kt > s:  # keys past the sequence: other data (NaN-safe: zero V so 0 * V stays 0)
                v[s - k0 :] = 0
            if k0 + kt - 1 > a:  # the tile reaches past the group's first row: causal mask
                mask = (key_offsets + k0)[None, :] > q_pos[:, None]  # also masks keys >= s for rows < s
            _online_step(q, k.permute(1, 2, 0), v.permute(1, 0, 2), mask, scale, m, den, acc)
        res = (acc / den[..., None]).to(q_NHD.dtype).view(hkv, g, qt, hd).permute(2, 0, 1, 3)
        out_view[gi] = res
    return out.view(groups * qt, h, hd)[context_len - first : s - first]


def _online_state(
    r: int, hkv: int, g: int, hd: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The online softmax's running max, denominator and weighted sum for [R, Hkv, G] query heads (fp32)."""
    return (
        torch.full((r, hkv, g), float("-inf"), device=dev),
        torch.zeros(r, hkv, g, device=dev),
        torch.zeros(r, hkv, g, hd, device=dev),
    )


def _online_step(
    q: torch.Tensor,
    kT: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    m: torch.Tensor,
    den: torch.Tensor,
    acc: torch.Tensor,
) -> None:
    """Fold one key tile into the running max `m`, denominator `den` and fp32 accumulator `acc`
    (updated in place). q [..., R, hd], kT [..., hd, K], v [..., K, hd], mask [R, K] or [..., R, K]
    (True = masked), m / den [..., R], acc [..., R, hd]."""
    scores = torch.matmul(q, kT).float().mul_(scale)
    if mask is not None:
        scores.masked_fill_(mask, float("-inf"))
    m_new = torch.maximum(m, scores.amax(dim=-1))
    alpha = torch.exp(m - m_new)  # 0 on the first tile (m = -inf), 1 where the max did not move
    probs = scores.sub_(m_new[..., None]).exp_()
    den.mul_(alpha).add_(probs.sum(dim=-1))
    pv = torch.matmul(probs.to(v.dtype), v)
    acc.mul_(alpha[..., None]).add_(pv)
    m.copy_(m_new)


def decode_plan(
    tables_RN: torch.Tensor, key_counts: list[int], *, block_size: int
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor | None]]]:
    """What every attention layer of a decode step reads: rows sorted by key count (longest first),
    and per key tile (rows still active, their [active * blocks_per_tile] block ids, the [active, KT]
    mask of key slots past each row's count or None when all are in range).

    Args:
        tables_RN: [R, >= blocks of the longest row] block table of each row's sequence.
        key_counts: keys each row attends to (its query is the last of them).
    Returns:
        (order [R] row indices longest first, tiles).
    """
    dev = tables_RN.device
    kt = key_tile(block_size)
    per_tile = kt // block_size
    order = sorted(range(len(key_counts)), key=lambda r: -key_counts[r])
    counts = [key_counts[r] for r in order]
    tiles_needed = -(-counts[0] // kt)
    width = tiles_needed * per_tile
    tables = torch.zeros(len(order), width, dtype=torch.long, device=dev)
    have = min(width, tables_RN.shape[1])
    tables[:, :have] = tables_RN[torch.tensor(order, device=dev), :have]
    counts_t = torch.tensor(counts, device=dev)
    key_offsets = torch.arange(kt, device=dev)
    plan = []
    for ti in range(tiles_needed):
        k0 = ti * kt
        active = sum(1 for c in counts if c > k0)
        ids = tables[:active, ti * per_tile : (ti + 1) * per_tile].reshape(-1)
        mask = None
        if counts[active - 1] < k0 + kt:  # some active row ends inside this tile
            mask = (key_offsets + k0)[None, :] >= counts_t[:active, None]
        plan.append((active, ids, mask))
    return torch.tensor(order, dtype=torch.long, device=dev), plan


def decode_attention(
    q_RHD: torch.Tensor,
    *,
    plan: tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor | None]]],
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row over its keys in the pool, tile by tile through `decode_plan`'s block ids.

    Args:
        q_RHD: [R, H, hd] queries in the row order `decode_plan` was given.
    Returns:
        [R, H, hd] in q's dtype.
    """
    r, h, hd = q_RHD.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    g = h // hkv
    kt = key_tile(bs)
    order, tiles = plan
    dev, cdt = q_RHD.device, compute_dtype(q_RHD)
    q = q_RHD.index_select(0, order).view(r, hkv, g, hd).to(cdt)  # [R, Hkv, G, hd], longest row first
    m, den, acc = _online_state(r, hkv, g, hd, dev)
    for active, ids, mask in tiles:
        k = k_pool.index_select(0, ids).view(active, kt, hkv, hd).to(cdt)
        v = v_pool.index_select(0, ids).view(active, kt, hkv, hd).to(cdt)
        if mask is not None:  # slots past a row's keys may hold other data, NaN included
            v.masked_fill_(mask[:, :, None, None], 0)
            mask = mask[:, None, None, :]
        _online_step(
            q[:active],
            k.permute(0, 2, 3, 1),
            v.permute(0, 2, 1, 3),
            mask,
            scale,
            m[:active],
            den[:active],
            acc[:active],
        )
    out = (acc / den[..., None]).to(q_RHD.dtype).view(r, h, hd)
    return torch.empty_like(out).index_copy_(0, order, out)


def fixed_decode_attention(
    q_RHD: torch.Tensor,
    *,
    tables_RN: torch.Tensor,
    key_counts_R: torch.Tensor,
    tiles: int,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`decode_attention` with a plan fixed by shapes alone: every row reads `tiles` key tiles, masked past its
    key count (a device tensor), in row order (no sort). What a CUDA graph of a decode bucket captures.

    Args:
        q_RHD: [R, H, hd] queries.
        tables_RN: [R, >= tiles * blocks per tile] block ids; entries past a row's keys must be valid block ids
            (they are read, then masked).
        key_counts_R: [R] int64 keys each row attends to (>= 1; its query is the last of them).
    Returns:
        [R, H, hd] in q's dtype.
    """
    r, h, hd = q_RHD.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    g = h // hkv
    kt = key_tile(bs)
    per_tile = kt // bs
    dev, cdt = q_RHD.device, compute_dtype(q_RHD)
    q = q_RHD.view(r, hkv, g, hd).to(cdt)
    m, den, acc = _online_state(r, hkv, g, hd, dev)
    key_offsets = torch.arange(kt, device=dev)
    for ti in range(tiles):
        ids = tables_RN[:, ti * per_tile : (ti + 1) * per_tile].reshape(-1)
        k = k_pool.index_select(0, ids).view(r, kt, hkv, hd).to(cdt)
        v = v_pool.index_select(0, ids).view(r, kt, hkv, hd).to(cdt)
        mask = (key_offsets + ti * kt)[None, :] >= key_counts_R[:, None]  # [R, KT] slots past each row's keys
        v.masked_fill_(mask[:, :, None, None], 0)  # they may hold other data, NaN included
        _online_step(q, k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3), mask[:, None, None, :], scale, m, den, acc)
    return (acc / den[..., None]).to(q_RHD.dtype).view(r, h, hd)
