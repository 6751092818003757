"""Owns the device side: parameters, the KV cache, and one compiled program per bucket.

Every program is compiled ahead of time (`lower().compile()`) at start-up; `execute` only looks the
program up, so a run can never trigger a compile behind the user's back (a missing bucket is a bug
and raises). The KV cache is donated to every step and replaced by the step's output.
"""
from __future__ import annotations

import time
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import ForwardOptions
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.sampler import NUM_BANNED, SamplingInputs, sample
from jaxserve.runner.step_inputs import StepInputs, build_step_inputs
from jaxserve.scheduler import StepPlan
from pallas_kernels.metadata import AttentionMetadata


class ModelRunner:
    def __init__(self, model: nnx.Module, cfg: ModelConfig, *, num_pages: int, page_size: int,
                 buckets: BucketSet, attention_impl: str, kv_dtype):
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.opts = ForwardOptions(attention_impl=attention_impl)
        self.graphdef, self.params = nnx.split(model)
        shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
        self.k_cache = jnp.zeros(shape, kv_dtype)
        self.v_cache = jnp.zeros(shape, kv_dtype)
        self._jit = jax.jit(self._step, donate_argnums=(1, 2), static_argnames=("return_logits",))
        self._compiled: dict[tuple, object] = {}
        self.compile_seconds = 0.0

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.size * self.k_cache.dtype.itemsize

    def _step(self, params, k_cache, v_cache, inputs: StepInputs, return_logits: bool = False):
        model = nnx.merge(self.graphdef, params)
        logits, k_cache, v_cache = model(inputs.input_ids, inputs.attn, k_cache, v_cache,
                                         inputs.logits_indices, self.opts)
        tokens = sample(logits, inputs.sampling)
        return tokens, (logits if return_logits else None), k_cache, v_cache

    def _abstract_inputs(self, T: int, P: int) -> StepInputs:
        S = self.buckets.seqs_for(T)
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        md = AttentionMetadata(positions=i32(T), token_seq=i32(T), slot_mapping=i32(T),
                               query_start=i32(S + 1), seq_lens=i32(S), page_table=i32(S, P))
        si = SamplingInputs(temperature=f32(S), top_k=i32(S), top_p=f32(S), min_p=f32(S),
                            seeds=jax.ShapeDtypeStruct((S,), jnp.uint32), token_index=i32(S),
                            banned=i32(S, NUM_BANNED))
        return StepInputs(i32(T), md, i32(S), si)

    def compile(self, key: tuple, return_logits: bool = False):
        t0 = time.perf_counter()
        T, P = key
        exe = self._jit.lower(self.params, self.k_cache, self.v_cache, self._abstract_inputs(T, P),
                              return_logits=return_logits).compile()
        self.compile_seconds += time.perf_counter() - t0
        self._compiled[(T, P, return_logits)] = exe
        return exe

    def compile_all(self) -> int:
        for key in self.buckets.all():
            if (*key, False) not in self._compiled:
                self.compile(key)
        return len(self._compiled)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def execute(self, plan: StepPlan, return_logits: bool = False):
        """Run one step. Returns (sampled token per row, logits per row or None) as numpy."""
        inputs, n = build_step_inputs(plan, self.buckets, self.page_size)
        key = (inputs.input_ids.shape[0], inputs.attn.page_table.shape[1], return_logits)
        exe = self._compiled.get(key)
        if exe is None:
            if not return_logits:
                raise RuntimeError(f"bucket {key[:2]} was not compiled at start-up")
            exe = self.compile(key[:2], return_logits=True)   # test/debug path only
        tokens, logits, self.k_cache, self.v_cache = exe(self.params, self.k_cache, self.v_cache,
                                                         inputs)
        tokens = np.asarray(tokens)[:n]
        return tokens, (np.asarray(logits)[:n] if logits is not None else None)
