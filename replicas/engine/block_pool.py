"""The cache pools of one trunk rank as the engine sees them: free KV block ids, state slot ids, state checkpoints.

Owns: allocation and release by index (the tensors live on the trunk rank), reference counts on KV blocks (the
prefix cache shares a prompt's blocks with the sequences that hit it: a block is free when no one holds it), the
free list of state checkpoints (the prefix cache's saved DeltaNet states), and the usage figures the metrics
report. Must not: know sequences. Tests: tests/replicas/test_scheduler.py, tests/replicas/test_prefix_cache.py.
"""

from __future__ import annotations


class BlockPool:
    """Free lists of KV blocks, DeltaNet state slots and state checkpoints of one trunk rank.

    Args:
        num_checkpoints: the rank's state checkpoint pool (`CacheSizes.state_checkpoints`); 0: no prefix cache.
    """

    def __init__(self, *, num_blocks: int, num_slots: int, block_size: int, num_checkpoints: int = 0) -> None:
        if num_blocks < 1 or num_slots < 1 or block_size < 1:
            raise ValueError("a trunk rank needs at least one KV block and one state slot")
        if num_checkpoints < 0:
            raise ValueError("num_checkpoints must be >= 0")
        self.num_blocks, self.num_slots, self.block_size = num_blocks, num_slots, block_size
        self.num_checkpoints = num_checkpoints
        self._free_blocks = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._free_checkpoints = list(range(num_checkpoints - 1, -1, -1))
        self._refs = [0] * num_blocks  # holders of each block: its sequences and the prefix cache

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
        out = [self._free_blocks.pop() for _ in range(n)]
        refs = self._refs
        for b in out:
            refs[b] = 1
        return out

    def share(self, blocks: list[int] | tuple[int, ...]) -> None:
        """One more holder of each block (a sequence hitting the prefix cache, or the cache adopting them)."""
        refs = self._refs
        for b in blocks:
            assert refs[b] > 0, f"sharing free KV block {b}"
            refs[b] += 1

    def refs(self, block: int) -> int:
        return self._refs[block]

    def release_refs(self, blocks: list[int] | tuple[int, ...]) -> None:
        """One holder less of each block; a block nobody holds is free again."""
        refs, free = self._refs, self._free_blocks
        for b in reversed(blocks):
            r = refs[b] - 1
            assert r >= 0, f"releasing free KV block {b}"
            refs[b] = r
            if r == 0:
                free.append(b)

    def release(self, *, slot: int | None, blocks: list[int]) -> None:
        if slot is not None:
            self._free_slots.append(slot)
        self.release_refs(blocks)

    @property
    def free_checkpoints(self) -> int:
        return len(self._free_checkpoints)

    def take_checkpoint(self) -> int | None:
        """A free state checkpoint id, or None."""
        return self._free_checkpoints.pop() if self._free_checkpoints else None

    def release_checkpoint(self, checkpoint: int) -> None:
        assert 0 <= checkpoint < self.num_checkpoints and checkpoint not in self._free_checkpoints
        self._free_checkpoints.append(checkpoint)

    @property
    def kv_usage(self) -> float:
        return 1.0 - len(self._free_blocks) / self.num_blocks

    @property
    def slot_usage(self) -> float:
        return 1.0 - len(self._free_slots) / self.num_slots
