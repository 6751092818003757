"""A host-only run of the engine's planner and scheduler: no model, fake tokens, the step-time model
of `cost_model.py` for the clock.

`simulate` plans copies of the samples with a policy and runs the real `Scheduler` over them as
the engine's loop does (fused decode blocks when only decodes run, the same token buckets); each
sample stops at its expected output length (max_tokens when it has no estimate). It returns the
projected seconds and a trace of every plan. `choose_policy` is `schedule_policy="auto"`: the
policy with the lowest projected time.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.cost_model import StepCosts
from jaxserve.runner.buckets import BucketSet
from jaxserve.scheduler import PagePool, Sample, Scheduler
from jaxserve.scheduler.admission import for_plan
from jaxserve.scheduler.density import DensityModel, expected_len
from jaxserve.scheduler.planner import BlendOptions, plan_batch

CANDIDATES = ("fifo", "batchllm", "blendserve")
_STOP, _TOKEN = 1, 2     # the fake tokens: the one that ends a sample, and any other


@dataclasses.dataclass
class PlanRecord:
    seconds: float
    tokens: int             # computed in the plan (all its steps)
    padded: int             # bucket tokens a step
    rows: int
    decode_steps: int
    decode_rows: int
    kv_reads: float         # KV tokens the decode rows read (all steps)
    kv_pages_used: int
    pairs: float = 0.0      # prefill (query, key) pairs


@dataclasses.dataclass
class SimResult:
    policy: str
    seconds: float
    steps: int
    plans: int
    trace: list

    @property
    def token_fill(self) -> float:
        padded = sum(p.padded * p.decode_steps for p in self.trace)
        return sum(p.tokens for p in self.trace) / padded if padded else 0.0


@dataclasses.dataclass
class _Result:      # what `Scheduler.commit` reads of a runner's StepResult
    tokens: np.ndarray
    sampled_lp: Optional[np.ndarray] = None
    top_lp: Optional[np.ndarray] = None
    top_ids: Optional[np.ndarray] = None
    prompt_logprobs: Optional[tuple] = None


def _copy(s: Sample) -> Sample:
    """A fresh sample with the same prompt, limits and expected length, stopping by the fake
    stop token (its realised length is its expected one)."""
    c = Sample(prompt_ids=s.prompt_ids, index=s.index, priority=s.priority,
               params=dataclasses.replace(s.params, logprobs=None, prompt_logprobs=None,
                                          presence_penalty=0.0, frequency_penalty=0.0,
                                          repetition_penalty=1.0),
               request=s.request, sample=s.sample, seed=s.seed,
               stop_ids=frozenset({_STOP}), max_len=s.max_len,
               expected_output_len=s.expected_output_len)
    c.target = max(min(expected_len(s), s.params.max_tokens), s.params.min_tokens, 1)
    return c


def _tokens(plan) -> np.ndarray:
    toks = np.full((plan.decode_steps, len(plan.rows)), _TOKEN, np.int32)
    for r, (row, seq) in enumerate(zip(plan.rows, plan.owners)):
        if row.samples:
            i = seq.target - 1 - row.num_generated     # the step that samples its last token
            if 0 <= i < plan.decode_steps:
                toks[i, r] = _STOP
    return toks


def simulate(samples: list, policy: str, ecfg: EngineConfig, model_cfg: ModelConfig,
             costs: StepCosts, *, num_pages: int, buckets: BucketSet, fused_decode_steps: int,
             density: Optional[DensityModel] = None, blend: Optional[BlendOptions] = None,
             keep_trace: bool = True, overlap: bool = False, fast: bool = True) -> SimResult:
    seqs = [_copy(s) for s in samples]
    blend = blend or BlendOptions(ecfg.blend_density_order, ecfg.blend_dual_scan,
                                  ecfg.blend_admission)
    plan = plan_batch(seqs, sharing=ecfg.global_prefix_sharing, policy=policy,
                      model_cfg=model_cfg, blend=blend, density=density)
    sched = Scheduler(PagePool(num_pages, ecfg.page_size), ecfg.max_num_batched_tokens,
                      ecfg.max_num_seqs, reserve=ecfg.admission_control,
                      admission=for_plan(plan, policy == "blendserve" and blend.admission),
                      fuse_while_stalled=ecfg.fuse_while_stalled)
    sched.add_all(seqs)
    sched.light_rows = True
    seconds, steps, plans, trace = 0.0, 0, 0, []
    while sched.has_work:
        p = sched.schedule_decode_block(fused_decode_steps) or sched.schedule()
        if not p.rows:
            raise RuntimeError("the scheduler planned an empty step with work waiting")
        padded = buckets.token_bucket(p.num_tokens)
        terms = costs.plan_terms(p, ecfg.page_size, ecfg.shared_prefix_attention)
        dt = costs.seconds(terms[0], padded, p.decode_steps, *terms[1:], overlap=overlap)
        if keep_trace:
            trace.append(_record(dt, p, padded, terms, sched))
        sched.commit(p, _Result(_tokens(p)))
        seconds += dt
        steps += p.decode_steps
        plans += 1
        if fast:
            ff = _fast_forward(sched, p, padded, terms, costs, overlap, fused_decode_steps)
            if ff is not None:
                seconds += sum(r.seconds for r in ff)
                steps += sum(r.decode_steps for r in ff)
                plans += len(ff)
                if keep_trace:
                    trace += ff
    return SimResult(policy, seconds, steps, plans, trace)


def _record(dt, p, padded, terms, sched) -> PlanRecord:
    rows, reads, decoders, pairs = terms
    n = p.decode_steps
    return PlanRecord(dt, p.num_tokens * n, padded, rows, n, decoders,
                      n * reads + decoders * n * (n - 1) / 2, sched.pool.num_used, pairs)


def _fast_forward(sched, p, padded, terms, costs: StepCosts, overlap: bool, fused: int):
    """After a plan in which every running sample decoded and nothing else ran: the plans that
    would repeat it exactly (the same rows, each a step or a fused block further on), up to the
    one in which a sample finishes, advanced at once; their records, or None.

    They repeat it exactly because nothing changes what can be admitted before a sample
    finishes: the rows are the same, the reserved pages are the same, and free pages only shrink
    (an admission that failed keeps failing). Pages for the skipped positions are allocated as
    the steps would have."""
    running = sched.running
    if p.decode_steps == 1 and fused > 1 and (
            not sched.waiting or sched.fuse_while_stalled and sched.admission_stalled):
        return None                      # a fused block may come next (pages permitting)
    if len(p.rows) != len(running) or not all(r.samples and r.num_tokens == 1 for r in p.rows):
        return None
    if not all(s.samples and s.num_pending == 1 for s in running):
        return None
    n = p.decode_steps
    left = min(min(s.target - len(s.output_ids), s.remaining) for s in running)
    m = (left - 1) // n                  # whole plans in which nobody finishes
    if m < 1:
        return None
    k = m * n
    need = sum(max(0, sched._own_pages_for(s, s.num_computed + k) - len(s.pages)) for s in running)
    if need > sched.pool.num_free:
        return None                      # a step would run out of pages (preemption): step it
    rows, reads, decoders, pairs = terms
    out = []
    for j in range(1, m + 1):
        r = reads + j * n * decoders
        dt = costs.seconds(rows, padded, n, r, decoders, pairs, overlap)
        out.append(PlanRecord(dt, p.num_tokens * n, padded, rows, n, decoders,
                              n * r + decoders * n * (n - 1) / 2, sched.pool.num_used, pairs))
    for s in running:
        s.output_ids.extend([_TOKEN] * k)
        s.num_computed += k
        sched._ensure_pages(s, s.num_computed)
    return out


def order_bound(res: SimResult, costs: StepCosts, *, budget: int, max_rows: int,
                output_lens: list[int]) -> float:
    """The least time any admission order could take for the batch `res` simulated, under the
    step-time model: the device work no order changes (tokens computed, prefill attention pairs,
    KV read: those of `res`), no padding, no host time (hidden under overlap), and the fewest
    steps any schedule needs (the tokens over the budget, the longest output, the outputs over
    the rows). Because a step's parts add up (`cost_model.py`), an order can save only steps,
    padding and host time: `res.seconds / order_bound(res, ...)` is the most any order could
    gain over the one simulated."""
    work = sum(costs.token * p.tokens + costs.kv * p.kv_reads + costs.pair * p.pairs
               for p in res.trace)
    tokens = sum(p.tokens for p in res.trace)
    steps = max(-(-tokens // budget), max(output_lens, default=0),
                -(-sum(output_lens) // max_rows))
    return work + steps * costs.step


def choose_policy(samples: list, ecfg: EngineConfig, model_cfg: ModelConfig, costs: StepCosts,
                  **kw) -> tuple[str, dict]:
    """The candidate policy with the lowest projected time, and every candidate's projection."""
    projected = {p: simulate(samples, p, ecfg, model_cfg, costs, keep_trace=False, **kw).seconds
                 for p in CANDIDATES}
    return min(CANDIDATES, key=lambda p: (projected[p], CANDIDATES.index(p))), projected
