"""Iteration-level scheduler: which tokens of which sequences run in the next step.

Every step: decode tokens of running requests first (one each), then prefill chunks of running
sequences (shared prefixes and requests), then new work from the waiting list in plan order, until
the token budget or the row limit is hit. Finished requests leave and waiting ones join at every
step.

A waiting request whose shared prefix has not been computed starts that prefix instead (it is
prefilled once, as a sequence of its own that samples nothing), and joins once the prefix is
resident. Prefix pages are released when the last request below finishes.

Admission: with `reserve=True` a sequence is admitted only when the pages it can grow to (prompt +
max_tokens, capped at max_model_len) fit beside everything already admitted, so the pool can never
run out and nothing is preempted. With `reserve=False` (vLLM-style) a request is admitted when its
first chunk fits; when a running request then cannot get a page, the lowest-priority, newest
running request is preempted (pages freed, recomputed later from its prefix) and counted.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.cache import PagePool
from jaxserve.scheduler.sequence import Sequence, Status

LOOKAHEAD = 64   # waiting requests inspected past ones blocked on a prefix still being computed
MAX_COPIES = 32  # copy-on-write page copies per step (runner.step_inputs.MAX_COPIES)


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    start: int          # first token position computed this step
    num_tokens: int     # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this row's last logits produce a new token (the chunk reaches the sequence end)."""
        return not self.seq.is_prefix and self.start + self.num_tokens == self.seq.num_tokens


@dataclasses.dataclass
class StepPlan:
    rows: list[ScheduledSeq]
    decode_steps: int = 1      # > 1: a fused block of decode steps (every row decodes)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (src, dst) pages

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.rows)

    @property
    def max_seq_len(self) -> int:
        """Longest KV length any row reaches in this plan (a fused block counts all its steps)."""
        if self.decode_steps > 1:
            return max(r.start + min(self.decode_steps, r.seq.remaining) for r in self.rows)
        return max(r.start + r.num_tokens for r in self.rows)


