"""Data parallelism by prefix subtree: split one batch over M engine replicas so that they finish
together and every shared prefix is computed on as few replicas as possible.

Units of work are the top-level subtrees of the global prefix tree (a shared-prefix group with
everything below it) and the requests outside any shared prefix. A unit's cost is the time its
work takes at the device's ceilings, with the planner's terms: compute ~ tokens to compute
(prefill with each shared prefix once, plus decode tokens) and memory ~ KV tokens read during
decode. Units go, largest first, to the replica that ends lowest (LPT), then single moves off the
slowest replica refine that. A unit is split into its child subtrees and direct requests only when
the plan is out of balance and the split lowers the slowest replica's cost by a clear margin: its
prefix is then computed once on each replica that holds members, which the cost charges and the
plan counts (`split_groups`, `duplicated_prefix_tokens`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional, Sequence

from jaxserve.config import ModelConfig
from jaxserve.scheduler.planner import kv_read_tokens
from jaxserve.scheduler.prefix_tree import TreeNode, build_prefix_tree

# Out of balance: the slowest replica's planned cost above the mean by more than this.
TOLERANCE = 0.05
_MOVE_PASSES = 256


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds of a piece of work: compute tokens at `flops_per_token` over `peak_flops`, plus KV
    tokens read at `kv_bytes_per_token` over `hbm_bandwidth`. Only the ratio of the two terms
    matters for balance; the defaults are the H100 ceilings measured here (benchmarks/README.md)."""

    flops_per_token: float = 1.0
    kv_bytes_per_token: float = 0.0
    peak_flops: float = 6.3e14
    hbm_bandwidth: float = 2.2e12

    @classmethod
    def for_model(cls, cfg: ModelConfig, dtype_bytes: int = 2, **ceilings) -> "CostModel":
        return cls(2.0 * cfg.num_params(), float(cfg.kv_bytes_per_token(dtype_bytes)), **ceilings)

    def seconds(self, compute_tokens: float, kv_tokens: float = 0.0) -> float:
        return (compute_tokens * self.flops_per_token / self.peak_flops
                + kv_tokens * self.kv_bytes_per_token / self.hbm_bandwidth)


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One request as the partition sees it."""

    prompt_ids: Sequence[int]
    max_tokens: int
    n: int = 1
    shareable: bool = True      # False: prefills its whole prompt alone (e.g. prompt logprobs)


@dataclasses.dataclass
class Partition:
    parts: list[list[int]]          # item indices of each replica, ascending
    costs: list[float]              # planned seconds of each replica
    split_groups: int               # top-level groups whose members sit on 2+ replicas
    duplicated_prefix_tokens: int   # prefix tokens computed more than once because of splits

    @property
    def imbalance(self) -> float:
        """The slowest replica's planned cost over the mean, minus 1."""
        mean = sum(self.costs) / len(self.costs) if self.costs else 0.0
        return max(self.costs) / mean - 1 if mean > 0 else 0.0

    def replica_of(self) -> list[int]:
        out = [0] * sum(len(p) for p in self.parts)
        for r, part in enumerate(self.parts):
            for i in part:
                out[i] = r
        return out


@dataclasses.dataclass(eq=False)
class _Unit:
    items: list[int]                 # item indices
    cost: float                      # its own work; prefixes of split nodes above it excluded
    node: Optional[TreeNode]         # a subtree that can be split further (None: one request)
    above: tuple = ()                # split nodes above it: charged once per replica holding it
    group: int = -1                  # the top-level unit it came from


class _Planner:
    def __init__(self, items: Sequence[WorkItem], cost: CostModel):
        self.items, self.cm = items, cost
        idx = [i for i, it in enumerate(items) if it.shareable and len(it.prompt_ids) > 0]
        self.tree = build_prefix_tree([items[i].prompt_ids for i in idx]) if idx else None
        self.direct: dict = {}
        self.subtree: dict = {}                   # node -> (cost, items) of everything below it
        in_tree = set(idx)
        loose = [i for i in range(len(items)) if i not in in_tree]
        if self.tree is not None:
            for j, node in enumerate(self.tree.leaf_node):
                if node is None:
                    loose.append(idx[j])
                else:
                    self.direct.setdefault(node, []).append(idx[j])
            for node in reversed(self.tree.shared):       # children before parents
                c = self.prefix_cost(node) + sum(self.own_cost(i, node.depth)
                                                 for i in self.direct.get(node, []))
                members = list(self.direct.get(node, []))
                for ch in node.children:
                    cc, cm = self.subtree[ch]
                    c += cc
                    members += cm
                self.subtree[node] = (c, members)
        self.loose = sorted(loose)

    def own_cost(self, i: int, base: int) -> float:
        """Item i's work below a shared prefix of `base` tokens: the rest of its prompt (its `n`
        samples each compute the last token), its decode tokens and its decode KV reads."""
        it = self.items[i]
        p, d, n = len(it.prompt_ids), it.max_tokens, it.n
        if p == 0:
            return 0.0
        return self.cm.seconds(p - base + (n - 1) + n * d, n * kv_read_tokens(p, d))

    def prefix_cost(self, node: TreeNode) -> float:
        return self.cm.seconds(node.own_len)

    def top_units(self) -> list[_Unit]:
        units = []
        if self.tree is not None:
            for node in self.tree.root.children:
                c, members = self.subtree[node]
                units.append(_Unit(sorted(members), c, node, (), len(units)))
        for i in self.loose:
            units.append(_Unit([i], self.own_cost(i, 0), None, (), len(units)))
        return units

    def split(self, u: _Unit) -> list[_Unit]:
        above = u.above + (u.node,)
        pieces = []
        for ch in u.node.children:
            c, members = self.subtree[ch]
            pieces.append(_Unit(sorted(members), c, ch, above, u.group))
        for i in self.direct.get(u.node, []):
            pieces.append(_Unit([i], self.own_cost(i, u.node.depth), None, above, u.group))
        # The split node's own prefix moved from the unit's cost into `above`.
        return pieces


