"""The run loop: requests -> samples -> batch plan -> (schedule -> run -> commit)* -> outputs.

The engine owns one model on one device, its runner and the start-up sizes. `run` takes a whole
batch of tokenized requests and returns one RequestOutput per request, in input order. A request
that cannot run (empty, too long, bad parameters) gets an error output and costs only itself.
Every program the batch can reach is compiled before its first step (`compile_for`).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.engine.outputs import OutputCollector, RequestMetrics, RequestOutput
from jaxserve.engine.requests import Limits, Request, make_samples, validate
from jaxserve.engine.sizing import plan_sizes
from jaxserve.engine.stats import RunStats
from jaxserve.runner import mesh as mesh_mod
from jaxserve.runner.model_runner import ModelRunner
from jaxserve.runner.programs import (CompileEvents, Features, ProgramKey,
                                      enable_compilation_cache)
from jaxserve.engine.cost_model import StepCosts, device_profile
from jaxserve.engine.planning import Stages
from jaxserve.engine.simulate import choose_policy
from jaxserve.scheduler import PagePool, Sample, Scheduler
from jaxserve.scheduler.density import DensityModel
import pallas_kernels
from pallas_kernels import AttentionSpec

_MIN_HIST_WIDTH = 16
AUTO_MAX_SAMPLES = 8000     # auto simulates at most this many samples (a few seconds a policy)


def shares_a_page(samples: list[Sample], page_size: int) -> bool:
    """Whether two prompts start with the same page of tokens: without that no prefix of the
    batch can be shared (shared prefixes are whole pages from the first token), so no step has
    groups."""
    seen = set()
    for s in samples:
        if len(s.prompt_ids) >= page_size:
            head = tuple(s.prompt_ids[:page_size])
            if head in seen:
                return True
            seen.add(head)
    return False


def batch_features(samples: list[Sample], vocab_size: int, groups: bool = True) -> Features:
    """The extras the batch's programs must compute (plain when nobody asks for any); `groups`:
    whether its steps can have shared-prefix groups."""
    need = 0
    for s in samples:
        p = s.params
        if p.has_penalties:
            n = (len(set(s.prompt_ids)) if p.repetition_penalty != 1.0 else 0) + p.max_tokens
            need = max(need, min(n, vocab_size))
    width = max(1 << max(need - 1, 0).bit_length(), _MIN_HIST_WIDTH) if need else 0
    return Features(logprobs=any(s.params.logprobs is not None for s in samples),
                    prompt_logprobs=any(s.wants_prompt_logprobs for s in samples),
                    hist_width=width,
                    stochastic=any(s.params.temperature > 0 for s in samples),
                    filters=any(s.params.temperature > 0 and s.params.has_filters
                                for s in samples),
                    groups=groups)


class CompileProgress:
    """A progress line on stderr while programs compile: rewritten in place on a terminal, a line
    every 15 s (and at the end) in a log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._last = -1e9

    def __call__(self, done: int, total: int, seconds: float) -> None:
        tty = getattr(self.stream, "isatty", lambda: False)()
        if not tty and done < total and seconds - self._last < 15:
            return
        self._last = seconds
        line = f"compiling programs: {done}/{total} ({seconds:.1f} s)"
        end = "\n" if done == total or not tty else ""
        print(("\r" if tty else "") + line, end=end, file=self.stream, flush=True)


