"""Owns the device side: the parameters, the KV cache and the compiled programs.

`dispatch(plan, features)` lays the plan out at the smallest compiled program that fits
(`step_inputs`) and starts it (`decode_loop.step_program`; the KV cache is donated to every
program and replaced by its output) without waiting: it returns a `Pending` whose `result()`
brings the sampled tokens and extras back as numpy (`StepResult`). Each program also hands the
next one its newest tokens on the device (`Carry`), so the host can plan and dispatch step N + 1
before it has step N's tokens. `execute` is dispatch + result. Programs are compiled only through
`compile(keys)`, before a run's first step. With `launch_thread`, the step's inputs are still laid
out on the calling thread, but their transfer and the program's launch happen in order on one
worker thread, so the caller goes on planning even where a launch waits for the device.

With a mesh (tensor parallelism) every program runs under `shard_map`: the parameters and the KV
cache (split on KV heads) are the devices' shards, a step's inputs, the carry and all outputs are
replicated, and each device runs the forward on its local heads (`runner.mesh`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
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
from jaxserve.runner.programs import (ExecutableCache, Features, ProgramKey,
                                      ProgramSet, compiler_options, source_fingerprint)
from jaxserve.runner.step_inputs import abstract_step_inputs, build_step_inputs, empty_carry
from jaxserve.scheduler.step_plan import StepPlan
from pallas_kernels import AttentionSpec
from pallas_kernels.gpu import block_sizes


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


# XLA:CPU executables do not always survive serialisation (a deserialised program can name a
# kernel function that another compile in the same process provided: "Function wrapped_iota not
# found"), so only accelerator programs are kept; on CPU, JAX's own persistent cache still saves
# the XLA compile.
EXECUTABLE_CACHE_BACKENDS = ("gpu", "tpu")


class Pending:
    """A dispatched program: `result()` waits for it and copies its outputs to the host. `out`:
    the program's outputs, or a future of them (launched from the runner's launch thread)."""

    def __init__(self, out, n_rows: int):
        self._out = out
        self._n = n_rows

    def _outputs(self):
        out = self._out
        return out.result() if isinstance(out, concurrent.futures.Future) else out

    def is_ready(self) -> bool:
        """Whether the program has been launched and has finished (nothing to wait for)."""
        out = self._out
        if isinstance(out, concurrent.futures.Future) and not out.done():
            return False
        return self._outputs().tokens.is_ready()

    def result(self) -> StepResult:
        out, n = self._outputs(), self._n
        host = mesh_mod.to_host      # replicated outputs: this process's first copy
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


def conditionals_on_device(platform: str) -> bool:
    """Whether `lax.cond` is decided on the device (see `ProgramContext.device_conditionals`):
    XLA:GPU copies a conditional's predicate to the host and waits for it."""
    return platform != "gpu"


