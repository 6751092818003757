"""The run loop: requests -> scheduler -> runner -> scheduler -> outputs.

The engine owns one model on one device, its page pool, scheduler and runner. `run` takes a whole
batch of already-tokenized requests and returns one RequestOutput per request, in input order. A
request that cannot run (empty, too long, bad parameters) gets an error output and costs only
itself.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxserve.cache import PagePool
from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.outputs import RequestMetrics, RequestOutput, SampleOutput
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.extras import ExtrasContext, wants_prompt_logprobs
from jaxserve.runner.model_runner import ModelRunner
from jaxserve.runner.sampler import NUM_BANNED
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, Sequence
from jaxserve.scheduler.planner import plan_batch


@dataclasses.dataclass
class Request:
    """One tokenized request. `error` set means it failed before reaching the engine."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: Optional[str] = None
    priority: int = 0
    error: Optional[str] = None


@dataclasses.dataclass
class RunStats:
    prompt_tokens: int = 0
    computed_prefill_tokens: int = 0
    optimal_prefill_tokens: int = 0
    reused_prompt_tokens: int = 0   # prompt tokens of started requests that came from shared KV
    num_groups: int = 0
    num_shared_prefixes: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    num_steps: int = 0
    fused_blocks: int = 0           # fused decode blocks (each counts decode_steps in num_steps)
    padded_tokens: int = 0          # sum of token buckets actually run
    num_requests: int = 0
    num_errors: int = 0
    peak_kv_pages: int = 0
    kv_pages_total: int = 0
    compiled_programs: int = 0
    compile_seconds: float = 0.0
    wall_seconds: float = 0.0
    # Per host step: (seconds since start, tokens computed, tokens generated, padded bucket tokens).
    trace: list = dataclasses.field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("trace")
        d["token_fill_mean"] = ((self.computed_prefill_tokens + self.decode_tokens) / self.padded_tokens
                                if self.padded_tokens else 0.0)
        d["peak_kv_pool_use"] = self.peak_kv_pages / self.kv_pages_total if self.kv_pages_total else 0.0
        d["reuse_ratio"] = (1 - self.computed_prefill_tokens / self.prompt_tokens
                            if self.prompt_tokens else 0.0)
        d["optimal_reuse_ratio"] = (1 - self.optimal_prefill_tokens / self.prompt_tokens
                                    if self.prompt_tokens else 0.0)
        d["output_tokens_per_s"] = self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0
        return d


def resolve_attention_impl(name: str) -> str:
    if name == "auto":
        return pallas_kernels.default_impl()
    if name not in pallas_kernels.IMPLEMENTATIONS:
        raise ConfigError(f"engine: field 'attention_impl'={name!r} is not available here "
                          f"(available: auto, {', '.join(sorted(pallas_kernels.IMPLEMENTATIONS))})")
    return name