class Scheduler:
    def __init__(self, pool: PagePool, max_num_batched_tokens: int, max_num_seqs: int,
                 reserve: bool = False):
        self.pool = pool
        self.ps = pool.page_size
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.reserve = reserve
        self.waiting: list[Sequence] = []      # requests, sorted by sort_key
        self.running: list[Sequence] = []      # requests and prefixes being computed
        self.committed = 0                     # pages reserved by admitted, unfinished sequences
        self.num_preemptions = 0
        self._copies: list[tuple[int, int]] = []

    def add(self, seq: Sequence) -> None:
        """Insert into the waiting list, kept in sort_key order (preempted requests re-enter)."""
        lo, hi, k = 0, len(self.waiting), seq.sort_key
        while lo < hi:
            mid = (lo + hi) // 2
            if self.waiting[mid].sort_key <= k:
                lo = mid + 1
            else:
                hi = mid
        self.waiting.insert(lo, seq)

    def add_all(self, seqs) -> None:
        """Bulk insert at start-up (one sort instead of n insertions)."""
        self.waiting.extend(seqs)
        self.waiting.sort(key=lambda s: s.sort_key)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- pages ------------------------------------------------------------------------------
    def _own_pages_for(self, seq: Sequence, upto_tokens: int) -> int:
        return self.pool.pages_for(upto_tokens) - seq.first_own_page(self.ps)

    def _projected_pages(self, seq: Sequence) -> int:
        if seq.is_prefix:
            return self._own_pages_for(seq, seq.num_tokens)
        longest = min(len(seq.prompt_ids) + seq.params.max_tokens, seq.max_len)
        return self._own_pages_for(seq, longest)

    def _ensure_pages(self, seq: Sequence, upto_tokens: int) -> bool:
        need = self._own_pages_for(seq, upto_tokens) - len(seq.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        first = not seq.pages
        seq.pages.extend(self.pool.allocate(need))
        if first and seq.base % self.ps:
            # The prefix's last page is partly filled: this sequence writes its own tokens into
            # a private copy of it (copied on device before the step's forward pass).
            src = seq.prefix.page_table(self.ps)[seq.first_own_page(self.ps)]
            self._copies.append((src, seq.pages[0]))
        return True

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        if self.reserve:
            self.committed -= seq.reserved_pages
            seq.reserved_pages = 0

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = seq.base
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self._release(seq)
        for p in seq.ancestors():
            p.members_left -= 1
            if p.members_left == 0:
                self._release(p)

    # -- admission ------------------------------------------------------------------------------
    def _can_admit(self, seq: Sequence, first_chunk: int) -> bool:
        if self.reserve:
            return self.committed + self._projected_pages(seq) <= self.pool.num_usable
        need = self._own_pages_for(seq, seq.num_computed + first_chunk) - len(seq.pages)
        return need <= self.pool.num_free

    def _admit(self, seq: Sequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)
        if self.reserve:
            seq.reserved_pages = self._projected_pages(seq)
            self.committed += seq.reserved_pages

    def _next_prefix_to_start(self, seq: Sequence) -> tuple[Optional[Sequence], bool]:
        """(the top-most prefix of `seq` not started yet, whether `seq` is blocked)."""
        chain = list(seq.ancestors())[::-1]   # root-most first
        for p in chain:
            if p.status is Status.WAITING:
                return p, True
            if p.status is Status.RUNNING:
                return None, True
        return None, False

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        rows: list[ScheduledSeq] = []
        budget = self.budget
        scheduled: set[int] = set()
        # Decodes first, then running prefills; within each, plan order. The last running request
        # is the preemption victim.
        self.running.sort(key=lambda s: (s.num_pending > 1, s.sort_key))
        i = 0
        while i < len(self.running) and budget > 0 and len(rows) < self.max_num_seqs:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while not self._ensure_pages(seq, seq.num_computed + n):
                victims = [s for s in self.running if not s.is_prefix and id(s) not in scheduled]
                if not victims:
                    if rows:
                        return self._plan(rows)
                    raise RuntimeError(
                        f"KV page pool of {self.pool.num_usable} pages cannot hold sequence "
                        f"{seq.index} ({seq.num_tokens} tokens); raise num_pages")
                victim = max(victims, key=lambda s: s.sort_key)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # preempted itself; the list shrank, same index is the next sequence
            rows.append(ScheduledSeq(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        # Admit waiting work in plan order while it fits.
        j = 0
        skipped = 0
        while (j < len(self.waiting) and budget > 0 and len(rows) < self.max_num_seqs
               and len(self._copies) < MAX_COPIES):
            seq = self.waiting[j]
            start, blocked = self._next_prefix_to_start(seq)
            if blocked:
                if start is not None:
                    n = min(start.num_pending, budget)
                    if not self._can_admit(start, n) or not self._ensure_pages(start, start.num_computed + n):
                        break
                    self._admit(start)
                    rows.append(ScheduledSeq(start, start.num_computed, n))
                    scheduled.add(id(start))
                    budget -= n
                    continue   # the same request may now be blocked on its next prefix level
                skipped += 1
                if skipped > LOOKAHEAD:
                    break
                j += 1
                continue
            n = min(seq.num_pending, budget)
            if not self._can_admit(seq, n) or not self._ensure_pages(seq, seq.num_computed + n):
                break
            self.waiting.pop(j)
            self._admit(seq)
            rows.append(ScheduledSeq(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        return self._plan(rows)

    def _plan(self, rows, decode_steps: int = 1) -> StepPlan:
        plan = StepPlan(rows, decode_steps=decode_steps, copies=self._copies)
        self._copies = []
        return plan

    def schedule_decode_block(self, n_steps: int) -> Optional[StepPlan]:
        """A plan for `n_steps` fused decode steps, or None when a plain step is needed.

        Only when nothing waits and every running sequence is a decoding request: then no step in
        the block would have admitted or prefilled anything, so fusing changes no scheduling
        decision. Pages for every row's next `min(n_steps, remaining)` tokens are allocated first.
        """
        if n_steps <= 1 or self.waiting or not self.running or len(self.running) > self.max_num_seqs:
            return None
        if any(seq.is_prefix or seq.num_pending != 1 for seq in self.running):
            return None
        need = {}
        for seq in self.running:
            upto = seq.num_computed + min(n_steps, seq.remaining)
            need[id(seq)] = max(0, self._own_pages_for(seq, upto) - len(seq.pages))
        if sum(need.values()) > self.pool.num_free:
            return None
        self.running.sort(key=lambda s: s.sort_key)
        for seq in self.running:
            self._ensure_pages(seq, seq.num_computed + min(n_steps, seq.remaining))
        return self._plan([ScheduledSeq(seq, seq.num_computed, 1) for seq in self.running],
                          decode_steps=n_steps)

    # -- after the step ---------------------------------------------------------------------------
    def commit(self, plan: StepPlan, sampled) -> list[Sequence]:
        """Advance the scheduled rows after the step ran; returns the requests that finished."""
        finished = []
        for row, tok in zip(plan.rows, sampled):
            seq = row.seq
            seq.num_computed = row.start + row.num_tokens
            if seq.is_prefix:
                if seq.num_computed == seq.num_tokens:
                    seq.status = Status.FINISHED      # resident until its last member finishes
                    self.running.remove(seq)
                    seq._chain = seq.page_table(self.ps)
                continue
            if not row.samples:
                continue
            seq.append(int(tok))
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        return finished

    def commit_block(self, plan: StepPlan, tokens) -> list[Sequence]:
        """Advance after a fused decode block; `tokens[i, row]` is step i's sample for a row."""
        finished = []
        for r, row in enumerate(plan.rows):
            seq = row.seq
            for i in range(plan.decode_steps):
                seq.num_computed += 1
                seq.append(int(tokens[i, r]))
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        return finished
