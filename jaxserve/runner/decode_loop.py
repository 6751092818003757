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
from jaxserve.runner.step_inputs import Carry, StepInputs
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
    carry: Optional[Carry] = None              # for the next program (host/device overlap)


@dataclasses.dataclass(frozen=True)
class ProgramContext:
    """Static facts every program of a runner shares."""

    attention: AttentionSpec
    num_layers: int
    num_pages: int
    page_size: int
    vocab_size: int
    max_rows: int                   # R: rows of the carry between programs (max_num_seqs)
    return_logits: bool = False
    # Whether work a step may not need is skipped with `lax.cond`. Not on GPU: XLA:GPU decides
    # a conditional on the host (it copies the predicate back and blocks until the stream
    # reaches it), so a cond in a step holds the thread that launches it until every step
    # before it has run, and host/device overlap is lost. There the skippable work (penalties
    # of a step without penalised rows, prompt logprobs of a step without such rows) is done
    # and its result selected away.
    device_conditionals: bool = True


def copy_pages(k_cache, v_cache, src, dst, ctx: ProgramContext):
    """Copy-on-write: duplicate pages `src` into `dst` in every layer. Unused slots are 0 -> 0
    (the sink page onto itself), so the copy runs unconditionally: MAX_COPIES pages per layer
    cost microseconds, less than deciding to skip them would (see `device_conditionals`)."""
    offs = (jnp.arange(ctx.num_layers, dtype=jnp.int32) * ctx.num_pages)[:, None]
    s_all = (offs + src[None, :]).reshape(-1)
    d_all = (offs + dst[None, :]).reshape(-1)
    # Destinations are fresh pages, each copied once; the repeats are 0 -> 0 (the sink onto
    # itself, the same value), so the writes may go unordered (see `write_kv`).
    return (k_cache.at[:, d_all].set(k_cache[:, s_all], unique_indices=True),
            v_cache.at[:, d_all].set(v_cache[:, s_all], unique_indices=True))


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


def _carry_out(tokens, done, ctx: ProgramContext) -> Carry:
    pad = ctx.max_rows - tokens.shape[0]
    return Carry(tokens=jnp.pad(tokens, (0, pad)), done=jnp.pad(done, (0, pad)))


def step_program(model, opts, k_cache, v_cache, inputs: StepInputs, carry: Carry, *,
                 key: ProgramKey, ctx: ProgramContext):
    """One program: returns (ProgramOutput, k_cache, v_cache). `carry` is the previous program's:
    tokens the host does not know yet come from it, and rows it saw stop stay stopped."""
    feats = key.features
    k_top = lp_mod.num_top(ctx.vocab_size)
    ex = inputs.extras
    lim = inputs.limits
    k_cache, v_cache = copy_pages(k_cache, v_cache, inputs.copy_src, inputs.copy_dst, ctx)
    input_ids = jnp.where(inputs.prev_row >= 0,
                          carry.tokens[jnp.maximum(inputs.prev_row, 0)], inputs.input_ids)
    done0 = (inputs.row_prev >= 0) & carry.done[jnp.maximum(inputs.row_prev, 0)]

    def stopped(tok, i):
        """Rows whose token i stops them: a stop id past min_tokens, or no tokens left."""
        is_stop = jnp.any((tok[:, None] == lim.stop_ids) & (lim.stop_ids >= 0), axis=-1)
        return (is_stop & (i + 1 >= lim.min_left)) | (i + 1 >= lim.remaining)

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
            skip = ctx.device_conditionals
            if dense is None:
                x = penalize(x, ex.hist_ids, ex.hist_counts, ex.presence, ex.frequency,
                             ex.repetition, skip_inactive=skip)
            else:
                x = penalize_dense(x, *dense, ex.presence, ex.frequency, ex.repetition,
                                   skip_inactive=skip)
        si = dataclasses.replace(inputs.sampling, token_index=inputs.sampling.token_index + i)
        lim = inputs.limits
        banned = jnp.where((i < lim.min_left)[:, None], lim.stop_ids, -1)
        tok = sample(x, si, banned, stochastic=feats.stochastic, filters=feats.filters)
        if feats.logprobs:
            out["sampled_lp"] = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
        if feats.prompt_logprobs:
            out["plp"] = lp_mod.prompt_logprobs(lambda h: model.compute_logits(h, opts), res[3],
                                                ex.plp_target, k_top,
                                                skip_empty=ctx.device_conditionals)
        if ctx.return_logits:
            out["logits"] = logits
        return tok, out, k_cache, v_cache

    if key.steps == 1:
        md = inputs.attn
        # A row the previous program saw stop computes a dropped token: its K/V go to the sink.
        md = dataclasses.replace(md, slot_mapping=jnp.where(done0[md.token_seq], 0,
                                                            md.slot_mapping))
        tok, out, k_cache, v_cache = forward_sample(0, md, input_ids, k_cache, v_cache, None)
        po = ProgramOutput(tokens=tok[None], logits=out.get("logits"),
                           carry=_carry_out(tok, done0 | stopped(tok, 0), ctx))
        if feats.logprobs:
            po.sampled_lp, po.top_lp, po.top_ids = (out["sampled_lp"][None], out["top_lp"][None],
                                                    out["top_ids"][None])
        if feats.prompt_logprobs:
            po.plp_lp, po.plp_top_lp, po.plp_top_ids = out["plp"]
        return po, k_cache, v_cache

    md0 = inputs.attn
    s_rows = inputs.logits_indices.shape[0]
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
        done = done | stopped(tok, i)
        return k_cache, v_cache, tok[row], done, po, dense

    init = (k_cache, v_cache, input_ids, done0, stacked, dense)
    k_cache, v_cache, _, done, po, _ = jax.lax.fori_loop(0, n, body, init)
    # Each row's newest token: the last one it produced (min(steps, remaining) of them).
    last = jnp.clip(jnp.minimum(n, lim.remaining) - 1, 0, n - 1)
    po.carry = _carry_out(po.tokens[last, jnp.arange(s_rows)], done, ctx)
    return po, k_cache, v_cache
