"""Host-side (numpy) work list for shared-prefix (cascade) attention on the GPU kernel.

`build_cascade_work(md, groups, ...)` turns one step's metadata and its prefix groups into the
`WorkItems` the kernel in `pallas_kernels.gpu.kernel` runs in one launch:

  * shared items: for each group, the query rows of all its members (tokens x the G q heads of a
    KV head) in blocks of `block_rows`, against chunks of the group's prefix pages. The prefix is
    read once per row block (not once per member), and the matmul M dimension is full;
  * unique items: each request's rows against its own suffix `[prefix_len, seq_len)`;
  * long KV ranges (prefix or suffix) are split into chunks of about equal cost, so that all SMs
    get similar work: cost of an item ~ KV tokens it reads (+ a fixed per-item overhead that
    `min_chunk` stands for); the chunk length is total cost / (waves x SMs / KV heads), and items
    are ordered longest first (LPT), so long items do not start last;
  * `merge_idx` lists each query row's partials (one per chunk of its prefix, one per chunk of
    its suffix) for the LSE merge;
  * optionally (`packed_segments`), the shared prefixes of members that prefill in this step
    become dense segments (`PackedPrefix`) for one packed flash-attention call instead of shared
    items: a 64-row Triton item reads its group's prefix at 0.2-0.3 of the tensor-core rate,
    cuDNN's packed flash attention the same work at 0.55-0.85 (H200, benchmarks/README.md calls
    AA-AB).

Without groups it produces the same kind of list as the device builder, so the cascade path
with no sharing costs what the plain path costs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from pallas_kernels.common import pow2_at_least
from pallas_kernels.metadata import (AttentionMetadata, OwnItems, PackedPrefix, PrefixGroups,
                                     WorkItems)


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


def host_inputs(md: AttentionMetadata, groups: Optional[PrefixGroups], ppb: int):
    """The builder's numpy view of `md` and `groups`: positions, query starts, row lengths, each
    row's group and prefix length (-1 / 0 without groups), and one page table holding the rows'
    tables and then the groups' (width padded to a multiple of `ppb` pages). Shared with the loop
    oracle in tests.
    """
    pos = np.asarray(md.positions, np.int64)
    qs = np.asarray(md.query_start, np.int64)
    seq_lens = np.asarray(md.seq_lens, np.int64)
    pt = np.asarray(md.page_table, np.int32)
    s_count, p = pt.shape
    if groups is not None:
        seq_group = np.asarray(groups.seq_group, np.int64)
        plen = np.where(seq_group >= 0, np.asarray(groups.prefix_lens, np.int64), 0)
        gpt = np.asarray(groups.page_table, np.int32)
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


class _Items(NamedTuple):
    """Candidate items of one row-block size before chunking: page-table row, KV range, and per
    row slot the query row, its causal limit and whether the slot is used."""

    tab: np.ndarray     # int64[n]
    lo: np.ndarray      # int64[n]
    hi: np.ndarray      # int64[n]
    rows: np.ndarray    # int32[n, bm]
    his: np.ndarray     # int32[n, bm]
    used: np.ndarray    # bool[n, bm]


def _scatter_items(tab, lo, hi, item, slot, row, row_hi, bm: int) -> _Items:
    n = tab.shape[0]
    rows = np.zeros((n, bm), np.int32)
    his = np.zeros((n, bm), np.int32)
    used = np.zeros((n, bm), bool)
    rows[item, slot] = row
    his[item, slot] = row_hi
    used[item, slot] = True
    return _Items(tab, lo, hi, rows, his, used)


def _concat(a: _Items, b: _Items) -> _Items:
    return _Items(*(np.concatenate([x, y]) for x, y in zip(a, b)))


def _shared_tokens(ts, thi, seq_lens, seq_group, plen, n_groups):
    """Which query tokens read a group's shared prefix (all but rows without a group and tokens
    with no visible key)."""
    sg = seq_group[ts]
    return (sg >= 0) & (sg < n_groups) & (seq_lens[ts] > 0) & (plen[ts] > 0) & (thi > 0)


def _shared_items(ts, tok, thi, seq_lens, seq_group, plen, s_count, n_groups, g, bm,
                  skip=None) -> _Items:
    """Shared prefixes. Row sets: (group, prefix_len) in ascending order, members' tokens in row
    order (the loop form's order; lexsort is stable), tokens with no visible key left out (and
    those `skip` marks: their prefix is a packed segment). Each token gives G query rows
    t * G + j; a set's rows are cut into blocks of bm (a block may split a token's heads when G
    does not divide bm)."""
    heads = np.arange(g)
    sg = seq_group[ts]
    sh = _shared_tokens(ts, thi, seq_lens, seq_group, plen, n_groups)
    if skip is not None:
        sh &= ~skip
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
    item = set_first_item[r_set] + r_local // bm
    slot = r_local % bm
    row = (tok[sel][:, None] * g + heads).reshape(-1)
    row_hi = np.repeat(thi[sel], g)
    n = int(set_blocks.sum())
    # Rows are in item order, so a block starts where its slot is 0.
    blk_first = np.flatnonzero(slot == 0)
    blk_max = np.maximum.reduceat(row_hi, blk_first) if n else np.zeros(0, np.int64)
    item_set = np.repeat(np.arange(set_rows.shape[0]), set_blocks)
    tab = s_count + s_gi[new_set][item_set]
    hi = np.minimum(s_pl[new_set][item_set], blk_max)
    return _scatter_items(tab, np.zeros(n, np.int64), hi, item, slot, row, row_hi, bm)


def _packed_segments(ts, tok, thi, qlen, seq_lens, seq_group, plen, table, s_count, n_groups,
                     page_size: int, num_segments: int, num_pages: int, num_tokens: int):
    """The shared prefixes that run as dense segments (`PackedPrefix`), and which query tokens
    they take from the shared items.

    Candidates are the tokens of prefilling rows (several query tokens: stacked, they fill the
    tensor cores; decode tokens stay shared items, which stack the G heads of each token
    instead) of a group that see its whole prefix (limit >= prefix_len; tokens inside the prefix,
    a member prefilling the prefix itself, need a causal mask). A segment is a run of
    consecutive candidate tokens of one (group, prefix_len) set: the call reads the step's
    queries in place, so a set whose prefilling members are not adjacent makes several
    segments, each with its own copy of the prefix. Runs are taken largest first (tokens x
    prefix) while `num_segments` segments and `num_pages` KV pages hold them; the rest stay
    shared items.

    Returns (PackedPrefix of numpy arrays, bool mask over query tokens)."""
    n_tok = ts.shape[0]
    taken = np.zeros(n_tok, bool)
    token_seg = np.full(num_tokens, -1, np.int32)
    q_lens = np.full(num_segments, -1, np.int32)
    q_offsets = np.full(num_segments + 1, -1, np.int32)
    kv_pages = np.zeros(num_pages, np.int32)
    kv_lens = np.full(num_segments, -1, np.int32)
    kv_offsets = np.full(num_segments + 1, -1, np.int32)
    cand = (_shared_tokens(ts, thi, seq_lens, seq_group, plen, n_groups) & (thi >= plen[ts])
            & (qlen[ts] > 1))
    sel = np.nonzero(cand)[0]                 # query tokens in step order (tok is increasing)
    nseg = 0
    if sel.shape[0]:
        key = seq_group[ts[sel]] * (1 << 31) + plen[ts[sel]]
        new_run = np.ones(sel.shape[0], bool)
        new_run[1:] = (key[1:] != key[:-1]) | (tok[sel[1:]] != tok[sel[:-1]] + 1)
        first = np.flatnonzero(new_run)
        counts = np.diff(np.append(first, sel.shape[0]))
        run_len = plen[ts[sel[first]]]
        run_group = seq_group[ts[sel[first]]]
        run_pages = -(-run_len // page_size)
        end = pages = 0
        # The selected runs, then laid out in token order (cuDNN's offsets ascend).
        chosen = []
        for k in np.argsort(-(counts * run_len), kind="stable"):
            if len(chosen) == num_segments:
                break
            if pages + run_pages[k] <= num_pages:
                chosen.append(k)
                pages += run_pages[k]
        pages = 0
        for k in sorted(chosen):
            toks = sel[first[k]:first[k] + counts[k]]
            taken[toks] = True
            t0 = int(tok[toks[0]])
            token_seg[t0:t0 + counts[k]] = nseg
            kv_pages[pages:pages + run_pages[k]] = table[s_count + run_group[k], :run_pages[k]]
            q_offsets[nseg], q_lens[nseg] = t0, counts[k]
            kv_offsets[nseg], kv_lens[nseg] = pages * page_size, run_len[k]
            pages += run_pages[k]
            end = t0 + counts[k]
            nseg += 1
        if nseg:
            q_offsets[nseg], kv_offsets[nseg] = end, pages * page_size
    if nseg == 0:
        # No segment: one dummy segment (the first token over the sink page, merged into no
        # token) keeps the call's inputs those of a real one.
        q_lens[0], kv_lens[0] = 1, page_size
        q_offsets[:2], kv_offsets[:2] = (0, 1), (0, page_size)
    packed = PackedPrefix(token_seg=token_seg, q_lens=q_lens, q_offsets=q_offsets,
                          kv_pages=kv_pages, kv_lens=kv_lens, kv_offsets=kv_offsets)
    return packed, taken


def _own_items(ts, toff, tok, thi, seq_lens, plen, g, bm) -> _Items:
    """Each request's own (unique) part: its tokens in blocks of bm // G (all of them, whatever
    their limit), KV range [prefix_len, max limit of the block); a block whose limits all stay
    within the prefix (empty suffix) has only its prefix partial and no item."""
    heads = np.arange(g)
    bq = max(1, bm // g)
    u_tok = np.nonzero(seq_lens[ts] > 0)[0]
    u_s, u_off, u_hi = ts[u_tok], toff[u_tok], thi[u_tok]
    u_start = (u_off % bq) == 0                      # tokens of a row are contiguous, in order
    u_blk = np.cumsum(u_start) - 1
    u_first = np.nonzero(u_start)[0]
    ub_max = np.maximum.reduceat(u_hi, u_first) if u_first.shape[0] else np.zeros(0, np.int64)
    ub_s = u_s[u_first]
    ub_lo = plen[ub_s]
    ub_keep = np.maximum(ub_max, 0) > ub_lo
    ub_item = np.cumsum(ub_keep) - 1
    tk_keep = ub_keep[u_blk]
    item = np.repeat(ub_item[u_blk][tk_keep], g)
    slot = (((u_off % bq)[tk_keep] * g)[:, None] + heads).reshape(-1)
    row = (tok[u_tok][tk_keep][:, None] * g + heads).reshape(-1)
    row_hi = np.repeat(u_hi[tk_keep], g)
    return _scatter_items(ub_s[ub_keep], ub_lo[ub_keep], ub_max[ub_keep], item, slot, row,
                          row_hi, bm)


def _chunked(c: _Items, *, chunk_len: Optional[int], block_kv: int, min_chunk: int,
             target_items: int, num_items: Optional[int], what: str):
    """Cut `c`'s long ranges into chunks and order them longest first, padded to `num_items`.

    Cost model: an item costs ~ the KV tokens it reads; aim at `target_items` items per KV head
    (waves x SMs / KV heads). Returns ((pt_tab, kv_start, kv_end, rows, row_hi, used) with W
    rows, the chunk length used); pad items have an empty range."""
    total = int(np.maximum(0, c.hi - c.lo).sum())
    if chunk_len is None:
        chunk_len = max(min_chunk, -(-max(1, total // target_items) // block_kv) * block_kv)
    src, c0, c1 = _chunk_bounds(c.lo, c.hi, chunk_len, block_kv)
    # Longest first (stable, as the loop form's `sorted`); ties keep (chunk, row block)
    # neighbours adjacent for L2 reuse of a chunk.
    order = np.argsort(-(c1 - c0), kind="stable")
    src, c0, c1 = src[order], c0[order], c1[order]
    n_items = src.shape[0]
    w_need = max(1, n_items)
    w = num_items or pow2_at_least(w_need)
    if w < w_need:
        raise ValueError(f"{what}={w} < {w_need} needed")
    bm = c.rows.shape[1]
    tab = np.zeros((w,), np.int64)
    kv_start = np.zeros((w,), np.int32)
    kv_end = np.zeros((w,), np.int32)          # pad items: empty range
    rows = np.zeros((w, bm), np.int32)
    his = np.zeros((w, bm), np.int32)
    used = np.zeros((w, bm), bool)
    tab[:n_items] = c.tab[src]
    kv_start[:n_items] = c0
    kv_end[:n_items] = c1
    rows[:n_items] = c.rows[src]
    his[:n_items] = c.his[src]
    used[:n_items] = c.used[src]
    return (tab, kv_start, kv_end, rows, his, used), chunk_len


def _lists_and_partials(shared: _Items, own: _Items, two_lists: bool, rows_total: int, *,
                        num_items, num_own_items, **kw):
    """The chunked list(s) and every query row's partials: (parts, shortest chunk length used,
    flat partial index and query row of each partial, sorted by row, partials per row).

    A row's partials are in item order (flat w * BM + i ascending over the first list, then
    W * BM + w' * BM' + i' over the second). A row whose visible range misses a chunk entirely
    adds nothing to it; skip it. Row-major nonzero gives flat order, a stable sort by row keeps
    it within each row."""
    if two_lists:
        chunked = [_chunked(shared, num_items=num_items, what="num_items", **kw),
                   _chunked(own, num_items=num_own_items, what="num_own_items", **kw)]
    else:
        # One list: shared items first, then own ones, chunked and ordered together.
        chunked = [_chunked(_concat(shared, own), num_items=num_items, what="num_items", **kw)]
    parts = [p for p, _ in chunked]
    flats, rs, base = [], [], 0
    for tab, c0, c1, rows, his, used in parts:
        live = used & (his > c0[:, None])
        flat = np.flatnonzero(live)
        flats.append(flat + base)
        rs.append(rows.reshape(-1)[flat])
        base += rows.size
    flat, r = np.concatenate(flats), np.concatenate(rs)
    by_row = np.argsort(r, kind="stable")
    r, flat = r[by_row], flat[by_row]
    counts = np.bincount(r, minlength=rows_total)
    return parts, min(n for _, n in chunked), flat, r, counts


def build_cascade_work(md: AttentionMetadata, groups: Optional[PrefixGroups], *,
                       num_q_heads: int, num_kv_heads: int, page_size: int, block_rows: int = 64,
                       block_kv: int = 64, num_sms: int = 132, waves: float = 2.0,
                       min_chunk: int = 256, chunk_len: Optional[int] = None,
                       num_items: Optional[int] = None,
                       num_partials: Optional[int] = None,
                       own_block_rows: Optional[int] = None,
                       num_own_items: Optional[int] = None,
                       packed_segments: int = 0, packed_pages: int = 0) -> WorkItems:
    """The work list (numpy arrays) of `md` with the shared-prefix `groups` (None: no sharing).

    `num_items` / `num_partials` fix the padded sizes (static shapes for jit; default: next power
    of two of what is needed). A step whose rows would need more than `num_partials` partials at
    the cost model's chunk length gets longer chunks (doubled until they fit or hold the longest
    range, where each row has at most two: its shared prefix and its own part), so a bucket can
    keep K small where its steps have enough items without splitting (`host_layout`); an
    explicit `chunk_len` is kept as given. `block_rows` must be a power of two >= 16; `block_kv`
    a multiple of `page_size`: long ranges are cut on its multiples.

    `own_block_rows` (a power of two >= 16, other than `block_rows`): the requests' own parts
    become a second list of items that size (`WorkItems.own`, `num_own_items` of them), which the
    kernel runs as its own launch. A decode row's own part is one token x G heads: in the shared
    items' 64-row blocks it fills G of 64 rows, in 16-row blocks G of 16, and those run the
    kernel's decode loop (block_sizes.prefetch_mode). Each list is chunked for its own launch.

    `packed_segments` > 0: up to that many runs of prefilling members' tokens take their prefix
    from dense segments (`WorkItems.packed`, see `_packed_segments`) over a KV buffer of
    `packed_pages` pages; their merge lists hold only their own parts (the merge adds the
    segments' output to every token `token_seg` names). Only for steps without a sliding window
    (a segment sees its whole prefix).

    Runs on the host every engine step, so it is vectorised numpy: no Python loop whose trip count
    grows with tokens, rows, groups or items (per-row loops cost ~10 ms per step at T*G in the
    thousands); the one exception is an explicit `chunk_len` < `block_kv` (see `_chunk_bounds`).
    `tests/cascade_oracle.py` holds the loop form it reproduces array for array without
    `own_block_rows` (same item order, same rows, same merge lists).
    """
    g = num_q_heads // num_kv_heads
    bm = block_rows
    bm_own = own_block_rows or bm
    for b in (bm, bm_own):
        if b & (b - 1) or b < 16:
            raise ValueError(f"block_rows must be a power of two >= 16, got {b}")
    block_kv = max(block_kv, page_size)
    ppb = block_kv // page_size
    (pos, qs, seq_lens, seq_group, plen, table, t, s_count, n_groups,
     pw) = host_inputs(md, groups, ppb)

    # Every query token, row by row in order: its row `ts`, its index within the row `toff`, and
    # its causal limit min(pos + 1, seq_len) (the item's KV range does the clipping to prefix or
    # suffix, so the sliding window, measured from pos + 1, stays right).
    qlen = np.maximum(qs[1:s_count + 1] - qs[:s_count], 0)
    ts, toff, _ = _segment_ids(qlen)
    tok = qs[ts] + toff
    thi = np.minimum(pos[tok] + 1, seq_lens[ts])

    packed = taken = None
    if packed_segments:
        packed, taken = _packed_segments(
            ts, tok, thi, qlen, seq_lens, seq_group, plen, table, s_count, n_groups, page_size,
            packed_segments, packed_pages, t)
    shared = _shared_items(ts, tok, thi, seq_lens, seq_group, plen, s_count, n_groups, g, bm,
                           skip=taken)
    own = _own_items(ts, toff, tok, thi, seq_lens, plen, g, bm_own)
    if g > min(bm, bm_own) and (shared.tab.shape[0] or own.tab.shape[0]):
        raise ValueError(f"{g} q heads per KV head do not fit block_rows={min(bm, bm_own)}")
    kw = dict(block_kv=block_kv, target_items=max(1, int(waves * num_sms / num_kv_heads)))
    longest = int(max([0] + [int(np.max(x.hi - x.lo)) for x in (shared, own) if x.hi.size]))
    while True:
        parts, used_len, flat, r, counts = _lists_and_partials(
            shared, own, bm_own != bm, t * g, chunk_len=chunk_len, min_chunk=min_chunk,
            num_items=num_items, num_own_items=num_own_items, **kw)
        k_need = max(1, int(counts.max()) if counts.shape[0] else 1)
        if (num_partials is None or k_need <= num_partials or chunk_len is not None
                or used_len >= longest):
            break
        # More partials than the bucket's static K: longer chunks, fewer of them. Once a chunk
        # holds the longest range, a row has at most one shared and one own partial.
        min_chunk = 2 * used_len
    k = num_partials or pow2_at_least(k_need)
    if k < k_need:
        raise ValueError(f"num_partials={k} < {k_need} needed")
    midx = np.full((t * g, k), -1, np.int32)
    midx[r, np.arange(r.shape[0]) - (np.cumsum(counts) - counts)[r]] = flat

    def items(part):
        tab, c0, c1, rows, his, _ = part
        return dict(pt_base=(tab * pw).astype(np.int32), kv_start=c0, kv_end=c1, rows=rows,
                    row_hi=his)

    own_items = OwnItems(**items(parts[1])) if len(parts) > 1 else None
    return WorkItems(page_table=table.reshape(-1), merge_idx=midx, pt_width=pw, own=own_items,
                     packed=packed, **items(parts[0]))
