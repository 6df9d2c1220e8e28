"""The prefix cache of one trunk rank: a radix tree over prompt keys on the 64-token grid.

A node covers one 64-token chunk of a path (its key: the chunk's token ids, or an image prompt's tree key:
replicas/api/media.py `MultimodalPrompt.cache_key`) and holds the KV blocks of that chunk, which the tree shares
by reference count with the sequences using them (replicas/engine/block_pool.py), and optionally a saved DeltaNet
state at its end ("state checkpoint": an index into the rank's checkpoint pool), ready once the step that wrote
it has finished. A prompt resumes only where a ready state is (DeltaNet layers need it; KV alone is not enough):
`match` finds the deepest ready state p <= len(prompt) - 1 on the prompt's path. Which states to keep is decided
at admission (`plan_captures`): the branch point where the prompt leaves an existing path, the request's hints
(end of the system/tools preamble, start of the last assistant header), and provisional states every
`probe_interval` tokens on a path's new part, which go first and are trimmed once a branch claims the path;
at most `states_per_path` kept states per path. One tree per namespace: (cache_salt, mtp flag) (tenants never
share prefixes; a sequence that drafts with the MTP head also keeps MTP KV rows in its blocks).

Eviction under pressure, KV and states apart, least valuable first: KV of unreferenced leaves only (a block a
running sequence uses is never freed; evicting a node drops its state), KV-only leaves before leaves that hold a
state, least recently used first; states unpinned only (a sequence about to restore one pins it), provisional
ones first, then by recency x tokens saved (all states cost the same bytes).
Adoption is incremental: `insert` keeps a cursor per key (the node its last insert of that key reached) and a
prefill's next chunk resumes there, so a prompt costs O(its chunks) over its whole prefill, not a walk from the root
per chunk; any node leaving the tree (eviction, reset) makes every cursor stale (a generation count), and a stale or
missing cursor falls back to the walk from the root. The nodes before a cursor keep the recency of the insert that
passed them (at most a step older than a walk from the root would give).
Must not: know sequences or steps (the scheduler drives it). Tests: tests/replicas/test_prefix_cache.py.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import NamedTuple

from replicas.engine.block_pool import BlockPool
from replicas.engine.prefix_config import PrefixCacheConfig

GRID = 64
Namespace = tuple[str, bool]  # (cache_salt or "", mtp)


@dataclass(eq=False)
class _Node:
    """One 64-token chunk of a path: KV blocks of the chunk, and maybe the state after it."""

    key: tuple[int, ...]
    parent: _Node | None
    end: int  # tokens from the root to the end of this chunk
    blocks: list[int] = field(default_factory=list)
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    checkpoint: int | None = None  # the saved state after this chunk (ready: the step that wrote it finished)
    provisional: bool = False  # a probe state no branch or hint has claimed (goes first)
    pins: int = 0  # sequences about to restore this state
    last_used: int = 0
    # the token after `end` in the prompt that saved the state: the MTP layer's KV row at end - 1 was computed with
    # it, so in an MTP namespace a prompt resumes here only when its own next token is the same
    next_token: int | None = None


class _Cursor(NamedTuple):
    """Where the last `insert` of a key got to: valid while the tree's generation is unchanged."""

    key: Seq[int]
    ns: Namespace
    node: _Node
    generation: int


_MAX_CURSORS = 1024  # keys whose prefill stopped short (aborted, preempted) do not pile up


class Hit(NamedTuple):
    """A prefix-cache hit: `length` tokens computed (a multiple of 64), their KV `blocks`, the state `checkpoint`."""

    length: int
    blocks: tuple[int, ...]
    checkpoint: int | None


MISS = Hit(0, (), None)


class Capture(NamedTuple):
    """Where a sequence saves its state (after `pos` tokens); `provisional`: a probe, not a branch or hint."""

    pos: int
    provisional: bool


