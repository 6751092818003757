"""Iteration-level scheduler: which tokens of which sequences run in the next step.

Every step: decode tokens of running samples first (one each), then prefill chunks of running
sequences (shared prefixes and samples), then new work from the waiting list in the order the
admission policy offers it (`admission.py`: plan order, or BlendServe's two queues), until the
token budget or the row limit is hit. Finished samples leave and waiting ones join at every step.

A waiting sample whose shared prefix has not been computed starts that prefix instead (it is
prefilled once, as a sequence of its own that samples nothing), and joins once the prefix is
resident. Prefix pages are released when the last sample below finishes.

Admission: with `reserve=True` a sequence is admitted only when the pages it can grow to (prompt +
max_tokens, capped at max_model_len) fit beside everything already admitted, so the pool can never
run out and nothing is preempted. With `reserve=False` (vLLM-style) a sample is admitted when its
first chunk fits; when a running sample then cannot get a page, the lowest-priority, newest
running sample is preempted (pages freed, recomputed later from its prefix) and counted.

`schedule()` returns a `StepPlan` of plain rows for the runner and advances the sequences as if the
step had run (positions computed, a placeholder for each token it samples); `commit()` takes the
step's sampled tokens (and logprobs) back, possibly one step later (host/device overlap): a sample
that finishes then has had at most one more step scheduled, whose token is dropped. A sample with
placeholders is never preempted (its next token is still on the device).
"""
from __future__ import annotations

from typing import Optional

from jaxserve.scheduler.admission import Outcome, PlanOrder, prefix_resident
from jaxserve.scheduler.page_pool import PagePool
from jaxserve.scheduler.sequence import KVSequence, Sample, SharedPrefix, Status
from jaxserve.scheduler.step_plan import MAX_COPIES, PlannedRow, RowSampling, StepPlan


def _row_sampling(s: Sample) -> RowSampling:
    p = s.params
    return RowSampling(temperature=p.temperature, top_k=max(p.top_k, 0), top_p=p.top_p,
                       min_p=p.min_p, seed=s.seed & 0xFFFFFFFF, stop_ids=tuple(sorted(s.stop_ids)),
                       min_tokens=p.min_tokens, logprobs=p.logprobs is not None,
                       presence=p.presence_penalty, frequency=p.frequency_penalty,
                       repetition=p.repetition_penalty)


def _logprob_entry(k: int, ids, vals, token: int, token_lp) -> dict:
    """vLLM's shape: the top-k tokens, most likely first, then the chosen one if not among them."""
    d = {int(i): float(v) for i, v in zip(ids[:k], vals[:k])}
    d.setdefault(int(token), float(token_lp))
    return d


