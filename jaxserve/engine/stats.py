"""A run's counters: what was computed, how full the steps were, what compiled, how long it took."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RunStats:
    prompt_tokens: int = 0
    computed_prefill_tokens: int = 0
    optimal_prefill_tokens: int = 0
    reused_prompt_tokens: int = 0   # prompt tokens of started samples that came from shared KV
    num_groups: int = 0
    num_shared_prefixes: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0
    preemptions: int = 0
    dropped_tokens: int = 0         # sampled for samples that had finished (planned a step ahead)
    num_steps: int = 0
    fused_blocks: int = 0           # fused decode blocks (each counts decode_steps in num_steps)
    padded_tokens: int = 0          # sum of token buckets actually run
    num_requests: int = 0
    num_errors: int = 0
    peak_kv_pages: int = 0
    kv_pages_total: int = 0
    compiled_programs: int = 0      # programs this run compiled (or found in the cache)
    compile_seconds: float = 0.0    # of this run, before its first step
    compile_cache_hits: int = 0     # of those, programs the persistent compilation cache held
    mid_run_compiles: int = 0       # XLA compiles after the first step: always 0 by design
    schedule_policy: str = ""       # the policy that ran (what `auto` chose)
    projected_seconds: dict = dataclasses.field(default_factory=dict)  # auto: policy -> simulated
    # Output lengths (`length_estimate.py`): samples run first to estimate the others', samples
    # planned with an estimate, mean estimated and realised lengths of those, and the mean
    # |estimated - realised| / realised on the probe itself (each predicted from the others)
    # and, after the run, on every estimated sample.
    output_len_probe_samples: int = 0
    output_len_estimated_samples: int = 0
    output_len_estimated_mean: float = 0.0
    output_len_realised_mean: float = 0.0
    output_len_probe_error: float = 0.0
    output_len_error: float = 0.0
    wall_seconds: float = 0.0
    # Per host step: (seconds since start, tokens computed, tokens generated, padded bucket tokens).
    trace: list = dataclasses.field(default_factory=list, repr=False)

    def record_step(self, plan, generated: int, padded: int, now: float) -> None:
        """Count one executed plan (a single step or a fused block)."""
        n = plan.decode_steps
        self.num_steps += n
        self.fused_blocks += n > 1
        self.padded_tokens += padded * n
        for row in plan.rows:
            if row.is_decode:
                self.decode_tokens += n
            else:
                self.computed_prefill_tokens += row.num_tokens
        self.generated_tokens += generated
        self.trace.append((now, plan.num_tokens * n, generated, padded * n))

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
