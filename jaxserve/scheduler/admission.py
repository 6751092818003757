"""Which waiting sample the scheduler tries to admit next, each step.

The scheduler fills a step with running work first, then asks its admission policy for candidates
(`next()`) and tells it what became of each (`result()`) until the token budget, the rows or the
KV pages run out, or the policy has nothing more to offer.

`PlanOrder`: the waiting samples in plan order. Past the first that does not fit only members of
shared prefixes already resident may be admitted (their prefixes' pages come back only when they
have run, so it waits for nothing else and does not starve). Samples waiting for their shared
prefix to be computed are passed over; at most LOOKAHEAD samples are passed over in all.

`BlendAdmission` (BlendServe): two queues, the compute-heavy and the memory-heavy side of the
batch's density (`planner.Unit.compute_side`), each in plan order, so a group's members are
admitted one after another and groups of a side one group after another. Each step it compares
the KV the running samples read per decode step with the amount that would keep the step's mix
at the density of the work left (`budget * kv_left / tokens_left`): below it, it admits from the
memory-heavy side (more decoding rows), above it from the compute-heavy side (prefill that fills
the budget). The memory-heavy side leaves the rows and KV pages that the compute-heavy side's
flow needs while that side waits (BlendServe's split of KV memory between the two scanners), so
neither side starves and prefill keeps every step full until both run out together.
"""
from __future__ import annotations

import bisect
import enum
from typing import Optional

from jaxserve.scheduler.density import Costs, expected_len, kv_reads
from jaxserve.scheduler.sequence import Sample, Status

LOOKAHEAD = 64   # waiting samples inspected past ones blocked on a prefix still being computed


class Outcome(enum.Enum):
    ADMITTED = 0        # it runs from this step on
    PREFIX_STARTED = 1  # its shared prefix was started instead; ask about the same sample again
    PREFIX_WAIT = 2     # its shared prefix is still being computed
    NO_FIT = 3          # not enough KV pages (or reserve) for it now


class PlanOrder:
    def bind(self, sched) -> None:
        self.sched = sched

    def add(self, seq: Sample) -> None:
        pass

    def add_all(self, seqs) -> None:
        pass

    def remove(self, seq: Sample) -> None:
        pass

    def begin(self) -> None:
        self.j = 0
        self.skipped = 0
        self.resident_only = False      # past a sample that did not fit
        self.stop = False

    def next(self) -> Optional[Sample]:
        w = self.sched.waiting
        while not self.stop and self.j < len(w):
            s = w[self.j]
            if not self.resident_only or prefix_resident(s):
                return s
            self._skip()
        return None

    def _skip(self) -> None:
        self.skipped += 1
        self.j += 1
        self.stop = self.skipped > LOOKAHEAD

    def result(self, seq: Sample, outcome: Outcome) -> None:
        if outcome is Outcome.PREFIX_WAIT:
            self._skip()
        elif outcome is Outcome.NO_FIT:
            # Only members of prefixes already resident may pass it: their pages come back only
            # when they run, so the sample that did not fit waits for them and for nothing else.
            self.resident_only = True
            self._skip()
        # ADMITTED: it left the list, the same index is the next sample; PREFIX_STARTED: again.


def prefix_resident(s: Sample) -> bool:
    """Whether `s` sits below a shared prefix that is computed and held (it needs no new one)."""
    return s.prefix is not None and all(p.status is Status.FINISHED for p in s.ancestors())


def member_costs(s: Sample) -> Costs:
    """Work a sample leaves to do: prompt tokens past what is cached, its decode, and the KV it
    reads beyond its cascade group's prefix (which the group reads once per step)."""
    d = max(expected_len(s) - len(getattr(s, "output_ids", ())), 0)
    g = s.group.num_tokens if s.group is not None else 0
    ctx = s.num_tokens
    return Costs(max(len(s.prompt_ids) - s.num_computed, 0) + d, kv_reads(ctx - g, d))


class _SideQueue:
    """Waiting samples of one side in sort_key order, with the work they hold."""

    def __init__(self):
        self.keys: list = []
        self.seqs: list = []
        self.costs = Costs()

    def add(self, s: Sample) -> None:
        k = s.sort_key
        i = bisect.bisect_left(self.keys, k)
        self.keys.insert(i, k)
        self.seqs.insert(i, s)
        self.costs.add(member_costs(s))

    def extend(self, seqs) -> None:
        merged = sorted(list(zip(self.keys, self.seqs)) + [(s.sort_key, s) for s in seqs],
                        key=lambda e: e[0])
        self.keys = [k for k, _ in merged]
        self.seqs = [s for _, s in merged]
        for s in seqs:
            self.costs.add(member_costs(s))

    def remove(self, s: Sample) -> None:
        i = bisect.bisect_left(self.keys, s.sort_key)
        if i < len(self.seqs) and self.seqs[i] is s:
            del self.keys[i], self.seqs[i]
            c = member_costs(s)
            self.costs.tokens -= c.tokens
            self.costs.kv -= c.kv