def size_kv_pages(cfg: ModelConfig, ecfg: EngineConfig, kv_dtype, max_model_len: int) -> int:
    """Pages per layer from the memory left after the weights (or the explicit `num_pages`)."""
    if ecfg.num_pages is not None:
        return ecfg.num_pages
    page_bytes = cfg.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize) * ecfg.page_size
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
        stats = None
    if stats and "bytes_limit" in stats:
        budget = ecfg.kv_cache_memory_fraction * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        budget = ecfg.cpu_kv_cache_bytes
    pages = int(budget // page_bytes)
    # Never more than every row at full length needs (plus the sink).
    cap = ecfg.max_num_seqs * -(-max_model_len // ecfg.page_size) + 1
    pages = min(pages, cap)
    if pages < 2:
        raise ConfigError(f"engine: no memory left for the KV cache ({budget / 2**30:.2f} GiB "
                          f"budget, {page_bytes} bytes per page); lower max_model_len or set num_pages")
    return pages


class Engine:
    def __init__(self, model_cfg: ModelConfig, model, ecfg: EngineConfig, *,
                 eos_token_ids: tuple[int, ...] = (), kv_dtype=None,
                 detokenize: Optional[Callable[[list[int]], str]] = None, tokenizer=None):
        self.cfg = model_cfg
        self.ecfg = ecfg
        self.max_model_len = ecfg.max_model_len or model_cfg.max_position_embeddings
        if self.max_model_len > model_cfg.max_position_embeddings and \
                model_cfg.rope_scaling.rope_type == "default":
            raise ConfigError(f"engine: max_model_len={self.max_model_len} exceeds the model's "
                              f"max_position_embeddings={model_cfg.max_position_embeddings}")
        self.eos_token_ids = tuple(eos_token_ids) or tuple(model_cfg.eos_token_ids)
        self.tokenizer = tokenizer
        self.detokenize = detokenize or (
            (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer else None)
        kv_dtype = kv_dtype or model.embed.value.dtype
        self.attention_impl = resolve_attention_impl(ecfg.attention_impl)
        # "auto": unrolled on GPU, where the scan's per-step copies of each layer's weights cost
        # ~2x in the matmuls (H100: 16.9 vs 7.6 ms for 32 layers at 256 rows); the scan elsewhere
        # (CPU tests: faster compiles, no copies that matter).
        if ecfg.layer_loop == "auto":
            self.layer_loop = "unrolled" if jax.default_backend() == "gpu" else "scan"
        else:
            self.layer_loop = ecfg.layer_loop
        if self.layer_loop == "unrolled" and hasattr(model, "unstack_layers"):
            model.unstack_layers()   # before the KV cache is sized from the memory left
        self.num_pages = size_kv_pages(model_cfg, ecfg, kv_dtype, self.max_model_len)
        max_pages_per_seq = -(-self.max_model_len // ecfg.page_size)
        # Page-width buckets only pay where attention cost grows with the page-table width: the
        # gather-based reference on CPU. Pallas kernels stop at each row's length, and on an
        # accelerator the reference is only a peer, so one width keeps compile time down there.
        growth = (ecfg.page_bucket_growth
                  if self.attention_impl == "reference" and jax.default_backend() == "cpu" else 1)
        self.buckets = BucketSet.make(ecfg.max_num_batched_tokens, ecfg.max_num_seqs,
                                      max_pages_per_seq, page_growth=growth)
        self.runner = ModelRunner(model, model_cfg, num_pages=self.num_pages,
                                  page_size=ecfg.page_size, buckets=self.buckets,
                                  attention_impl=self.attention_impl, kv_dtype=kv_dtype,
                                  shared_prefix_attention=ecfg.shared_prefix_attention)
        if ecfg.compile_on_init:
            self.runner.compile_all(ecfg.fused_decode_steps)
        self.last_stats = RunStats()

    # -- request validation: errors cost only the request --------------------------------------
    def _validate(self, req: Request, pool: PagePool) -> Optional[str]:
        if req.error:
            return req.error
        n = len(req.prompt_ids)
        if n == 0:
            return "empty prompt"
        if n >= self.max_model_len:
            return (f"prompt of {n} tokens does not fit max_model_len={self.max_model_len} "
                    "(needs room for at least one generated token)")
        bad = [t for t in req.prompt_ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            return f"prompt token id {bad[0]} is outside the vocabulary (size {self.cfg.vocab_size})"
        longest = min(n + req.params.max_tokens, self.max_model_len)
        # +1: a request below a shared prefix holds its own copy of the prefix's partial page.
        if pool.pages_for(longest) + 1 > pool.num_usable:
            return (f"request needs up to {pool.pages_for(longest) + 1} KV pages but the pool has "
                    f"{pool.num_usable}; lower max_tokens or raise num_pages")
        stops = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos
                                                   else set(self.eos_token_ids))
        if req.params.stop and self.tokenizer is None:
            return "field 'stop': stop strings need a tokenizer; this model has none"
        if req.params.min_tokens and len(stops) > NUM_BANNED:
            return f"field 'min_tokens' with more than {NUM_BANNED} stop token ids is not supported"
        return None

    def run(self, requests: list[Request], progress: Optional[Callable] = None,
            on_output: Optional[Callable[[int, RequestOutput], None]] = None) -> list[RequestOutput]:
        """Run every request to completion. `on_output(index, output)` is called as soon as each
        request's output is final (errors first, then in finishing order), e.g. to persist it."""
        t_start = time.perf_counter()
        pool = PagePool(self.num_pages, self.ecfg.page_size)
        sched = Scheduler(pool, self.ecfg.max_num_batched_tokens, self.ecfg.max_num_seqs,
                          reserve=self.ecfg.admission_control)
        stats = RunStats(num_requests=len(requests), kv_pages_total=pool.num_usable)
        outputs: list[Optional[RequestOutput]] = [None] * len(requests)
        pending: dict[int, list] = {}   # request -> its samples' outputs as they finish
        seqs: list[Sequence] = []
        for i, req in enumerate(requests):
            err = self._validate(req, pool)
            if err is not None:
                outputs[i] = RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), "", [],
                                           "error", error=err)
                stats.num_errors += 1
                if on_output is not None:
                    on_output(i, outputs[i])
                continue
            p = req.params
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos
                                                      else frozenset(self.eos_token_ids))
            pending[i] = [None] * p.n
            for k in range(p.n):
                # Sample k of a request draws its own stream: from the request's seed when given,
                # else from the engine seed and the request's position (sample 0 as with n=1).
                base = [p.seed % 2 ** 64] if p.seed is not None else [self.ecfg.seed, i]
                seed = (p.seed if (p.seed is not None and k == 0) else
                        int(np.random.SeedSequence(base + ([k] if k else [])).generate_state(1)[0]))
                seq = Sequence(index=len(seqs), prompt_ids=list(req.prompt_ids), params=p,
                               seed=seed, stop_ids=stop_ids, max_len=self.max_model_len,
                               priority=req.priority, request=i, sample=k,
                               metrics=RequestMetrics(arrival_time=t_start))
                if p.stop:
                    from jaxserve.stop_strings import StopStringChecker

                    seq.stop_checker = StopStringChecker(self.tokenizer, p.stop,
                                                         p.include_stop_str_in_output)
                stats.prompt_tokens += len(seq.prompt_ids)
                seqs.append(seq)
        # Prompt logprobs need logits at every prompt position, so the sample that reports them
        # prefills its whole prompt in its own rows: it stays out of the prefix-sharing plan and
        # is admitted after the planned requests (in input order under fifo or without sharing).
        own = [s for s in seqs if wants_prompt_logprobs(s)]
        planned = [s for s in seqs if not wants_prompt_logprobs(s)] if own else seqs
        plan = plan_batch(planned, sharing=self.ecfg.global_prefix_sharing,
                          policy=self.ecfg.schedule_policy, model_cfg=self.cfg)
        in_order = plan.tree is None or self.ecfg.schedule_policy == "fifo"
        next_order = max((s.order for s in planned), default=-1) + 1
        for j, s in enumerate(own):
            s.order = s.index if in_order else next_order + j
        stats.optimal_prefill_tokens = (
            plan.optimal_prefill_tokens + sum(len(s.prompt_ids) for s in own)
            if plan.tree is not None else stats.prompt_tokens)
        stats.num_groups = plan.num_groups
        stats.num_shared_prefixes = len(plan.prefixes)
        sched.add_all(seqs)
        # Logprobs / penalties: their programs are compiled now, before the first step, and only
        # when this batch asks for them; steps without such rows keep the plain programs.
        extras = ExtrasContext.for_batch(seqs, self.cfg.vocab_size)
        if extras is not None:
            self.runner.compile_extras(extras.spec, self.ecfg.fused_decode_steps)

        n_fused = self.ecfg.fused_decode_steps
        while sched.has_work:
            plan = sched.schedule_decode_block(n_fused)
            if plan is None:
                plan = sched.schedule()
            if not plan.rows:
                raise RuntimeError("scheduler produced an empty step with work pending")
            now = time.perf_counter()
            for row in plan.rows:
                m = row.seq.metrics
                if m.first_scheduled_time is None:
                    m.first_scheduled_time = now
                    if not row.seq.is_prefix:
                        stats.reused_prompt_tokens += row.seq.base
                if row.start < len(row.seq.prompt_ids) or row.num_tokens > 1:
                    stats.computed_prefill_tokens += row.num_tokens
                    m.num_computed_prompt_tokens += row.num_tokens
            sampling_rows = [row.seq for row in plan.rows if row.samples]
            gen_step = 0
            before = {id(s): len(s.output_ids) for s in sampling_rows}
            use_extras = extras is not None and extras.step_needs(plan)
            if plan.decode_steps > 1:
                if use_extras:
                    tokens, ex_out = self.runner.execute_block_extras(plan, extras)
                else:
                    tokens = self.runner.execute_block(plan)
                stats.fused_blocks += 1
                finished = sched.commit_block(plan, tokens)
            else:
                if use_extras:
                    tokens, ex_out = self.runner.execute_extras(plan, extras)
                else:
                    tokens, _ = self.runner.execute(plan)
                finished = sched.commit(plan, tokens)
            if use_extras:
                extras.collect(plan, ex_out, fused=plan.decode_steps > 1)
            stats.num_steps += plan.decode_steps
            padded = self.buckets.pick(plan.num_tokens, 1)[0] * plan.decode_steps
            stats.padded_tokens += padded
            now = time.perf_counter()
            for seq in sampling_rows:
                new = len(seq.output_ids) - before[id(seq)]
                stats.generated_tokens += new
                gen_step += new
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
            stats.decode_tokens += sum(1 for row in plan.rows if row.start >= len(row.seq.prompt_ids)
                                       and row.num_tokens == 1) * plan.decode_steps
            for seq in finished:
                seq.metrics.finished_time = now
                if seq.stop_text is not None:
                    text = seq.stop_text
                else:
                    text = self.detokenize(seq.output_ids) if self.detokenize else ""
                i = seq.request
                lp, plp = extras.finish(seq) if extras is not None else (None, None)
                pending[i][seq.sample] = (seq, SampleOutput(text, list(seq.output_ids),
                                                            seq.finish_reason, logprobs=lp), plp)
                if all(x is not None for x in pending[i]):
                    parts = pending.pop(i)
                    first = parts[0][0]
                    samples = [x[1] for x in parts]
                    req = requests[i]
                    outputs[i] = RequestOutput(req.request_id, req.prompt, first.prompt_ids,
                                               samples[0].text, samples[0].token_ids,
                                               samples[0].finish_reason, metrics=first.metrics,
                                               samples=samples, prompt_logprobs=parts[0][2],
                                               logprobs=samples[0].logprobs)
                    if on_output is not None:
                        on_output(i, outputs[i])
            stats.trace.append((now - t_start, plan.num_tokens * plan.decode_steps, gen_step, padded))
            if progress is not None:
                progress(len(finished), plan.num_tokens * plan.decode_steps, stats)

        stats.preemptions = sched.num_preemptions
        stats.peak_kv_pages = pool.peak_used
        stats.compiled_programs = self.runner.num_compiled
        stats.compile_seconds = self.runner.compile_seconds
        stats.wall_seconds = time.perf_counter() - t_start
        self.last_stats = stats
        assert all(o is not None for o in outputs)
        return outputs  # type: ignore[return-value]
