"""Which waiting sample the scheduler tries to admit next, each step.

The scheduler asks its admission policy for the step's token budget (`step_budget()`), fills the
step with running work first, then asks the policy for candidates (`next()`) and tells it what
became of each (`result()`) until the budget, the rows or the KV pages run out, or the policy has
nothing more to offer.

`PlanOrder`: the waiting samples in plan order. Past the first that does not fit only members of
shared prefixes already started and resident may be admitted, wherever they are in the order
(their prefixes' pages come back only when they have run, so it waits for nothing else and does
not starve; on an input whose groups are interleaved this finishes started groups before new
prefixes fill the pool). Samples waiting for their shared prefix to be computed are passed over,
up to LOOKAHEAD of them.

`BlendAdmission` (BlendServe): two queues, the compute-heavy and the memory-heavy end of the
batch, each in plan order (the resource-aware tree's order, which keeps a group's members, and the
groups of a side, one after another). BlendServe's density is re-measured on the resources a step
of this engine has: a unit's share of the token budget over its share of rows or KV pages
(reserved pages under admission control), against the batch's. Each step each side's drain time
is its remaining need of each resource over what its running samples hold of it, the scarcest
resource counting. The memory side is admitted from first (its samples hold rows for many steps:
started late they end the run as a tail of long decodes in steps with few rows), the compute side
from what it leaves. Once the memory side holds what rows it can, the compute side's remaining
work is spread over the steps the memory side still needs (`step_budget`: decodes plus that
share of prefill, rounded up to a token bucket so the share costs no padding), so each step's
mix stays near the batch's density and the two sides run out together (no long phase of prefill alone, then decode alone). The memory side
never takes the last row or the KV pages the compute side's next request needs while that side
waits, so neither starves.

Why a step's resources and not the roofline: on the GPU here a step's matmuls and attention run
one after the other (`engine/cost_model.py`: their times add), so a mixed step does not hide KV
reads under compute; what mixing saves is steps (the fixed cost of each, and padding), which the
budget, the rows and the KV pool bound.
"""
from __future__ import annotations

import bisect
import enum
from typing import Optional

from jaxserve.scheduler.density import Costs, expected_len, kv_reads, prefix_share
from jaxserve.scheduler.sequence import Sample, Status

LOOKAHEAD = 64   # waiting samples inspected past ones blocked on a prefix still being computed
BLEND_SPREAD = 2.0   # units within this factor of the batch's density are not split into sides


class Outcome(enum.Enum):
    ADMITTED = 0        # it runs from this step on
    PREFIX_STARTED = 1  # its shared prefix was started instead; ask about the same sample again
    PREFIX_WAIT = 2     # its shared prefix is still being computed
    NO_FIT = 3          # not enough KV pages (or reserve) for it now


class PlanOrder:
    def step_budget(self) -> int:
        """Tokens the next step may take (the scheduler's budget)."""
        return self.sched.budget

    def bind(self, sched) -> None:
        self.sched = sched
        self.members: dict = {}     # id(prefix) -> its waiting samples below it, in plan order
        self.held: dict = {}        # id(prefix) -> prefix, started (held once computed)

    def add(self, seq: Sample) -> None:
        if seq.prefix is not None:
            bisect.insort(self.members.setdefault(id(seq.prefix), []), seq,
                          key=lambda s: s.sort_key)

    def add_all(self, seqs) -> None:
        for s in seqs:
            if s.prefix is not None:
                self.members.setdefault(id(s.prefix), []).append(s)
        for m in self.members.values():
            m.sort(key=lambda s: s.sort_key)

    def remove(self, seq: Sample) -> None:
        m = self.members.get(id(seq.prefix)) if seq.prefix is not None else None
        if m:
            m.remove(seq)

    def begin(self) -> None:
        self.j = 0
        self.skipped = 0
        self.stop = False
        self.behind: Optional[list] = None     # past a sample that did not fit

    def next(self) -> Optional[Sample]:
        if self.behind is not None:
            while self.behind:
                m = self.members.get(id(self.behind[0]))
                if m:
                    return m[0]
                del self.held[id(self.behind.pop(0))]
            return None
        w = self.sched.waiting
        return w[self.j] if not self.stop and self.j < len(w) else None

    def result(self, seq: Sample, outcome: Outcome) -> None:
        if outcome in (Outcome.ADMITTED, Outcome.PREFIX_STARTED) and seq.prefix is not None:
            self.held[id(seq.prefix)] = seq.prefix
        if self.behind is not None:
            if outcome is not Outcome.ADMITTED:
                self.behind.pop(0)           # this group does not fit either: the next one
            return
        if outcome is Outcome.PREFIX_WAIT:
            self.skipped += 1
            self.j += 1
            self.stop = self.skipped > LOOKAHEAD
        elif outcome is Outcome.NO_FIT:
            # Only members of prefixes already resident may pass it: their pages come back only
            # when they have run, so it waits for nothing else and does not starve.
            self.behind = [p for p in self.held.values() if _resident(p)]
        # ADMITTED: it left the list, the same index is the next sample; PREFIX_STARTED: again.