@dataclasses.dataclass
class _Assignment:
    where: list[int]                 # unit -> replica
    loads: list[float]
    present: list[Counter]           # replica -> split node -> units holding it
    members: list[set]               # replica -> its units

    @property
    def worst(self) -> float:
        return max(self.loads)


def _increment(u: _Unit, present: Counter, prefix_cost) -> float:
    return u.cost + sum(prefix_cost(a) for a in u.above if not present[a])


def _assign(units: list[_Unit], m: int, prefix_cost, tolerance: float) -> _Assignment:
    """LPT: largest first onto the replica that ends lowest; then moves off the slowest replica
    while it is more than a fifth of the tolerance above the mean."""
    full = [u.cost + sum(prefix_cost(a) for a in u.above) for u in units]
    a = _Assignment([0] * len(units), [0.0] * m, [Counter() for _ in range(m)],
                    [set() for _ in range(m)])
    for k in sorted(range(len(units)), key=lambda k: -full[k]):
        u = units[k]
        if u.above:
            r = min(range(m), key=lambda r: (a.loads[r] + _increment(u, a.present[r], prefix_cost), r))
        else:
            r = min(range(m), key=a.loads.__getitem__)
        _place(a, k, u, r, prefix_cost)
    for _ in range(_MOVE_PASSES):
        if a.worst <= sum(a.loads) / m * (1 + tolerance / 5) or not _best_move(a, units, m,
                                                                               prefix_cost):
            break
    return a


def _place(a: _Assignment, k: int, u: _Unit, r: int, prefix_cost) -> None:
    a.loads[r] += _increment(u, a.present[r], prefix_cost)
    a.present[r].update(u.above)
    a.where[k] = r
    a.members[r].add(k)


def _remove(a: _Assignment, k: int, u: _Unit, prefix_cost) -> None:
    r = a.where[k]
    a.present[r].subtract(u.above)
    a.loads[r] -= _increment(u, a.present[r], prefix_cost)
    a.members[r].discard(k)


def _best_move(a: _Assignment, units: list[_Unit], m: int, prefix_cost) -> bool:
    """Move the one unit off the slowest replica that lowers the pair's worse end the most."""
    h = max(range(m), key=a.loads.__getitem__)
    best = None
    for k in sorted(a.members[h]):
        u = units[k]
        present = a.present[h]
        present.subtract(u.above)
        saved = _increment(u, present, prefix_cost)
        present.update(u.above)
        for r in range(m):
            if r == h:
                continue
            worse = max(a.loads[h] - saved, a.loads[r] + _increment(u, a.present[r], prefix_cost))
            if worse < a.loads[h] * (1 - 1e-9) and (best is None or worse < best[0]):
                best = (worse, k, r)
    if best is None:
        return False
    _, k, r = best
    _remove(a, k, units[k], prefix_cost)
    _place(a, k, units[k], r, prefix_cost)
    return True


def partition(items: Sequence[WorkItem], num_parts: int, *, cost: Optional[CostModel] = None,
              tolerance: float = TOLERANCE) -> Partition:
    """Split `items` into `num_parts` parts balanced by `cost`, keeping every shared-prefix group
    on one part unless balance needs it split."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    pl = _Planner(items, cost or CostModel())
    units = pl.top_units()
    a = _assign(units, num_parts, pl.prefix_cost, tolerance)
    blocked: set = set()

    def out_of_balance(a):
        mean = sum(a.loads) / num_parts
        return mean > 0 and a.worst > mean * (1 + tolerance)

    while out_of_balance(a):
        h = max(range(num_parts), key=a.loads.__getitem__)
        cands = [k for k in a.members[h] if units[k].node is not None
                 and id(units[k]) not in blocked]
        if not cands:
            break
        k = max(cands, key=lambda k: units[k].cost)
        trial_units = units[:k] + pl.split(units[k]) + units[k + 1:]
        trial = _assign(trial_units, num_parts, pl.prefix_cost, tolerance)
        # A split duplicates a prefix and thins its sharing: only for a clear gain.
        if trial.worst < a.worst * (1 - tolerance / 2):
            units, a = trial_units, trial
        else:
            blocked.add(id(units[k]))
    return _result(units, a, num_parts)


def _result(units: list[_Unit], a: _Assignment, m: int) -> Partition:
    parts: list[list[int]] = [[] for _ in range(m)]
    groups: dict = {}
    for k, u in enumerate(units):
        parts[a.where[k]] += u.items
        groups.setdefault(u.group, set()).add(a.where[k])
    dup = 0
    nodes = {id(n): n for u in units for n in u.above}
    for key, node in nodes.items():
        holders = sum(1 for r in range(m) if a.present[r][node] > 0)
        dup += (holders - 1) * node.own_len
    return Partition([sorted(p) for p in parts], list(a.loads),
                     sum(len(rs) > 1 for rs in groups.values()), dup)
