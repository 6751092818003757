"""Owns the device side: the parameters, the KV cache and the compiled programs.

`execute(plan, features)` lays the plan out at the smallest compiled program that fits
(`step_inputs`), runs it (`decode_loop.step_program`; the KV cache is donated to every program and
replaced by its output) and returns the sampled tokens and extras as numpy (`StepResult`).
Programs are compiled only through `compile(keys)`, before a run's first step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import ForwardOptions
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.decode_loop import ProgramContext, step_program
from jaxserve.runner.programs import Features, ProgramKey, ProgramSet
from jaxserve.runner.step_inputs import abstract_step_inputs, build_step_inputs
from jaxserve.scheduler.step_plan import StepPlan
from pallas_kernels import AttentionSpec


@dataclasses.dataclass
class StepResult:
    """A step's outputs for its real rows, as numpy: tokens [steps, rows]; the logprob arrays
    only when the program computed them."""

    tokens: np.ndarray
    sampled_lp: Optional[np.ndarray] = None     # [steps, rows]
    top_lp: Optional[np.ndarray] = None         # [steps, rows, K]
    top_ids: Optional[np.ndarray] = None        # [steps, rows, K]
    prompt_logprobs: Optional[tuple] = None     # (top ids [T, K], top logprobs [T, K], target lp [T])
    logits: Optional[np.ndarray] = None         # [rows, V] (runners built with return_logits)


class ModelRunner:
    def __init__(self, model: nnx.Module, cfg: ModelConfig, *, num_pages: int, page_size: int,
                 buckets: BucketSet, attention: AttentionSpec, kv_dtype,
                 return_logits: bool = False, device=None):
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.attention = attention
        self.opts = ForwardOptions(attention)
        self.ctx = ProgramContext(attention=attention, num_layers=cfg.num_layers,
                                  num_pages=num_pages, page_size=page_size,
                                  vocab_size=cfg.vocab_size, return_logits=return_logits)
        self.graphdef, self.params = nnx.split(model)
        shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
        self.k_cache = jnp.zeros(shape, kv_dtype, device=device)
        self.v_cache = jnp.zeros(shape, kv_dtype, device=device)
        self._jit = jax.jit(self._program, donate_argnums=(1, 2), static_argnames=("key",))
        self.programs = ProgramSet(self._lower)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.size * self.k_cache.dtype.itemsize

    @property
    def num_compiled(self) -> int:
        return len(self.programs)

    @property
    def compile_seconds(self) -> float:
        return self.programs.compile_seconds

    def _program(self, params, k_cache, v_cache, inputs, *, key: ProgramKey):
        model = nnx.merge(self.graphdef, params)
        return step_program(model, self.opts, k_cache, v_cache, inputs, key=key, ctx=self.ctx)

    def _layout(self, key: ProgramKey) -> dict:
        return dict(T=key.tokens, P=key.pages, S=self.buckets.seqs_for(key.tokens),
                    features=key.features, page_size=self.page_size, attention=self.attention)

    def _lower(self, key: ProgramKey):
        return self._jit.lower(self.params, self.k_cache, self.v_cache,
                               abstract_step_inputs(**self._layout(key)), key=key)

    def compile(self, keys: Iterable[ProgramKey],
                progress: Optional[Callable[[int, int, float], None]] = None) -> int:
        return self.programs.compile(keys, progress)

    def execute(self, plan: StepPlan, features: Features) -> StepResult:
        """Run one step (or a fused block) of `plan` with the programs computing `features`."""
        if plan.decode_steps > 1:
            features = features.for_decode_block()
        key = self.programs.pick(self.buckets.token_bucket(plan.num_tokens),
                                 -(-plan.max_seq_len // self.page_size), plan.decode_steps,
                                 features)
        inputs = build_step_inputs(plan, **self._layout(key))
        out, self.k_cache, self.v_cache = self.programs[key](self.params, self.k_cache,
                                                             self.v_cache, inputs)
        n = len(plan.rows)
        res = StepResult(tokens=np.asarray(out.tokens)[:, :n])
        if out.top_ids is not None:
            res.sampled_lp = np.asarray(out.sampled_lp)[:, :n]
            res.top_lp = np.asarray(out.top_lp)[:, :n]
            res.top_ids = np.asarray(out.top_ids)[:, :n]
        if out.plp_lp is not None:
            res.prompt_logprobs = (np.asarray(out.plp_top_ids), np.asarray(out.plp_top_lp),
                                   np.asarray(out.plp_lp))
        if out.logits is not None:
            res.logits = np.asarray(out.logits)[:n]
        return res