def _resident(p) -> bool:
    while p is not None:
        if p.status is not Status.FINISHED:
            return False
        p = p.prefix
    return True


def prefix_resident(s: Sample) -> bool:
    """Whether `s` sits below a shared prefix that is computed and held (it needs no new one)."""
    return s.prefix is not None and _resident(s.prefix)


def member_costs(s: Sample) -> Costs:
    """Work a sample leaves to do: prompt tokens past what is cached and its share of the shared
    prefixes not computed yet, its decode, and the KV it reads beyond its cascade group's prefix
    (which the group reads once per step)."""
    d = max(expected_len(s) - len(s.output_ids), 0)
    g = s.group.num_tokens if s.group is not None else 0
    pending = max(len(s.prompt_ids) - s.num_computed, 0) + prefix_share(s, pending_only=True)
    return Costs(pending + d, kv_reads(s.num_tokens - g, d))


def demand(s: Sample, sched) -> tuple[float, float, float]:
    """What a sample still needs of a step's three resources, summed over the steps it has left:
    tokens (of the budget), row-steps (a row each step it runs) and KV page-steps (the pages it
    holds, as reserved under admission control, each step it runs)."""
    c = member_costs(s)
    d = max(expected_len(s) - len(s.output_ids), 0)
    pending = max(len(s.prompt_ids) - s.num_computed, 0)
    life = d + -(-pending // sched.budget)
    if sched.reserve:
        pages = s.reserved_pages or sched._projected_pages(s)
    else:
        pages = sched.pool.pages_for(s.num_tokens + d // 2)
    return c.tokens, life, pages * life


class _SideQueue:
    """Waiting samples of one side in sort_key order, with what they need."""

    def __init__(self):
        self.keys: list = []
        self.seqs: list = []
        self.need = [0.0, 0.0, 0.0]
        self._need: dict = {}

    def _count(self, s: Sample, sched) -> None:
        v = self._need[id(s)] = demand(s, sched)
        for i in range(3):
            self.need[i] += v[i]

    def add(self, s: Sample, sched) -> None:
        k = s.sort_key
        i = bisect.bisect_left(self.keys, k)
        self.keys.insert(i, k)
        self.seqs.insert(i, s)
        self._count(s, sched)

    def extend(self, seqs, sched) -> None:
        merged = sorted(list(zip(self.keys, self.seqs)) + [(s.sort_key, s) for s in seqs],
                        key=lambda e: e[0])
        self.keys = [k for k, _ in merged]
        self.seqs = [s for _, s in merged]
        for s in seqs:
            self._count(s, sched)

    def remove(self, s: Sample) -> None:
        i = bisect.bisect_left(self.keys, s.sort_key)
        if i < len(self.seqs) and self.seqs[i] is s:
            del self.keys[i], self.seqs[i]
            v = self._need.pop(id(s))
            for j in range(3):
                self.need[j] -= v[j]


def _density(v, cap) -> float:
    """Share of the budget over share of the scarcer memory resource (rows or KV pages)."""
    return (v[0] / cap[0]) / max(v[1] / cap[1], v[2] / cap[2], 1e-30)


class BlendAdmission:
    """BlendServe's two scanners acting on what runs (see the module docstring)."""

    MEMORY, COMPUTE = 0, 1

    def __init__(self, units):
        self.units = units
        self.side_of: dict = {}
        self.queues = [_SideQueue(), _SideQueue()]
        self.prefix_side: dict = {}         # shared prefixes being computed -> the side they serve

    def bind(self, sched) -> None:
        """Split the units by density on this scheduler's resources: a unit's share of the
        token budget over its share of rows or KV pages (whichever it needs more of), against
        the batch's own."""
        self.sched = sched
        cap = (sched.budget, sched.max_num_seqs, sched.pool.num_usable)
        per = []
        for u in self.units:
            v = [0.0, 0.0, 0.0]
            for x in u.samples:
                for i, d in enumerate(demand(x, sched)):
                    v[i] += d
            per.append(v)
        target = _density([sum(v[i] for v in per) for i in range(3)], cap)
        rho = [_density(v, cap) for v in per]
        # A batch whose units all sit within BLEND_SPREAD of its density has nothing to blend
        # (requests of one shape split by rounding): one queue, in plan order.
        uniform = all(target / BLEND_SPREAD <= r <= target * BLEND_SPREAD for r in rho)
        for u, r in zip(self.units, rho):
            side = self.COMPUTE if r >= target and not uniform else self.MEMORY
            for x in u.samples:
                self.side_of[id(x)] = side

    def step_budget(self) -> int:
        """The compute side's work spread over the steps the memory side still needs, once the
        memory side has taken what rows it can: the step takes its decodes, the memory side's
        prefill and that share of the compute side's, rounded up to a token bucket (a power of
        two, as the runner pads steps) so the share costs no padding."""
        sched = self.sched
        self.begin()
        m_steps = self._drain(self.MEMORY)
        if (not self.need[self.COMPUTE][0] or m_steps == float("inf") or m_steps <= 0
                or (self.queues[self.MEMORY].seqs and self.rows < sched.max_num_seqs - 1)):
            return sched.budget
        want = self.need[self.COMPUTE][0] / m_steps
        for s in sched.running:
            if not s.samples:
                if self.prefix_side.get(id(s), self.COMPUTE) == self.MEMORY:
                    want += s.num_pending
            elif s.num_pending == 1 or self._side(s) == self.MEMORY:
                want += s.num_pending
        b = 16
        while b < want:
            b *= 2
        return min(b, sched.budget)

    def _side(self, seq: Sample) -> int:
        return self.side_of.get(id(seq), self.MEMORY)

    def add(self, seq: Sample) -> None:
        self.queues[self._side(seq)].add(seq, self.sched)

    def add_all(self, seqs) -> None:
        for side in (self.MEMORY, self.COMPUTE):
            self.queues[side].extend([s for s in seqs if self._side(s) == side], self.sched)

    def remove(self, seq: Sample) -> None:
        self.queues[self._side(seq)].remove(seq)

    # -- one step -----------------------------------------------------------------------------
    def begin(self) -> None:
        """Each side's needs (running and waiting) and what it holds now: tokens a step, rows,
        KV pages."""
        sched = self.sched
        self.need = [list(q.need) for q in self.queues]
        self.use = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
        for s in sched.running:
            if not s.samples:
                # A shared prefix being prefilled works for the side that started it.
                side = self.prefix_side.get(id(s), self.COMPUTE)
                self.use[side][0] += min(s.num_pending, sched.budget)
                self.need[side][0] += s.num_pending
                continue
            side = self._side(s)
            for i, d in enumerate(demand(s, sched)):
                self.need[side][i] += d
            self._hold(side, s)
        self.cursor = [0, 0]
        self.skipped = [0, 0]
        self.blocked = [False, False]
        self.rows = len(sched.running)
        self.side = self.MEMORY

    def _hold(self, side: int, s: Sample) -> None:
        u = self.use[side]
        u[0] += min(s.num_pending, self.sched.budget)
        u[1] += 1
        u[2] += s.reserved_pages if self.sched.reserve else len(s.pages)

    def _drain(self, side: int) -> float:
        """Steps the side needs at what it holds now: its scarcest resource's need over its use."""
        n, u = self.need[side], self.use[side]
        return max(n[i] / u[i] if u[i] > 0 else (float("inf") if n[i] > 0 else 0.0)
                   for i in range(3))

    def _head(self, side: int) -> Optional[Sample]:
        q = self.queues[side].seqs
        i = self.cursor[side]
        return q[i] if not self.blocked[side] and i < len(q) else None

    def _memory_capped(self, seq: Sample) -> bool:
        """Whether admitting `seq` would leave no row or too few KV pages for the compute side's
        next request to join."""
        sched = self.sched
        head = self.queues[self.COMPUTE].seqs[0]
        if self.rows + 1 > sched.max_num_seqs - 1:
            return True
        if sched.reserve:
            need, c_need, used = (sched._projected_pages(seq), sched._projected_pages(head),
                                  sched.committed)
        else:
            need, c_need, used = (sched.pool.pages_for(seq.num_tokens),
                                  sched.pool.pages_for(len(head.prompt_ids)), sched.pool.num_used)
        return used + need + c_need > sched.pool.num_usable

    def next(self) -> Optional[Sample]:
        mem, comp = self._head(self.MEMORY), self._head(self.COMPUTE)
        if mem is not None and self.queues[self.COMPUTE].seqs and (
                comp is None or mem.priority >= comp.priority) and self._memory_capped(mem):
            self.blocked[self.MEMORY] = True
            mem = None
        if mem is not None and comp is not None:
            # Memory-heavy work first (longest-processing-time first): it holds its rows for
            # many steps, and started late it would end the run as a tail of a few long decodes
            # in steps with few rows. The compute side fills the budget the step has left and
            # the rows and pages the cap above keeps for it.
            side = (self.COMPUTE if comp.priority < mem.priority else self.MEMORY)
        elif mem is not None:
            side = self.MEMORY
        elif comp is not None:
            side = self.COMPUTE
        else:
            return None
        self.side = side
        return mem if side == self.MEMORY else comp

    def result(self, seq: Sample, outcome: Outcome) -> None:
        side = self.side
        if outcome is Outcome.ADMITTED:
            self.rows += 1
            self._hold(side, seq)
        elif outcome is Outcome.PREFIX_STARTED:
            self.rows += 1
            prefix = next(p for p in reversed(list(seq.ancestors())) if p.status is Status.RUNNING)
            self.prefix_side[id(prefix)] = side
            self.use[side][0] += min(prefix.num_pending, self.sched.budget)
        elif outcome is Outcome.PREFIX_WAIT:
            self.cursor[side] += 1
            self.skipped[side] += 1
            self.blocked[side] = self.skipped[side] > LOOKAHEAD
        elif outcome is Outcome.NO_FIT:
            self.blocked[side] = True


def for_plan(plan, enabled: bool):
    """The admission policy a batch plan asks for."""
    if enabled and plan.units:
        return BlendAdmission(plan.units)
    return PlanOrder()
