"""Sampling extras: log-probabilities of generated tokens (`logprobs`) and of prompt tokens
(`prompt_logprobs`), and presence / frequency / repetition penalties.

**The fast paths stay as they are.** The plain programs (one per bucket, compiled at start-up:
greedy argmax, fused decode blocks) are not touched. The extras run in a second set of programs,
one per bucket (and per fused-block bucket), compiled at the start of a run, before its first step,
and only when that run's batch asks for an extra (the engine sees the whole batch up front), so a
run still never compiles mid-way. Which extras those programs compute is `ExtrasSpec`, a static
value fixed for the run from the whole batch; a step uses them only when one of its rows needs an
extra, every other step runs the plain program. Rows without extras in an extras step come out
bit-identical (penalties of 0 / 1 are exact no-ops; logprobs are only read).

**Logprobs** are of the raw distribution: log_softmax of the model's logits before penalties,
bans, temperature and top-k/top-p/min-p (vLLM's default "raw_logprobs"); top-`MAX_LOGPROBS` values
and ids are computed once per row and cut to each request's k on the host.

**Penalty history reaches the device as a sparse list per row**: `hist_ids` i32[S, W] (distinct
token ids, -1 padded) and `hist_counts` i32[S, W] (how often each was generated; prompt tokens of a
row with a repetition penalty are listed with count 0, "seen" but not "generated"). The device
scatters them into dense [S, V] counts and a seen mask, inside a `lax.cond` that is skipped when
no row of the step has a penalty. W is fixed for the run (so shapes are static and there is one
extras program per bucket): the smallest power of two >= the most distinct tokens any penalised
request can list (distinct prompt tokens if it has a repetition penalty, plus max_tokens, capped at
the vocabulary). The host keeps each sequence's list incrementally (O(new tokens) per step) and
copies it into the step's arrays. This costs S x W x 8 bytes of host->device transfer per extras
step, instead of S x V for dense arrays; n > 1 samples are separate sequences, each with its own
history.

**Fused decode blocks** keep running with extras: the extras block program densifies the history
once at the block start and carries the counts and seen mask through its steps, adding each step's
sampled token on device, and returns every step's logprobs; outputs equal those of single steps.

**Prompt logprobs** need logits at every prompt position, not only at each row's last token: the
extras programs (when the run has prompt logprobs) keep the final hidden states of all T token rows
and, under a `lax.cond` taken only when the step has such rows, run the LM head, log_softmax and
top-k over them in chunks of at most `_PROMPT_CHUNK` rows (bounding the [chunk, V] temporaries). A
shared prefix is prefilled once as its own sequence, so its positions would never be computed in
the request's own rows: the engine keeps sample 0 of each prompt-logprobs request out of the
prefix-sharing plan (its whole prompt is prefilled in its own rows); its other samples share as
usual. After a preemption the recomputed positions are not recorded again.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from jaxserve.sampling_params import MAX_LOGPROBS

_PROMPT_CHUNK = 256
_MIN_HIST_WIDTH = 16


@dataclasses.dataclass(frozen=True)
class ExtrasSpec:
    """Static: what a run's extras programs compute (part of their compile key)."""

    logprobs: bool = False          # top-k + sampled-token logprobs of each sampling row
    prompt_logprobs: bool = False   # logprobs at every token row (under lax.cond)
    hist_width: int = 0             # W of the penalty history; 0 = no penalties in the run


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExtrasInputs:
    presence: jax.Array      # f32[S] presence penalty (0 = off)
    frequency: jax.Array     # f32[S] frequency penalty (0 = off)
    repetition: jax.Array    # f32[S] repetition penalty (1 = off)
    hist_ids: jax.Array      # i32[S, W] distinct history tokens, -1 padded
    hist_counts: jax.Array   # i32[S, W] times generated (0: prompt only)
    plp_target: jax.Array    # i32[T] prompt token whose logprob the row's logits give, -1 = none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExtrasOutputs:
    """Per sampling row (fused blocks: with a leading step axis) and, for prompt logprobs, per
    token row. Fields the spec does not compute are None."""

    sampled_lp: Optional[jax.Array] = None    # f32[S]  logprob of the sampled token
    top_lp: Optional[jax.Array] = None        # f32[S, K] top-K logprobs, descending
    top_ids: Optional[jax.Array] = None       # i32[S, K]
    plp_lp: Optional[jax.Array] = None        # f32[T]  logprob of plp_target
    plp_top_lp: Optional[jax.Array] = None    # f32[T, K]
    plp_top_ids: Optional[jax.Array] = None   # i32[T, K]


