"""TPU (Mosaic) Pallas ragged paged attention with shared-prefix (cascade) groups.

Two `pallas_call`s over the engine's KV cache (`[Hkv, layers * pages, page_size, D]` per K and
V, left in HBM: `memory_space=pl.ANY`), both built from one kernel body:

  * rows kernel: grid (KV head, query block of `q_tokens` tokens of the flat token array). A
    query block holds the G q heads of its tokens stacked into the matmul M dimension
    (M = q_tokens * G; q is laid out `[Hkv, T * G, D]`, row t * G + j). The rows (requests)
    whose tokens fall into the block are its *items*; each item streams its own KV blocks of
    `kv_pages` pages through the page table, causal by position, from `prefix_len` on when the
    row has a shared prefix, so prefill chunks, decode rows and a grouped row's suffix are all
    the same code path.
  * prefix kernel (only with groups): grid (KV head, group block). A group block is up to
    `prefix_q_tokens` tokens of one group's members, gathered by the wrapper (jnp, static
    shapes) into `[Hkv, blocks * M, D]`; its one item streams the group's prefix pages once for
    all those rows and writes a partial (o normalised over the prefix, lse). The rows kernel
    reads that partial back per token and merges it with its own (the suffix) by log-sum-exp
    before writing the output.

Per-grid-step work lists (items) and the page tables live in SMEM (scalar prefetch,
`pltpu.PrefetchScalarGridSpec`). KV moves by manual DMA, one `make_async_copy` per (KV head,
page) per cache into a double-buffered VMEM block with one DMA semaphore per (cache, slot);
while block i is computed, block i + 1 is in flight, and block i + 1 may belong to the next
item, the next grid step or the next KV head: the stream of KV blocks is global over the grid,
which is why both grid axes are "arbitrary" (the current buffer slot and the outstanding DMA
carry from one grid step into the next). Pages past a block's last needed page are not fetched
(their V rows are zeroed before the PV matmul, their scores masked). Online softmax in float32
with a finite mask value; rows with no visible key end with l = 0, o = 0 and lse = -inf.

See `pallas_kernels/tpu/README.md` for the layout choices (page size, separate K and V caches,
head-dim padding) and `block_sizes.py` for the sizes and the VMEM budget.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import MASK_VALUE
from pallas_kernels.metadata import AttentionMetadata
from pallas_kernels.tpu import block_sizes as bsz

LANES = bsz.LANES

# Fields of one work item (int32, flat `items[i * NF + f]` in SMEM).
F_PT = 0      # offset of the item's page list in the flat page table (row * pages per row)
F_T0 = 1      # rows kernel: the item's tokens [t0, t1) of the flat token array
F_T1 = 2
F_POS0 = 3    # rows kernel: position of token t0 (a row's tokens have consecutive positions)
F_SL = 4      # rows kernel: the row's KV length (seq_lens)
F_LO = 5      # rows kernel: first KV position of the row's own part (its prefix length)
F_HI = 6      # KV positions the item reads end here (its pages [0, cdiv(hi, page_size)))
F_B0 = 7      # KV blocks [b0, b1) the item streams (b1 == b0: nothing to read)
F_B1 = 8
F_NEXT = 9    # next item (in grid order, same KV head) with KV blocks; num_items if none
NF = 10


def _cdiv(a, b):
    return (a + b - 1) // b


def _kernel(meta_ref, items_ref, steps_ref, pt_ref, *refs, mode: str, merge_in: bool,
            g: int, q_tokens: int, ppb: int, page_size: int, pages_per_row: int,
            sm_scale: float, window: Optional[int], precision):
    refs = list(refs)
    q_ref = refs.pop(0)
    lim_ref = refs.pop(0) if mode == "prefix" else None
    o1_ref, lse1_ref = (refs.pop(0), refs.pop(0)) if merge_in else (None, None)
    k_hbm, v_hbm = refs.pop(0), refs.pop(0)
    o_ref = refs.pop(0)
    lse_ref = refs.pop(0) if mode == "prefix" else None
    kbuf, vbuf, sems, slot_ref, acc_ref, m_ref, l_ref = refs

    h = pl.program_id(0)
    step = pl.program_id(1)
    num_heads = pl.num_programs(0)
    m_rows, d = q_ref.shape
    bk = ppb * page_size
    off = meta_ref[0]            # page offset of the layer
    first = meta_ref[1]          # first item with KV blocks (num_items if none)
    num_items = meta_ref[2]

    def field(i, f):
        return items_ref[i * NF + f]

    def dma(head, i, blk, slot, p):
        """The K and V DMAs of page p of item i's KV block `blk`, into buffer `slot`."""
        page_idx = jnp.minimum(blk * ppb + p, pages_per_row - 1)
        page = pt_ref[field(i, F_PT) + page_idx] + off
        return (pltpu.make_async_copy(k_hbm.at[head, page], kbuf.at[slot, p], sems.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[head, page], vbuf.at[slot, p], sems.at[1, slot]))

    def live_pages(i, blk):
        # Pages of the block the item reads; the rest of the buffer is not fetched.
        return jnp.clip(_cdiv(field(i, F_HI), page_size) - blk * ppb, 0, ppb)

    def start(head, i, blk, slot):
        def body(p, c):
            ck, cv = dma(head, i, blk, slot, p)
            ck.start()
            cv.start()
            return c
        lax.fori_loop(0, live_pages(i, blk), body, 0)

    def wait(head, i, blk, slot):
        def body(p, c):
            ck, cv = dma(head, i, blk, slot, p)
            ck.wait()
            cv.wait()
            return c
        lax.fori_loop(0, live_pages(i, blk), body, 0)

    i0 = steps_ref[step]
    i1 = steps_ref[step + 1]

    @pl.when((h == 0) & (step == 0))
    def _():
        slot_ref[0] = 0

    # The first block of the whole grid has no predecessor to prefetch it.
    @pl.when((h == 0) & (first >= i0) & (first < i1))
    def _():
        start(h, first, field(first, F_B0), slot_ref[0])

    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    def limits(i):
        """Per-row visible KV range [lo, hi) of item i, as [M, 1] (prefix) or [M, bk] arrays."""
        if mode == "prefix":
            lim = lim_ref[...]
            return lim[:, 0:1], lim[:, 1:2]
        tok = step * q_tokens + lax.broadcasted_iota(jnp.int32, (m_rows, bk), 0) // g
        t0, t1 = field(i, F_T0), field(i, F_T1)
        pos = field(i, F_POS0) + (tok - t0)
        inside = (tok >= t0) & (tok < t1)
        hi = jnp.where(inside, jnp.minimum(pos + 1, field(i, F_SL)), 0)
        lo = field(i, F_LO)
        if window is not None:
            lo = jnp.maximum(lo, pos + 1 - window)
        return lo, hi

    def compute(i, blk, slot):
        lo, hi = limits(i)
        q = q_ref[...]
        k = kbuf[slot].reshape(bk, d)
        v = vbuf[slot].reshape(bk, d)
        # Keys past the item's end were not fetched (stale or uninitialised VMEM): zero their
        # V rows, since 0 * NaN in the PV matmul would poison the row.
        vpos = blk * bk + lax.broadcasted_iota(jnp.int32, (bk, d), 0)
        v = jnp.where(vpos < field(i, F_HI), v, jnp.zeros_like(v))
        kpos = blk * bk + lax.broadcasted_iota(jnp.int32, (m_rows, bk), 1)
        visible = (kpos >= lo) & (kpos < hi)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale
        s = jnp.where(visible, s, MASK_VALUE)
        m_prev = m_ref[...]
        l_prev = l_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))     # [M, 128]
        p = jnp.where(visible, jnp.exp(s - m_new[:, 0:1]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_ref[...] = m_new
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        acc_ref[...] = acc_ref[...] * alpha[:, 0:1] + pv

    def item_body(i, carry):
        b1 = field(i, F_B1)

        def block_body(blk, c):
            slot = slot_ref[0]
            last = blk + 1 >= b1
            nxt = field(i, F_NEXT)
            wrap = last & (nxt >= num_items)        # this head's last block: next head's first
            n_head = jnp.where(wrap, h + 1, h)
            n_item = jnp.where(last, jnp.where(wrap, first, nxt), i)
            n_blk = jnp.where(last, field(jnp.minimum(n_item, num_items - 1), F_B0), blk + 1)

            @pl.when(jnp.logical_not(wrap) | (h + 1 < num_heads))
            def _():
                start(n_head, n_item, n_blk, 1 - slot)

            wait(h, i, blk, slot)
            compute(i, blk, slot)
            slot_ref[0] = 1 - slot
            return c

        lax.fori_loop(field(i, F_B0), b1, block_body, 0)
        return carry

    lax.fori_loop(i0, i1, item_body, 0)

    l = l_ref[...]
    l_col = l[:, 0:1]
    o = acc_ref[...] / jnp.where(l_col > 0, l_col, 1.0)
    if mode == "prefix":
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m_ref[...] + jnp.log(jnp.where(l > 0, l, 1.0)),
                                 -jnp.inf)
        return
    if merge_in:
        # L = logaddexp(l1, l2), o = exp(l1 - L) o1 + exp(l2 - L) o2, written with the larger
        # lse factored out (mx) so an empty partial (lse = -inf) has weight 0 and two empty
        # ones give o = 0 instead of NaN.
        lse2 = jnp.where(l_col > 0, m_ref[...][:, 0:1] + jnp.log(jnp.where(l_col > 0, l_col,
                                                                          1.0)), -jnp.inf)
        lse1 = lse1_ref[...][:, 0:1]
        mx = jnp.maximum(lse1, lse2)
        mx = jnp.where(mx == -jnp.inf, 0.0, mx)
        w1 = jnp.exp(lse1 - mx)
        w2 = jnp.exp(lse2 - mx)
        den = w1 + w2
        o = (w1 * o1_ref[...] + w2 * o) / jnp.where(den > 0, den, 1.0)
    o_ref[...] = o.astype(o_ref.dtype)


def _attention_call(q_blocks, k_cache, v_cache, items, steps, page_table, page_offset, *,
                    num_items: int, mode: str, g: int, q_tokens: int, kv_pages: int,
                    pages_per_row: int, sm_scale: float, window: Optional[int], out_dtype,
                    interpret, vmem_limit_bytes: int, lim=None, prefix=None):
    """One pallas_call over `steps.shape[0] - 1` grid steps per KV head.

    q_blocks: [Hkv, steps * M, D]. Returns o [Hkv, steps * M, D] (out_dtype) and, for the
    prefix kernel, lse float32 [Hkv, steps * M, 128] (lane-replicated)."""
    hkv, rows, d = q_blocks.shape
    _, _, page_size, _ = k_cache.shape
    m_rows = q_tokens * g
    n_steps = rows // m_rows
    meta = jnp.stack([jnp.asarray(page_offset, jnp.int32).reshape(()),
                      _first_live(items, num_items), jnp.int32(num_items)])
    blk = lambda h, i, *_: (h, i, 0)                              # noqa: E731
    in_specs = [pl.BlockSpec((None, m_rows, d), blk)]
    args = [q_blocks]
    if mode == "prefix":
        in_specs.append(pl.BlockSpec((m_rows, LANES), lambda h, i, *_: (i, 0)))
        args.append(lim)
    if prefix is not None:
        o1, lse1 = prefix
        in_specs += [pl.BlockSpec((None, m_rows, d), blk),
                     pl.BlockSpec((None, m_rows, LANES), blk)]
        args += [o1, lse1]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)]
    args += [k_cache, v_cache]
    out_specs = [pl.BlockSpec((None, m_rows, d), blk)]
    out_shape = [jax.ShapeDtypeStruct((hkv, rows, d), out_dtype)]
    if mode == "prefix":
        out_specs.append(pl.BlockSpec((None, m_rows, LANES), blk))
        out_shape.append(jax.ShapeDtypeStruct((hkv, rows, LANES), jnp.float32))
    kv_dtype = k_cache.dtype
    scratch = [
        pltpu.VMEM((2, kv_pages, page_size, d), kv_dtype),       # K double buffer
        pltpu.VMEM((2, kv_pages, page_size, d), kv_dtype),       # V double buffer
        pltpu.SemaphoreType.DMA((2, 2)),                          # (K / V, slot)
        pltpu.SMEM((1,), jnp.int32),                              # slot holding the current block
        pltpu.VMEM((m_rows, d), jnp.float32),                     # acc
        pltpu.VMEM((m_rows, LANES), jnp.float32),                 # m (running max)
        pltpu.VMEM((m_rows, LANES), jnp.float32),                 # l (running sum)
    ]
    precision = lax.Precision.HIGHEST if q_blocks.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, mode=mode, merge_in=prefix is not None, g=g, q_tokens=q_tokens, ppb=kv_pages,
        page_size=page_size, pages_per_row=pages_per_row, sm_scale=sm_scale, window=window,
        precision=precision)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(hkv, n_steps), in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes),
        interpret=interpret,
        name=f"ragged_paged_attention_{mode}_m{m_rows}_kv{kv_pages * page_size}",
    )(meta, items, steps, page_table, *args)
    return outs


