"""GPU Pallas ragged paged attention (Triton lowering), with shared-prefix (cascade) work items.

One kernel serves every case. Its unit of work is an *item*: a block of BM query rows and one
KV range `[kv_start, kv_end)` over one page-table row. A query row is (token t, q head j of the G
q heads that share a KV head), so GQA heads are stacked into the matmul M dimension. The grid is
(KV heads, items), heads fastest, so the list's longest-first order holds across heads; each
program streams its KV range page-block by page-block (gathering pages through the page table,
`ref[int_vector]`) with an online softmax and writes a partial (output normalised over its range,
log-sum-exp) per row. A merge (one XLA fusion) combines the
partials of each query row by log-sum-exp. Items cover, in one launch (horizontal fusion):

  * prefill chunks and decode tokens (rows of one request, causal mask per row),
  * a long KV range split into chunks (flash-decoding: more programs than requests),
  * a shared prefix: rows of all members of a group against the group's prefix pages, read once
    per row block instead of once per request, plus each member's own suffix as its own item.

The work list comes from `AttentionMetadata.work` when the host built it
(`pallas_kernels.cascade.build_cascade_metadata`), otherwise `build_work_items` derives a
no-sharing list on device from the plain metadata (jnp, static shapes).

Lowering: Triton (`compiler_params=pltriton.CompilerParams`); see benchmarks/attention.md for
what a Mosaic GPU version would need.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.metadata import AttentionMetadata, WorkItems

# Finite mask value (DESIGN §4): running max starts here, so a fully masked block never gives
# inf - inf = NaN; empty rows get lse = -inf explicitly at the end.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover - no devices
        return 132


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

def _kernel(pt_ref, base_ref, kvs_ref, kve_ref, off_ref, rows_ref, hi_ref, q_ref, k_ref, v_ref,
            o_ref, lse_ref, *, g: int, hq: int, ppb: int, page_size: int, scale_log2: float,
            window: Optional[int], prec, masked_store: bool, prefetch_pages: bool = False):
    h = pl.program_id(0)
    bk = ppb * page_size
    kv_start = kvs_ref[0]
    kv_end = kve_ref[0]
    base = base_ref[0]
    off = off_ref[0]
    rows = rows_ref[...]                                   # [BM] t * G + j
    hi = hi_ref[...]                                       # [BM] exclusive KV limit (0: pad)
    bm = rows.shape[0]
    d = q_ref.shape[-1]
    # q is [T * Hq, D]: row (t, j) of KV head h is q[t, h * G + j].
    qrow = lax.div(rows, g) * hq + h * g + lax.rem(rows, g)
    q = q_ref[qrow]                                        # [BM, D] gather
    hi_e = jnp.minimum(hi, kv_end)
    if window is None:
        lo_e = jnp.full_like(hi, kv_start)
    else:
        lo_e = jnp.maximum(hi - window, kv_start)

    first = lax.div(kv_start, bk)
    last = lax.div(kv_end + bk - 1, bk)

    def load_pages(i):
        return pt_ref[pl.ds(base + i * ppb, ppb)] + off    # [ppb] global page ids

    def body(i, carry):
        if prefetch_pages:
            # The next block's page ids are loaded one iteration ahead, so the K/V gather does
            # not wait behind a dependent page-table load (short items are latency-bound).
            acc, m, l, pages = carry
            nxt = load_pages(jnp.minimum(i + 1, jnp.maximum(last - 1, first)))
        else:
            acc, m, l = carry
            pages = load_pages(i)
        k = k_ref[pages].reshape(bk, d)
        v = v_ref[pages].reshape(bk, d)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=prec,
                            preferred_element_type=jnp.float32) * scale_log2
        kpos = i * bk + lax.broadcasted_iota(jnp.int32, (bm, bk), 1)
        valid = (kpos >= lo_e[:, None]) & (kpos < hi_e[:, None])
        s = jnp.where(valid, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=prec,
            preferred_element_type=jnp.float32)
        if prefetch_pages:
            return acc, m_new, l, nxt
        return acc, m_new, l

    acc = jnp.zeros((bm, d), jnp.float32)
    m = jnp.full((bm,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((bm,), jnp.float32)
    if prefetch_pages:
        acc, m, l, _ = lax.fori_loop(first, last, body, (acc, m, l, load_pages(first)))
    else:
        acc, m, l = lax.fori_loop(first, last, body, (acc, m, l))

    nonempty = hi_e > lo_e
    l_safe = jnp.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    lse = jnp.where(nonempty, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
    if masked_store:
        # Pad row slots are never read by the merge: skip their stores (decode items fill only
        # G of BM rows, so this saves most of the partial-output traffic).
        live = hi > 0
        pltriton.store(o_ref, o.astype(o_ref.dtype), mask=jnp.broadcast_to(live[:, None], o.shape))
        pltriton.store(lse_ref, lse, mask=live)
    else:
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def attention_partials(q2, k_cache, v_cache, work: WorkItems, page_offset, *, g: int, hq: int,
                       sm_scale: float, window: Optional[int], pages_per_block: int,
                       num_warps: int, num_stages: int, interpret: bool,
                       partial_dtype=None, prefetch_pages: bool = False):
    """Run the kernel over every item x KV head.

    q2: [T * Hq, D]. Returns o [W, Hkv, BM, D] (partial_dtype), lse float32 [W, Hkv, BM].
    """
    hkv, total_pages, ps, d = k_cache.shape
    w, bm = work.rows.shape
    ppb = pages_per_block
    if work.pt_width % ppb:
        raise ValueError(f"page-table width {work.pt_width} not a multiple of {ppb} pages/block")
    partial_dtype = partial_dtype or q2.dtype
    prec = lax.Precision.HIGHEST if q2.dtype == jnp.float32 else None
    off = jnp.asarray(page_offset, jnp.int32).reshape(1)
    kernel = functools.partial(
        _kernel, g=g, hq=hq, ppb=ppb, page_size=ps, scale_log2=sm_scale * LOG2E, window=window,
        prec=prec, masked_store=hasattr(pltriton, "store"), prefetch_pages=prefetch_pages)
    npt = work.page_table.shape[0]
    # Grid (KV heads, items): the launch runs the first grid axis fastest, so programs start in
    # list order for all heads together. With (items, heads) every item of head 0 started before
    # any of head 1, and the last head's longest items (a shared prefix) ran alone at the end.
    item = lambda h, i: (i,)                                   # noqa: E731
    o, lse = pl.pallas_call(
        kernel,
        grid=(hkv, w),
        in_specs=[
            pl.BlockSpec((npt,), lambda h, i: (0,)),           # page table (flat)
            pl.BlockSpec((1,), item),                          # pt_base
            pl.BlockSpec((1,), item),                          # kv_start
            pl.BlockSpec((1,), item),                          # kv_end
            pl.BlockSpec((1,), lambda h, i: (0,)),             # page offset of the layer
            pl.BlockSpec((None, bm), lambda h, i: (i, 0)),     # rows
            pl.BlockSpec((None, bm), lambda h, i: (i, 0)),     # row_hi
            pl.BlockSpec(q2.shape, lambda h, i: (0, 0)),       # q, gathered by row in-kernel
            pl.BlockSpec((None, total_pages, ps, d), lambda h, i: (h, 0, 0, 0)),
            pl.BlockSpec((None, total_pages, ps, d), lambda h, i: (h, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bm, d), lambda h, i: (i, h, 0, 0)),
            pl.BlockSpec((None, None, bm), lambda h, i: (i, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((w, hkv, bm, d), partial_dtype),
                   jax.ShapeDtypeStruct((w, hkv, bm), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bm{bm}_bk{ppb * ps}",
    )(work.page_table, work.pt_base, work.kv_start, work.kv_end, off, work.rows, work.row_hi,
      q2, k_cache, v_cache)
    return o, lse


def merge(o, lse, merge_idx, t: int, hkv: int, g: int, out_dtype):
    """LSE-merge the partials of each query row: o [W, Hkv, BM, D], lse [W, Hkv, BM],
    merge_idx [T * G, K] -> [T, Hkv * G, D]. Rows with no partial (pad tokens) give 0."""
    w, _, bm, d = o.shape
    valid = merge_idx >= 0
    idx = jnp.maximum(merge_idx, 0)
    wi, ii = idx // bm, idx % bm
    lse_g = jnp.where(valid[..., None], lse[wi, :, ii], -jnp.inf)        # [TG, K, Hkv]
    o_g = o[wi, :, ii].astype(jnp.float32)                                # [TG, K, Hkv, D]
    if merge_idx.shape[1] == 1:
        out = jnp.where(jnp.isfinite(lse_g)[..., None], o_g, 0.0)[:, 0]
    else:
        mx = jnp.max(lse_g, axis=1, keepdims=True)
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        wgt = jnp.exp(lse_g - mx)                                         # -inf -> 0
        den = jnp.sum(wgt, axis=1)
        num = jnp.sum(wgt[..., None] * o_g, axis=1)
        out = num / jnp.where(den > 0, den, 1.0)[..., None]               # [TG, Hkv, D]
    out = out.reshape(t, g, hkv, d).transpose(0, 2, 1, 3).reshape(t, hkv * g, d)
    return out.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# No-sharing work list, built on device from the plain metadata (static shapes)
# ---------------------------------------------------------------------------------------------

def default_block_rows(num_tokens: int, num_seqs: int, g: int) -> int:
    """Rows per item: decode-dominated steps use the smallest tensor-core tile (16) so a request's
    one token x G heads wastes few rows; prefill-heavy steps use 64 so KV blocks are reused by
    more query rows."""
    small = max(16, _pow2_at_least(g))
    return small if num_tokens <= 2 * num_seqs else max(64, small)


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


def default_kv_splits(num_blocks: int, hkv: int, kv_max: int, block_kv: int,
                      num_sms: Optional[int] = None) -> int:
    """Split the KV range when (row blocks x KV heads) alone gives fewer than ~2 waves of
    programs; never below 256 tokens a split (each split costs a partial write + merge)."""
    num_sms = num_sms or _num_sms()
    want = -(-2 * num_sms // max(1, num_blocks * hkv))
    cap = max(1, kv_max // max(256, block_kv))
    return int(max(1, min(want, cap)))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _default_block_kv(head_dim: int, page_size: int) -> int:
    # 64 KV tokens per block at head dim 128 is what was measured (case a: 84 % of HBM BW on the
    # H100); a 128-token block at head dim 128 was still compiling/running when a 330 s run
    # timed out, so it stays off until measured.
    return max(64 if head_dim >= 128 else 128, page_size)


def with_work_items(md: AttentionMetadata, *, num_q_heads: int, num_kv_heads: int,
                    page_size: int, head_dim: int, block_rows: Optional[int] = None,
                    kv_splits: Optional[int] = None) -> AttentionMetadata:
    """`md` with the no-sharing work list built (jnp, traceable). Call it once per step, before
    the layer scan, so the list is not rebuilt in every layer; the kernel then uses `md.work`."""
    if md.work is not None:
        return md
    g = num_q_heads // num_kv_heads
    dp = _pow2_at_least(max(head_dim, 16))
    block_kv = _default_block_kv(dp, page_size)
    t = md.num_tokens
    bm = block_rows or default_block_rows(t, md.num_seqs, g)
    bq = max(1, bm // g)
    nqb = min(t, t // bq + min(md.num_seqs, t))
    ppb = block_kv // page_size
    pw = -(-md.pages_per_seq // ppb) * ppb
    splits = kv_splits or default_kv_splits(nqb, num_kv_heads, pw * page_size, block_kv)
    work = build_work_items(md, g=g, block_rows=bm, block_kv=block_kv, page_size=page_size,
                            kv_splits=splits)
    import dataclasses
    return dataclasses.replace(md, work=work)


def ragged_paged_attention(q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0,
                           sm_scale: float, sliding_window: Optional[int] = None,
                           interpret: bool = False, block_rows: Optional[int] = None,
                           block_kv: Optional[int] = None, kv_splits: Optional[int] = None,
                           num_warps: Optional[int] = None, num_stages: int = 2,
                           prefetch_pages: bool = False) -> jax.Array:
    """Causal attention of a ragged token batch over the paged cache (GPU Pallas, Triton).

    Uses `md.work` when set (host-built, e.g. with shared-prefix groups); otherwise builds a
    no-sharing work list on device. Matches `reference.ragged_paged_attention` on every token with
    a non-empty KV range; pad tokens (rows with seq_len 0) give 0.
    """
    t, hq, d = q.shape
    hkv, _, ps, dk = k_cache.shape
    if dk != d or hq % hkv:
        raise ValueError(f"shape mismatch: q {q.shape}, cache {k_cache.shape}")
    g = hq // hkv
    if ps & (ps - 1):
        raise NotImplementedError(f"page_size {ps} is not a power of two (Triton block shapes)")
    dp = _pow2_at_least(max(d, 16))
    if dp != d:
        # Triton needs power-of-two block shapes. Zero-padding D is exact (extra q.k terms and
        # output columns are 0) but copies the cache: correct, slow. Allocate the cache padded
        # (head_dim 64/128) to avoid it.
        q = jnp.pad(q, ((0, 0), (0, 0), (0, dp - d)))
        k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
    work = md.work
    block_kv = max(block_kv or _default_block_kv(dp, ps), ps)
    ppb = block_kv // ps
    if work is None:
        bm = block_rows or default_block_rows(t, md.num_seqs, g)
        bq = max(1, bm // g)
        nqb = min(t, t // bq + min(md.num_seqs, t))
        pw = -(-md.pages_per_seq // ppb) * ppb
        splits = kv_splits or default_kv_splits(nqb, hkv, pw * ps, block_kv)
        work = build_work_items(md, g=g, block_rows=bm, block_kv=block_kv, page_size=ps,
                                kv_splits=splits)
    else:
        # A host-built list fixes the page-table width; use the largest block that divides it.
        while work.pt_width % ppb:
            ppb //= 2
    bm = work.rows.shape[1]
    if num_warps is None:
        num_warps = 4 if bm <= 32 else 8 if bm >= 128 else 4
    o, lse = attention_partials(
        q.reshape(t * hq, dp), k_cache, v_cache, work, page_offset, g=g, hq=hq,
        sm_scale=sm_scale, window=sliding_window, pages_per_block=ppb, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret, prefetch_pages=prefetch_pages)
    out = merge(o, lse, work.merge_idx, t, hkv, g, q.dtype)
    return out[..., :d] if dp != d else out