def num_top(vocab_size: int) -> int:
    return min(MAX_LOGPROBS, vocab_size)


def prompt_chunk(T: int) -> int:
    """Rows per LM-head chunk for prompt logprobs: the largest power of two dividing T, capped."""
    c = T & -T
    return min(c, _PROMPT_CHUNK)


def abstract_inputs(spec: ExtrasSpec, T: int, S: int) -> ExtrasInputs:
    i32 = lambda *s: jax.ShapeDtypeStruct(s, np.int32)  # noqa: E731
    f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)  # noqa: E731
    w = max(spec.hist_width, 1)
    return ExtrasInputs(f32(S), f32(S), f32(S), i32(S, w), i32(S, w), i32(T))


def wants_prompt_logprobs(seq) -> bool:
    """Sample 0 of a request with prompt_logprobs computes (and reports) them."""
    return (not seq.is_prefix and seq.params is not None
            and seq.params.prompt_logprobs is not None and seq.sample == 0)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class _History:
    """One sequence's sparse penalty history, kept incrementally."""

    __slots__ = ("slot", "ids", "counts", "n_out")

    def __init__(self, prompt_ids, with_prompt: bool, width: int):
        self.slot: dict[int, int] = {}
        self.ids = np.full(width, -1, np.int32)
        self.counts = np.zeros(width, np.int32)
        self.n_out = 0
        if with_prompt:
            for t in dict.fromkeys(prompt_ids):
                self.slot[t] = len(self.slot)
            self.ids[:len(self.slot)] = list(self.slot)

    def sync(self, output_ids) -> None:
        for t in output_ids[self.n_out:]:
            j = self.slot.get(t)
            if j is None:
                j = self.slot[t] = len(self.slot)
                self.ids[j] = t
            self.counts[j] += 1
        self.n_out = len(output_ids)


