"""Everything one compiled program reads, as one registered pytree, and the one function that lays
a step plan out into it (host, numpy). The abstract shapes a program is compiled for are the
shapes of that same function's output for an empty plan, so the layout exists once.

Attention metadata is completed here for the chosen implementation
(`pallas_kernels.host_prepare`: e.g. the GPU kernel's shared-prefix work list) and, inside the
program, once per step before the layer loop (`pallas_kernels.device_prepare`).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import jax
import numpy as np

import pallas_kernels
from jaxserve.runner.programs import Features
from jaxserve.runner.sampler import NUM_BANNED, SamplingInputs
from jaxserve.scheduler.step_plan import MAX_COPIES, StepPlan
from pallas_kernels import AttentionMetadata, AttentionSpec, PrefixGroups


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowLimits:
    """When each row's generation may stop: fused decode blocks stop rows on device, and every
    step bans a row's stop ids while it is below min_tokens."""

    remaining: jax.Array   # i32[S] tokens the row may still generate (0 for pad rows)
    min_left: jax.Array    # i32[S] tokens before its stop ids are allowed
    stop_ids: jax.Array    # i32[S, NUM_BANNED] -1 padded (more are still honoured by the host)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExtrasInputs:
    """Inputs of the programs that compute logprobs / penalties / prompt logprobs."""

    presence: jax.Array      # f32[S] presence penalty (0 = off)
    frequency: jax.Array     # f32[S] frequency penalty (0 = off)
    repetition: jax.Array    # f32[S] repetition penalty (1 = off)
    hist_ids: jax.Array      # i32[S, W] distinct history tokens, -1 padded
    hist_counts: jax.Array   # i32[S, W] times generated (0: prompt only)
    plp_target: jax.Array    # i32[T] prompt token whose logprob the row's logits give, -1 = none


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Carry:
    """What a program hands the next one on the device (host/device overlap): each row's newest
    sampled token and whether the row has stopped, for R = max_num_seqs rows."""

    tokens: jax.Array   # i32[R]
    done: jax.Array     # bool[R]


def empty_carry(rows: int) -> Carry:
    return Carry(tokens=np.zeros(rows, np.int32), done=np.zeros(rows, bool))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    input_ids: jax.Array          # i32[T] (-1 where the previous program's carry holds the token)
    prev_row: jax.Array           # i32[T] row of the previous program whose newest token this is; -1
    row_prev: jax.Array           # i32[S] the same for each row's last token (stopped rows stay stopped)
    attn: AttentionMetadata
    logits_indices: jax.Array     # i32[S] last token row of each sequence row
    sampling: SamplingInputs
    limits: RowLimits
    copy_src: jax.Array           # i32[MAX_COPIES] layer-local pages copied (all layers) before
    copy_dst: jax.Array           # i32[MAX_COPIES] the forward pass; 0 -> 0 (sink) is padding
    extras: Optional[ExtrasInputs] = None


