"""Fused decode blocks while waiting samples cannot fit (`Scheduler.admission_stalled`): without
EOS or stop strings, fusing changes no admission, host-only (the real scheduler, fake tokens)."""
from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.simulate import _copy, _Result, _tokens
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import PagePool, Sample, Scheduler


def run(samples, fuse: bool, *, pages: int, rows: int, n_steps: int = 4):
    """Every plan until done: (decode steps, rows waiting, rows' smallest max_tokens left) per
    plan, and the decode step at which each sample was first scheduled."""
    seqs = [_copy(s) for s in samples]
    for s in seqs:
        s.target = s.params.max_tokens          # stops only at max_tokens
    sched = Scheduler(PagePool(pages, 8), 64, rows, reserve=True, fuse_while_stalled=fuse)
    sched.add_all(seqs)
    plans, started, step = [], {}, 0
    while sched.has_work:
        p = sched.schedule_decode_block(n_steps) or sched.schedule()
        assert p.rows
        plans.append((p.decode_steps, len(sched.waiting),
                      min(r.remaining for r in p.rows if r.samples) if any(
                          r.samples for r in p.rows) else None))
        for seq in p.owners:
            started.setdefault(seq.index, step)
        sched.commit(p, _Result(_tokens(p)))
        step += p.decode_steps
    return plans, started, step


@pytest.mark.parametrize("limit", ["pages", "rows"])
def test_blocks_while_stalled_change_no_admission(limit):
    rng = np.random.default_rng(3)
    samples = [Sample(prompt_ids=rng.integers(0, 100, int(rng.integers(8, 30))).tolist(),
                      index=i, request=i, max_len=256,
                      params=SamplingParams(max_tokens=int(rng.integers(9, 40)), ignore_eos=True))
               for i in range(14)]
    # "pages": 40 pages of 8 tokens hold ~4 rows at full length under the reserve; "rows": the
    # pool holds all, 4 rows a step do not.
    pages, rows = (40, 16) if limit == "pages" else (400, 4)
    old, started_old, steps_old = run(samples, False, pages=pages, rows=rows)
    new, started_new, steps_new = run(samples, True, pages=pages, rows=rows)
    assert started_new == started_old and steps_new == steps_old
    blocks_waiting = [p for p in new if p[0] > 1 and p[1]]
    assert blocks_waiting                                   # they fused while samples waited
    assert not [p for p in old if p[0] > 1 and p[1]]        # the old rule never did
    assert all(p[2] >= 4 for p in blocks_waiting)           # no row ran out inside a block
    assert len(new) < len(old)
