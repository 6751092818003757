"""Everything one jitted step reads, as one registered pytree; built on the host with numpy."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from jaxserve.runner.buckets import BucketSet
from jaxserve.runner.sampler import NUM_BANNED, SamplingInputs
from jaxserve.scheduler import StepPlan
from jaxserve.scheduler.batcher import MAX_COPIES
from pallas_kernels.metadata import AttentionMetadata




@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    input_ids: jax.Array          # i32[T]
    attn: AttentionMetadata
    logits_indices: jax.Array     # i32[S] last token row of each sequence row
    sampling: SamplingInputs
    copy_src: jax.Array           # i32[MAX_COPIES] layer-local pages copied (all layers) before
    copy_dst: jax.Array           # i32[MAX_COPIES] the forward pass; 0 -> 0 (sink) is padding


def build_step_inputs(plan: StepPlan, buckets: BucketSet, page_size: int,
                      cascade: Optional[dict] = None) -> tuple[StepInputs, int]:
    """Pad the plan to its bucket. Returns the inputs (numpy leaves) and the number of real rows.

    `cascade` (model head counts) asks for the shared-prefix work list of the GPU kernel: requests
    of one cascade group that run in this step read their group's prefix pages once."""
    rows = plan.rows
    n_tok = plan.num_tokens
    max_pages = -(-plan.max_seq_len // page_size)
    T, P = buckets.pick(n_tok, max_pages)
    S = buckets.seqs_for(T)
    assert len(rows) <= S, (len(rows), S)

    input_ids = np.zeros(T, np.int32)
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
    banned = np.full((S, NUM_BANNED), -1, np.int32)

    t = 0
    for s, row in enumerate(rows):
        seq, start, n = row.seq, row.start, row.num_tokens
        pos = np.arange(start, start + n, dtype=np.int32)
        npr = len(seq.prompt_ids)
        # Tokens [start, start+n) come from the prompt and then from the output (after preemption).
        if start + n <= npr:
            input_ids[t:t + n] = seq.prompt_ids[start:start + n]
        else:
            input_ids[t:t + n] = [seq.token_at(i) for i in range(start, start + n)]
        positions[t:t + n] = pos
        pages = np.asarray(seq.page_table(page_size), np.int32)
        slot_mapping[t:t + n] = pages[pos // page_size] * page_size + pos % page_size
        token_seq[t:t + n] = s
        query_start[s] = t
        seq_lens[s] = start + n
        page_table[s, :len(pages)] = pages
        t += n
        logits_indices[s] = t - 1
        if seq.is_prefix:
            continue   # shared prefixes sample nothing: greedy defaults, logits ignored
        p = seq.params
        temperature[s] = p.temperature
        top_k[s] = max(p.top_k, 0)
        top_p[s] = p.top_p
        min_p[s] = p.min_p
        seeds[s] = seq.seed & 0xFFFFFFFF
        token_index[s] = len(seq.output_ids)
        if len(seq.output_ids) < p.min_tokens and seq.stop_ids:
            ids = sorted(seq.stop_ids)[:NUM_BANNED]
            banned[s, :len(ids)] = ids
    query_start[len(rows):] = n_tok
    md = AttentionMetadata(positions=positions, token_seq=token_seq, slot_mapping=slot_mapping,
                           query_start=query_start, seq_lens=seq_lens, page_table=page_table)
    if cascade is not None:
        md = _with_cascade(md, rows, page_size, S, P, T, cascade)
    si = SamplingInputs(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        seeds=seeds, token_index=token_index, banned=banned)
    copy_src = np.zeros(MAX_COPIES, np.int32)
    copy_dst = np.zeros(MAX_COPIES, np.int32)
    assert len(plan.copies) <= MAX_COPIES, len(plan.copies)
    for c, (src, dst) in enumerate(plan.copies):
        copy_src[c], copy_dst[c] = src, dst
    return StepInputs(input_ids, md, logits_indices, si, copy_src, copy_dst), len(rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeBlockInputs:
    """A fused block of decode steps: the first step's inputs plus what the device needs to run the
    following steps without the host (how many tokens each row may still produce, its stop ids)."""

    step: StepInputs
    remaining: jax.Array   # i32[S] tokens the row may still generate (0 for pad rows)
    min_left: jax.Array    # i32[S] tokens before stop ids are allowed
    stop_ids: jax.Array    # i32[S, NUM_BANNED] -1 padded


def build_decode_block_inputs(plan: StepPlan, buckets: BucketSet, page_size: int,
                              cascade: Optional[dict] = None):
    """`cascade`: the first step's shared-prefix work list is built here as for a single step; the
    block advances it on device (`advance_work_items`)."""
    step, n = build_step_inputs(plan, buckets, page_size, cascade=cascade)
    S = step.logits_indices.shape[0]
    remaining = np.zeros(S, np.int32)
    min_left = np.zeros(S, np.int32)
    stop_ids = np.full((S, NUM_BANNED), -1, np.int32)
    for s, row in enumerate(plan.rows):
        seq = row.seq
        remaining[s] = seq.remaining
        min_left[s] = max(seq.params.min_tokens - len(seq.output_ids), 0)
        # More stop ids than fit are still honoured by the host, which is the authority on when a
        # request ends; the device copy only routes a finished row's writes to the sink early.
        ids = sorted(seq.stop_ids)[:NUM_BANNED]
        stop_ids[s, :len(ids)] = ids
    return DecodeBlockInputs(step, remaining, min_left, stop_ids), n


def _with_cascade(md: AttentionMetadata, rows, page_size: int, S: int, P: int, T: int,
                  heads: dict) -> AttentionMetadata:
    """Host-built work list with the step's shared-prefix groups (only the work list goes to the
    device; the group fields are inputs of the builder)."""
    import pallas_kernels

    lay = pallas_kernels.cascade_layout(T, S, P, page_size=page_size, **heads)
    members: dict = {}
    for s, row in enumerate(rows):
        g = row.seq.group
        if g is not None and not row.seq.is_prefix and g.num_tokens >= page_size:
            members.setdefault(id(g), (g, []))[1].append(s)
    seq_group = np.full(S, -1, np.int32)
    prefix_lens = np.zeros(S, np.int32)
    group_pt = np.zeros((lay["num_groups"], P), np.int32)
    group_lens = np.zeros(lay["num_groups"], np.int32)
    gi = 0
    for g, ss in members.values():
        if len(ss) < 2:
            continue   # a prefix read by one row in this step gains nothing from a group item
        full = g.num_tokens // page_size           # the shared part is the prefix's full pages
        group_pt[gi, :full] = g.page_table(page_size)[:full]
        group_lens[gi] = full * page_size
        for s in ss:
            seq_group[s] = gi
            prefix_lens[s] = full * page_size
        gi += 1
    md = dataclasses.replace(md, seq_group=seq_group, prefix_lens=prefix_lens,
                             group_page_table=group_pt, group_lens=group_lens)
    md = pallas_kernels.build_cascade_metadata(
        md, num_q_heads=heads["num_q_heads"], num_kv_heads=heads["num_kv_heads"],
        page_size=page_size, block_rows=lay["block_rows"], block_kv=lay["block_kv"],
        num_sms=lay["num_sms"], waves=lay["waves"], num_items=lay["num_items"],
        num_partials=lay["num_partials"])
    return dataclasses.replace(md, seq_group=None, prefix_lens=None, group_page_table=None,
                               group_lens=None)
