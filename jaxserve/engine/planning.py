"""The batch plan of a run, in at most two stages.

Policies that order by density (blendserve, and auto, which may choose it) first run a small probe
of the samples whose output lengths are not fixed (`length_estimate.py`): the scheduler starts with
the probe alone, and once it has finished the other samples get their estimated lengths, are
ordered (auto: by the policy a host-only simulation projects fastest, `simulate.py`) and join.
The prefix tree is built once over the whole batch, so a prefix that probe and later samples share
is computed once. Other policies plan everything at once.

Prompt logprobs need logits at every prompt position, so the sample that reports them prefills
its whole prompt in its own rows: it stays out of the sharing plan and is admitted after the
planned samples (in input order under fifo or without sharing).
"""
from __future__ import annotations

from typing import Callable, Optional

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine import length_estimate
from jaxserve.scheduler.admission import PlanOrder, for_plan
from jaxserve.scheduler.density import DensityModel
from jaxserve.scheduler.planner import BlendOptions, order_samples, plan_batch


def blend_options(ecfg: EngineConfig) -> BlendOptions:
    return BlendOptions(density_order=ecfg.blend_density_order, dual_scan=ecfg.blend_dual_scan,
                        admission=ecfg.blend_admission)


class Stages:
    """`first`: the samples the scheduler starts with, under `admission`; `advance(sched)`, called
    when the scheduler has run out of work, adds the rest (True) or says the run is done."""

    def __init__(self, samples: list, ecfg: EngineConfig, model_cfg: ModelConfig, stats, *,
                 density: Optional[DensityModel] = None,
                 choose: Optional[Callable[[list], tuple[str, dict]]] = None):
        self.ecfg, self.cfg, self.stats, self.density = ecfg, model_cfg, stats, density
        self.choose = choose                 # auto: samples -> (policy, projected seconds)
        self.samples = samples
        self.own = [s for s in samples if s.wants_prompt_logprobs]
        planned = [s for s in samples if not s.wants_prompt_logprobs] if self.own else samples
        policy = ecfg.schedule_policy
        probe = (length_estimate.pick_probe(samples, ecfg.output_len_sample_fraction, ecfg.seed)
                 if policy in ("blendserve", "auto") else [])
        staged = policy == "auto" or bool(probe)
        self.plan = plan_batch(planned, sharing=ecfg.global_prefix_sharing,
                               policy="fifo" if staged else policy, model_cfg=model_cfg,
                               blend=blend_options(ecfg), density=density)
        stats.optimal_prefill_tokens = (
            self.plan.optimal_prefill_tokens + sum(len(s.prompt_ids) for s in self.own)
            if self.plan.tree is not None else stats.prompt_tokens)
        stats.num_groups = self.plan.num_groups
        stats.num_shared_prefixes = len(self.plan.prefixes)
        self.report = length_estimate.Report()
        self.probe = probe
        ids = {id(s) for s in probe}
        self.first = probe or samples
        self.rest = [s for s in samples if id(s) not in ids] if probe else []
        if probe:
            self.admission = PlanOrder()        # the probe in input order
        elif policy == "auto":
            self._order(samples)
        else:
            self.admission = for_plan(self.plan, policy == "blendserve" and ecfg.blend_admission)
            stats.schedule_policy = policy
            self._order_own(policy)

    def _order_own(self, policy: str) -> None:
        planned = [s for s in self.samples if not s.wants_prompt_logprobs]
        in_order = self.plan.tree is None or policy == "fifo"
        next_order = max((s.order for s in planned), default=-1) + 1
        for j, s in enumerate(self.own):
            s.order = s.index if in_order else next_order + j

    def _order(self, part: list) -> None:
        """Order `part` by the configured policy (auto: the fastest projected) and set the
        admission policy that goes with it."""
        policy = self.ecfg.schedule_policy
        if policy == "auto":
            policy, projected = self.choose(part)
            self.stats.projected_seconds = projected
        self.stats.schedule_policy = policy
        ids = {id(s) for s in self.own}
        order_samples(self.plan, [s for s in part if id(s) not in ids], policy,
                      model_cfg=self.cfg, blend=blend_options(self.ecfg), density=self.density)
        self._order_own(policy)
        self.admission = for_plan(self.plan, policy == "blendserve" and self.ecfg.blend_admission)

    def advance(self, sched) -> bool:
        if not self.rest:
            return False
        rest, self.rest = self.rest, []
        self.report = length_estimate.estimate(self.probe, rest)
        self._order(rest)
        sched.admission = self.admission
        self.admission.bind(sched)
        sched.add_all(rest)
        return True

    def finish(self) -> None:
        length_estimate.record(self.stats, self.report, self.samples)
