"""How a trunk rank splits a step's sequences into ping-pong micro-batches (MegaScale-Infer's attention-FFN overlap).

One rule, used by the trunk rank (to build the micro-batches) and by the group (to size the fixed exchange capacity
per micro-batch): m consecutive groups of sequences with about equal token counts; a sequence is never split (its
DeltaNet state and KV run in one piece), and a group may be empty (fewer sequences than m), in which case the rank
still makes that micro-batch's exchanges with no rows. Tests: tests/replicas/test_micro_batches.py.
"""

from __future__ import annotations


def split_sequences(tokens: list[int], m: int) -> list[tuple[int, int]]:
    """[start, end) sequence index ranges of the m micro-batches, in order, covering all of `tokens` (new tokens per
    sequence). Sequence i goes to the group whose share of the total holds its middle token."""
    if m < 1:
        raise ValueError(f"micro-batches must be >= 1, got {m}")
    total = sum(tokens)
    bounds, acc, i = [0], 0, 0
    for k in range(1, m):
        # sequences whose midpoint lies before k/m of the tokens stay in the earlier groups
        while i < len(tokens) and 2 * m * acc + m * tokens[i] <= 2 * k * total:
            acc += tokens[i]
            i += 1
        bounds.append(i)
    bounds.append(len(tokens))
    return list(zip(bounds, bounds[1:]))


def max_micro_batch_tokens(tokens: list[int], m: int) -> int:
    """The most new tokens any of the m micro-batches of `tokens` holds."""
    return max((sum(tokens[a:b]) for a, b in split_sequences(tokens, m)), default=0)
