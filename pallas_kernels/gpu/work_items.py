"""The GPU kernel's work lists built on the device (jnp, static shapes, traceable).

`device_work_items(md, ...)` is the no-sharing list the runner builds once per step, before the
layer loop, when the host did not build a shared-prefix list; `advance_work_items` moves a decode
step's list forward by a number of tokens, so a fused block of decode steps keeps the list (with
its shared-prefix items) that the host built for its first step.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from pallas_kernels.gpu import block_sizes
from pallas_kernels.metadata import AttentionMetadata, WorkItems


def build_work_items(md: AttentionMetadata, *, g: int, block_rows: int, block_kv: int,
                     page_size: int, kv_splits: int) -> WorkItems:
    """jnp work list without sharing: each request's tokens in blocks of `block_rows // g`
    tokens (x G heads), each block against the request's KV, split into `kv_splits` chunks."""
    t = md.num_tokens
    s = md.num_seqs
    p = md.pages_per_seq
    bm = block_rows
    bq = max(1, bm // g)
    ppb = block_kv // page_size
    pw = -(-p // ppb) * ppb
    qs = md.query_start
    qlen = qs[1:] - qs[:-1]
    nb = (qlen + bq - 1) // bq
    bend = jnp.cumsum(nb)
    bstart = bend - nb
    nqb = min(t, t // bq + min(s, t))                  # static bound on the number of blocks
    b = jnp.arange(nqb, dtype=jnp.int32)
    # compare_all: a fully parallel search (the default "scan" is a while loop, which on GPU
    # costs a host round trip per iteration).
    sb = jnp.minimum(jnp.searchsorted(bend, b, side="right", method="compare_all"),
                     s - 1).astype(jnp.int32)
    valid_b = b < bend[-1]
    local = b - bstart[sb]
    tok0 = qs[sb] + local * bq
    ntok = jnp.where(valid_b, jnp.clip(qlen[sb] - local * bq, 0, bq), 0)
    slot = jnp.arange(bm, dtype=jnp.int32)
    ti, ji = slot // g, slot % g
    rvalid = (ti[None, :] < ntok[:, None]) & (ti[None, :] < bq)
    tok = jnp.clip(tok0[:, None] + ti[None, :], 0, t - 1)
    hi = jnp.where(rvalid, jnp.minimum(md.positions[tok] + 1, md.seq_lens[sb][:, None]), 0)
    rows = jnp.where(rvalid, tok * g + ji[None, :], 0)
    hmax = jnp.max(hi, axis=1)
    kv_max = pw * page_size
    ck = -(-(-(-kv_max // kv_splits)) // block_kv) * block_kv     # chunk, multiple of block_kv
    c = jnp.arange(kv_splits, dtype=jnp.int32)
    kv_start = jnp.broadcast_to(c[None, :] * ck, (nqb, kv_splits))
    kv_end = jnp.minimum((c[None, :] + 1) * ck, hmax[:, None])
    pt = md.page_table
    if pw != p:
        pt = jnp.pad(pt, ((0, 0), (0, pw - p)))         # sink page 0; never unmasked
    # merge: token t of row s sits in block bstart[s] + lt // bq at slot (lt % bq) * G + j.
    tt = jnp.arange(t, dtype=jnp.int32)
    st = md.token_seq
    lt = tt - qs[st]
    tvalid = (lt >= 0) & (tt < qs[st + 1]) & (md.seq_lens[st] > 0)
    bt = bstart[st] + lt // bq
    base_slot = (lt % bq) * g
    item0 = bt * kv_splits
    jj = jnp.arange(g, dtype=jnp.int32)
    midx = ((item0[:, None, None] + c[None, None, :]) * bm
            + base_slot[:, None, None] + jj[None, :, None])          # [T, G, K]
    midx = jnp.where(tvalid[:, None, None], midx, -1).reshape(t * g, kv_splits)
    w = nqb * kv_splits
    return WorkItems(
        page_table=pt.reshape(-1).astype(jnp.int32),
        pt_base=jnp.repeat(sb * pw, kv_splits).astype(jnp.int32),
        kv_start=kv_start.reshape(w).astype(jnp.int32),
        kv_end=kv_end.reshape(w).astype(jnp.int32),
        rows=jnp.repeat(rows, kv_splits, axis=0).astype(jnp.int32),
        row_hi=jnp.repeat(hi, kv_splits, axis=0).astype(jnp.int32),
        merge_idx=midx.astype(jnp.int32),
        pt_width=pw)


def device_work_items(md: AttentionMetadata, *, num_q_heads: int, num_kv_heads: int,
                      page_size: int, head_dim: int, block_rows: Optional[int] = None,
                      kv_splits: Optional[int] = None,
                      block_kv: Optional[int] = None) -> WorkItems:
    """The no-sharing work list of `md` with the default block sizes (or the ones given)."""
    g = num_q_heads // num_kv_heads
    bk = max(block_kv or block_sizes.block_kv(head_dim, page_size), page_size)
    t = md.num_tokens
    bm = block_rows or block_sizes.device_block_rows(t, md.num_seqs, g)
    bq = max(1, bm // g)
    nqb = min(t, t // bq + min(md.num_seqs, t))
    ppb = bk // page_size
    pw = -(-md.pages_per_seq // ppb) * ppb
    splits = kv_splits or block_sizes.kv_splits(nqb, num_kv_heads, pw * page_size, bk)
    return build_work_items(md, g=g, block_rows=bm, block_kv=bk, page_size=page_size,
                            kv_splits=splits)


def _advance_items(items, steps, cap):
    live = items.row_hi > 0
    item_hi = jnp.max(items.row_hi, axis=1)
    tail = (items.kv_end > items.kv_start) & (items.kv_end >= item_hi)
    return dataclasses.replace(
        items,
        kv_end=jnp.where(tail, jnp.minimum(items.kv_end + steps, cap), items.kv_end),
        row_hi=jnp.where(live, jnp.minimum(items.row_hi + steps, cap), 0))


def advance_work_items(work: WorkItems, steps, page_size: int) -> WorkItems:
    """The work list of a decode step `steps` tokens later, from the list built for a decode step
    (one token per row): every row's causal limit moves by `steps`, and so does the end of each
    item that reaches its rows' limits (the item holding the rows' newest tokens); items that end
    before (a shared prefix, an earlier chunk of a split range) are unchanged, and so are the
    partials each row merges. Limits are capped at the page-table width (rows that finished
    inside a fused block keep computing into discarded outputs). A second list (`work.own`)
    moves the same way."""
    cap = work.pt_width * page_size
    work = _advance_items(work, steps, cap)
    if work.own is not None:
        work = dataclasses.replace(work, own=_advance_items(work.own, steps, cap))
    return work
