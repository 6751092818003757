"""Host-side (numpy) work list for shared-prefix (cascade) attention on the GPU kernel.

`build_cascade_metadata(md, ...)` turns one step's metadata with prefix groups into the
`WorkItems` the kernel in `pallas_kernels.gpu` runs in one launch:

  * shared items: for each group, the query rows of all its members (tokens x the G q heads of a
    KV head) in blocks of `block_rows`, against chunks of the group's prefix pages. The prefix is
    read once per row block (not once per member), and the matmul M dimension is full;
  * unique items: each request's rows against its own suffix `[prefix_len, seq_len)`;
  * long KV ranges (prefix or suffix) are split into chunks of about equal cost, so that all SMs
    get similar work: cost of an item ~ KV tokens it reads (+ a fixed per-item overhead that
    `min_chunk` stands for); the chunk length is total cost / (waves x SMs / KV heads), and items
    are ordered longest first (LPT), so long items do not start last;
  * `merge_idx` lists each query row's partials (one per chunk of its prefix, one per chunk of
    its suffix) for the LSE merge.

Without groups it produces the same kind of list as the device builder, so the cascade path
with no sharing costs what the plain path costs.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from pallas_kernels.metadata import AttentionMetadata, WorkItems


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _chunks(lo: int, hi: int, length: int, align: int):
    """Split [lo, hi) into pieces of about `length` tokens, cut on multiples of `align`."""
    out = []
    start = lo
    while start < hi:
        end = min(hi, ((start + length) // align) * align) if start + length < hi else hi
        if end <= start:
            end = min(hi, start + length)
        out.append((start, end))
        start = end
    return out


def _segment_ids(lengths: np.ndarray):
    """For segments of `lengths`: (segment id of each element, index of each element within its
    segment, start of each segment), all without a Python loop over elements."""
    n = int(lengths.sum())
    seg = np.repeat(np.arange(lengths.shape[0]), lengths)
    starts = np.cumsum(lengths) - lengths
    return seg, np.arange(n) - starts[seg], starts


def _chunk_bounds(lo: np.ndarray, hi: np.ndarray, length: int, align: int):
    """`_chunks` over many ranges at once: (range index, chunk start, chunk end) of every chunk,
    ranges in order and each range's chunks in order, exactly as `_chunks` cuts them.

    For length >= align `_chunks` has a closed form: the first chunk ends on the last multiple of
    `align` at or below lo + length; every later start is then aligned, so every later chunk is
    floor(length / align) * align long, except the last, which ends at hi (a chunk is full while
    start + length < hi). A shorter `length` (only ever passed explicitly, e.g. by tests; the
    derived one is >= block_kv) may leave starts unaligned, so it takes the per-range loop."""
    if length < align:
        cut = [_chunks(int(a), int(b), length, align) for a, b in zip(lo, hi)]
        n = np.array([len(c) for c in cut], np.int64)
        flat = np.array([x for c in cut for x in c], np.int64).reshape(-1, 2)
        return np.repeat(np.arange(lo.shape[0]), n), flat[:, 0], flat[:, 1]
    step = (length // align) * align
    e1 = ((lo + length) // align) * align
    full = np.maximum(0, -(-(hi - length - e1) // step))      # chunks after the first, not last
    n = np.where(hi <= lo, 0, np.where(lo + length >= hi, 1, 2 + full))
    src, k, _ = _segment_ids(n)
    last = k == n[src] - 1
    c0 = np.where(k == 0, lo[src], e1[src] + (k - 1) * step)
    c1 = np.where(last, hi[src], e1[src] + k * step)
    return src, c0, c1


def host_inputs(md: AttentionMetadata, ppb: int):
    """The builder's numpy view of `md`: positions, query starts, row lengths, each row's group and
    prefix length (-1 / 0 without groups), and one page table holding the rows' tables and then
    the groups' (width padded to a multiple of `ppb` pages). Shared with the loop oracle in tests.
    """
    pos = np.asarray(md.positions, np.int64)
    qs = np.asarray(md.query_start, np.int64)
    seq_lens = np.asarray(md.seq_lens, np.int64)
    pt = np.asarray(md.page_table, np.int32)
    s_count, p = pt.shape
    if md.seq_group is not None:
        seq_group = np.asarray(md.seq_group, np.int64)
        plen = np.where(seq_group >= 0, np.asarray(md.prefix_lens, np.int64), 0)
        gpt = np.asarray(md.group_page_table, np.int32)
        n_groups, pg = gpt.shape
    else:
        seq_group = np.full((s_count,), -1, np.int64)
        plen = np.zeros((s_count,), np.int64)
        gpt = np.zeros((0, 1), np.int32)
        n_groups, pg = 0, 1
    pw = -(-max(p, pg) // ppb) * ppb
    table = np.zeros((s_count + n_groups, pw), np.int32)
    table[:s_count, :p] = pt
    if n_groups:
        table[s_count:, :pg] = gpt
    return pos, qs, seq_lens, seq_group, plen, table, pos.shape[0], s_count, n_groups, pw


def build_cascade_metadata(md: AttentionMetadata, *, num_q_heads: int, num_kv_heads: int,
                           page_size: int, block_rows: int = 64, block_kv: int = 64,
                           num_sms: int = 132, waves: float = 2.0, min_chunk: int = 256,
                           chunk_len: Optional[int] = None,
                           num_items: Optional[int] = None,
                           num_partials: Optional[int] = None) -> AttentionMetadata:
    """Return `md` with `work` set (numpy arrays), honouring `seq_group`/`prefix_lens`/
    `group_page_table`/`group_lens` when present.

    `num_items` / `num_partials` fix the padded sizes (static shapes for jit; default: next power
    of two of what is needed). `block_rows` must be a power of two >= 16; `block_kv` a multiple of
    `page_size` (the kernel must be called with the same `block_kv`).

    Runs on the host every engine step, so it is vectorised numpy: no Python loop whose trip count
    grows with tokens, rows, groups or items (per-row loops cost ~10 ms per step at T*G in the
    thousands); the one exception is an explicit `chunk_len` < `block_kv` (see `_chunk_bounds`). `tests/cascade_oracle.py` holds the loop form it reproduces array for array
    (same item order, same rows, same merge lists).
    """
    g = num_q_heads // num_kv_heads
    bm = block_rows
    if bm & (bm - 1) or bm < 16:
        raise ValueError(f"block_rows must be a power of two >= 16, got {bm}")
    block_kv = max(block_kv, page_size)
    ppb = block_kv // page_size
    (pos, qs, seq_lens, seq_group, plen, table, t, s_count, n_groups,
     pw) = host_inputs(md, ppb)

    # Every query token, row by row in order: its row `ts`, its index within the row `toff`, and
    # its causal limit min(pos + 1, seq_len) (the item's KV range does the clipping to prefix or
    # suffix, so the sliding window, measured from pos + 1, stays right).
    qlen = np.maximum(qs[1:s_count + 1] - qs[:s_count], 0)
    ts, toff, _ = _segment_ids(qlen)
    tok = qs[ts] + toff
    thi = np.minimum(pos[tok] + 1, seq_lens[ts])
    heads = np.arange(g)

    # Shared prefixes. Row sets: (group, prefix_len) in ascending order, members' tokens in row
    # order (the loop form's order; lexsort is stable), tokens with no visible key left out. Each
    # token gives G query rows t * G + j; a set's rows are cut into blocks of bm (a block may split
    # a token's heads when G does not divide bm).
    sg = seq_group[ts]
    sh = ((sg >= 0) & (sg < n_groups) & (seq_lens[ts] > 0) & (plen[ts] > 0) & (thi > 0))
    sel = np.nonzero(sh)[0]
    sel = sel[np.lexsort((plen[ts[sel]], sg[sel]))]
    s_gi, s_pl = sg[sel], plen[ts[sel]]
    new_set = np.ones(sel.shape[0], bool)
    new_set[1:] = (s_gi[1:] != s_gi[:-1]) | (s_pl[1:] != s_pl[:-1])
    set_id = np.cumsum(new_set) - 1
    set_rows = np.bincount(set_id, minlength=int(new_set.sum())) * g
    r_set, r_local, _ = _segment_ids(set_rows)
    set_blocks = -(-set_rows // bm)
    set_first_item = np.cumsum(set_blocks) - set_blocks
    sh_item = set_first_item[r_set] + r_local // bm
    sh_slot = r_local % bm
    sh_row = (tok[sel][:, None] * g + heads).reshape(-1)
    sh_hi = np.repeat(thi[sel], g)
    n_sh = int(set_blocks.sum())
    # Rows are in item order, so a block starts where its slot is 0.
    blk_first = np.flatnonzero(sh_slot == 0)
    sh_blk_max = np.maximum.reduceat(sh_hi, blk_first) if n_sh else np.zeros(0, np.int64)
    item_set = np.repeat(np.arange(set_rows.shape[0]), set_blocks)
    set_gi = s_gi[new_set]
    set_pl = s_pl[new_set]
    sh_tab = s_count + set_gi[item_set]
    sh_lo = np.zeros(n_sh, np.int64)
    sh_hi_item = np.minimum(set_pl[item_set], sh_blk_max)

    # Each request's own (unique) part: its tokens in blocks of bm // G (all of them, whatever
    # their limit), KV range [prefix_len, max limit of the block); a block whose limits all stay
    # within the prefix (empty suffix) has only its prefix partial and no item.
    bq = max(1, bm // g)
    uq = seq_lens[ts] > 0
    u_tok = np.nonzero(uq)[0]
    u_s, u_off, u_hi = ts[u_tok], toff[u_tok], thi[u_tok]
    u_start = (u_off % bq) == 0                      # tokens of a row are contiguous, in order
    u_blk = np.cumsum(u_start) - 1
    u_first = np.nonzero(u_start)[0]
    if u_first.shape[0]:
        ub_max = np.maximum.reduceat(u_hi, u_first)
    else:
        ub_max = np.zeros(0, np.int64)
    ub_s = u_s[u_first]
    ub_lo = plen[ub_s]
    ub_keep = np.maximum(ub_max, 0) > ub_lo
    ub_item = n_sh + np.cumsum(ub_keep) - 1
    tk_keep = ub_keep[u_blk]
    u_item_tok = ub_item[u_blk][tk_keep]
    u_slot_tok = (u_off % bq)[tk_keep] * g
    un_item = np.repeat(u_item_tok, g)
    un_slot = (u_slot_tok[:, None] + heads).reshape(-1)
    un_row = (tok[u_tok][tk_keep][:, None] * g + heads).reshape(-1)
    un_hi = np.repeat(u_hi[tk_keep], g)

    # Candidate items before chunking: shared ones first, then unique ones.
    raw_tab = np.concatenate([sh_tab, ub_s[ub_keep]])
    raw_lo = np.concatenate([sh_lo, ub_lo[ub_keep]])
    raw_hi = np.concatenate([sh_hi_item, ub_max[ub_keep]])
    n_raw = raw_tab.shape[0]
    if g > bm and n_raw:
        raise ValueError(f"{g} q heads per KV head do not fit block_rows={bm}")
    all_item = np.concatenate([sh_item, un_item])
    all_slot = np.concatenate([sh_slot, un_slot])
    raw_rows = np.zeros((n_raw, bm), np.int32)
    raw_his = np.zeros((n_raw, bm), np.int32)
    raw_used = np.zeros((n_raw, bm), bool)
    raw_rows[all_item, all_slot] = np.concatenate([sh_row, un_row])
    raw_his[all_item, all_slot] = np.concatenate([sh_hi, un_hi])
    raw_used[all_item, all_slot] = True

    # Cost model: an item costs ~ the KV tokens it reads; aim at `waves` programs per SM.
    total = int(np.maximum(0, raw_hi - raw_lo).sum())
    target_items = max(1, int(waves * num_sms / num_kv_heads))
    if chunk_len is None:
        chunk_len = max(min_chunk, -(-max(1, total // target_items) // block_kv) * block_kv)
    src, c0, c1 = _chunk_bounds(raw_lo, raw_hi, chunk_len, block_kv)
    # Longest first (stable, as the loop form's `sorted`); ties keep (chunk, row block)
    # neighbours adjacent for L2 reuse of a chunk.
    order = np.argsort(-(c1 - c0), kind="stable")
    src, c0, c1 = src[order], c0[order], c1[order]

    n_items = src.shape[0]
    w_need = max(1, n_items)
    w = num_items or _pow2_at_least(w_need)
    if w < w_need:
        raise ValueError(f"num_items={w} < {w_need} needed")
    pt_base = np.zeros((w,), np.int32)
    kv_start = np.zeros((w,), np.int32)
    kv_end = np.zeros((w,), np.int32)          # pad items: empty range
    rows_a = np.zeros((w, bm), np.int32)
    hi_a = np.zeros((w, bm), np.int32)
    pt_base[:n_items] = raw_tab[src] * pw
    kv_start[:n_items] = c0
    kv_end[:n_items] = c1
    rows_a[:n_items] = raw_rows[src]
    hi_a[:n_items] = raw_his[src]

    # merge_idx: a row's partials in item order (flat w * BM + i ascending). A row whose visible
    # range misses a chunk entirely adds nothing to it; skip it. Row-major nonzero gives flat
    # order, a stable sort by row keeps it within each row.
    live = raw_used[src] & (hi_a[:n_items] > c0[:, None])
    flat = np.flatnonzero(live)
    r = rows_a[:n_items].reshape(-1)[flat]
    by_row = np.argsort(r, kind="stable")
    r, flat = r[by_row], flat[by_row]
    counts = np.bincount(r, minlength=t * g)
    k_need = max(1, int(counts.max()) if counts.shape[0] else 1)
    k = num_partials or _pow2_at_least(k_need)
    if k < k_need:
        raise ValueError(f"num_partials={k} < {k_need} needed")
    midx = np.full((t * g, k), -1, np.int32)
    midx[r, np.arange(r.shape[0]) - (np.cumsum(counts) - counts)[r]] = flat
    work = WorkItems(page_table=table.reshape(-1), pt_base=pt_base, kv_start=kv_start,
                     kv_end=kv_end, rows=rows_a, row_hi=hi_a, merge_idx=midx, pt_width=pw)
    return dataclasses.replace(md, work=work)
