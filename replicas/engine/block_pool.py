"""The cache pools of one trunk rank as the engine sees them: free KV block ids and state slot ids.

Owns: allocation and release by index (the tensors live on the trunk rank), and the usage
figures the metrics report. Must not: know sequences. Tests: tests/replicas/test_scheduler.py.
"""

from __future__ import annotations


class BlockPool:
    """Free lists of KV blocks and DeltaNet state slots of one trunk rank."""

    def __init__(self, *, num_blocks: int, num_slots: int, block_size: int, num_checkpoints: int = 0) -> None:
        if num_blocks < 1 or num_slots < 1 or block_size < 1:
            raise ValueError("a trunk rank needs at least one KV block and one state slot")
        self.num_blocks, self.num_slots, self.block_size = num_blocks, num_slots, block_size
        self.num_checkpoints = num_checkpoints  # the rank's prefix-cache state checkpoints
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def take_slot(self) -> int:
        return self._free_slots.pop()

    def take_blocks(self, n: int) -> list[int]:
        if n > len(self._free_blocks):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free_blocks)} free")
        return [self._free_blocks.pop() for _ in range(n)]

    def release(self, *, slot: int | None, blocks: list[int]) -> None:
        if slot is not None:
            self._free_slots.append(slot)
        self._free_blocks.extend(reversed(blocks))

    @property
    def kv_usage(self) -> float:
        return 1.0 - len(self._free_blocks) / self.num_blocks

    @property
    def slot_usage(self) -> float:
        return 1.0 - len(self._free_slots) / self.num_slots
