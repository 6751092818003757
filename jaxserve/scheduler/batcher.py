"""Iteration-level scheduler: which tokens of which requests run in the next step.

Every step: decode tokens of running requests first (one each), then prefill chunks of running
requests, then new requests from the waiting queue, until the token budget or the row limit is hit.
Finished requests leave and waiting ones join at every step. When the page pool cannot hold the
next token of a running request, the lowest-priority, newest running request is preempted: its
pages are freed and it is recomputed later (prompt + what it generated so far), and it is counted.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional

from jaxserve.cache import PagePool
from jaxserve.scheduler.sequence import Sequence, Status


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    start: int          # first token position computed this step
    num_tokens: int     # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this row's last logits produce a new token (the chunk reaches the sequence end)."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclasses.dataclass
class StepPlan:
    rows: list[ScheduledSeq]
    decode_steps: int = 1      # > 1: a fused block of decode steps (every row decodes)

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
    def __init__(self, pool: PagePool, max_num_batched_tokens: int, max_num_seqs: int):
        self.pool = pool
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: list = []      # heap of (priority, index, seq)
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        heapq.heappush(self.waiting, (seq.priority, seq.index, seq))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _ensure_pages(self, seq: Sequence, upto_tokens: int) -> bool:
        need = self.pool.pages_for(upto_tokens) - len(seq.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.pages.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages = []
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)

    def free(self, seq: Sequence) -> None:
        self.pool.release(seq.pages)
        seq.pages = []

    def schedule(self) -> StepPlan:
        rows: list[ScheduledSeq] = []
        budget = self.budget
        scheduled: set[int] = set()
        # Running requests in priority order; the tail is the preemption victim.
        self.running.sort(key=lambda s: s.sort_key)
        i = 0
        while i < len(self.running) and budget > 0 and len(rows) < self.max_num_seqs:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while not self._ensure_pages(seq, seq.num_computed + n):
                victim = self.running[-1]
                if id(victim) in scheduled:
                    # Everything still running is already in this step: stop taking tokens.
                    return StepPlan(rows) if rows else self._fail_no_progress(seq)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # preempted itself; the list shrank, same index is the next request
            rows.append(ScheduledSeq(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        # Admit waiting requests while their first chunk fits.
        while self.waiting and budget > 0 and len(rows) < self.max_num_seqs:
            seq = self.waiting[0][2]
            n = min(seq.num_pending, budget)
            if not self._ensure_pages(seq, seq.num_computed + n):
                break
            heapq.heappop(self.waiting)
            seq.status = Status.RUNNING
            self.running.append(seq)
            rows.append(ScheduledSeq(seq, seq.num_computed, n))
            scheduled.add(id(seq))
            budget -= n
        return StepPlan(rows)

    def schedule_decode_block(self, n_steps: int) -> Optional[StepPlan]:
        """A plan for `n_steps` fused decode steps, or None when a plain step is needed.

        Only when nothing waits and every running request is decoding: then no step in the block
        would have admitted or prefilled anything, so fusing changes no scheduling decision. Pages
        for every row's next `min(n_steps, remaining)` tokens are allocated up front.
        """
        if n_steps <= 1 or self.waiting or not self.running or len(self.running) > self.max_num_seqs:
            return None
        if any(seq.num_pending != 1 for seq in self.running):
            return None
        need = {}
        for seq in self.running:
            upto = seq.num_computed + min(n_steps, seq.remaining)
            need[id(seq)] = max(0, self.pool.pages_for(upto) - len(seq.pages))
        if sum(need.values()) > self.pool.num_free:
            return None
        self.running.sort(key=lambda s: s.sort_key)
        for seq in self.running:
            if need[id(seq)]:
                seq.pages.extend(self.pool.allocate(need[id(seq)]))
        return StepPlan([ScheduledSeq(seq, seq.num_computed, 1) for seq in self.running],
                        decode_steps=n_steps)

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
                seq.status = Status.FINISHED
                self.running.remove(seq)
                self.free(seq)
                finished.append(seq)
        return finished

    def _fail_no_progress(self, seq: Sequence) -> StepPlan:
        raise RuntimeError(
            f"KV page pool of {self.pool.num_usable} pages cannot hold request {seq.index} "
            f"({seq.num_tokens} tokens); raise num_pages or lower max_model_len")

    def commit(self, plan: StepPlan, sampled: list[int]) -> list[Sequence]:
        """Advance the scheduled rows after the step ran; returns the requests that finished."""
        finished = []
        for row, tok in zip(plan.rows, sampled):
            seq = row.seq
            seq.num_computed = row.start + row.num_tokens
            if not row.samples:
                continue
            seq.append(int(tok))
            if seq.finish_reason is not None:
                seq.status = Status.FINISHED
                self.running.remove(seq)
                self.free(seq)
                finished.append(seq)
        return finished
