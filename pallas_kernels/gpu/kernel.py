"""GPU Pallas ragged paged attention (Triton lowering), with shared-prefix (cascade) work items.

One kernel serves every case. Its unit of work is an *item*: a block of BM query rows and one
KV range `[kv_start, kv_end)` over one page-table row. A query row is (token t, q head j of the G
q heads that share a KV head), so GQA heads are stacked into the matmul M dimension. The grid is
(KV heads, items), heads fastest, so the list's longest-first order holds across heads; each
program streams its KV range page-block by page-block (gathering pages through the page table,
`ref[int_vector]`) with an online softmax and writes a partial (output normalised over its range,
log-sum-exp) per row. A merge (one XLA fusion, `merge` below; or, opt-in,
`pallas_kernels.gpu.merge`) combines the partials of each query row by log-sum-exp. Items
cover, in one launch (horizontal fusion):

  * prefill chunks and decode tokens (rows of one request, causal mask per row),
  * a long KV range split into chunks (flash-decoding: more programs than requests),
  * a shared prefix: rows of all members of a group against the group's prefix pages, read once
    per row block instead of once per request, plus each member's own suffix as its own item.

The prefixes of groups whose members prefill may instead come as dense segments
(`WorkItems.packed`): one packed flash-attention call (cuDNN, `packed_prefix`) whose partial of
each token, in token order, the merge takes as one more slot.

The work list is `AttentionMetadata.work`, built once per step by the runner: on the host with
shared-prefix groups (`pallas_kernels.gpu.cascade`), or on the device without
(`pallas_kernels.gpu.work_items`).

Decode items (<= 16 rows) run the loop with a register prefetch (`prefetch_kv`): block i+1's K/V
gather is issued before block i's math and page ids run two blocks ahead, so two blocks are in
flight per program; with 32-token blocks and 2 warps that read the KV 1.3-1.4x faster on the H200
(block_sizes.prefetch_mode). Larger items keep the plain loop.

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

from pallas_kernels.common import MASK_VALUE
from pallas_kernels.gpu import block_sizes
from pallas_kernels.gpu import merge as merge_kernel
from pallas_kernels.gpu import packed_prefix
from pallas_kernels.metadata import AttentionMetadata, WorkItems

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------

def _kernel(pt_ref, base_ref, kvs_ref, kve_ref, off_ref, rows_ref, hi_ref, q_ref, k_ref, v_ref,
            o_ref, lse_ref, *, g: int, hq: int, ppb: int, page_size: int, scale_log2: float,
            window: Optional[int], prec, masked_store: bool, prefetch_pages: bool = False,
            prefetch_kv: bool = False):
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

    def block_update(i, k, v, acc, m, l):
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
        return acc, m_new, l

    def load_kv(pages):
        return k_ref[pages].reshape(bk, d), v_ref[pages].reshape(bk, d)

    def body_prefetch_kv(i, carry):
        # Register double-buffering: block i's K/V tiles arrived during block i-1's math, the
        # gather of block i+1 is issued before block i's math (nothing uses it until the next
        # iteration, so the loads stay in flight), and page ids run two blocks ahead. The last
        # iteration re-gathers its own block (an L2 hit) instead of branching.
        acc, m, l, k, v, pages_next = carry
        k_n, v_n = load_kv(pages_next)
        pages_nn = load_pages(jnp.minimum(i + 2, jnp.maximum(last - 1, first)))
        acc, m, l = block_update(i, k, v, acc, m, l)
        return acc, m, l, k_n, v_n, pages_nn

    def body(i, carry):
        if prefetch_pages:
            # The next block's page ids are loaded one iteration ahead, so the K/V gather does
            # not wait behind a dependent page-table load (short items are latency-bound).
            acc, m, l, pages = carry
            nxt = load_pages(jnp.minimum(i + 1, jnp.maximum(last - 1, first)))
        else:
            acc, m, l = carry
            pages = load_pages(i)
        k, v = load_kv(pages)
        acc, m, l = block_update(i, k, v, acc, m, l)
        if prefetch_pages:
            return acc, m, l, nxt
        return acc, m, l

    acc = jnp.zeros((bm, d), jnp.float32)
    m = jnp.full((bm,), MASK_VALUE, jnp.float32)
    l = jnp.zeros((bm,), jnp.float32)
    if prefetch_kv:
        # An empty range (first == last) gathers block `first` once and never uses it.
        k0, v0 = load_kv(load_pages(first))
        pn = load_pages(jnp.minimum(first + 1, jnp.maximum(last - 1, first)))
        acc, m, l, _, _, _ = lax.fori_loop(first, last, body_prefetch_kv, (acc, m, l, k0, v0, pn))
    elif prefetch_pages:
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
                       partial_dtype=None, prefetch_pages: bool = False,
                       prefetch_kv: bool = False, items=None):
    """Run the kernel over every item x KV head of `items` (default: `work`'s first list; or
    `work.own`), over `work`'s page table.

    q2: [T * Hq, D]. Returns o [W, Hkv, BM, D] (partial_dtype), lse float32 [W, Hkv, BM].
    """
    items = work if items is None else items
    hkv, total_pages, ps, d = k_cache.shape
    w, bm = items.rows.shape
    ppb = pages_per_block
    if work.pt_width % ppb:
        raise ValueError(f"page-table width {work.pt_width} not a multiple of {ppb} pages/block")
    partial_dtype = partial_dtype or q2.dtype
    prec = lax.Precision.HIGHEST if q2.dtype == jnp.float32 else None
    off = jnp.asarray(page_offset, jnp.int32).reshape(1)
    kernel = functools.partial(
        _kernel, g=g, hq=hq, ppb=ppb, page_size=ps, scale_log2=sm_scale * LOG2E, window=window,
        prec=prec, masked_store=hasattr(pltriton, "store"), prefetch_pages=prefetch_pages,
        prefetch_kv=prefetch_kv)
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
    )(work.page_table, items.pt_base, items.kv_start, items.kv_end, off, items.rows,
      items.row_hi, q2, k_cache, v_cache)
    return o, lse


def _select(pred, a, scalar):
    """jnp.where(pred, a, scalar) in lax ops (jnp.where is a nested jitted call); `pred`'s
    dimensions are `a`'s leading ones (size 1 broadcasts)."""
    return lax.select(lax.broadcast_in_dim(pred, a.shape, tuple(range(pred.ndim))), a,
                      lax.full_like(a, scalar))


