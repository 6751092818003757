"""Owns the device side: the parameters, the KV cache and the compiled programs.

`execute(plan, features)` lays the plan out at the smallest compiled program that fits
(`step_inputs`), runs it (`decode_loop.step_program`; the KV cache is donated to every program and
replaced by its output) and returns the sampled tokens and extras as numpy (`StepResult`).
Programs are compiled only through `compile(keys)`, before a run's first step.

With a mesh (tensor parallelism) every program runs under `shard_map`: the parameters and the KV
cache (split on KV heads) are the devices' shards, a step's inputs and all outputs are replicated,
and each device runs the forward on its local heads (`runner.mesh`).
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
from jaxserve.runner import mesh as mesh_mod
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
                 return_logits: bool = False, mesh: Optional[jax.sharding.Mesh] = None):
        """`attention` describes one device's heads (a tensor-parallel runner's local ones);
        `mesh`: the model's parameters are sharded over it (`runner.mesh`)."""
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.attention = attention
        self.mesh = mesh
        tp = mesh_mod.mesh_size(mesh)
        self.opts = ForwardOptions(attention, tp_axis=None if mesh is None else mesh_mod.AXIS, tp_size=tp)
        self.ctx = ProgramContext(attention=attention, num_layers=cfg.num_layers,
                                  num_pages=num_pages, page_size=page_size,
                                  vocab_size=cfg.vocab_size, return_logits=return_logits)
        self.graphdef, self.params = nnx.split(model)
        shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
        if mesh is None:
            self.k_cache = jnp.zeros(shape, kv_dtype)
            self.v_cache = jnp.zeros(shape, kv_dtype)
        else:
            zeros = jax.jit(lambda: jnp.zeros(shape, kv_dtype),
                            out_shardings=jax.sharding.NamedSharding(mesh, mesh_mod.kv_spec()))
            self.k_cache, self.v_cache = zeros(), zeros()
            self.param_specs = mesh_mod.param_specs(self.params, cfg, tp)
        self._jit = jax.jit(self._program, donate_argnums=(1, 2), static_argnames=("key",))
        self.programs = ProgramSet(self._lower)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.size * self.k_cache.dtype.itemsize

    @property
    def kv_bytes_per_device(self) -> int:
        return 2 * mesh_mod.per_device_bytes(self.k_cache)

    @property
    def num_compiled(self) -> int:
        return len(self.programs)

    @property
    def compile_seconds(self) -> float:
        return self.programs.compile_seconds

    def _program(self, params, k_cache, v_cache, inputs, *, key: ProgramKey):
        def body(params, k_cache, v_cache, inputs):
            model = nnx.merge(self.graphdef, params)
            return step_program(model, self.opts, k_cache, v_cache, inputs, key=key, ctx=self.ctx)

        if self.mesh is None:
            return body(params, k_cache, v_cache, inputs)
        kv, rep = mesh_mod.kv_spec(), jax.sharding.PartitionSpec()
        # check_vma=False: all_gather results are replicated but not typed so; every output
        # (tokens sampled from the gathered logits) is the same on every device by construction.
        return jax.shard_map(body, mesh=self.mesh, in_specs=(self.param_specs, kv, kv, rep),
                             out_specs=(rep, kv, kv), check_vma=False)(
            params, k_cache, v_cache, inputs)

    def _layout(self, key: ProgramKey) -> dict:
        return dict(T=key.tokens, P=key.pages, S=self.buckets.seqs_for(key.tokens),
                    features=key.features, page_size=self.page_size, attention=self.attention)

    def _lower(self, key: ProgramKey):
        inputs = abstract_step_inputs(**self._layout(key))
        if self.mesh is not None:
            rep = mesh_mod.replicated(self.mesh)
            inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                  inputs)
        return self._jit.lower(self.params, self.k_cache, self.v_cache, inputs, key=key)

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
        if self.mesh is not None:
            inputs = mesh_mod.put_replicated(inputs, self.mesh)
        out, self.k_cache, self.v_cache = self.programs[key](self.params, self.k_cache,
                                                             self.v_cache, inputs)
        n = len(plan.rows)
        host = mesh_mod.to_host
        res = StepResult(tokens=host(out.tokens)[:, :n])
        if out.top_ids is not None:
            res.sampled_lp = host(out.sampled_lp)[:, :n]
            res.top_lp = host(out.top_lp)[:, :n]
            res.top_ids = host(out.top_ids)[:, :n]
        if out.plp_lp is not None:
            res.prompt_logprobs = (host(out.plp_top_ids), host(out.plp_top_lp), host(out.plp_lp))
        if out.logits is not None:
            res.logits = host(out.logits)[:n]
        return res
