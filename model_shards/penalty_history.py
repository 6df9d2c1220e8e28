"""The penalty history of a rank's sequences, kept on the rank's device and appended to in place.

Layout (bounded by tokens, not by vocabulary): one int32 row per sequence that has a penalty (`take` / `give`),
holding the token ids it was fed in order (its prompt, then its outputs), padded with `vocab` (an id the
penalties ignore). Rows and width grow by doubling (a device copy, no host sync), so the pool is at most
2 x (sequences with penalties at once) x (longest such context) x 4 bytes: 256 sequences at 32k tokens take
32 MiB, where a count table [slots, vocab] at a 248k vocabulary would take 254 MiB whatever the contexts. When no
row is in use the pool shrinks back to its first size. The penalties read a row by gather and scatter over its
ids (model_shards/sampling.py `apply_penalties_history`): O(history) per step, as before, with no upload of it.

Writes: tokens the host already holds (a prefill chunk, a restored prefix, accepted drafts) are staged and
uploaded in one transfer per step (`flush`: O(new tokens)); a sampled token is written by the sampler on the
device from its own output (`sample(history=...)`), so a decode step that feeds back the token the rank sampled
uploads nothing for its history.
Tests: tests/model_shards/test_sampling.py, tests/replicas/test_device_path.py.
"""

from __future__ import annotations

import torch


class PenaltyHistory:
    """Token-id rows on one device for the sequences whose sampling has a penalty.

    Args:
        vocab_size: the padding id (ids >= vocab are ignored by the penalties).
        device: where the rows live (the rank's device).
        rows, width: the first allocation (grown on demand).
    """

    def __init__(self, vocab_size: int, device: torch.device, *, rows: int = 4, width: int = 256) -> None:
        self.vocab_size, self.device = vocab_size, device
        self._first = (rows, width)
        self.ids = torch.full((0, 0), vocab_size, dtype=torch.int32, device=device)  # allocated at the first take
        self._free: list[int] = []
        self._used = 0
        self._staged: list[tuple[int, int, tuple[int, ...]]] = []

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def take(self) -> int:
        """A row for a new sequence, all padding."""
        if not self._free:
            self._grow(rows=max(self._first[0], 2 * self.ids.shape[0]), width=max(self._first[1], self.width))
        row = self._free.pop()
        self.ids.select(0, row).fill_(self.vocab_size)  # it may hold an earlier sequence's ids
        self._used += 1
        return row

    def give(self, row: int) -> None:
        """The sequence is gone: its row is free (its staged writes are dropped)."""
        self._staged = [w for w in self._staged if w[0] != row]
        self._free.append(row)
        self._used -= 1
        if self._used == 0 and self.ids.shape != self._first:  # nothing held: drop what a long context grew
            self.ids = torch.full(self._first, self.vocab_size, dtype=torch.int32, device=self.device)
            self._free = list(range(self._first[0]))[::-1]

    def reserve(self, width: int) -> None:
        """Make every row at least `width` ids wide (doubling)."""
        if width > self.width:
            self._grow(rows=self.ids.shape[0], width=max(width, 2 * self.width))

    def stage(self, row: int, col: int, tokens: tuple[int, ...]) -> None:
        """Write host-known `tokens` into `row` from `col` at the next `flush`."""
        if tokens:
            self.reserve(col + len(tokens))
            self._staged.append((row, col, tokens))

    def flush(self) -> None:
        """The staged writes, in one host-to-device transfer (the step's new tokens, never a whole history)."""
        if not self._staged:
            return
        rows = [r for r, _, t in self._staged for _ in t]
        cols = [c + j for _, c, t in self._staged for j in range(len(t))]
        vals = [x for _, _, t in self._staged for x in t]
        self._staged = []
        r, c, v = upload_list([rows, cols, vals], self.device).unbind(0)
        self.ids.index_put_((r, c), v.int())

    def _grow(self, *, rows: int, width: int) -> None:
        old = self.ids  # padded out with `vocab`: a device op, no host copy
        self.ids = torch.nn.functional.pad(
            old, (0, width - old.shape[1], 0, rows - old.shape[0]), value=self.vocab_size
        )
        self._free.extend(range(rows - 1, old.shape[0] - 1, -1))  # popped from the end: lowest rows first


def upload_list(values: list[list[int]], device: torch.device) -> torch.Tensor:
    """Host ints to the device without a host sync (pinned, non-blocking on CUDA; a factory call elsewhere: a
    fake "cuda" device on a CPU-only build cannot take a copy)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.tensor(values, dtype=torch.long).pin_memory().to(device, non_blocking=True)
    return torch.tensor(values, dtype=torch.long, device=device)
