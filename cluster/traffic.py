"""All-to-all traffic of a decode step, the network floor, and placing ranks on nodes by traffic.

Owns: `LinkSpeeds` (NIC and NVLink bandwidth per GPU, per direction), `step_traffic` (dispatch +
combine bytes of one decode step on every GPU's four directional links, from the expert map's
share of rows per expert rank), `network_floor_s`, and `place_by_traffic` (which node each
global rank goes on so the busiest link carries the least). Pure arithmetic, no Ray (capacity
planning and the Serve app's placement group both call it).

Link model, stated once: every GPU has its own NIC (inter-node, `nic_gbps` each way; no forwarding
through a peer GPU's NIC) and an NVLink port (intra-node, `nvlink_gbps` each way); trunk and expert
ranks are distinct GPUs. A decode step runs, per MoE layer, a dispatch phase (trunks send hidden
rows + a 4-byte expert id; experts receive) then a combine phase (experts send rows back). The two
phases are separated by the experts' compute, so a layer's communication time is the busiest
link's time in dispatch plus the busiest link's time in combine. Routing is uniform: a trunk with
T tokens sends T x top-k rows per layer, split over expert ranks by their share of expert slots
(a redundant copy takes 1/copies of its expert's rows: tokens are spread over copies).

Worked example (2 nodes x 4 GPUs, D = 4, X = 2, equal shares, NIC 1 unit, NVLink >> NIC): rank
order puts trunks 0-3 on node 0 and both experts on node 1: each expert receives all 4 trunks'
rows over its NIC (4 x T x k / 2 rows). Two trunks + one expert per node: each expert receives
2 trunks' rows over NVLink and 2 over its NIC (2 x T x k / 2 rows), half the busiest link.
Tests: tests/cluster/test_traffic.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from cluster.placement import ExpertMap
from cluster.topology import GroupShape

DEFAULT_NIC_GBPS = 400.0  # one 400 Gb/s NIC per GPU (ConnectX-7 / InfiniBand NDR), each way
# NVLink 4 on H100 SXM and H200 SXM: 18 links x 25 GB/s = 450 GB/s each way (900 GB/s bidirectional).
NVLINK_GBPS = {"H100": 3600.0, "H200": 3600.0}
DEFAULT_NVLINK_GBPS = NVLINK_GBPS["H200"]
# the int32 expert id on every dispatched row (replicas/ep/a2a_protocol.py; not imported: cluster/ sits below replicas/)
ID_BYTES = 4
LINK_KINDS = ("nic_out", "nic_in", "nvlink_out", "nvlink_in")


@dataclass(frozen=True)
class LinkSpeeds:
    """Per GPU, per direction, in Gb/s (1e9 bits)."""

    nic_gbps: float = DEFAULT_NIC_GBPS
    nvlink_gbps: float = DEFAULT_NVLINK_GBPS

    def __post_init__(self) -> None:
        if self.nic_gbps <= 0:
            raise ValueError(f"nic_gbps must be > 0, got {self.nic_gbps}")
        if self.nvlink_gbps <= 0:
            raise ValueError(f"nvlink_gbps must be > 0, got {self.nvlink_gbps}")

    def bytes_per_s(self, kind: str) -> float:
        return (self.nic_gbps if kind.startswith("nic") else self.nvlink_gbps) * 1e9 / 8


@dataclass(frozen=True)
class RankTraffic:
    """Bytes one global rank moves in one decode step on each directional link (all MoE layers)."""

    rank: int
    node: int
    role: str  # "trunk" or "expert"
    nic_out: float
    nic_in: float
    nvlink_out: float
    nvlink_in: float

    def of(self, kind: str) -> float:
        return float(getattr(self, kind))


def expert_shares(expert_map: ExpertMap, layer: int = 0) -> tuple[float, ...]:
    """Fraction of a layer's routed rows each expert rank receives under uniform routing."""
    shares = [0.0] * expert_map.num_expert_ranks
    per_expert = expert_map.owners[layer]
    for ranks in per_expert:
        for r in ranks:
            shares[r] += 1.0 / (len(ranks) * len(per_expert))
    return tuple(shares)