def _first_live(items, num_items: int):
    """First item with KV blocks, or num_items."""
    b0 = items[F_B0::NF]
    b1 = items[F_B1::NF]
    idx = jnp.where(b1 > b0, jnp.arange(num_items, dtype=jnp.int32), num_items)
    return jnp.min(idx).astype(jnp.int32)


def _link(live, num_items: int):
    """F_NEXT of each item: the next live item after it (num_items if none)."""
    idx = jnp.where(live, jnp.arange(num_items, dtype=jnp.int32), num_items)
    incl = lax.cummin(idx, axis=0, reverse=True)
    return jnp.concatenate([incl[1:], jnp.full((1,), num_items, jnp.int32)])


def _pack(fields: dict, num_items: int):
    cols = [jnp.broadcast_to(jnp.asarray(fields.get(f, 0), jnp.int32), (num_items,))
            for f in range(NF)]
    return jnp.stack(cols, axis=1).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Work lists (jnp, static shapes from T, S, the group table and the block sizes)
# ---------------------------------------------------------------------------------------------

def row_items(md: AttentionMetadata, *, q_tokens: int, kv_block: int, prefix_lens,
              window: Optional[int]):
    """Items of the rows kernel: the pieces of each row cut at query-block boundaries.

    The cut points are the rows' starts and the multiples of `q_tokens`; the intervals between
    consecutive cut points, in order, are the items (at most S + T / q_tokens + 1 of them; empty
    ones read nothing). Returns (items int32[NI * NF], steps int32[NQB + 1]: first item of each
    query block, NI)."""
    t = md.num_tokens
    s = md.num_seqs
    p = md.pages_per_seq
    nqb = _cdiv(t, q_tokens)
    qs = jnp.clip(md.query_start.astype(jnp.int32), 0, t)
    bounds = jnp.minimum(jnp.arange(nqb + 1, dtype=jnp.int32) * q_tokens, t)
    cuts = jnp.sort(jnp.concatenate([qs, bounds]))
    st, en = cuts[:-1], cuts[1:]
    ni = st.shape[0]
    row = jnp.searchsorted(qs[:s], st, side="right").astype(jnp.int32) - 1
    row_c = jnp.clip(row, 0, s - 1)
    belongs = (row >= 0) & (en > st) & (st < qs[row_c + 1])
    pos0 = md.positions[jnp.minimum(st, t - 1)].astype(jnp.int32)
    sl = md.seq_lens[row_c].astype(jnp.int32)
    plen = prefix_lens[row_c]
    hi = jnp.minimum(pos0 + (en - st), sl)
    lo = plen if window is None else jnp.maximum(plen, pos0 + 1 - window)
    live = belongs & (hi > lo)
    b0 = jnp.where(live, lo // kv_block, 0)
    b1 = jnp.where(live, _cdiv(hi, kv_block), 0)
    items = _pack({F_PT: row_c * p, F_T0: st, F_T1: jnp.where(belongs, en, st), F_POS0: pos0,
                   F_SL: sl, F_LO: plen, F_HI: hi, F_B0: b0, F_B1: b1,
                   F_NEXT: _link(live, ni)}, ni)
    qb = jnp.minimum(st // q_tokens, nqb - 1)
    steps = jnp.searchsorted(qb, jnp.arange(nqb + 1, dtype=jnp.int32),
                             side="left").astype(jnp.int32)
    return items, steps, ni


def num_group_blocks(num_tokens: int, num_groups: int, prefix_q_tokens: int) -> int:
    """Static bound on group blocks: sum over groups of cdiv(tokens_g, bq) is at most
    floor(T / bq) plus one partial block per non-empty group (at most min(groups, T))."""
    return num_tokens // prefix_q_tokens + min(num_groups, num_tokens)


def prefix_blocks(md: AttentionMetadata, *, prefix_q_tokens: int, kv_block: int,
                  window: Optional[int], num_blocks: Optional[int] = None):
    """Group blocks of the prefix kernel (jnp): every token of a grouped row whose prefix range
    is non-empty, sorted by group (stable, so in token order), cut into blocks of
    `prefix_q_tokens` tokens of one group.

    `num_blocks` (static; default `num_group_blocks`, which always suffices) bounds the blocks;
    groups are given blocks in id order, and a group whose blocks would not fit gets none: its
    rows are not grouped in this call (`group_fits` False), so the rows kernel reads their
    whole context and the answer stays exact.

    Returns dict(items, steps, num_items, slot_tok int32[NGB * bq] token of each slot (0 for
    empty slots), slot_lo / slot_hi int32[NGB * bq] visible prefix range of each slot
    ([0, 0) for empty slots), tok_pos int32[T] slot of each token, -1 if none, group_fits
    bool[groups])."""
    t = md.num_tokens
    s = md.num_seqs
    ng, pg = md.groups.page_table.shape
    bq = prefix_q_tokens
    nb = num_blocks or num_group_blocks(t, ng, bq)
    seq = jnp.clip(md.token_seq, 0, s - 1)
    grp = md.groups.seq_group[seq].astype(jnp.int32)
    ok = (grp >= 0) & (grp < ng)
    plen = jnp.where(ok, md.groups.prefix_lens[seq], 0).astype(jnp.int32)
    pos = md.positions.astype(jnp.int32)
    hi = jnp.minimum(jnp.minimum(pos + 1, md.seq_lens[seq]), plen)
    lo = jnp.zeros_like(pos) if window is None else jnp.maximum(pos + 1 - window, 0)
    use = ok & (hi > lo)
    gc = jnp.clip(grp, 0, ng - 1)
    cnt = jnp.zeros((ng,), jnp.int32).at[gc].add(use.astype(jnp.int32))
    nblk = _cdiv(cnt, bq)
    bend = jnp.cumsum(nblk)
    fits = bend <= nb
    use = use & fits[gc]
    cnt = jnp.where(fits, cnt, 0)
    nblk = jnp.where(fits, nblk, 0)
    key = jnp.where(use, grp, ng)
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    skey = key[order]
    bstart = jnp.cumsum(nblk) - nblk
    gstart = jnp.cumsum(cnt) - cnt
    k = jnp.minimum(skey, ng - 1)
    local = jnp.arange(t, dtype=jnp.int32) - gstart[k]
    in_grp = skey < ng
    blk = jnp.where(in_grp, bstart[k] + local // bq, nb)          # nb: dropped
    flat = jnp.where(in_grp, blk * bq + local % bq, nb * bq)
    slot_tok = jnp.zeros((nb * bq,), jnp.int32).at[flat].set(order, mode="drop")
    slot_lo = jnp.zeros((nb * bq,), jnp.int32).at[flat].set(lo[order], mode="drop")
    slot_hi = jnp.zeros((nb * bq,), jnp.int32).at[flat].set(hi[order], mode="drop")
    blk_grp = jnp.zeros((nb,), jnp.int32).at[blk].set(k, mode="drop")
    blk_hi = jnp.zeros((nb,), jnp.int32).at[blk].max(hi[order], mode="drop")
    blk_lo = jnp.full((nb,), jnp.iinfo(jnp.int32).max, jnp.int32).at[blk].min(
        lo[order], mode="drop")
    live = blk_hi > blk_lo
    b0 = jnp.where(live, blk_lo // kv_block, 0)
    b1 = jnp.where(live, _cdiv(blk_hi, kv_block), 0)
    items = _pack({F_PT: blk_grp * pg, F_HI: blk_hi, F_B0: b0, F_B1: b1,
                   F_NEXT: _link(live, nb)}, nb)
    tok_pos = jnp.full((t,), -1, jnp.int32).at[order].set(jnp.where(in_grp, flat, -1))
    return dict(items=items, steps=jnp.arange(nb + 1, dtype=jnp.int32), num_items=nb,
                slot_tok=slot_tok, slot_lo=slot_lo, slot_hi=slot_hi, tok_pos=tok_pos,
                group_fits=fits)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def resolve_interpret(interpret):
    """None: compiled on a TPU backend, TPU interpret mode elsewhere; True: interpret mode with
    default `InterpretParams`; False or an `InterpretParams`: as given."""
    if interpret is None:
        try:
            on_tpu = jax.default_backend() == "tpu"
        except RuntimeError:  # pragma: no cover - no backend
            on_tpu = False
        return False if on_tpu else pltpu.InterpretParams()
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret


def _setup(q, k_cache, v_cache, md, *, q_tokens, kv_pages, prefix_q_tokens, prefix_kv_pages,
           vmem_limit_bytes, out_dtype, grouped, interpret, num_prefix_blocks=None):
    """Resolve block sizes, check the budget, pad head_dim to the lanes and lay q out as
    [Hkv, Tp * G, Dp]. Returns (config dict, padded q rows, padded k, padded v)."""
    t, hq, d = q.shape
    hkv, _, page_size, dk = k_cache.shape
    # A cache may be allocated with head_dim already padded to the lanes (dk > d, zeros past
    # d): then only q is padded here.
    padded_cache = dk > d and dk % LANES == 0
    if (dk != d and not padded_cache) or hq % hkv or v_cache.shape != k_cache.shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k_cache.shape}, v {v_cache.shape}")
    g = hq // hkv
    sub = bsz.sublane_rows(k_cache.dtype)
    if page_size % 8:
        raise ValueError(f"page_size {page_size} is not a multiple of 8 (the sublane tile; "
                         f"{sub} for {k_cache.dtype.name} pages)")
    defaults = bsz.default_block_sizes(num_q_per_kv=g, page_size=page_size, dtype=q.dtype)
    cfg = dict(
        t=t, hq=hq, d=d, hkv=hkv, g=g, page_size=page_size,
        q_tokens=q_tokens or defaults.q_tokens, kv_pages=kv_pages or defaults.kv_pages,
        prefix_q_tokens=prefix_q_tokens or defaults.prefix_q_tokens,
        prefix_kv_pages=prefix_kv_pages or defaults.prefix_kv_pages,
        vmem=vmem_limit_bytes or bsz.vmem_limit_for(), dp=-(-dk // LANES) * LANES,
        out_dtype=jnp.dtype(out_dtype or q.dtype), interpret=resolve_interpret(interpret))
    s_count, p = md.page_table.shape
    nqb = _cdiv(t, cfg["q_tokens"])
    cfg["tp"] = nqb * cfg["q_tokens"]
    common = dict(num_q_per_kv=g, page_size=page_size, head_dim=cfg["dp"], q_dtype=q.dtype,
                  kv_dtype=k_cache.dtype, vmem_limit_bytes=cfg["vmem"])
    bsz.check_budget(kernel="rows", q_tokens=cfg["q_tokens"], kv_pages=cfg["kv_pages"],
                     out_dtype=cfg["out_dtype"], with_prefix=grouped,
                     smem=bsz.smem_bytes(num_seqs=s_count, pages_per_seq=p,
                                         num_items=s_count + nqb + 1, num_blocks=nqb),
                     **common)
    if grouped:
        ng, pg = md.groups.page_table.shape
        nb = num_prefix_blocks or num_group_blocks(t, ng, cfg["prefix_q_tokens"])
        cfg["num_prefix_blocks"] = nb
        bsz.check_budget(kernel="prefix", q_tokens=cfg["prefix_q_tokens"],
                         kv_pages=cfg["prefix_kv_pages"], out_dtype=jnp.float32,
                         smem=bsz.smem_bytes(num_seqs=ng, pages_per_seq=pg, num_items=nb,
                                             num_blocks=nb),
                         **common)
    dp = cfg["dp"]
    if dp != d:
        # Lanes are 128 wide: a head_dim of 64 is zero-padded to 128 (exact: the extra q.k
        # terms and output columns are 0). Padding the caches here copies them on every call;
        # an engine running this kernel should allocate its caches with the padded head_dim
        # (zeros past head_dim), which skips that copy.
        q = jnp.pad(q, ((0, 0), (0, 0), (0, dp - d)))
    if dp != dk:
        k_cache = jnp.pad(k_cache, ((0, 0), (0, 0), (0, 0), (0, dp - dk)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, 0), (0, 0), (0, dp - dk)))
    # [T, Hq, D] -> [Hkv, T * G, D]: the G q heads of a KV head become consecutive matmul rows.
    qr = q.reshape(t, hkv, g, dp).transpose(1, 0, 2, 3)
    qr = jnp.pad(qr, ((0, 0), (0, cfg["tp"] - t), (0, 0), (0, 0))).reshape(hkv, -1, dp)
    return cfg, qr, k_cache, v_cache


def _prefix_rows(cfg, qr, k_cache, v_cache, md, page_offset, window):
    """Prefix partial of every token row: (o1 float32 [Hkv, Tp * G, Dp], lse1 float32
    [Hkv, Tp * G, 128]); rows without a prefix get o1 = 0, lse1 = -inf. Also returns which
    groups got blocks (`prefix_blocks`' group_fits)."""
    g, t, tp, ps = cfg["g"], cfg["t"], cfg["tp"], cfg["page_size"]
    heads = jnp.arange(g, dtype=jnp.int32)
    pb = prefix_blocks(md, prefix_q_tokens=cfg["prefix_q_tokens"],
                       kv_block=cfg["prefix_kv_pages"] * ps, window=window,
                       num_blocks=cfg["num_prefix_blocks"])
    rows = (pb["slot_tok"][:, None] * g + heads).reshape(-1)
    qg = qr[:, rows]
    lim = jnp.zeros((rows.shape[0], LANES), jnp.int32)
    lim = lim.at[:, 0].set(jnp.repeat(pb["slot_lo"], g)).at[:, 1].set(
        jnp.repeat(pb["slot_hi"], g))
    o_pre, lse_pre = _attention_call(
        qg, k_cache, v_cache, pb["items"], pb["steps"],
        md.groups.page_table.astype(jnp.int32).reshape(-1), page_offset,
        num_items=pb["num_items"], mode="prefix", g=g, q_tokens=cfg["prefix_q_tokens"],
        kv_pages=cfg["prefix_kv_pages"], pages_per_row=md.groups.page_table.shape[1],
        sm_scale=cfg["sm_scale"], window=window, out_dtype=jnp.float32,
        interpret=cfg["interpret"], vmem_limit_bytes=cfg["vmem"], lim=lim)
    # Back to token rows: row t * G + j reads slot tok_pos[t] * G + j of the group blocks.
    tok_pos = jnp.pad(pb["tok_pos"], (0, tp - t), constant_values=-1)
    src = (jnp.maximum(tok_pos, 0)[:, None] * g + heads).reshape(-1)
    has = jnp.repeat(tok_pos >= 0, g)[None, :, None]
    return (jnp.where(has, o_pre[:, src], 0.0), jnp.where(has, lse_pre[:, src], -jnp.inf),
            pb["group_fits"])


def _to_tokens(cfg, x):
    """[Hkv, Tp * G, W] -> [T, Hq, W]."""
    hkv, g, t = cfg["hkv"], cfg["g"], cfg["t"]
    w = x.shape[-1]
    return x.reshape(hkv, -1, g, w)[:, :t].transpose(1, 0, 2, 3).reshape(t, hkv * g, w)


def prefix_partial(q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0,
                   sm_scale: float, sliding_window: Optional[int] = None, interpret=None,
                   prefix_q_tokens: Optional[int] = None, prefix_kv_pages: Optional[int] = None,
                   vmem_limit_bytes: Optional[int] = None,
                   num_prefix_blocks: Optional[int] = None):
    """The prefix kernel alone: each token's attention over its group's shared prefix,
    (o float32 [T, Hq, D] normalised over the prefix, lse float32 [T, Hq]); tokens without a
    prefix give o = 0, lse = -inf. The first partial of `reference.cascade_attention_partials`.
    """
    if md.groups is None:
        raise ValueError("prefix_partial needs the metadata's group fields")
    cfg, qr, k_cache, v_cache = _setup(
        q, k_cache, v_cache, md, q_tokens=None, kv_pages=None, prefix_q_tokens=prefix_q_tokens,
        prefix_kv_pages=prefix_kv_pages, vmem_limit_bytes=vmem_limit_bytes, out_dtype=None,
        grouped=True, interpret=interpret, num_prefix_blocks=num_prefix_blocks)
    cfg["sm_scale"] = sm_scale
    o1, lse1, _ = _prefix_rows(cfg, qr, k_cache, v_cache, md,
                            jnp.asarray(page_offset, jnp.int32), sliding_window)
    return _to_tokens(cfg, o1)[..., :cfg["d"]], _to_tokens(cfg, lse1)[..., 0]


def ragged_paged_attention(
    q: jax.Array,            # [T, Hq, D]
    k_cache: jax.Array,      # [Hkv, layers * pages, page_size, D]
    v_cache: jax.Array,
    md: AttentionMetadata,
    *,
    page_offset=0,           # layer * pages (traced int32 scalar in the model's layer scan)
    sm_scale: float,
    sliding_window: Optional[int] = None,
    interpret=None,
    q_tokens: Optional[int] = None,
    kv_pages: Optional[int] = None,
    prefix_q_tokens: Optional[int] = None,
    prefix_kv_pages: Optional[int] = None,
    vmem_limit_bytes: Optional[int] = None,
    out_dtype=None,
    use_groups: bool = True,
    num_prefix_blocks: Optional[int] = None,
) -> jax.Array:
    """Causal attention of one step's ragged token batch over the paged cache (TPU Pallas).

    Equals `reference.ragged_paged_attention` on every token of a row with seq_len > 0; tokens
    of pad rows (and tokens no row covers) give 0. With `md.groups` set (and `use_groups`), a group's shared prefix is read
    once per block of its members' tokens (prefix kernel) and each row's own KV from its prefix
    length on (rows kernel); without them every row reads its whole context.

    Requires, as the engine lays a step out: the tokens of row s are
    `[query_start[s], query_start[s + 1])` with consecutive positions. Block sizes default to
    `block_sizes.default_block_sizes`; `vmem_limit_bytes` to the generation's default scoped
    VMEM limit; sizes that do not fit raise `block_sizes.VmemBudgetError`. `out_dtype`
    (default q.dtype) is the output's dtype (float32 gives the kernel's unrounded result).
    `interpret`: see `resolve_interpret`.

    `num_prefix_blocks` (static) sizes the prefix kernel's grid and its gathered q / partial
    arrays ([Hkv, blocks * prefix_q_tokens * G, D]); the default, `num_group_blocks` =
    T // prefix_q_tokens + min(groups, T), never runs out, but with a group table of S rows it
    is mostly padding. A smaller count is exact too: groups that do not fit (in group id order)
    are computed without sharing.
    """
    grouped = use_groups and md.groups is not None
    cfg, qr, k_cache, v_cache = _setup(
        q, k_cache, v_cache, md, q_tokens=q_tokens, kv_pages=kv_pages,
        prefix_q_tokens=prefix_q_tokens, prefix_kv_pages=prefix_kv_pages,
        vmem_limit_bytes=vmem_limit_bytes, out_dtype=out_dtype, grouped=grouped,
        interpret=interpret, num_prefix_blocks=num_prefix_blocks)
    cfg["sm_scale"] = sm_scale
    page_offset = jnp.asarray(page_offset, jnp.int32)
    s_count, p = md.page_table.shape
    prefix = None
    if grouped:
        ng = md.groups.page_table.shape[0]
        o1, lse1, fits = _prefix_rows(cfg, qr, k_cache, v_cache, md, page_offset,
                                      sliding_window)
        seq_ok = (md.groups.seq_group >= 0) & (md.groups.seq_group < ng)
        seq_ok = seq_ok & fits[jnp.clip(md.groups.seq_group, 0, ng - 1)]
        row_plen = jnp.where(seq_ok, md.groups.prefix_lens, 0).astype(jnp.int32)
        prefix = (o1, lse1)
    else:
        row_plen = jnp.zeros((s_count,), jnp.int32)
    items, steps, ni = row_items(md, q_tokens=cfg["q_tokens"],
                                 kv_block=cfg["kv_pages"] * cfg["page_size"],
                                 prefix_lens=row_plen, window=sliding_window)
    (out,) = _attention_call(
        qr, k_cache, v_cache, items, steps, md.page_table.astype(jnp.int32).reshape(-1),
        page_offset, num_items=ni, mode="rows", g=cfg["g"], q_tokens=cfg["q_tokens"],
        kv_pages=cfg["kv_pages"], pages_per_row=p, sm_scale=sm_scale, window=sliding_window,
        out_dtype=cfg["out_dtype"], interpret=cfg["interpret"], vmem_limit_bytes=cfg["vmem"],
        prefix=prefix)
    out = _to_tokens(cfg, out)
    return out[..., :cfg["d"]] if cfg["dp"] != cfg["d"] else out
