"""Measured expert load: a moving window of per-step counts and the saved load file.

`LoadWindow` keeps the counts of the last `window_steps` steps (tokens per expert per MoE layer as the
expert ranks received them), so a rebalance places by recent traffic, not by the whole server life.
The load file (JSON) is what `ExpertParallelGroup.save_load` writes and what an initial placement reads:
    {"format": "epserve-expert-load/1", "num_experts": E, "steps": N,
     "layers": [[tokens per expert] per MoE layer (decoder layers, then MTP layers)],
     "padding_rows": [unused capacity slots per MoE layer]}
Tokens are per-step means over the window. Must not: know Ray or weights.
Tests: tests/cluster/test_expert_load.py.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch

FORMAT = "epserve-expert-load/1"


class LoadWindow:
    """Sums of the last `window_steps` steps' counts ([layers, experts] tokens, [layers] padding rows).

    Samples arrive in batches (whatever the ranks counted since the last read, over `steps` steps); whole
    batches are dropped from the old end while the rest still covers the window.
    """

    def __init__(self, window_steps: int) -> None:
        if window_steps < 1:
            raise ValueError(f"window_steps must be >= 1, got {window_steps}")
        self.window_steps = window_steps
        self._batches: deque[tuple[int, torch.Tensor, torch.Tensor]] = deque()

    def add(self, steps: int, tokens: torch.Tensor, padding: torch.Tensor) -> None:
        if steps <= 0:
            return
        self._batches.append((steps, tokens.to(torch.float64), padding.to(torch.float64)))
        while len(self._batches) > 1 and self.steps - self._batches[0][0] >= self.window_steps:
            self._batches.popleft()

    @property
    def steps(self) -> int:
        return sum(b[0] for b in self._batches)

    def mean_tokens(self) -> torch.Tensor | None:
        """Per-step mean tokens per expert per layer over the window; None before any step."""
        if not self._batches:
            return None
        return sum(b[1] for b in self._batches) / self.steps  # type: ignore[return-value]  # a tensor sum

    def mean_padding(self) -> torch.Tensor | None:
        if not self._batches:
            return None
        return sum(b[2] for b in self._batches) / self.steps  # type: ignore[return-value]  # a tensor sum


def rank_imbalance(per_rank: torch.Tensor) -> torch.Tensor:
    """max / mean tokens over expert ranks, per layer ([layers, X] -> [layers]); 1.0 for an idle layer."""
    mean = per_rank.mean(dim=1)
    out = torch.ones_like(mean, dtype=torch.float64)
    used = mean > 0
    out[used] = (per_rank[used].max(dim=1).values / mean[used]).to(torch.float64)
    return out


def write_load_file(path: str | Path, tokens: torch.Tensor, *, steps: int, padding: torch.Tensor | None = None) -> None:
    """Write the load file (see the module docstring); tokens [layers, experts]."""
    doc = {
        "format": FORMAT,
        "num_experts": int(tokens.shape[1]),
        "steps": int(steps),
        "layers": [[float(v) for v in row] for row in tokens.tolist()],
        "padding_rows": [float(v) for v in padding.tolist()] if padding is not None else [],
    }
    Path(path).write_text(json.dumps(doc))


def read_load_file(
    path: str | Path, *, num_experts: int | None = None, num_layers: int | None = None
) -> list[list[float]]:
    """Tokens per expert per MoE layer from a load file.

    Raises:
        ValueError: not a load file, or its shape does not match the model (naming what differs).
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read expert load file {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not an expert load file (format {FORMAT!r} expected)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(r, list) for r in layers):
        raise ValueError(f"{path}: 'layers' must be a list of per-expert token lists")
    out = [[float(v) for v in row] for row in layers]
    for i, row in enumerate(out):
        if num_experts is not None and len(row) != num_experts:
            raise ValueError(f"{path}: MoE layer {i} lists {len(row)} experts, the model has {num_experts}")
        if any(v < 0 for v in row):
            raise ValueError(f"{path}: MoE layer {i} has a negative load")
    if num_layers is not None and len(out) != num_layers:
        raise ValueError(f"{path}: {len(out)} MoE layers, the model has {num_layers}")
    return out


def per_rank_load(
    tokens: Sequence[Sequence[float]] | torch.Tensor, owners: Sequence[Sequence[Sequence[int]]], num_ranks: int
) -> torch.Tensor:
    """[layers, X] tokens per expert rank under an expert map's owners (a copy gets its share)."""
    t = torch.as_tensor(tokens, dtype=torch.float64)
    out = torch.zeros(t.shape[0], num_ranks, dtype=torch.float64)
    for layer in range(min(t.shape[0], len(owners))):
        for e, ranks in enumerate(owners[layer]):
            for r in ranks:
                out[layer, r] += t[layer, e] / len(ranks)
    return out