def _groups(plan: StepPlan, S: int, P: int, page_size: int) -> PrefixGroups:
    """The step's shared-prefix groups: rows of one group read its prefix once. A prefix read by
    one row in this step gains nothing from a group, so it is left out (and a step of S rows
    has at most S // 2 groups)."""
    members: dict = {}
    for s, row in enumerate(plan.rows):
        if row.group is not None:
            members.setdefault(row.group, (row.group_pages, []))[1].append(s)
    seq_group = np.full(S, -1, np.int32)
    prefix_lens = np.zeros(S, np.int32)
    table = np.zeros((max(1, S // 2), P), np.int32)
    lens = np.zeros(max(1, S // 2), np.int32)
    gi = 0
    for pages, rows in members.values():
        if len(rows) < 2:
            continue
        table[gi, :len(pages)] = pages
        lens[gi] = len(pages) * page_size
        seq_group[rows] = gi
        prefix_lens[rows] = lens[gi]
        gi += 1
    return PrefixGroups(seq_group=seq_group, prefix_lens=prefix_lens, page_table=table, lens=lens)


def _extras(plan: StepPlan, T: int, S: int, width: int) -> ExtrasInputs:
    w = max(width, 1)
    presence = np.zeros(S, np.float32)
    frequency = np.zeros(S, np.float32)
    repetition = np.ones(S, np.float32)
    hist_ids = np.full((S, w), -1, np.int32)
    hist_counts = np.zeros((S, w), np.int32)
    plp_target = np.full(T, -1, np.int32)
    t = 0
    for s, row in enumerate(plan.rows):
        sp = row.sampling
        if row.samples and sp is not None and sp.has_penalties:
            presence[s], frequency[s], repetition[s] = sp.presence, sp.frequency, sp.repetition
            ids, counts = row.history
            if len(ids) > width:
                raise ValueError(f"penalty history of {len(ids)} tokens exceeds the run's "
                                 f"width {width}")
            hist_ids[s, :len(ids)] = ids
            hist_counts[s, :len(counts)] = counts
        if row.prompt_logprob_targets is not None:
            plp_target[t:t + row.num_tokens] = row.prompt_logprob_targets
        t += row.num_tokens
    return ExtrasInputs(presence, frequency, repetition, hist_ids, hist_counts, plp_target)


def build_step_inputs(plan: StepPlan, *, T: int, P: int, S: int, features: Features,
                      page_size: int, attention: AttentionSpec) -> StepInputs:
    """Lay the plan out at bucket (T tokens, P pages per row, S rows); numpy leaves."""
    rows = plan.rows
    n_tok = plan.num_tokens
    assert len(rows) <= S and n_tok <= T, (len(rows), S, n_tok, T)

    input_ids = np.zeros(T, np.int32)
    prev_row = np.full(T, -1, np.int32)
    row_prev = np.full(S, -1, np.int32)
    positions = np.zeros(T, np.int32)
    slot_mapping = np.zeros(T, np.int32)            # pad tokens -> sink page 0
    token_seq = np.full(T, min(len(rows), S - 1), np.int32)
    query_start = np.full(S + 1, n_tok, np.int32)
    seq_lens = np.zeros(S, np.int32)
    page_table = np.zeros((S, P), np.int32)
    logits_indices = np.zeros(S, np.int32)
    temperature = np.zeros(S, np.float32)
    top_k = np.zeros(S, np.int32)
    top_p = np.ones(S, np.float32)
    min_p = np.zeros(S, np.float32)
    seeds = np.zeros(S, np.uint32)
    token_index = np.zeros(S, np.int32)
    remaining = np.zeros(S, np.int32)
    min_left = np.zeros(S, np.int32)
    stop_ids = np.full((S, NUM_BANNED), -1, np.int32)

    R = len(rows)
    if R:
        # Token and page layout for all rows at once (a per-row numpy loop costs ~20 us a row,
        # several ms a step at a thousand rows, while the device waits for nothing else).
        n = np.fromiter((r.num_tokens for r in rows), np.int64, R)
        start = np.fromiter((r.start for r in rows), np.int64, R)
        first = np.cumsum(n) - n
        tok_row = np.repeat(np.arange(R), n)
        pos = start[tok_row] + np.arange(n_tok) - first[tok_row]
        input_ids[:n_tok] = np.fromiter(itertools.chain.from_iterable(r.token_ids for r in rows),
                                        np.int32, n_tok)
        positions[:n_tok] = pos
        token_seq[:n_tok] = tok_row
        query_start[:R] = first
        seq_lens[:R] = start + n
        logits_indices[:R] = first + n - 1
        n_pages = np.fromiter((len(r.page_table) for r in rows), np.int64, R)
        page_row = np.repeat(np.arange(R), n_pages)
        page_table[page_row, np.arange(page_row.shape[0]) - (np.cumsum(n_pages) - n_pages)[page_row]] = \
            np.fromiter(itertools.chain.from_iterable(r.page_table for r in rows), np.int32,
                        page_row.shape[0])
        slot_mapping[:n_tok] = page_table[tok_row, pos // page_size] * page_size + pos % page_size
    for s, row in enumerate(rows):
        if row.last_token_from is not None:
            prev_row[first[s] + n[s] - 1] = row_prev[s] = row.last_token_from
        sp = row.sampling
        if not row.samples or sp is None:
            continue   # rows that sample nothing: greedy defaults, logits ignored
        temperature[s], top_k[s], top_p[s], min_p[s] = sp.temperature, sp.top_k, sp.top_p, sp.min_p
        seeds[s] = sp.seed
        token_index[s] = row.num_generated
        remaining[s] = row.remaining
        min_left[s] = max(sp.min_tokens - row.num_generated, 0)
        if sp.stop_ids:
            ids = sp.stop_ids[:NUM_BANNED]
            stop_ids[s, :len(ids)] = ids
    md = AttentionMetadata(positions=positions, token_seq=token_seq, slot_mapping=slot_mapping,
                           query_start=query_start, seq_lens=seq_lens, page_table=page_table)
    groups = (_groups(plan, S, P, page_size) if pallas_kernels.uses_groups(attention) else None)
    md = pallas_kernels.host_prepare(md, groups, attention)
    copy_src = np.zeros(MAX_COPIES, np.int32)
    copy_dst = np.zeros(MAX_COPIES, np.int32)
    assert len(plan.copies) <= MAX_COPIES, len(plan.copies)
    for c, (src, dst) in enumerate(plan.copies):
        copy_src[c], copy_dst[c] = src, dst
    return StepInputs(
        input_ids=input_ids, prev_row=prev_row, row_prev=row_prev, attn=md,
        logits_indices=logits_indices,
        sampling=SamplingInputs(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                seeds=seeds, token_index=token_index),
        limits=RowLimits(remaining=remaining, min_left=min_left, stop_ids=stop_ids),
        copy_src=copy_src, copy_dst=copy_dst,
        extras=None if features.plain else _extras(plan, T, S, features.hist_width))


def abstract_step_inputs(**layout) -> StepInputs:
    """The shapes a program is compiled for: those of an empty plan's inputs at the bucket."""
    inputs = build_step_inputs(StepPlan([]), **layout)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), inputs)