def step_traffic(
    shape: GroupShape,
    rank_nodes: tuple[int, ...],
    shares: tuple[float, ...],
    *,
    tokens_per_trunk: float,
    top_k: int,
    moe_layers: int,
    hidden: int,
    dtype_bytes: int = 2,
) -> tuple[RankTraffic, ...]:
    """Every rank's bytes per decode step on its NIC and NVLink, each way.

    Args:
        rank_nodes: node of each global rank (trunks 0..D-1, then experts).
        shares: each expert rank's fraction of the routed rows (`expert_shares`); sums to 1.
        tokens_per_trunk: decode tokens each trunk rank holds this step.
        hidden, dtype_bytes: row width and bytes per element on the wire (bf16 activations: 2).
    """
    d, x = shape.trunk_ranks, shape.expert_ranks
    if len(rank_nodes) != d + x:
        raise ValueError(f"rank_nodes names {len(rank_nodes)} ranks; the group has D + X = {d + x}")
    if len(shares) != x:
        raise ValueError(f"{len(shares)} expert shares for X = {x} expert ranks")
    rows = tokens_per_trunk * top_k * moe_layers  # rows one trunk sends per step, over all MoE layers
    out_row, back_row = hidden * dtype_bytes + ID_BYTES, hidden * dtype_bytes
    acc = {r: dict.fromkeys(LINK_KINDS, 0.0) for r in range(d + x)}
    for i in range(d):
        for j in range(x):
            e = d + j
            n = rows * shares[j]
            link = "nvlink" if rank_nodes[i] == rank_nodes[e] else "nic"
            acc[i][f"{link}_out"] += n * out_row  # dispatch
            acc[e][f"{link}_in"] += n * out_row
            acc[e][f"{link}_out"] += n * back_row  # combine
            acc[i][f"{link}_in"] += n * back_row
    return tuple(
        RankTraffic(rank=r, node=rank_nodes[r], role="trunk" if r < d else "expert", **acc[r]) for r in range(d + x)
    )


def network_floor_s(traffic: tuple[RankTraffic, ...], speeds: LinkSpeeds) -> float:
    """Seconds of communication per decode step: the busiest link of the dispatch phase (trunks out,
    experts in) plus the busiest link of the combine phase (experts out, trunks in)."""

    def busiest(pairs: list[tuple[RankTraffic, str]]) -> float:
        return max((t.of(k) / speeds.bytes_per_s(k) for t, k in pairs), default=0.0)

    trunks = [t for t in traffic if t.role == "trunk"]
    experts = [t for t in traffic if t.role == "expert"]
    dispatch = [(t, k) for t in trunks for k in ("nic_out", "nvlink_out")]
    dispatch += [(t, k) for t in experts for k in ("nic_in", "nvlink_in")]
    combine = [(t, k) for t in experts for k in ("nic_out", "nvlink_out")]
    combine += [(t, k) for t in trunks for k in ("nic_in", "nvlink_in")]
    return busiest(dispatch) + busiest(combine)