class Scheduler:
    def __init__(self, pool: PagePool, max_num_batched_tokens: int, max_num_seqs: int,
                 reserve: bool = False, admission=None, fuse_while_stalled: bool = True):
        self.pool = pool
        self.fuse_while_stalled = fuse_while_stalled
        self.ps = pool.page_size
        self.budget = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.reserve = reserve
        self.waiting: list[Sample] = []        # sorted by sort_key
        self.running: list[KVSequence] = []    # samples and prefixes being computed
        self.committed = 0                     # pages reserved by admitted, unfinished sequences
        # The last step's admission found nothing waiting that fits (pages, reserve or rows),
        # and no sequence has released pages since: nothing can start until one does.
        self.admission_stalled = False
        self.num_preemptions = 0
        self.num_dropped = 0                   # tokens sampled for samples already finished
        self.num_prefix_evictions = 0          # times resident prefixes had to be dropped
        self._copies: list[tuple[int, int]] = []
        self._sampling: dict[int, RowSampling] = {}
        self.admission = admission if admission is not None else PlanOrder()
        self.admission.bind(self)
        # Rows without token ids and page tables (their lengths only): for host-only simulation.
        self.light_rows = False

    def add(self, seq: Sample) -> None:
        """Insert into the waiting list, kept in sort_key order (preempted samples re-enter)."""
        lo, hi, k = 0, len(self.waiting), seq.sort_key
        while lo < hi:
            mid = (lo + hi) // 2
            if self.waiting[mid].sort_key <= k:
                lo = mid + 1
            else:
                hi = mid
        self.waiting.insert(lo, seq)
        self.admission.add(seq)

    def add_all(self, seqs) -> None:
        """Bulk insert at start-up (one sort instead of n insertions)."""
        self.waiting.extend(seqs)
        self.waiting.sort(key=lambda s: s.sort_key)
        self.admission.add_all(seqs)

    def _remove_waiting(self, seq: Sample) -> None:
        lo, hi, k = 0, len(self.waiting), seq.sort_key
        while lo < hi:
            mid = (lo + hi) // 2
            if self.waiting[mid].sort_key < k:
                lo = mid + 1
            else:
                hi = mid
        assert self.waiting[lo] is seq
        self.waiting.pop(lo)
        self.admission.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- pages ------------------------------------------------------------------------------
    def _own_pages_for(self, seq: KVSequence, upto_tokens: int) -> int:
        return self.pool.pages_for(upto_tokens) - seq.first_own_page(self.ps)

    def _projected_pages(self, seq: KVSequence) -> int:
        return self._own_pages_for(seq, seq.longest)

    def _ensure_pages(self, seq: KVSequence, upto_tokens: int) -> bool:
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

    def _release(self, seq: KVSequence) -> None:
        self.admission_stalled = False
        self.pool.release(seq.pages)
        seq.pages = []
        if self.reserve:
            self.committed -= seq.reserved_pages
            seq.reserved_pages = 0

    def _preempt(self, seq: Sample) -> None:
        self._release(seq)
        seq.num_computed = seq.base
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)

    def _finish(self, seq: Sample) -> None:
        seq.status = Status.FINISHED
        self.running.remove(seq)
        self._release(seq)
        self._sampling.pop(id(seq), None)
        for p in seq.ancestors():
            p.members_left -= 1
            if p.members_left == 0:
                self._release(p)

    # -- admission ------------------------------------------------------------------------------
    def _can_admit(self, seq: KVSequence, first_chunk: int, extra: int = 0) -> bool:
        """Whether `seq` fits with `extra` more pages beside it (reserved, or free)."""
        if self.reserve:
            own = 0 if seq.reserved_pages else self._projected_pages(seq)
            return self.committed + own + extra <= self.pool.num_usable
        need = self._own_pages_for(seq, seq.num_computed + first_chunk) - len(seq.pages)
        return need + extra <= self.pool.num_free

    def _admit(self, seq: KVSequence) -> None:
        seq.status = Status.RUNNING
        self.running.append(seq)
        if self.reserve and not seq.reserved_pages:
            seq.reserved_pages = self._projected_pages(seq)
            self.committed += seq.reserved_pages

    def _next_prefix_to_start(self, seq: Sample) -> tuple[Optional[SharedPrefix], bool]:
        """(the top-most prefix of `seq` not started yet, whether `seq` is blocked)."""
        for p in list(seq.ancestors())[::-1]:   # root-most first
            if p.status is Status.WAITING:
                return p, True
            if p.status is Status.RUNNING:
                return None, True
        return None, False

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        picked: list[tuple[KVSequence, int]] = []   # (sequence, tokens this step)
        budget = self.admission.step_budget()
        scheduled: set[int] = set()
        # Decodes first, then running prefills; within each, plan order. The last running sample
        # is the preemption victim.
        self.running.sort(key=lambda s: (s.num_pending > 1, s.sort_key))
        i = 0
        while i < len(self.running) and budget > 0 and len(picked) < self.max_num_seqs:
            seq = self.running[i]
            if seq.samples and seq.remaining <= 0:
                i += 1          # every token it may generate is on the device: it ends at commit
                continue
            n = min(seq.num_pending, budget)
            while not self._ensure_pages(seq, seq.num_computed + n):
                victims = [s for s in self.running if s.samples and id(s) not in scheduled
                           and not s.placeholders]
                if not victims:
                    if picked or any(getattr(s, "placeholders", 0) for s in self.running):
                        return self._plan(picked)   # a commit may free pages: plan again then
                    raise RuntimeError(
                        f"KV page pool of {self.pool.num_usable} pages cannot hold sequence "
                        f"{seq.index} ({seq.num_tokens} tokens); raise num_pages")
                victim = max(victims, key=lambda s: s.sort_key)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # preempted itself; the list shrank, same index is the next sequence
            picked.append((seq, n))
            scheduled.add(id(seq))
            budget -= n
            i += 1
        # Admit waiting work while it fits, in the order the admission policy offers it.
        pol = self.admission
        pol.begin()
        admitted_any = no_fit = False
        while budget > 0 and len(picked) < self.max_num_seqs and len(self._copies) < MAX_COPIES:
            seq = pol.next()
            if seq is None:
                break
            outcome, admitted, n = self._try_admit(seq, budget)
            if admitted is not None:
                picked.append((admitted, n))
                budget -= n
                admitted_any = True
            no_fit |= outcome is Outcome.NO_FIT
            pol.result(seq, outcome)
        # Pages and reserve only shrink while rows decode, and rows free only when one ends:
        # what did not fit now does not fit until a sequence releases its pages (`_release`).
        self.admission_stalled = bool(self.waiting) and not admitted_any and (
            no_fit or len(picked) >= self.max_num_seqs)
        if not picked and self.waiting and not self.running:
            picked = self._unstick(budget)
        return self._plan(picked)

    def _unstick(self, budget: int) -> list:
        """Nothing runs and nothing the policy offered fits: the pool is held by resident shared
        prefixes. Admit any member of one that fits; failing that, drop the prefixes (they are
        recomputed when their members come) and admit in plan order into the emptied pool."""
        for seq in list(self.waiting):
            if prefix_resident(seq):
                outcome, admitted, n = self._try_admit(seq, budget)
                if admitted is not None:
                    return [(admitted, n)]
        for seq in self.waiting:
            if seq.reserved_pages:
                self.committed -= seq.reserved_pages
                seq.reserved_pages = 0
        for p in {id(a): a for s in self.waiting for a in s.ancestors()}.values():
            if p.status is Status.FINISHED:
                self._release(p)
                p.status, p.num_computed, p._chain = Status.WAITING, p.base, None
        self.num_prefix_evictions += 1
        outcome, admitted, n = self._try_admit(self.waiting[0], budget)
        if admitted is None:
            raise RuntimeError(f"KV page pool of {self.pool.num_usable} pages cannot hold sample "
                               f"{self.waiting[0].index}; raise num_pages")
        return [(admitted, n)]

    def _try_admit(self, seq: Sample, budget: int):
        """Admit `seq`, or the top-most shared prefix it still needs, with a first chunk of at most
        `budget` tokens if its pages fit: (what happened, the sequence admitted or None, tokens)."""
        start, blocked = self._next_prefix_to_start(seq)
        if blocked and start is None:
            return Outcome.PREFIX_WAIT, None, 0
        target = start if blocked else seq
        n = min(target.num_pending, budget)
        # A prefix starts only if the sample it starts for can follow it: resident prefixes
        # whose members cannot fit would otherwise hold the pool with nothing running. Under
        # admission control the sample's pages are reserved with the prefix's.
        extra = 0
        if blocked and not seq.reserved_pages:
            extra = (self._projected_pages(seq) if self.reserve else
                     self.pool.pages_for(len(seq.prompt_ids)) - seq.first_own_page(self.ps))
        if (not self._can_admit(target, n, extra)
                or not self._ensure_pages(target, target.num_computed + n)):
            return Outcome.NO_FIT, None, 0
        if target is seq:
            self._remove_waiting(seq)
        self._admit(target)
        if blocked and self.reserve and extra:
            seq.reserved_pages = extra
            self.committed += extra
        return (Outcome.ADMITTED if target is seq else Outcome.PREFIX_STARTED), target, n

    def schedule_decode_block(self, n_steps: int) -> Optional[StepPlan]:
        """A plan for `n_steps` fused decode steps, or None when a plain step is needed.

        Only when every running sequence is a decoding sample and no step in the block would
        have admitted or prefilled anything: nothing waits, or what waits did not fit at the
        last step (`admission_stalled`) and no row reaches its max_tokens inside the block, so
        no pages come free before it ends. (A row that stops on EOS or a stop string inside the
        block frees its pages at the block's end instead of at once: a waiting sample may then
        start up to `n_steps - 1` steps later than in plain steps.) Pages for every row's next
        `min(n_steps, remaining)` tokens are allocated first.
        """
        if n_steps <= 1 or (self.waiting and not (self.fuse_while_stalled and
                                                   self.admission_stalled)):
            return None
        # Samples whose every token is on the device already end at a commit: not in the block.
        rows = [s for s in self.running if not (s.samples and s.remaining <= 0)]
        if not rows or len(rows) > min(self.max_num_seqs, self.budget):
            return None
        if any(not seq.samples or seq.num_pending != 1 for seq in rows):
            return None
        if self.waiting and any(seq.remaining < n_steps for seq in rows):
            return None
        need = 0
        for seq in rows:
            upto = seq.num_computed + min(n_steps, seq.remaining)
            need += max(0, self._own_pages_for(seq, upto) - len(seq.pages))
        if need > self.pool.num_free:
            return None
        rows.sort(key=lambda s: s.sort_key)
        for seq in rows:
            self._ensure_pages(seq, seq.num_computed + min(n_steps, seq.remaining))
        return self._plan([(seq, 1) for seq in rows], decode_steps=n_steps)

    # -- rows -----------------------------------------------------------------------------------
    def _row(self, seq: KVSequence, n: int) -> PlannedRow:
        """The plain row of `seq`'s next `n` positions. Runs for every row of every step: the
        common cases read the sequence's fields directly rather than through its properties."""
        start = seq.num_computed
        light = self.light_rows                 # a host-only simulation: lengths, no ids or pages
        if not seq.samples:
            return PlannedRow(range(start, start + n) if light else seq.prompt_ids[start:start + n],
                              start, [] if light else seq.page_table(self.ps))
        n_prompt, n_out = len(seq.prompt_ids), len(seq.output_ids)
        generated = n_out + seq.placeholders
        end = n_prompt + generated                   # positions, placeholders included
        if light:
            tokens = range(start, start + n)
        elif start + n <= n_prompt:
            tokens = seq.prompt_ids[start:start + n]
        elif n == 1:
            tokens = [seq.output_ids[start - n_prompt] if start - n_prompt < n_out else -1]
        else:
            tokens = seq.tokens(start, n)
        row = PlannedRow(tokens, start, [] if light else seq.page_table(self.ps))
        if start + n == end:
            if seq.placeholders:
                row.last_token_from = seq.last_from     # the newest token is on the device
            sp = self._sampling.get(id(seq))
            if sp is None:
                sp = self._sampling[id(seq)] = _row_sampling(seq)
            row.samples, row.sampling = True, sp
            row.num_generated = generated
            row.remaining = min(seq.params.max_tokens - generated, seq.max_len - end)
            if seq.history is not None:
                row.history = (list(seq.history.ids), list(seq.history.counts))
        g = seq.group
        if g is not None and len(g.prompt_ids) >= self.ps:
            full = g.num_tokens // self.ps      # the shared part is the prefix's full pages
            row.group = id(g)
            row.group_pages = range(full) if light else g.page_table(self.ps)[:full]
        if seq.wants_prompt_logprobs:
            # Positions p whose logits give the logprob of prompt token p + 1, not recorded yet
            # (a recompute after preemption records nothing twice).
            lo = max(start, seq.prompt_logprobs_done)
            hi = min(start + n, len(seq.prompt_ids) - 1)
            if hi > lo:
                targets = [-1] * n
                for p in range(lo, hi):
                    targets[p - start] = seq.prompt_ids[p + 1]
                row.prompt_logprob_targets = targets
        return row

    def _plan(self, picked, decode_steps: int = 1) -> StepPlan:
        plan = StepPlan([self._row(seq, n) for seq, n in picked], decode_steps=decode_steps,
                        copies=self._copies, owners=[seq for seq, _ in picked])
        self._copies = []
        # The sequences move on as if the plan had run: the device runs plans in order, so the
        # next plan can build on this one before its tokens are known.
        for r, (row, (seq, n)) in enumerate(zip(plan.rows, picked)):
            if row.samples:
                k = min(decode_steps, row.remaining)     # tokens this plan samples for the row
                seq.num_computed = row.end + k - 1        # a fused block computes k positions
                seq.placeholders += k
                seq.last_from = r
            else:
                seq.num_computed = row.end
                if not seq.samples and seq.num_computed == seq.num_tokens:
                    # Shared prefix resident from the next step on, until its last member finishes.
                    seq.mark_computed(self.ps)
                    self.running.remove(seq)
        return plan

    # -- after the step ---------------------------------------------------------------------------
    def commit(self, plan: StepPlan, result) -> list[Sample]:
        """The step's `result` (`runner.StepResult`: tokens [decode_steps, rows] and the logprobs
        asked for) for the plan's samples; returns the samples that finished. A sample that
        finished at an earlier commit drops this plan's token (it was scheduled before the host
        knew)."""
        finished = []
        t = 0
        for r, (row, seq) in enumerate(zip(plan.rows, plan.owners)):
            t0, t = t, t + row.num_tokens
            if not seq.samples:
                continue
            if seq.status is Status.FINISHED:
                self.num_dropped += min(plan.decode_steps, row.remaining) if row.samples else 0
                continue
            if row.prompt_logprob_targets is not None and result.prompt_logprobs is not None:
                self._record_prompt_logprobs(seq, row, t0, result.prompt_logprobs)
            if not row.samples:
                continue
            for i in range(min(plan.decode_steps, row.remaining)):
                tok = int(result.tokens[i, r])
                lp = None
                if seq.logprobs is not None and result.top_ids is not None:
                    lp = _logprob_entry(seq.params.logprobs, result.top_ids[i, r],
                                        result.top_lp[i, r], tok, result.sampled_lp[i, r])
                seq.append(tok, lp)
                if seq.finish_reason is not None:
                    break
            if seq.finish_reason is not None:
                self._finish(seq)
                finished.append(seq)
        return finished

    def _record_prompt_logprobs(self, seq: Sample, row: PlannedRow, t0: int, plp) -> None:
        ids, vals, lps = plp
        k = seq.params.prompt_logprobs
        last = seq.prompt_logprobs_done
        for j, target in enumerate(row.prompt_logprob_targets):
            if target >= 0:
                pos = row.start + j
                seq.prompt_logprobs[pos + 1] = _logprob_entry(k, ids[t0 + j], vals[t0 + j],
                                                              target, lps[t0 + j])
                last = pos + 1
        seq.prompt_logprobs_done = last
