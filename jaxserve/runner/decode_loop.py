"""The device side of one program: copy-on-write pages, then one step or a fused block of decode
steps, each a forward pass and on-device sampling (with the extras its key asks for).

A fused block runs `steps` decode steps inside one program (`lax.fori_loop`): step i's inputs are
the first step's moved i tokens forward (positions, KV slots, lengths, and the attention
implementation's own metadata through `pallas_kernels.advance`), and its tokens are the tokens
sampled in step i - 1. Rows that have finished (a stop id past min_tokens, or no tokens left)
keep computing, since shapes are static, but write their K/V into the sink page, so their pages
are never touched past their end; the host, which learns every step's tokens, stays the
authority on when a sample ends.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxserve.runner import logprobs as lp_mod
from jaxserve.runner.penalties import history_to_dense, penalize, penalize_dense
from jaxserve.runner.programs import ProgramKey
from jaxserve.runner.sampler import sample
from jaxserve.runner.step_inputs import StepInputs
from pallas_kernels import AttentionMetadata, AttentionSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProgramOutput:
    """What a program returns besides the caches. Fields its key does not compute are None."""

    tokens: jax.Array                          # i32[steps, S] sampled token of each row per step
    sampled_lp: Optional[jax.Array] = None     # f32[steps, S]    logprob of the sampled token
    top_lp: Optional[jax.Array] = None         # f32[steps, S, K] top-K logprobs, descending
    top_ids: Optional[jax.Array] = None        # i32[steps, S, K]
    plp_lp: Optional[jax.Array] = None         # f32[T]    logprob of each row's prompt target
    plp_top_lp: Optional[jax.Array] = None     # f32[T, K]
    plp_top_ids: Optional[jax.Array] = None    # i32[T, K]
    logits: Optional[jax.Array] = None         # f32[S, V] (runners built with return_logits)


@dataclasses.dataclass(frozen=True)
class ProgramContext:
    """Static facts every program of a runner shares."""

    attention: AttentionSpec
    num_layers: int
    num_pages: int
    page_size: int
    vocab_size: int
    return_logits: bool = False


def copy_pages(k_cache, v_cache, src, dst, ctx: ProgramContext):
    """Copy-on-write: duplicate pages `src` into `dst` in every layer (skipped when none)."""
    def copy(kv):
        k_cache, v_cache = kv
        offs = (jnp.arange(ctx.num_layers, dtype=jnp.int32) * ctx.num_pages)[:, None]
        s_all = (offs + src[None, :]).reshape(-1)
        d_all = (offs + dst[None, :]).reshape(-1)
        return (k_cache.at[:, d_all].set(k_cache[:, s_all]),
                v_cache.at[:, d_all].set(v_cache[:, s_all]))

    return jax.lax.cond(jnp.any(dst != 0), copy, lambda kv: kv, (k_cache, v_cache))


def advanced_metadata(md0: AttentionMetadata, i, live_row, ctx: ProgramContext) -> AttentionMetadata:
    """Decode step i of a fused block: every real token i positions on; finished rows write to the
    sink page."""
    ps = ctx.page_size
    t = md0.positions.shape[0]
    row = md0.token_seq
    real = jnp.arange(t) < md0.query_start[-1]
    live = real & live_row[row]
    p_width = md0.page_table.shape[1]
    pos = md0.positions + i
    page = md0.page_table[row, jnp.minimum(pos // ps, p_width - 1)]
    md = dataclasses.replace(
        md0, positions=jnp.where(real, pos, 0),
        slot_mapping=jnp.where(live, page * ps + pos % ps, 0),
        seq_lens=jnp.where(md0.seq_lens > 0, jnp.minimum(md0.seq_lens + i, p_width * ps), 0))
    return pallas_kernels.advance(md0, md, i, ctx.attention)


def step_program(model, opts, k_cache, v_cache, inputs: StepInputs, *, key: ProgramKey,
                 ctx: ProgramContext):
    """One program: returns (ProgramOutput, k_cache, v_cache)."""
    feats = key.features
    k_top = lp_mod.num_top(ctx.vocab_size)
    ex = inputs.extras
    k_cache, v_cache = copy_pages(k_cache, v_cache, inputs.copy_src, inputs.copy_dst, ctx)

    def forward_sample(i, md, tokens_in, k_cache, v_cache, dense):
        md = pallas_kernels.device_prepare(md, ctx.attention)
        res = model(tokens_in, md, k_cache, v_cache, inputs.logits_indices, opts,
                    return_hidden=feats.prompt_logprobs)
        logits, k_cache, v_cache = res[:3]
        out = {}
        if feats.logprobs:
            lp, out["top_lp"], out["top_ids"] = lp_mod.top_logprobs(logits, k_top)
        x = logits
        if feats.hist_width:
            if dense is None:
                x = penalize(x, ex.hist_ids, ex.hist_counts, ex.presence, ex.frequency,
                             ex.repetition)
            else:
                x = penalize_dense(x, *dense, ex.presence, ex.frequency, ex.repetition)
        si = dataclasses.replace(inputs.sampling, token_index=inputs.sampling.token_index + i)
        lim = inputs.limits
        banned = jnp.where((i < lim.min_left)[:, None], lim.stop_ids, -1)
        tok = sample(x, si, banned)
        if feats.logprobs:
            out["sampled_lp"] = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
        if feats.prompt_logprobs:
            out["plp"] = lp_mod.prompt_logprobs(lambda h: model.compute_logits(h, opts), res[3],
                                                ex.plp_target, k_top)
        if ctx.return_logits:
            out["logits"] = logits
        return tok, out, k_cache, v_cache

    if key.steps == 1:
        tok, out, k_cache, v_cache = forward_sample(0, inputs.attn, inputs.input_ids, k_cache,
                                                    v_cache, None)
        po = ProgramOutput(tokens=tok[None], logits=out.get("logits"))
        if feats.logprobs:
            po.sampled_lp, po.top_lp, po.top_ids = (out["sampled_lp"][None], out["top_lp"][None],
                                                    out["top_ids"][None])
        if feats.prompt_logprobs:
            po.plp_lp, po.plp_top_lp, po.plp_top_ids = out["plp"]
        return po, k_cache, v_cache

    md0 = inputs.attn
    s_rows = inputs.logits_indices.shape[0]
    lim = inputs.limits
    row = md0.token_seq
    n = key.steps
    dense = None
    if feats.hist_width:
        # The history is densified once; each step's token joins it for the next steps.
        dense = history_to_dense(ex.hist_ids, ex.hist_counts, ctx.vocab_size)
    stacked = ProgramOutput(tokens=jnp.zeros((n, s_rows), jnp.int32))
    if feats.logprobs:
        stacked.sampled_lp = jnp.zeros((n, s_rows), jnp.float32)
        stacked.top_lp = jnp.zeros((n, s_rows, k_top), jnp.float32)
        stacked.top_ids = jnp.zeros((n, s_rows, k_top), jnp.int32)

    def body(i, carry):
        k_cache, v_cache, tokens_in, done, po, dense = carry
        md = advanced_metadata(md0, i, (~done) & (i < lim.remaining), ctx)
        tok, out, k_cache, v_cache = forward_sample(i, md, tokens_in, k_cache, v_cache, dense)
        if dense is not None:
            counts, seen = dense
            rows = jnp.arange(s_rows)
            dense = (counts.at[rows, tok].add(1), seen.at[rows, tok].set(True))
        po = dataclasses.replace(po, tokens=po.tokens.at[i].set(tok))
        if feats.logprobs:
            po = dataclasses.replace(po, sampled_lp=po.sampled_lp.at[i].set(out["sampled_lp"]),
                                     top_lp=po.top_lp.at[i].set(out["top_lp"]),
                                     top_ids=po.top_ids.at[i].set(out["top_ids"]))
        is_stop = jnp.any((tok[:, None] == lim.stop_ids) & (lim.stop_ids >= 0), axis=-1)
        done = done | (is_stop & (i + 1 >= lim.min_left)) | (i + 1 >= lim.remaining)
        return k_cache, v_cache, tok[row], done, po, dense

    carry = (k_cache, v_cache, inputs.input_ids, jnp.zeros(s_rows, bool), stacked, dense)
    k_cache, v_cache, _, _, po, _ = jax.lax.fori_loop(0, n, body, carry)
    return po, k_cache, v_cache