class ExtrasContext:
    """Host side of one run's extras: which rows need them, their inputs, and the results."""

    def __init__(self, spec: ExtrasSpec, vocab_size: int):
        self.spec = spec
        self.vocab_size = vocab_size
        self._hist: dict = {}                 # Sequence -> _History
        self.logprobs: dict = {}              # Sequence -> [dict token -> logprob] per output
        self.prompt_logprobs: dict = {}       # Sequence -> [None | dict] per prompt position
        self._plp_done: dict = {}             # Sequence -> positions whose logits are recorded

    @classmethod
    def for_batch(cls, seqs, vocab_size: int) -> Optional["ExtrasContext"]:
        """The run's context, or None when no request asks for an extra (plain programs only)."""
        lp = any(s.params.logprobs is not None for s in seqs)
        plp = any(wants_prompt_logprobs(s) for s in seqs)
        need = 0
        for s in seqs:
            p = s.params
            if p.has_penalties:
                n = (len(set(s.prompt_ids)) if p.repetition_penalty != 1.0 else 0) + p.max_tokens
                need = max(need, min(n, vocab_size))
        width = max(_pow2(need), _MIN_HIST_WIDTH) if need else 0
        if not (lp or plp or width):
            return None
        return cls(ExtrasSpec(logprobs=lp, prompt_logprobs=plp, hist_width=width), vocab_size)

    # -- which rows -------------------------------------------------------------------------
    def _plp_positions(self, row) -> range:
        """Positions p of this row whose logits give the logprob of prompt token p + 1, not yet
        recorded (a recompute after preemption records nothing twice)."""
        seq = row.seq
        if not wants_prompt_logprobs(seq):
            return range(0)
        assert seq.base == 0, "a prompt-logprobs request must not sit below a shared prefix"
        # Recorded positions form a prefix (a sequence's rows run in position order).
        lo = max(row.start, self._plp_done.get(seq, 0))
        return range(lo, min(row.start + row.num_tokens, len(seq.prompt_ids) - 1))

    def row_needs(self, row) -> bool:
        seq = row.seq
        if seq.is_prefix:
            return False
        p = seq.params
        if row.samples and (p.logprobs is not None or p.has_penalties):
            return True
        return len(self._plp_positions(row)) > 0

    def step_needs(self, plan) -> bool:
        return any(self.row_needs(r) for r in plan.rows)

    # -- inputs -----------------------------------------------------------------------------
    def build(self, plan, T: int, S: int) -> ExtrasInputs:
        w = max(self.spec.hist_width, 1)
        presence = np.zeros(S, np.float32)
        frequency = np.zeros(S, np.float32)
        repetition = np.ones(S, np.float32)
        hist_ids = np.full((S, w), -1, np.int32)
        hist_counts = np.zeros((S, w), np.int32)
        plp_target = np.full(T, -1, np.int32)
        t = 0
        for s, row in enumerate(plan.rows):
            seq = row.seq
            if not seq.is_prefix and row.samples and seq.params.has_penalties:
                p = seq.params
                h = self._hist.get(seq)
                if h is None:
                    h = self._hist[seq] = _History(seq.prompt_ids, p.repetition_penalty != 1.0,
                                                   self.spec.hist_width)
                h.sync(seq.output_ids)
                presence[s] = p.presence_penalty
                frequency[s] = p.frequency_penalty
                repetition[s] = p.repetition_penalty
                hist_ids[s] = h.ids
                hist_counts[s] = h.counts
            for pos in self._plp_positions(row):
                plp_target[t + pos - row.start] = seq.prompt_ids[pos + 1]
            t += row.num_tokens
        return ExtrasInputs(presence, frequency, repetition, hist_ids, hist_counts, plp_target)

    # -- results ----------------------------------------------------------------------------
    def _entry(self, k: int, ids, vals, token: int, token_lp) -> dict:
        d = {int(i): float(v) for i, v in zip(ids[:k], vals[:k])}
        d.setdefault(int(token), float(token_lp))
        return d

    def collect(self, plan, out: ExtrasOutputs, fused: bool) -> None:
        """Record the step's logprobs; call after the scheduler committed the step's tokens.
        `out` holds numpy arrays (fused blocks: with a leading step axis)."""
        t = 0
        for r, row in enumerate(plan.rows):
            seq = row.seq
            if out.plp_lp is not None and wants_prompt_logprobs(seq):
                positions = self._plp_positions(row)
                if len(positions):
                    lst = self.prompt_logprobs.setdefault(seq, [None] * len(seq.prompt_ids))
                    k = seq.params.prompt_logprobs
                    for pos in positions:
                        i = t + pos - row.start
                        lst[pos + 1] = self._entry(k, out.plp_top_ids[i], out.plp_top_lp[i],
                                                   seq.prompt_ids[pos + 1], out.plp_lp[i])
                    self._plp_done[seq] = positions.stop
            t += row.num_tokens
            if seq.is_prefix or seq.params.logprobs is None or out.sampled_lp is None:
                continue
            lst = self.logprobs.setdefault(seq, [])
            new = len(seq.output_ids) - len(lst)   # tokens the scheduler kept from this step
            for i in range(new):
                ix = (i, r) if fused else (r,)
                lst.append(self._entry(seq.params.logprobs, out.top_ids[ix], out.top_lp[ix],
                                       seq.output_ids[len(lst)], out.sampled_lp[ix]))

    def finish(self, seq):
        """(logprobs, prompt_logprobs) of a finished sequence, dropping its state."""
        self._hist.pop(seq, None)
        self._plp_done.pop(seq, None)
        lp = self.logprobs.pop(seq, None)
        if seq.params.logprobs is not None and lp is None:
            lp = []
        plp = self.prompt_logprobs.pop(seq, None)
        if wants_prompt_logprobs(seq) and plp is None:
            plp = [None] * len(seq.prompt_ids)
        return lp, plp