class PrefixCache:
    """The prefix cache of one trunk rank (the engine holds one per trunk rank).

    Args:
        pool: the rank's block pool: the tree's references on KV blocks and its checkpoint ids live there.
        config: states per path, probe interval.
    """

    def __init__(self, pool: BlockPool, config: PrefixCacheConfig) -> None:
        if GRID % pool.block_size:
            raise ValueError(f"the prefix cache needs a KV block size that divides {GRID} (got {pool.block_size})")
        self.pool = pool
        self.config = config
        self.per_chunk = GRID // pool.block_size  # KV blocks per node
        self._roots: dict[Namespace, _Node] = {}
        # eviction candidates, kept as the tree changes (a scan of the whole tree per eviction would cost O(nodes))
        self._leaves: set[_Node] = set()
        self._states: set[_Node] = set()
        self._tick = itertools.count(1)
        self._generation = 0  # bumped whenever a node leaves the tree: older cursors are stale
        self._cursors: OrderedDict[int, _Cursor] = OrderedDict()  # id(key) -> its cursor (holds the key)
        self.num_states = 0
        self.num_blocks = 0
        # counters (tokens for queries and hits, as vLLM counts them)
        self.queries = 0
        self.hits = 0
        self.states_stored = 0
        self.states_evicted = 0

    # ----------------------------------------------------------------- lookup
    def _walk(self, key: Seq[int], ns: Namespace, upto: int) -> list[_Node]:
        """The existing nodes along `key[:upto]` (whole chunks only), root excluded."""
        node = self._roots.get(ns)
        path: list[_Node] = []
        if node is None:
            return path
        for start in range(0, upto - GRID + 1, GRID):
            node = node.children.get(tuple(key[start : start + GRID]))
            if node is None:
                break
            path.append(node)
        return path

    def match(self, key: Seq[int], ns: Namespace, *, count: bool = True) -> Hit:
        """The deepest ready state p <= len(key) - 1 on the key's path (p tokens need no prefill), or MISS.
        `count`: record the query and hit in the counters (once per admitted sequence)."""
        path = self._walk(key, ns, len(key) - 1)
        tick = next(self._tick)
        hit = MISS
        mtp = ns[1]
        for node in path:
            node.last_used = tick
            if node.checkpoint is not None and (not mtp or node.next_token == key[node.end]):
                hit = Hit(node.end, (), node.checkpoint)
        if hit.length:
            blocks = [b for node in path[: hit.length // GRID] for b in node.blocks]
            hit = Hit(hit.length, tuple(blocks), hit.checkpoint)
        if count:
            self.queries += len(key)
            self.hits += hit.length
        return hit

    def pin(self, hit: Hit, ns: Namespace, key: Seq[int]) -> None:
        """A sequence will restore this hit's state in its next step: keep it from eviction until `unpin`."""
        node = self._node_at(key, ns, hit.length)
        if node is not None:
            node.pins += 1

    def unpin(self, key: Seq[int], ns: Namespace, length: int) -> None:
        node = self._node_at(key, ns, length)
        if node is not None and node.pins > 0:
            node.pins -= 1

    def _node_at(self, key: Seq[int], ns: Namespace, end: int) -> _Node | None:
        if end <= 0:
            return None
        path = self._walk(key, ns, end)
        return path[-1] if len(path) == end // GRID else None

    # ----------------------------------------------------------------- admission
    def plan_captures(self, key: Seq[int], ns: Namespace, hints: Seq[int], hit_len: int) -> list[Capture]:
        """Positions (ascending, on the grid, hit_len < c < len(key)) where the sequence should save its state.

        The branch point (where the prompt leaves the existing tree), the hints, then provisional states every
        `probe_interval` on the path's new part while the path's kept states stay within `states_per_path`. A ready
        provisional state at the branch point or a hint is claimed instead (and the provisional ones before it are
        trimmed)."""
        n = len(key)
        path = self._walk(key, ns, n - 1)
        matched = len(path) * GRID
        kept: list[int] = []
        if path and hit_len <= matched < n:
            kept.append(matched)  # the prompt leaves (or extends, or repeats) an existing path here
        for h in sorted({(h // GRID) * GRID for h in hints}, reverse=True):
            if hit_len <= h < n and h > 0 and h not in kept:
                kept.append(h)
        existing_kept = 0
        by_end = {node.end: node for node in path}
        planned: list[int] = []
        for c in kept:
            node = by_end.get(c)
            if node is not None and node.checkpoint is not None:
                if node.provisional:  # claimed: it stays, the probes before it go
                    node.provisional = False
                    self._trim_probes(node)
                continue
            if c > hit_len:
                planned.append(c)
        for node in path:
            if node.checkpoint is not None and not node.provisional and node.end < n:
                existing_kept += 1
        # claimed states always go in (`captured` makes room on the path); probes only within the cap
        planned = planned[: self.config.states_per_path]
        room = max(0, self.config.states_per_path - existing_kept - len(planned)) + len(planned)
        probe = self.config.probe_interval
        if probe and room > len(planned):
            first_new = max(matched, hit_len)
            probes = [c for c in range(probe, n, probe) if c > first_new and c not in planned]
            planned.extend(probes[: room - len(planned)])
        return sorted(Capture(c, c not in kept) for c in planned)

    # ----------------------------------------------------------------- adoption
    def insert(self, key: Seq[int], ns: Namespace, blocks: Seq[int], upto: int) -> _Node | None:
        """Adopt a sequence's KV blocks for `key[:upto]` (whole chunks; upto on the grid): chunks the tree lacks
        take the sequence's blocks (one reference each); chunks it has keep theirs. Returns the node ending at
        `upto` (None if the path stops short of it), so a caller needs no second walk."""
        upto = (upto // GRID) * GRID
        if upto <= 0:
            return None
        tick = next(self._tick)
        cur = self._cursors.get(id(key))
        if cur is not None and cur.key is key and cur.ns == ns and cur.generation == self._generation:
            node = cur.node  # the tree still holds the path up to it: resume there
            if node.end > upto:  # an earlier point of a path already adopted further
                while node.end > upto:
                    assert node.parent is not None
                    node = node.parent
                node.last_used = tick
                return node
        else:
            root = self._roots.get(ns)
            if root is None:
                root = self._roots[ns] = _Node((), None, 0)
            node = root
        for start in range(node.end, upto, GRID):
            chunk = tuple(key[start : start + GRID])
            child = node.children.get(chunk)
            if child is None:
                b0 = start // self.pool.block_size
                own = list(blocks[b0 : b0 + self.per_chunk])
                if len(own) < self.per_chunk:
                    return None  # the sequence does not hold these blocks (never the case for a computed prefix)
                self.pool.adopt(own)
                child = node.children[chunk] = _Node(chunk, node, start + GRID, own)
                self.num_blocks += len(own)
                self._leaves.discard(node)
                self._leaves.add(child)
            child.last_used = tick
            node = child
        if upto + GRID > len(key) - 1:  # no later chunk of this key can be adopted: its cursor goes
            self._cursors.pop(id(key), None)
        else:
            self._cursors[id(key)] = _Cursor(key, ns, node, self._generation)
            self._cursors.move_to_end(id(key))
            if len(self._cursors) > _MAX_CURSORS:
                self._cursors.popitem(last=False)
        return node

    def captured(
        self, key: Seq[int], ns: Namespace, blocks: Seq[int], pos: int, checkpoint: int, *, provisional: bool
    ) -> bool:
        """The step that saved the sequence's state after `key[:pos]` into `checkpoint` finished: adopt the path
        and keep the state there. False when the node already has a state (the checkpoint goes back to the pool)."""
        node = self.insert(key, ns, blocks, pos)
        if node is None or node.checkpoint is not None:
            self.pool.release_checkpoint(checkpoint)
            return False
        node.checkpoint, node.provisional = checkpoint, provisional
        node.next_token = key[pos] if pos < len(key) else None
        self._states.add(node)
        self.num_states += 1
        self.states_stored += 1
        if not provisional:
            self._trim_probes(node)
            self._cap_path(node)
        return True

    def _cap_path(self, node: _Node) -> None:
        """At most `states_per_path` kept states from the root to `node`: drop the ones nearest above it that no
        other path branches from (a later turn of a chat resumes at the newest; the shallow ones, e.g. the end of
        a system prompt, serve other conversations), never a pinned one."""
        above: list[_Node] = []
        up = node.parent
        while up is not None:
            if up.checkpoint is not None and not up.provisional:
                above.append(up)  # deepest first
            up = up.parent
        excess = 1 + len(above) - self.config.states_per_path
        for a in above:
            if excess <= 0:
                break
            if not a.pins and len(a.children) <= 1:
                self._drop_state(a)
                excess -= 1

    def _trim_probes(self, node: _Node) -> None:
        """A branch or hint state exists at `node`: the unclaimed probes before it on its path are superseded."""
        up = node.parent
        while up is not None:
            if up.checkpoint is not None and up.provisional and up.pins == 0:
                self._drop_state(up)
            up = up.parent

    # ----------------------------------------------------------------- eviction
    def _drop_state(self, node: _Node) -> int:
        ckpt = node.checkpoint
        assert ckpt is not None
        node.checkpoint, node.provisional = None, False
        self._states.discard(node)
        self.num_states -= 1
        self.states_evicted += 1
        self.pool.release_checkpoint(ckpt)
        return ckpt

    def _nodes(self) -> list[_Node]:
        out: list[_Node] = []
        stack = [c for root in self._roots.values() for c in root.children.values()]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def evict_state(self, *, provisional_only: bool = False) -> int | None:
        """Drop the least valuable unpinned state and return its checkpoint id (already back in the pool's free
        list), or None when every state is pinned (or there is none). `provisional_only`: for a probe, which may
        take the place of another probe but never of a state a branch or hint claimed."""
        best: _Node | None = None
        best_key: tuple[bool, float] | None = None
        now = next(self._tick)
        for node in self._states:
            if node.pins or (provisional_only and not node.provisional):
                continue
            # provisional first; then recency x tokens of prefill it saves (every state costs the same bytes)
            k = (not node.provisional, node.end / (1 + now - node.last_used))
            if best_key is None or k < best_key:
                best, best_key = node, k
        if best is None:
            return None
        return self._drop_state(best)

    def _evictable(self, node: _Node) -> bool:
        return not node.children and node.pins == 0 and all(self.pool.refs(b) == 1 for b in node.blocks)

    def evict_blocks(self, n: int) -> int:
        """Free at least `n` KV blocks if the tree can: unreferenced leaves, KV-only before those with a state,
        least recently used first; a parent becomes a candidate once its children are gone. Returns blocks freed."""
        if n <= 0:
            return 0
        order = itertools.count()
        heap = [
            ((node.checkpoint is not None, node.last_used), next(order), node)
            for node in self._leaves
            if self._evictable(node)
        ]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n:
            _, _, node = heapq.heappop(heap)
            if not self._evictable(node):
                continue
            freed += self._remove(node)
            parent = node.parent
            if parent is not None and parent.parent is not None and self._evictable(parent):
                heapq.heappush(heap, ((parent.checkpoint is not None, parent.last_used), next(order), parent))
        return freed

    def _remove(self, node: _Node) -> int:
        """Drop a leaf: its state, and its blocks (the tree's reference)."""
        if node.checkpoint is not None:
            self._drop_state(node)
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.key]
        self._generation += 1  # cursors may point at it (or below it)
        self._leaves.discard(node)
        if not parent.children and parent.parent is not None:
            self._leaves.add(parent)
        self.pool.release_refs(node.blocks)
        self.num_blocks -= len(node.blocks)
        if parent.parent is None and not parent.children:
            for ns, root in list(self._roots.items()):
                if root is parent:
                    del self._roots[ns]
        return len(node.blocks)

    def reset(self) -> None:
        """Drop everything no sequence uses (safe while serving: pinned states and shared blocks stay)."""
        for node in list(self._states):
            if not node.pins:
                self._drop_state(node)
        self.evict_blocks(self.num_blocks)

    def stats(self) -> dict[str, int]:
        return {
            "prefix_cache_queries": self.queries,
            "prefix_cache_hits": self.hits,
            "prefix_cache_states_stored": self.states_stored,
            "prefix_cache_states_evicted": self.states_evicted,
            "prefix_cache_states": self.num_states,
            "prefix_cache_blocks": self.num_blocks,
        }