def _gather(parts, merge_idx):
    """Each query row's partials from the launches' outputs `parts` [(o, lse)], addressed by
    flat index over the launches in order (w * BM + i, then on past the first launch's W * BM):
    (o [TG, K, Hkv, D] float32, 0 where merge_idx is -1; lse [TG, K, Hkv], -inf there).

    Slots the kernel never stores (pad rows: `masked_store`) hold whatever the buffer held, NaN
    included, and a -1 entry gathers some slot: its weight is 0, but 0 x NaN is NaN, so its
    output is set to 0 rather than trusted to be finite."""
    valid = merge_idx >= 0
    o_g = lse_g = None
    base = 0
    for o, lse in parts:
        w, hkv, bm, d = o.shape
        local = merge_idx - base
        mine = valid & (local >= 0) & (local < w * bm)
        idx = lax.clamp(jnp.int32(0), local, jnp.int32(w * bm - 1))
        wi, ii = lax.div(idx, jnp.int32(bm)), lax.rem(idx, jnp.int32(bm))
        o_p = o[wi, :, ii].astype(jnp.float32)                       # [TG, K, Hkv, D]
        lse_p = lse[wi, :, ii]                                        # [TG, K, Hkv]
        if o_g is None:
            o_g = lax.full(o_p.shape, 0.0, jnp.float32)
            lse_g = lax.full(lse_p.shape, -jnp.inf, jnp.float32)
        o_g = lax.select(lax.broadcast_in_dim(mine, o_p.shape, (0, 1)), o_p, o_g)
        lse_g = lax.select(lax.broadcast_in_dim(mine, lse_p.shape, (0, 1)), lse_p, lse_g)
        base += w * bm
    return o_g, lse_g