class Engine:
    def __init__(self, model_cfg: ModelConfig, model, ecfg: EngineConfig, *,
                 eos_token_ids: tuple[int, ...] = (), kv_dtype=None, tokenizer=None,
                 return_logits: bool = False,
                 compile_progress: Optional[Callable] = None, mesh=None, device=None):
        """`mesh`: the tensor-parallel mesh `model` was loaded onto (`runner.mesh.make_mesh`;
        needed when ecfg.tensor_parallel_size > 1: the model then runs split over its devices);
        `device`: the one device of an unsplit model (a data-parallel replica's; default: the
        first)."""
        tp = ecfg.tensor_parallel_size
        mesh_mod.check_tensor_parallel(model_cfg, tp)
        if mesh_mod.mesh_size(mesh) != tp:
            raise ConfigError(f"engine: tensor_parallel_size={tp} but the model was loaded onto "
                              f"{mesh_mod.mesh_size(mesh)} device(s) (pass its mesh)")
        self.mesh = mesh
        self.cfg = model_cfg
        self.ecfg = ecfg
        self.eos_token_ids = tuple(eos_token_ids) or tuple(model_cfg.eos_token_ids)
        self.tokenizer = tokenizer
        self.compile_progress = compile_progress or CompileProgress()
        self.compilation_cache_dir = enable_compilation_cache(ecfg.compilation_cache_dir)
        kv_dtype = kv_dtype or model.embed.value.dtype
        sizes = plan_sizes(model_cfg, ecfg, kv_dtype,
                           unstack=getattr(model, "unstack_layers", None),
                           devices=(mesh_mod.local_devices(mesh) if mesh is not None
                                    else [device] if device is not None else None))
        self.sizes = sizes
        self.attention_impl = sizes.attention_impl
        self.layer_loop = sizes.layer_loop
        self.max_model_len = sizes.max_model_len
        self.num_pages = sizes.num_pages
        self.buckets = sizes.buckets
        # One device's heads: under tensor parallelism each runs attention on its own.
        self.attention = AttentionSpec(
            sizes.attention_impl, model_cfg.num_heads // tp, model_cfg.num_kv_heads // tp,
            model_cfg.head_dim, ecfg.page_size, shared_prefix=ecfg.shared_prefix_attention,
            packed_prefix=ecfg.shared_prefix_attention and pallas_kernels.packed_prefix_available(
                sizes.attention_impl, kv_dtype, model_cfg.head_dim, model_cfg.sliding_window))
        self.runner = ModelRunner(model, model_cfg, num_pages=sizes.num_pages,
                                  page_size=ecfg.page_size, buckets=sizes.buckets,
                                  attention=self.attention, kv_dtype=kv_dtype,
                                  return_logits=return_logits,
                                  cache_dir=self.compilation_cache_dir, mesh=mesh, device=device,
                                  gpu_command_buffers=ecfg.gpu_command_buffers,
                                  launch_thread=ecfg.launch_thread)
        self.limits = Limits(sizes.max_model_len, model_cfg.vocab_size, sizes.num_pages - 1,
                             ecfg.page_size, self.eos_token_ids, tokenizer is not None)
        self.last_stats = RunStats()
        self.last_compile: dict = {}
        # Densities and the step-time model on this device (blendserve, auto).
        self.step_costs = StepCosts.make(device_profile((device or jax.devices()[0]).device_kind), model_cfg,
                                         jnp.dtype(kv_dtype).itemsize)
        prof = self.step_costs.profile
        self.density = DensityModel.for_model(model_cfg, peak_flops=prof.peak_flops,
                                              hbm_bandwidth=prof.hbm_bandwidth,
                                              kv_itemsize=jnp.dtype(kv_dtype).itemsize)

    # -- the run ------------------------------------------------------------------------------
    def run(self, requests: list[Request], progress: Optional[Callable] = None,
            on_output: Optional[Callable[[int, RequestOutput], None]] = None,
            positions: Optional[list[int]] = None) -> list[RequestOutput]:
        """Run every request to completion. `on_output(index, output)` is called as soon as each
        request's output is final (errors first, then in finishing order), e.g. to persist it.
        `positions[i]`: request i's place in the whole batch when this run is a part of it (its
        random streams derive from that, so a part samples as the whole batch would)."""
        t_start = time.perf_counter()
        stats = RunStats(num_requests=len(requests), kv_pages_total=self.num_pages - 1)
        outputs = OutputCollector(requests, on_output)
        samples = self._samples(requests, outputs, stats, positions)
        stages = Stages(samples, self.ecfg, self.cfg, stats, density=self.density,
                        choose=self._choose_policy)
        features = self._compile(samples, stats)
        sched = Scheduler(PagePool(self.num_pages, self.ecfg.page_size),
                          self.sizes.max_num_batched_tokens, self.sizes.max_num_seqs,
                          reserve=self.ecfg.admission_control, admission=stages.admission,
                          fuse_while_stalled=self.ecfg.fuse_while_stalled)
        sched.add_all(stages.first)
        metrics = {id(s): RequestMetrics(arrival_time=t_start) for s in samples}

        def commit(plan, pending) -> None:
            finished = sched.commit(plan, pending.result())
            self._account(plan, finished, metrics, stats, t_start)
            for s in finished:
                outputs.add(s, self._text(s), metrics[id(s)])
            if progress is not None:
                progress(len(finished), plan.num_tokens * plan.decode_steps, stats)

        with CompileEvents() as mid_run:
            self._loop(sched, features, commit, stages.advance)
        stages.finish()
        stats.mid_run_compiles = mid_run.compiles + mid_run.cache_hits
        stats.preemptions = sched.num_preemptions
        stats.dropped_tokens = sched.num_dropped
        stats.peak_kv_pages = sched.pool.peak_used
        stats.wall_seconds = time.perf_counter() - t_start
        self.last_stats = stats
        return outputs.results()

    def _loop(self, sched: Scheduler, features: Features, commit: Callable,
              advance: Callable[[Scheduler], bool]) -> None:
        """schedule -> run -> commit until every sample is done. With host/device overlap one step
        stays in flight: step N + 1 is planned and sent before step N's tokens are read, so the
        device does not wait for the host (batches with penalties run in turn: each step's
        penalty history needs every token before it). `advance(sched)` adds the plan's next
        stage once everything before it has been committed (False: nothing is left)."""
        overlap = self.ecfg.async_scheduling and not features.hist_width
        in_flight = None
        while sched.has_work or in_flight or advance(sched):
            plan = (sched.schedule_decode_block(self.sizes.fused_decode_steps)
                    or sched.schedule()) if sched.has_work else None
            if plan is None or not plan.rows:
                if in_flight is None:
                    raise RuntimeError("scheduler produced an empty step with work pending")
                commit(*in_flight)       # its tokens (or the pages it frees) unblock planning
                in_flight = None
                continue
            pending = self.runner.dispatch(plan, features if plan.needs_extras else features.base())
            if in_flight is not None:
                commit(*in_flight)
            in_flight = (plan, pending)
            if not overlap:
                commit(*in_flight)
                in_flight = None

    # -- before the first step --------------------------------------------------------------------
    def _samples(self, requests: list[Request], outputs: OutputCollector,
                 stats: RunStats, positions: Optional[list[int]] = None) -> list[Sample]:
        """Validate every request (errors become outputs at once) and expand the rest into samples."""
        samples: list[Sample] = []
        for i, req in enumerate(requests):
            err = validate(req, self.limits)
            if err is not None:
                stats.num_errors += 1
                outputs.error(i, err)
                continue
            outputs.expect(i, req.params.n)
            samples += make_samples(i, req, len(samples), engine_seed=self.ecfg.seed,
                                    max_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                                    tokenizer=self.tokenizer,
                                    position=positions[i] if positions is not None else i)
        stats.prompt_tokens = sum(len(s.prompt_ids) for s in samples)
        return samples

    def _choose_policy(self, samples: list[Sample]) -> tuple[str, dict]:
        """schedule_policy="auto": the policy a host-only simulation of `samples` on this device
        (`simulate.py`) projects fastest. A batch of more than AUTO_MAX_SAMPLES is simulated on
        a seeded random part of that size, with the KV pool and the rows shrunk alike."""
        ecfg = dataclasses.replace(self.ecfg, max_num_batched_tokens=self.sizes.max_num_batched_tokens,
                                   max_num_seqs=self.sizes.max_num_seqs)
        pages = self.num_pages
        if len(samples) > AUTO_MAX_SAMPLES:
            f = AUTO_MAX_SAMPLES / len(samples)
            pick = np.random.default_rng(ecfg.seed).choice(len(samples), AUTO_MAX_SAMPLES,
                                                           replace=False)
            samples = [samples[i] for i in sorted(pick)]
            need = max(-(-s.longest // ecfg.page_size) for s in samples) + 2
            pages = max(int(pages * f), need)
            ecfg = dataclasses.replace(ecfg, max_num_seqs=max(1, round(ecfg.max_num_seqs * f)))
        return choose_policy(samples, ecfg, self.cfg, self.step_costs, num_pages=pages,
                             buckets=self.buckets, fused_decode_steps=self.sizes.fused_decode_steps,
                             density=self.density,
                             overlap=bool(getattr(ecfg, "async_scheduling", False)))

    def program_keys(self, samples: list[Sample], features: Features) -> list[ProgramKey]:
        """Every program a run of `samples` can reach: token buckets up to what one step can hold,
        page-table widths up to the longest sample, fused blocks up to the rows that can run,
        and the extras variants when the batch asks for them (single steps with the widest page
        table only: steps with extras are the rare ones)."""
        b = self.buckets
        if not samples:
            return []
        step_tokens = min(self.sizes.max_num_batched_tokens,
                          sum(len(s.prompt_ids) for s in samples) + len(samples))
        ts = b.tokens_upto(step_tokens)
        ps = b.pages_upto(-(-max(s.longest for s in samples) // self.ecfg.page_size))
        base = features.base()
        keys = [ProgramKey(t, p, 1, base) for t in ts for p in ps]
        if not features.plain:
            keys += [ProgramKey(t, ps[-1], 1, features) for t in ts]
        n = self.sizes.fused_decode_steps
        if n > 1:
            tb = b.tokens_upto(min(self.sizes.max_num_seqs, len(samples)))
            keys += [ProgramKey(t, p, n, base) for t in tb for p in ps]
            fb = features.for_decode_block()
            if not fb.plain:
                keys += [ProgramKey(t, ps[-1], n, fb) for t in tb]
        return keys

    def _compile(self, samples: list[Sample], stats: RunStats) -> Features:
        sharing = self.ecfg.global_prefix_sharing and self.ecfg.shared_prefix_attention
        features = batch_features(samples, self.cfg.vocab_size,
                                  groups=sharing and shares_a_page(samples, self.ecfg.page_size))
        keys = self.program_keys(samples, features)
        if self.buckets.page_growth <= 1:
            # One page width a batch: where attention stops at each row's length (the kernels),
            # a wider page table costs next to nothing, so a batch whose programs are compiled
            # at a larger width already (an earlier, longer batch) runs on those and compiles
            # nothing (a short warm-up or test batch after a long one).
            keys = [self.runner.programs.covering(k) or k for k in keys]
        t0 = time.perf_counter()
        hits0 = self.runner.programs.cache_hits
        with CompileEvents() as ev:
            stats.compiled_programs = self.runner.compile(keys, self.compile_progress)
        stats.compile_seconds = time.perf_counter() - t0
        stats.compile_cache_hits = ev.cache_hits + self.runner.programs.cache_hits - hits0
        if stats.compiled_programs:
            where = (f"from the cache in {self.compilation_cache_dir}" if self.compilation_cache_dir
                     else "from the cache (off)")
            print(f"compiled {stats.compiled_programs} programs in {stats.compile_seconds:.1f} s "
                  f"({stats.compile_cache_hits} {where})", file=sys.stderr, flush=True)
        self.last_compile = dict(programs=stats.compiled_programs, seconds=stats.compile_seconds,
                                 cache_hits=stats.compile_cache_hits,
                                 total_programs=self.runner.num_compiled)
        return features

    def compile_for(self, requests: list[Request]) -> int:
        """Compile, ahead of `run(requests)`, every program it can reach (benchmarks time the
        compile apart from the run); returns how many were compiled now."""
        stats = RunStats()
        samples = self._samples(requests, OutputCollector(requests), stats)
        self._compile(samples, stats)
        return stats.compiled_programs

    # -- after each step -----------------------------------------------------------------------
    def _account(self, plan, finished, metrics, stats: RunStats, t_start: float) -> None:
        now = time.perf_counter()
        generated = 0
        for row, seq in zip(plan.rows, plan.owners):
            if not seq.samples:
                continue
            m = metrics[id(seq)]
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                stats.reused_prompt_tokens += seq.base
            if not row.is_decode:
                m.num_computed_prompt_tokens += row.num_tokens
            if row.samples:
                new = min(plan.decode_steps, len(seq.output_ids) - row.num_generated)
                generated += new
                if m.first_token_time is None and new:
                    m.first_token_time = now
        for s in finished:
            metrics[id(s)].finished_time = now
            metrics[id(s)].num_preemptions = s.num_preemptions
        padded = self.buckets.token_bucket(plan.num_tokens)
        stats.record_step(plan, generated, padded, now - t_start)

    def _text(self, s: Sample) -> str:
        if s.stop_text is not None:
            return s.stop_text
        return self.tokenizer.decode(s.output_ids, skip_special_tokens=True) if self.tokenizer else ""
