"""Owns the device side: parameters, the KV cache, and one compiled program per bucket.

Every program is compiled ahead of time (`lower().compile()`) at start-up; `execute` only looks the
program up, so a run can never trigger a compile behind the user's back (a missing bucket is a bug
and raises). The KV cache is donated to every step and replaced by the step's output.

Sampling extras (logprobs, prompt logprobs, penalties; jaxserve.runner.extras) run in a second set
of programs, compiled by `compile_extras` at the start of a run whose batch asks for them; the
plain programs above are untouched by them.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.llama import ForwardOptions
from jaxserve.runner import extras as ex_mod
from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.extras import ExtrasContext, ExtrasInputs, ExtrasOutputs, ExtrasSpec
from jaxserve.runner.sampler import (NUM_BANNED, SamplingInputs, apply_penalties, history_to_dense,
                                     penalize, sample, top_logprobs)
from jaxserve.runner.step_inputs import (DecodeBlockInputs, StepInputs,
                                         build_decode_block_inputs, build_step_inputs)
from jaxserve.scheduler import StepPlan
from jaxserve.scheduler.batcher import MAX_COPIES
import pallas_kernels
from pallas_kernels.metadata import AttentionMetadata, WorkItems, advance_work_items


# Inference programs have no backward pass to trade memory for, and XLA's rematerialization pass
# counts the donated KV cache twice (input and output), finds the program "over" device memory and
# spends ~10 s per program failing to shrink it (H100, unrolled Llama-3-8B: 122 s for 12 programs).
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


class ModelRunner:
    def __init__(self, model: nnx.Module, cfg: ModelConfig, *, num_pages: int, page_size: int,
                 buckets: BucketSet, attention_impl: str, kv_dtype,
                 shared_prefix_attention: bool = False):
        self.cfg = cfg
        self.num_pages = num_pages
        self.page_size = page_size
        self.buckets = buckets
        self.opts = ForwardOptions(attention_impl=attention_impl)
        # Shared-prefix attention needs the GPU kernel's host-built work lists.
        self.cascade = (dict(num_q_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                             head_dim=cfg.head_dim)
                        if shared_prefix_attention and attention_impl in pallas_kernels.PALLAS_GPU
                        else None)
        self.graphdef, self.params = nnx.split(model)
        shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
        self.k_cache = jnp.zeros(shape, kv_dtype)
        self.v_cache = jnp.zeros(shape, kv_dtype)
        self._jit = jax.jit(self._step, donate_argnums=(1, 2), static_argnames=("return_logits",))
        self._jit_block = jax.jit(self._decode_block, donate_argnums=(1, 2),
                                  static_argnames=("n_steps",))
        self._jit_ex = jax.jit(self._step_extras, donate_argnums=(1, 2), static_argnames=("spec",))
        self._jit_block_ex = jax.jit(self._decode_block, donate_argnums=(1, 2),
                                     static_argnames=("n_steps", "spec"))
        self._compiled: dict[tuple, object] = {}
        # Extras programs use the widest page table only: one per token bucket (page-width
        # buckets only pay for the gather-based CPU reference, and extras steps are the rare ones).
        self.extras_buckets = dataclasses.replace(buckets, page_buckets=buckets.page_buckets[-1:])
        self.compile_seconds = 0.0

    @property
    def kv_bytes(self) -> int:
        return 2 * self.k_cache.size * self.k_cache.dtype.itemsize

    def _copy_pages(self, k_cache, v_cache, src, dst):
        """Copy-on-write: duplicate pages `src` into `dst` in every layer (skipped when none).

        (Session 2 tried an unconditional copy, suspecting this cond of the unrolled loop's
        KV-sized allocation; that was allocator fragmentation from unstacking the weights, see
        `LlamaForCausalLM.unstack_layers`. The cond costs nothing on steps without copies.)"""
        def copy(kv):
            k_cache, v_cache = kv
            offs = (jnp.arange(self.cfg.num_layers, dtype=jnp.int32) * self.num_pages)[:, None]
            s_all = (offs + src[None, :]).reshape(-1)
            d_all = (offs + dst[None, :]).reshape(-1)
            return (k_cache.at[:, d_all].set(k_cache[:, s_all]),
                    v_cache.at[:, d_all].set(v_cache[:, s_all]))

        return jax.lax.cond(jnp.any(dst != 0), copy, lambda kv: kv, (k_cache, v_cache))

    def _step(self, params, k_cache, v_cache, inputs: StepInputs, return_logits: bool = False):
        model = nnx.merge(self.graphdef, params)
        k_cache, v_cache = self._copy_pages(k_cache, v_cache, inputs.copy_src, inputs.copy_dst)
        logits, k_cache, v_cache = model(inputs.input_ids, inputs.attn, k_cache, v_cache,
                                         inputs.logits_indices, self.opts)
        tokens = sample(logits, inputs.sampling)
        return tokens, (logits if return_logits else None), k_cache, v_cache

    # -- extras (only in the programs compiled for them) ---------------------------------------
    def _sample_extras(self, logits, si: SamplingInputs, ex: ExtrasInputs, spec: ExtrasSpec,
                       dense=None):
        """Penalties, then the usual sampler; logprobs of the raw logits. `dense` (fused blocks)
        is the carried (counts, seen) instead of the step's sparse history."""
        out = ExtrasOutputs()
        if spec.logprobs:
            lp, out.top_lp, out.top_ids = top_logprobs(logits, ex_mod.num_top(logits.shape[-1]))
        x = logits
        if spec.hist_width:
            if dense is None:
                x = penalize(x, ex.hist_ids, ex.hist_counts, ex.presence, ex.frequency,
                             ex.repetition)
            else:
                active = jnp.any((ex.presence != 0) | (ex.frequency != 0) | (ex.repetition != 1))
                x = jax.lax.cond(active, lambda y: apply_penalties(y, *dense, ex.presence,
                                                                   ex.frequency, ex.repetition),
                                 lambda y: y, x)
        tokens = sample(x, si)
        if spec.logprobs:
            out.sampled_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        return tokens, out

    def _prompt_logprobs(self, model, hidden, targets):
        """Logprobs at every token row (LM head over all T rows, in chunks), only when some row
        of the step asks (lax.cond); zeros otherwise."""
        t, d = hidden.shape
        c = ex_mod.prompt_chunk(t)
        k = ex_mod.num_top(self.cfg.vocab_size)

        def compute(_):
            def one(args):
                h, tg = args
                lp, vals, ids = top_logprobs(model.compute_logits(h), k)
                return jnp.take_along_axis(lp, jnp.maximum(tg, 0)[:, None], axis=-1)[:, 0], vals, ids

            a, vals, ids = jax.lax.map(one, (hidden.reshape(t // c, c, d), targets.reshape(t // c, c)))
            return a.reshape(t), vals.reshape(t, k), ids.reshape(t, k)

        def skip(_):
            return (jnp.zeros(t, jnp.float32), jnp.zeros((t, k), jnp.float32),
                    jnp.zeros((t, k), jnp.int32))

        return jax.lax.cond(jnp.any(targets >= 0), compute, skip, None)

    def _step_extras(self, params, k_cache, v_cache, inputs: StepInputs, ex: ExtrasInputs,
                     spec: ExtrasSpec):
        model = nnx.merge(self.graphdef, params)
        k_cache, v_cache = self._copy_pages(k_cache, v_cache, inputs.copy_src, inputs.copy_dst)
        res = model(inputs.input_ids, inputs.attn, k_cache, v_cache, inputs.logits_indices,
                    self.opts, return_hidden=spec.prompt_logprobs)
        logits, k_cache, v_cache = res[:3]
        tokens, out = self._sample_extras(logits, inputs.sampling, ex, spec)
        if spec.prompt_logprobs:
            out.plp_lp, out.plp_top_lp, out.plp_top_ids = self._prompt_logprobs(
                model, res[3], ex.plp_target)
        return tokens, out, k_cache, v_cache

    def _decode_block(self, params, k_cache, v_cache, bi: DecodeBlockInputs, ex=None, *,
                      n_steps: int, spec: Optional[ExtrasSpec] = None):
        """`n_steps` decode steps in one program; returns tokens i32[n_steps, S] (and, with extras,
        their ExtrasOutputs stacked over steps).

        Rows that have finished (stop id or no tokens left) keep computing (shapes are static) but
        write their K/V into the sink page, so their pages are never touched past their end.
        """
        model = nnx.merge(self.graphdef, params)
        st = bi.step
        k_cache, v_cache = self._copy_pages(k_cache, v_cache, st.copy_src, st.copy_dst)
        md0 = st.attn
        t = st.input_ids.shape[0]
        s_rows = st.logits_indices.shape[0]
        ps = self.page_size
        row = md0.token_seq
        real = jnp.arange(t) < md0.query_start[-1]
        p_width = md0.page_table.shape[1]

        def body(i, carry):
            k_cache, v_cache, tokens_in, done, out, ext = carry
            live_row = (~done) & (i < bi.remaining)                   # [S]
            live = real & live_row[row]                                # [T]
            pos = md0.positions + i
            page = md0.page_table[row, jnp.minimum(pos // ps, p_width - 1)]
            slot = jnp.where(live, page * ps + pos % ps, 0)
            seq_lens = jnp.where(md0.seq_lens > 0, jnp.minimum(md0.seq_lens + i, p_width * ps), 0)
            md = dataclasses.replace(md0, positions=jnp.where(real, pos, 0), slot_mapping=slot,
                                     seq_lens=seq_lens)
            if md0.work is not None:
                md.work = advance_work_items(md0.work, i, ps)
            logits, k_cache, v_cache = model(tokens_in, md, k_cache, v_cache, st.logits_indices,
                                             self.opts)
            si = dataclasses.replace(st.sampling, token_index=st.sampling.token_index + i,
                                     banned=jnp.where((i < bi.min_left)[:, None], bi.stop_ids, -1))
            if spec is None:
                tok = sample(logits, si)
            else:
                dense, outs = ext
                tok, o = self._sample_extras(logits, si, ex, spec, dense=dense)
                if dense is not None:   # this step's token joins the history of the next ones
                    counts, seen = dense
                    rows = jnp.arange(s_rows)
                    dense = (counts.at[rows, tok].add(1), seen.at[rows, tok].set(True))
                outs = jax.tree.map(lambda a, v: a.at[i].set(v), outs, o)
                ext = (dense, outs)
            is_stop = jnp.any((tok[:, None] == bi.stop_ids) & (bi.stop_ids >= 0), axis=-1)
            done = done | (is_stop & (i + 1 >= bi.min_left)) | (i + 1 >= bi.remaining)
            out = out.at[i].set(tok)
            return k_cache, v_cache, tok[row], done, out, ext

        ext = None
        if spec is not None:
            dense = (history_to_dense(ex.hist_ids, ex.hist_counts, self.cfg.vocab_size)
                     if spec.hist_width else None)
            k = ex_mod.num_top(self.cfg.vocab_size)
            outs = ExtrasOutputs()
            if spec.logprobs:
                outs = ExtrasOutputs(sampled_lp=jnp.zeros((n_steps, s_rows), jnp.float32),
                                     top_lp=jnp.zeros((n_steps, s_rows, k), jnp.float32),
                                     top_ids=jnp.zeros((n_steps, s_rows, k), jnp.int32))
            ext = (dense, outs)
        carry = (k_cache, v_cache, st.input_ids, jnp.zeros(s_rows, bool),
                 jnp.zeros((n_steps, s_rows), jnp.int32), ext)
        k_cache, v_cache, _, _, out, ext = jax.lax.fori_loop(0, n_steps, body, carry)
        if spec is not None:
            return out, ext[1], k_cache, v_cache
        return out, k_cache, v_cache

    def _abstract_inputs(self, T: int, P: int) -> StepInputs:
        S = self.buckets.seqs_for(T)
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
        md = AttentionMetadata(positions=i32(T), token_seq=i32(T), slot_mapping=i32(T),
                               query_start=i32(S + 1), seq_lens=i32(S), page_table=i32(S, P))
        if self.cascade is not None:
            lay = pallas_kernels.cascade_layout(T, S, P, page_size=self.page_size, **self.cascade)
            g = self.cfg.num_heads // self.cfg.num_kv_heads
            w, bm = lay["num_items"], lay["block_rows"]
            md.work = WorkItems(page_table=i32((S + lay["num_groups"]) * lay["pt_width"]),
                                pt_base=i32(w), kv_start=i32(w), kv_end=i32(w), rows=i32(w, bm),
                                row_hi=i32(w, bm), merge_idx=i32(T * g, lay["num_partials"]),
                                pt_width=lay["pt_width"])
        si = SamplingInputs(temperature=f32(S), top_k=i32(S), top_p=f32(S), min_p=f32(S),
                            seeds=jax.ShapeDtypeStruct((S,), jnp.uint32), token_index=i32(S),
                            banned=i32(S, NUM_BANNED))
        return StepInputs(i32(T), md, i32(S), si, i32(MAX_COPIES), i32(MAX_COPIES))

    def _abstract_block_inputs(self, T: int, P: int) -> DecodeBlockInputs:
        S = self.buckets.seqs_for(T)
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
        # With shared-prefix attention the host builds the first step's work list and the block
        # advances it on device; otherwise the kernel builds a plain list per step.
        return DecodeBlockInputs(self._abstract_inputs(T, P), i32(S), i32(S),
                                 i32(S, NUM_BANNED))

    def compile_extras(self, spec: ExtrasSpec, decode_steps: int = 1) -> None:
        """Compile the extras programs of `spec` for every bucket not compiled yet (the engine
        calls this before a run whose batch asks for extras)."""
        for T, P in self.extras_buckets.all():
            if ("extras", T, P, spec) in self._compiled:
                continue
            t0 = time.perf_counter()
            S = self.buckets.seqs_for(T)
            self._compiled[("extras", T, P, spec)] = self._jit_ex.lower(
                self.params, self.k_cache, self.v_cache, self._abstract_inputs(T, P),
                ex_mod.abstract_inputs(spec, T, S), spec=spec).compile(
                    compiler_options=COMPILER_OPTIONS)
            self.compile_seconds += time.perf_counter() - t0
        if decode_steps > 1:
            bspec = dataclasses.replace(spec, prompt_logprobs=False)   # blocks only decode
            for T, P in self.extras_buckets.decode_block_keys():
                key = ("block_extras", T, P, decode_steps, bspec)
                if key in self._compiled:
                    continue
                t0 = time.perf_counter()
                S = self.buckets.seqs_for(T)
                self._compiled[key] = self._jit_block_ex.lower(
                    self.params, self.k_cache, self.v_cache, self._abstract_block_inputs(T, P),
                    ex_mod.abstract_inputs(bspec, T, S), n_steps=decode_steps, spec=bspec).compile(
                        compiler_options=COMPILER_OPTIONS)
                self.compile_seconds += time.perf_counter() - t0

    def _lower_step(self, T: int, P: int, return_logits: bool = False):
        return self._jit.lower(self.params, self.k_cache, self.v_cache,
                               self._abstract_inputs(T, P), return_logits=return_logits)

    def _lower_block(self, T: int, P: int, n_steps: int):
        return self._jit_block.lower(self.params, self.k_cache, self.v_cache,
                                     self._abstract_block_inputs(T, P), n_steps=n_steps)

    def compile_block(self, key: tuple, n_steps: int):
        t0 = time.perf_counter()
        T, P = key
        exe = self._lower_block(T, P, n_steps).compile(compiler_options=COMPILER_OPTIONS)
        self.compile_seconds += time.perf_counter() - t0
        self._compiled[("block", T, P, n_steps)] = exe
        return exe

    def compile(self, key: tuple, return_logits: bool = False):
        t0 = time.perf_counter()
        T, P = key
        exe = self._lower_step(T, P, return_logits).compile(compiler_options=COMPILER_OPTIONS)
        self.compile_seconds += time.perf_counter() - t0
        self._compiled[(T, P, return_logits)] = exe
        return exe

    def compile_all(self, decode_steps: int = 1) -> int:
        """Every bucket's program (and fused-block program). Lowering (Python tracing) runs here
        one after another; XLA's compiles, which release the GIL, run in parallel threads (H100,
        unrolled Llama-3-8B: ~8 s a program, 13 programs)."""
        import concurrent.futures as cf

        t0 = time.perf_counter()
        todo = []
        for T, P in self.buckets.all():
            if (T, P, False) not in self._compiled:
                todo.append(((T, P, False), self._lower_step(T, P)))
        if decode_steps > 1:
            for T, P in self.buckets.decode_block_keys():
                if ("block", T, P, decode_steps) not in self._compiled:
                    todo.append((("block", T, P, decode_steps),
                                 self._lower_block(T, P, decode_steps)))
        if todo:
            workers = max(1, min(len(todo), 8, (os.cpu_count() or 2) // 2))
            with cf.ThreadPoolExecutor(workers) as pool:
                exes = list(pool.map(lambda kl: kl[1].compile(compiler_options=COMPILER_OPTIONS),
                                     todo))
            for (key, _), exe in zip(todo, exes):
                self._compiled[key] = exe
            self.compile_seconds += time.perf_counter() - t0
        return len(self._compiled)

    def execute_block(self, plan: StepPlan) -> np.ndarray:
        """Run a fused decode block. Returns tokens [decode_steps, rows] as numpy."""
        bi, n = build_decode_block_inputs(plan, self.buckets, self.page_size,
                                          cascade=self.cascade)
        key = ("block", bi.step.input_ids.shape[0], bi.step.attn.page_table.shape[1],
               plan.decode_steps)
        exe = self._compiled.get(key)
        if exe is None:
            raise RuntimeError(f"decode block {key[1:]} was not compiled at start-up")
        out, self.k_cache, self.v_cache = exe(self.params, self.k_cache, self.v_cache, bi)
        return np.asarray(out)[:, :n]

    def execute_block_extras(self, plan: StepPlan, ctx: ExtrasContext):
        """A fused decode block with extras. Returns (tokens [decode_steps, rows], ExtrasOutputs
        of numpy arrays [decode_steps, rows, ...])."""
        bi, n = build_decode_block_inputs(plan, self.extras_buckets, self.page_size,
                                          cascade=self.cascade)
        T, P = bi.step.input_ids.shape[0], bi.step.attn.page_table.shape[1]
        spec = dataclasses.replace(ctx.spec, prompt_logprobs=False)
        exe = self._compiled.get(("block_extras", T, P, plan.decode_steps, spec))
        if exe is None:
            raise RuntimeError(f"extras decode block {(T, P)} was not compiled for this run")
        ex = ctx.build(plan, T, bi.step.logits_indices.shape[0])
        out, outs, self.k_cache, self.v_cache = exe(self.params, self.k_cache, self.v_cache, bi, ex)
        outs = jax.tree.map(lambda a: np.asarray(a)[:, :n], outs)
        return np.asarray(out)[:, :n], outs

    def execute_extras(self, plan: StepPlan, ctx: ExtrasContext):
        """One step with extras. Returns (sampled token per row, ExtrasOutputs of numpy arrays)."""
        inputs, n = build_step_inputs(plan, self.extras_buckets, self.page_size,
                                      cascade=self.cascade)
        T, P = inputs.input_ids.shape[0], inputs.attn.page_table.shape[1]
        exe = self._compiled.get(("extras", T, P, ctx.spec))
        if exe is None:
            raise RuntimeError(f"extras bucket {(T, P)} was not compiled for this run")
        ex = ctx.build(plan, T, inputs.logits_indices.shape[0])
        tokens, outs, self.k_cache, self.v_cache = exe(self.params, self.k_cache, self.v_cache,
                                                       inputs, ex)
        outs = jax.tree.map(np.asarray, outs)
        return np.asarray(tokens)[:n], outs

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def execute(self, plan: StepPlan, return_logits: bool = False):
        """Run one step. Returns (sampled token per row, logits per row or None) as numpy."""
        inputs, n = build_step_inputs(plan, self.buckets, self.page_size, cascade=self.cascade)
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