class BlendAdmission:
    MEMORY, COMPUTE = 0, 1

    def __init__(self, units):
        self.side_of = {id(s): int(u.compute_side) for u in units for s in u.samples}
        # The compute-heavy side's flow: how many of its requests run at once (one prefilling, the
        # others decoding their few tokens) and the KV each reserves.
        comp = [s for u in units if u.compute_side for s in u.samples]
        if comp:
            n = len(comp)
            self.c_prompt = sum(len(s.prompt_ids) - s.base for s in comp) / n
            self.c_decode = sum(expected_len(s) for s in comp) / n
            self.c_longest = sum(min(len(s.prompt_ids) + s.params.max_tokens, s.max_len)
                                 for s in comp) / n
        else:
            self.c_prompt = self.c_decode = self.c_longest = 0.0
        self.queues = [_SideQueue(), _SideQueue()]

    def bind(self, sched) -> None:
        self.sched = sched
        flow = 1 + self.c_decode * sched.budget / max(self.c_prompt, 1.0)
        self.c_rows = int(min(max(flow, 1), sched.max_num_seqs // 2))
        self.c_pages = sched.pool.pages_for(int(self.c_rows * self.c_longest))

    def add(self, seq: Sample) -> None:
        self.queues[self.side_of.get(id(seq), self.MEMORY)].add(seq)

    def add_all(self, seqs) -> None:
        for side in (self.MEMORY, self.COMPUTE):
            self.queues[side].extend([s for s in seqs if self.side_of.get(id(s), 0) == side])

    def remove(self, seq: Sample) -> None:
        self.queues[self.side_of.get(id(seq), self.MEMORY)].remove(seq)

    # -- one step -----------------------------------------------------------------------------
    def begin(self) -> None:
        """The running mix: KV its decode reads per step (each group's prefix once) and the work
        it has left, which with the waiting work gives the step's target."""
        sched = self.sched
        left = Costs()
        for q in self.queues:
            left.add(q.costs)
        self.reads = 0.0
        group_reads: dict = {}
        for s in sched.running:
            if not s.samples:
                left.tokens += s.num_pending
                continue
            c = member_costs(s)
            left.add(c)
            g = s.group
            self.reads += s.num_tokens - (g.num_tokens if g is not None else 0)
            if g is not None:
                group_reads[id(g)] = g.num_tokens
        self.reads += sum(group_reads.values())
        self.target_reads = sched.budget * left.kv / max(left.tokens, 1.0)
        self.cursor = [0, 0]
        self.skipped = [0, 0]
        self.blocked = [False, False]
        self.rows = len(sched.running)
        self.side = self.MEMORY

    def _head(self, side: int) -> Optional[Sample]:
        q = self.queues[side].seqs
        i = self.cursor[side]
        return q[i] if not self.blocked[side] and i < len(q) else None

    def _memory_capped(self, seq: Sample) -> bool:
        """Whether admitting `seq` would take the rows or KV the compute side's flow needs."""
        sched = self.sched
        if self.rows + 1 > sched.max_num_seqs - self.c_rows:
            return True
        free = sched.pool.num_usable - self.c_pages
        if sched.reserve:
            return sched.committed + sched._projected_pages(seq) > free
        return sched.pool.num_used + sched.pool.pages_for(seq.num_tokens) > free

    def next(self) -> Optional[Sample]:
        mem, comp = self._head(self.MEMORY), self._head(self.COMPUTE)
        if mem is not None and self.queues[self.COMPUTE].seqs and (
                comp is None or mem.priority >= comp.priority) and self._memory_capped(mem):
            # While compute-heavy work waits, the memory side stays within its share.
            self.blocked[self.MEMORY] = True
            mem = None
        if mem is not None and comp is not None:
            if mem.priority != comp.priority:
                side = self.MEMORY if mem.priority < comp.priority else self.COMPUTE
            else:
                side = self.MEMORY if self.reads < self.target_reads else self.COMPUTE
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
            g = seq.group
            self.reads += seq.num_tokens - (g.num_tokens if g is not None else 0)
        elif outcome is Outcome.PREFIX_STARTED:
            self.rows += 1
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