class ModelRunner:
    def __init__(self, model: nnx.Module, cfg: ModelConfig, *, num_pages: int, page_size: int,
                 buckets: BucketSet, attention: AttentionSpec, kv_dtype,
                 return_logits: bool = False, cache_dir: Optional[str] = None,
                 mesh: Optional[jax.sharding.Mesh] = None, device=None,
                 gpu_command_buffers: bool = False, launch_thread: bool = False):
        """`attention` describes one device's heads (a tensor-parallel runner's local ones);
        `mesh`: the model's parameters are sharded over it (`runner.mesh`); `device`: the one
        device of an unsplit model (default: the first)."""
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.attention = attention
        self.mesh = mesh
        self.device = device
        tp = mesh_mod.mesh_size(mesh)
        self.opts = ForwardOptions(attention, tp_axis=None if mesh is None else mesh_mod.AXIS,
                                   tp_size=tp)
        platform = (mesh.devices.flat[0] if mesh is not None else device or jax.devices()[0]).platform
        self.ctx = ProgramContext(attention=attention, num_layers=cfg.num_layers,
                                  num_pages=num_pages, page_size=page_size,
                                  vocab_size=cfg.vocab_size, max_rows=buckets.max_num_seqs,
                                  return_logits=return_logits,
                                  device_conditionals=conditionals_on_device(platform))
        self.graphdef, self.params = nnx.split(model)
        shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
        if mesh is None:
            self.k_cache = jnp.zeros(shape, kv_dtype, device=device)
            self.v_cache = jnp.zeros(shape, kv_dtype, device=device)
        else:
            zeros = jax.jit(lambda: jnp.zeros(shape, kv_dtype),
                            out_shardings=jax.sharding.NamedSharding(mesh, mesh_mod.kv_spec()))
            self.k_cache, self.v_cache = zeros(), zeros()
            self.param_specs = mesh_mod.param_specs(self.params, cfg, tp)
        self._jit = jax.jit(self._program, donate_argnums=(1, 2), static_argnames=("key",))
        cache = (ExecutableCache(os.path.join(cache_dir, "jaxserve-programs"))
                 if cache_dir and jax.default_backend() in EXECUTABLE_CACHE_BACKENDS else None)
        self.compiler_options = compiler_options(platform, gpu_command_buffers)
        self._static_print = self._static_fingerprint() if cache else ""
        self.programs = ProgramSet(self._lower, self._fingerprint, cache, self.compiler_options)
        self._carry = self._to_devices(empty_carry(buckets.max_num_seqs))  # the last program's
        # One worker, so programs launch in dispatch order; it alone touches the KV cache and
        # the carry while steps are in flight.
        self._launcher = (concurrent.futures.ThreadPoolExecutor(1, "jaxserve-launch")
                          if launch_thread else None)

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

    def _program(self, params, k_cache, v_cache, inputs, carry, *, key: ProgramKey):
        def body(params, k_cache, v_cache, inputs, carry):
            model = nnx.merge(self.graphdef, params)
            return step_program(model, self.opts, k_cache, v_cache, inputs, carry, key=key,
                                ctx=self.ctx)

        if self.mesh is None:
            return body(params, k_cache, v_cache, inputs, carry)
        kv, rep = mesh_mod.kv_spec(), jax.sharding.PartitionSpec()
        # check_vma=False: all_gather results are replicated but not typed so; every output
        # (tokens sampled from the gathered logits) is the same on every device by construction.
        return jax.shard_map(body, mesh=self.mesh, in_specs=(self.param_specs, kv, kv, rep, rep),
                             out_specs=(rep, kv, kv), check_vma=False)(
            params, k_cache, v_cache, inputs, carry)

    def _to_devices(self, tree):
        """Host inputs of a program: as they are on one device, replicated over a mesh."""
        return tree if self.mesh is None else mesh_mod.put_replicated(tree, self.mesh)

    def _static_fingerprint(self) -> str:
        """Everything but the key that shapes a compiled program."""
        import hashlib

        shapes = jax.tree.map(lambda a: (a.shape, str(a.dtype), str(getattr(a, "sharding", ""))),
                              self.params)
        # The devices the program runs on: a program compiled for a data-parallel replica's
        # device must not be loaded for another's.
        on = (self.mesh.devices.flat if self.mesh is not None
              else [self.device] if self.device is not None else jax.devices()[:1])
        devices = [(d.platform, d.device_kind, d.id) for d in on]
        parts = [source_fingerprint(), jax.__version__, jax.lib.__version__, repr(devices),
                 repr(self.cfg), repr(self.ctx), repr(self.opts), str(self.graphdef),
                 repr(jax.tree.structure(self.params)), repr(jax.tree.leaves(shapes)),
                 repr((self.k_cache.shape, str(self.k_cache.dtype))), repr(sorted(self.compiler_options.items())),
                 os.environ.get("XLA_FLAGS", ""), repr(sorted(block_sizes.env_overrides().items()))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _fingerprint(self, key: ProgramKey) -> str:
        import hashlib

        return hashlib.sha256((self._static_print + repr(key)).encode()).hexdigest()[:40]

    def _layout(self, key: ProgramKey) -> dict:
        attention = (self.attention if key.features.groups
                     else dataclasses.replace(self.attention, shared_prefix=False))
        return dict(T=key.tokens, P=key.pages, S=self.buckets.seqs_for(key.tokens),
                    features=key.features, page_size=self.page_size, attention=attention)

    def _lower(self, key: ProgramKey):
        rep = None if self.mesh is None else mesh_mod.replicated(self.mesh)

        def shapes(tree):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                tree)

        return self._jit.lower(self.params, self.k_cache, self.v_cache,
                               shapes(abstract_step_inputs(**self._layout(key))),
                               shapes(empty_carry(self.buckets.max_num_seqs)), key=key)

    def compile(self, keys: Iterable[ProgramKey],
                progress: Optional[Callable[[int, int, float], None]] = None) -> int:
        return self.programs.compile(keys, progress)

    def dispatch(self, plan: StepPlan, features: Features) -> Pending:
        """Start one step (or a fused block) of `plan` with the programs computing `features`."""
        if plan.decode_steps > 1:
            features = features.for_decode_block()
        key = self.programs.pick(self.buckets.token_bucket(plan.num_tokens),
                                 -(-plan.max_seq_len // self.page_size), plan.decode_steps,
                                 features)
        inputs = build_step_inputs(plan, **self._layout(key))
        if self._launcher is None:
            return Pending(self._launch(key, inputs), len(plan.rows))
        return Pending(self._launcher.submit(self._launch, key, inputs), len(plan.rows))

    def _launch(self, key: ProgramKey, inputs):
        out, self.k_cache, self.v_cache = self.programs[key](
            self.params, self.k_cache, self.v_cache, self._to_devices(inputs), self._carry)
        self._carry = out.carry
        return out

    def execute(self, plan: StepPlan, features: Features) -> StepResult:
        return self.dispatch(plan, features).result()