# ------------------------------------------------------------------------------ placement
def rank_order_nodes(shape: GroupShape, slots_per_node: int) -> tuple[int, ...]:
    """Ranks in rank order filling one node after another (what a PACK placement group does)."""
    return tuple(r // slots_per_node for r in range(shape.world_size))


def _node_cost(t: int, x: int, *, d: int, big_x: int, nic: Fraction, nvl: Fraction) -> Fraction:
    """Dispatch-phase time of the busiest link on a node with t trunks and x experts, in units of
    (one trunk's rows x row bytes), equal expert shares 1/X. The combine phase mirrors it."""
    cost = Fraction(0)
    if t:
        cost = max(cost, Fraction(big_x - x, big_x) / nic, Fraction(x, big_x) / nvl)  # a trunk sends
    if x:
        cost = max(cost, Fraction(d - t, big_x) / nic, Fraction(t, big_x) / nvl)  # an expert receives
    return cost


def place_by_traffic(
    shape: GroupShape, *, nodes: int, slots_per_node: int, speeds: LinkSpeeds | None = None
) -> tuple[int, ...]:
    """The node of every global rank such that the busiest link of a decode step carries the least.

    Exact for equal expert shares (the placement does not depend on batch, top-k, hidden size or
    layers: they scale every link alike): a dynamic programme over nodes chooses how many trunks t_n
    and experts x_n each node holds, minimising the largest per-node link time, then, among those,
    the total bytes over NICs. Nodes are filled in order (node 0 first), trunk ranks and expert ranks
    each in rank order. With X = 0 (no exchange) ranks go in rank order.

    Raises:
        ValueError: the group needs more slots than `nodes` x `slots_per_node`.
    """
    speeds = speeds or LinkSpeeds()
    d, x = shape.trunk_ranks, shape.expert_ranks
    if nodes < 1 or slots_per_node < 1:
        raise ValueError(f"nodes and slots_per_node must be >= 1, got {nodes} and {slots_per_node}")
    if d + x > nodes * slots_per_node:
        raise ValueError(
            f"the group needs {d + x} slots (D={d} + X={x}), {nodes} node(s) x {slots_per_node} have "
            f"{nodes * slots_per_node}"
        )
    if x == 0:
        return rank_order_nodes(shape, slots_per_node)
    nic, nvl = Fraction(speeds.nic_gbps), Fraction(speeds.nvlink_gbps)
    types = [(t, e) for t in range(min(d, slots_per_node) + 1) for e in range(min(x, slots_per_node - t) + 1)]
    exact = {ty: _node_cost(*ty, d=d, big_x=x, nic=nic, nvl=nvl) for ty in types}
    order = sorted(set(exact.values()))
    cost = {ty: order.index(c) for ty, c in exact.items()}  # exact costs as ranks: the DP runs on ints
    # rows over NICs in dispatch (x X): this node's trunks to remote experts + its experts from remote trunks
    nic_rows = {(t, e): t * (x - e) + e * (d - t) for t, e in types}
    big = 1 << 62
    bound: int | None = None
    # pass 1: least largest node cost; pass 2, within that bound: least NIC rows, then experts spread widest
    for _ in range(2):
        # (placed D, placed X) -> (max node cost, NIC rows, most experts on one node)
        best: dict[tuple[int, int], tuple[int, int, int]] = {(0, 0): (0, 0, 0)}
        choice: list[dict[tuple[int, int], tuple[int, int]]] = []
        for _n in range(nodes):
            nxt: dict[tuple[int, int], tuple[int, int, int]] = {}
            pick: dict[tuple[int, int], tuple[int, int]] = {}
            for (dt, dx), (mx, tot, most) in best.items():
                for t, e in types:
                    c = cost[(t, e)]
                    if dt + t > d or dx + e > x or (bound is not None and c > bound):
                        continue
                    key, val = (dt + t, dx + e), (max(mx, c), tot + nic_rows[(t, e)], max(most, e))
                    have = nxt.get(key, (big, big, big))
                    if (val if bound is None else val[1:]) < (have if bound is None else have[1:]):
                        nxt[key], pick[key] = val, (t, e)
            best = nxt
            choice.append(pick)
        if bound is None:
            bound = best[(d, x)][0]
    # walk back node types, then hand out ranks; nodes with more trunks first for a stable, readable order
    per_node, key = [], (d, x)
    for n in range(nodes - 1, -1, -1):
        t, e = choice[n][key]
        per_node.append((t, e))
        key = (key[0] - t, key[1] - e)
    per_node.sort(key=lambda te: (-te[0] - te[1], -te[0]))
    out = [0] * (d + x)
    next_trunk, next_expert = 0, 0
    for node, (t, e) in enumerate(per_node):
        for _ in range(t):
            out[next_trunk] = node
            next_trunk += 1
        for _ in range(e):
            out[d + next_expert] = node
            next_expert += 1
    return tuple(out)


def spread_by_traffic(shape: GroupShape, nodes: int, speeds: LinkSpeeds | None = None) -> tuple[int, ...]:
    """`place_by_traffic` over `nodes` nodes of ceil((D + X) / nodes) ranks each: a group spread evenly over
    the nodes it is given (the Serve app's `group_nodes`)."""
    return place_by_traffic(shape, nodes=nodes, slots_per_node=-(-shape.world_size // nodes), speeds=speeds)