def merge(parts, merge_idx, t: int, hkv: int, g: int, out_dtype, dense=None):
    """LSE-merge the partials of each query row: `parts` [(o [W, Hkv, BM, D], lse [W, Hkv, BM])]
    (one per launch), merge_idx [T * G, K] -> [T, Hkv * G, D]. Rows with no partial (pad
    tokens) give 0. `dense` (o [T, Hkv * G, D], lse [T, Hkv * G], -inf where absent): one more
    partial of every row, in token order (the packed prefix segments'), read without an index.

    Written with lax ops only (no jnp.where / floor_divide, which are nested jitted calls): a
    nested call inside a stream-annotated computation gets no stream on XLA GPU ("No
    ExecutionStreamId found for call-start"), and attention is what an overlapped step would put
    on a side stream."""
    d = parts[0][0].shape[-1]
    o_g, lse_g = _gather(parts, merge_idx)
    if dense is not None:
        # [T, Hkv * G, ...] -> rows t * G + j, heads h: one more slot, fused into the merge.
        o_d, lse_d = dense
        o_d = o_d.reshape(t, hkv, g, d).transpose(0, 2, 1, 3).reshape(t * g, 1, hkv, d)
        lse_d = lse_d.reshape(t, hkv, g).transpose(0, 2, 1).reshape(t * g, 1, hkv)
        o_g = lax.concatenate([o_g, o_d.astype(jnp.float32)], 1)
        lse_g = lax.concatenate([lse_g, lse_d], 1)
    finite = lax.is_finite(lse_g)
    if lse_g.shape[1] == 1:
        out = _select(finite[..., None], o_g, 0.0)[:, 0]
    else:
        mx = jnp.max(lse_g, axis=1, keepdims=True)
        mx = _select(lax.is_finite(mx), mx, 0.0)
        wgt = jnp.exp(lse_g - mx)                                         # -inf -> 0
        den = jnp.sum(wgt, axis=1)
        num = jnp.sum(wgt[..., None] * o_g, axis=1)
        out = num / _select(den > 0, den, 1.0)[..., None]                 # [TG, Hkv, D]
    out = out.reshape(t, g, hkv, d).transpose(0, 2, 1, 3).reshape(t, hkv * g, d)
    return out.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def ragged_paged_attention(q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0,
                           sm_scale: float, sliding_window: Optional[int] = None,
                           interpret: bool = False, block_kv: Optional[int] = None,
                           num_warps: Optional[int] = None, num_stages: int = 2,
                           prefetch_pages: Optional[bool] = None,
                           prefetch_kv: Optional[bool] = None,
                           merge_impl: Optional[str] = None) -> jax.Array:
    """Causal attention of a ragged token batch over the paged cache (GPU Pallas, Triton), over
    the work list `md.work` (the runner builds it once per step: on the host with shared-prefix
    groups, or on the device without; `pallas_kernels.host_prepare` / `device_prepare`). Matches
    `reference.ragged_paged_attention` on every token with a non-empty KV range; pad tokens (rows
    with seq_len 0) give 0. `block_kv` caps the KV tokens per block and `prefetch_*` choose how
    far the loop loads ahead, `merge_impl` which merge combines the partials ("xla" or
    "pallas"; defaults: block_sizes).
    """
    t, hq, d = q.shape
    hkv, _, ps, dk = k_cache.shape
    if dk != d or hq % hkv:
        raise ValueError(f"shape mismatch: q {q.shape}, cache {k_cache.shape}")
    if md.work is None:
        raise ValueError("the GPU kernel reads md.work: build it with pallas_kernels.device_prepare "
                         "(or host_prepare) before the layer loop")
    g = hq // hkv
    if ps & (ps - 1):
        raise NotImplementedError(f"page_size {ps} is not a power of two (Triton block shapes)")
    dp = block_sizes.padded_head_dim(d)
    if dp != d:
        # Zero-padding D is exact (extra q.k terms and output columns are 0) but copies the cache:
        # correct, slow. Head dims 64/128 need no padding.
        q = jnp.pad(q, ((0, 0), (0, 0), (0, dp - d)))
        k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
    work = md.work
    parts = []
    for items in [work] + ([work.own] if work.own is not None else []):
        bm = items.rows.shape[1]
        pf_pages, pf_kv = prefetch_pages, prefetch_kv
        if pf_pages is None and pf_kv is None:
            mode = block_sizes.prefetch_mode(bm)
            pf_pages, pf_kv = mode == "pages", mode == "kv"
        pf_pages, pf_kv = bool(pf_pages), bool(pf_kv)
        # The largest block up to the chosen size that divides the list's page-table width.
        ppb = max(block_kv or block_sizes.kernel_block_kv(d, ps, bm, pf_kv), ps) // ps
        while work.pt_width % ppb:
            ppb //= 2
        parts.append(attention_partials(
            q.reshape(t * hq, dp), k_cache, v_cache, work, page_offset, g=g, hq=hq,
            sm_scale=sm_scale, window=sliding_window, pages_per_block=ppb,
            num_warps=num_warps or block_sizes.kernel_num_warps(bm, pf_kv),
            num_stages=num_stages, interpret=interpret, prefetch_pages=pf_pages,
            prefetch_kv=pf_kv, items=items))
    dense = None
    if work.packed is not None:
        if sliding_window is not None:
            raise ValueError("packed prefix segments see their whole prefix: a work list with "
                             "them cannot serve a sliding window")
        dense = packed_prefix.dense_partial(q, k_cache, v_cache, work.packed, page_offset,
                                            sm_scale=sm_scale, interpret=interpret)
    if ((merge_impl or block_sizes.merge_impl()) == "pallas" and dense is None
            and merge_kernel.block_rows(t * g)):
        out = merge_kernel.merge(parts, work.merge_idx, t, hkv, g, q.dtype, interpret=interpret)
    else:
        out = merge(parts, work.merge_idx, t, hkv, g, q.dtype, dense=dense)
    return out[..., :d] if dp != d else out
