"""Output lengths for planning, when requests do not fix them.

A sample's length is fixed when nothing can stop it before max_tokens (ignore_eos, no stop token
ids, no stop strings): the planner takes max_tokens. Otherwise a small random probe of those
samples (`fraction` of them, at least MIN_PROBE) runs to completion first; their outputs are the
batch's real outputs (nothing is computed twice). Every other unfixed sample is then given the
mean realised length of the probe samples most like it (`expected_output_len`): the same prompt
head (a shared template or system prompt) and max_tokens, else the same prompt head, else the same
max_tokens, else all of them, capped at its own max_tokens. A batch too small for a probe to be a
small part of it, or a probe that says nothing, leaves max_tokens.

The estimate's error is reported twice: on the probe, each probe sample predicted from the others
(before the run), and after the run on every estimated sample.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

MIN_PROBE = 4           # probe samples at the least
MAX_PROBE_SHARE = 0.5   # a probe must stay a small part of the samples it estimates
HEAD = 16               # prompt tokens that name a request's template
MIN_CLASS = 2           # probe samples a class needs before its mean is used


def length_fixed(s) -> bool:
    return not s.stop_ids and s.stop_checker is None


def pick_probe(samples: list, fraction: float, seed: int) -> list:
    """The samples to run first (a seeded random choice among those with unfixed lengths), or
    none when estimating is off or the batch is too small."""
    free = [s for s in samples if not length_fixed(s)]
    if fraction <= 0 or not free:
        return []
    k = max(MIN_PROBE, math.ceil(fraction * len(free)))
    if k > MAX_PROBE_SHARE * len(free):
        return []
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(free), size=k, replace=False).tolist())
    return [free[i] for i in pick]


def _keys(s) -> list:
    head = tuple(s.prompt_ids[:HEAD])
    m = s.params.max_tokens
    return [("head+max", head, m), ("head", head), ("max", m), ("all",)]


class Estimator:
    """Mean realised length per class of the probe samples."""

    def __init__(self, probe: list):
        self.sums: dict = {}
        for s in probe:
            for k in _keys(s):
                n, t = self.sums.get(k, (0, 0))
                self.sums[k] = (n + 1, t + len(s.output_ids))

    def predict(self, s, leave_out: Optional[int] = None) -> Optional[int]:
        """`s`'s expected length; `leave_out`: its own realised length, removed from the means."""
        for k in _keys(s):
            n, t = self.sums.get(k, (0, 0))
            if leave_out is not None:
                n, t = n - 1, t - leave_out
            if n >= MIN_CLASS or (k == ("all",) and n >= 1):
                return max(1, min(s.params.max_tokens, round(t / n)))
        return None


def _rel_error(pairs) -> float:
    pairs = list(pairs)
    if not pairs:
        return 0.0
    return sum(abs(e - r) / max(r, 1) for e, r in pairs) / len(pairs)


@dataclasses.dataclass
class Report:
    probe: int = 0
    estimated: int = 0
    estimated_mean: float = 0.0
    probe_error: float = 0.0


def estimate(probe: list, rest: list) -> Report:
    """Set `expected_output_len` of the unfixed samples in `rest` from the finished probe."""
    est = Estimator(probe)
    loo = [(est.predict(s, leave_out=len(s.output_ids)), len(s.output_ids)) for s in probe]
    rep = Report(probe=len(probe), probe_error=_rel_error((e, r) for e, r in loo if e is not None))
    lens = []
    for s in rest:
        if length_fixed(s):
            continue
        e = est.predict(s)
        if e is not None:
            s.expected_output_len = e
            lens.append(e)
    rep.estimated = len(lens)
    rep.estimated_mean = sum(lens) / len(lens) if lens else 0.0
    return rep


def record(stats, report: Report, samples: list) -> None:
    """Put the estimate's counters, and its error on every estimated sample after the run, into
    `stats` (RunStats)."""
    stats.output_len_probe_samples = report.probe
    stats.output_len_estimated_samples = report.estimated
    stats.output_len_estimated_mean = report.estimated_mean
    stats.output_len_probe_error = report.probe_error
    done = [(s.expected_output_len, len(s.output_ids)) for s in samples
            if s.expected_output_len is not None and s.finish_reason is not None]
    stats.output_len_realised_mean = sum(r for _, r in done) / len(done) if done else 0.0
    stats.output_len_error = _rel_error(done)
