"""Pool sizing from device memory (model_shards/cache_sizing.py): known answers worked by hand."""

from __future__ import annotations

import pytest

from model_shards.cache_sizing import PoolCounts, pool_counts_for_memory

MIB = 1 << 20


def test_slots_kept_blocks_take_the_rest() -> None:
    # 1000 MiB device, 0.9 allowed = 900 MiB; 300 MiB in use -> 600 MiB; 100 MiB workspace -> 500 MiB;
    # 4 slots of 10 MiB -> 460 MiB of 2 MiB blocks = 230 blocks
    got = pool_counts_for_memory(
        free_bytes=700 * MIB,
        total_bytes=1000 * MIB,
        utilization=0.9,
        bytes_per_block=2 * MIB,
        bytes_per_slot=10 * MIB,
        max_slots=4,
        workspace_bytes=100 * MIB,
    )
    assert got == PoolCounts(num_blocks=230, num_slots=4)


def test_reserves_are_paid_from_the_budget() -> None:
    # 100 MiB budget; the canary's block (2) and slot (10) leave 88; 2 slots -> 68 MiB = 34 blocks
    got = pool_counts_for_memory(
        free_bytes=100 * MIB,
        total_bytes=100 * MIB,
        utilization=1.0,
        bytes_per_block=2 * MIB,
        bytes_per_slot=10 * MIB,
        max_slots=2,
        reserved_blocks=1,
        reserved_slots=1,
    )
    assert got == PoolCounts(num_blocks=34, num_slots=2)


def test_fewer_slots_when_they_do_not_fit() -> None:
    # 60 MiB budget, a slot + a block = 12 MiB: 5 slots (not 100), 10 MiB left = 5 blocks
    got = pool_counts_for_memory(
        free_bytes=60 * MIB,
        total_bytes=60 * MIB,
        utilization=1.0,
        bytes_per_block=2 * MIB,
        bytes_per_slot=10 * MIB,
        max_slots=100,
    )
    assert got == PoolCounts(num_blocks=5, num_slots=5)


def test_no_room_names_the_numbers() -> None:
    with pytest.raises(ValueError, match="no room for the KV cache"):
        pool_counts_for_memory(
            free_bytes=50 * MIB,
            total_bytes=1000 * MIB,
            utilization=0.9,
            bytes_per_block=2 * MIB,
            bytes_per_slot=10 * MIB,
            max_slots=1,
        )
    with pytest.raises(ValueError, match="utilization must be in"):
        pool_counts_for_memory(
            free_bytes=1, total_bytes=1, utilization=0.0, bytes_per_block=1, bytes_per_slot=1, max_slots=1
        )


def test_state_checkpoints_are_carved_out_of_the_kv_blocks() -> None:
    # as the first test: 500 MiB budget, 4 slots of 10 MiB -> 460 MiB left; checkpoints (10 MiB) take at most a
    # quarter of it (115 MiB) -> 11, and 350 MiB of 2 MiB blocks = 175 blocks
    kw = dict(
        free_bytes=700 * MIB,
        total_bytes=1000 * MIB,
        utilization=0.9,
        bytes_per_block=2 * MIB,
        bytes_per_slot=10 * MIB,
        max_slots=4,
        workspace_bytes=100 * MIB,
        bytes_per_checkpoint=10 * MIB,
    )
    assert pool_counts_for_memory(**kw, max_checkpoints=64) == PoolCounts(
        num_blocks=175, num_slots=4, num_checkpoints=11
    )
    # fewer asked: all of them, the rest stays KV
    assert pool_counts_for_memory(**kw, max_checkpoints=3) == PoolCounts(num_blocks=215, num_slots=4, num_checkpoints=3)
    assert pool_counts_for_memory(**kw, max_checkpoints=0) == PoolCounts(num_blocks=230, num_slots=4)


def test_state_checkpoints_never_turn_a_fitting_size_away() -> None:
    # the tightest fit of test_fewer_slots_when_they_do_not_fit: 5 slots + 5 blocks, nothing left for checkpoints
    got = pool_counts_for_memory(
        free_bytes=60 * MIB,
        total_bytes=60 * MIB,
        utilization=1.0,
        bytes_per_block=2 * MIB,
        bytes_per_slot=10 * MIB,
        max_slots=100,
        max_checkpoints=100,
        bytes_per_checkpoint=10 * MIB,
    )
    assert got == PoolCounts(num_blocks=5, num_slots=5, num_checkpoints=0)
