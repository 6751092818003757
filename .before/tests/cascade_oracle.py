"""The loop form of `pallas_kernels.cascade.build_cascade_metadata`: slow and plain, kept as the
oracle the vectorised builder must reproduce array for array (tests/test_kernels.py)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from pallas_kernels.cascade import _chunks, _pow2_at_least, host_inputs
from pallas_kernels.metadata import AttentionMetadata, WorkItems


def build_cascade_metadata_loops(md: AttentionMetadata, *, num_q_heads: int,
                                  num_kv_heads: int, page_size: int, block_rows: int = 64,
                                  block_kv: int = 64, num_sms: int = 132, waves: float = 2.0,
                                  min_chunk: int = 256, chunk_len: Optional[int] = None,
                                  num_items: Optional[int] = None,
                                  num_partials: Optional[int] = None) -> AttentionMetadata:
    """Original per-row Python-loop builder, kept as the readable specification of
    `build_cascade_metadata` (which must return identical arrays; tests compare the two).

    `num_items` / `num_partials` fix the padded sizes (static shapes for jit; default: next power
    of two of what is needed). `block_rows` must be a power of two >= 16; `block_kv` a multiple of
    `page_size` (the kernel must be called with the same `block_kv`).
    """
    g = num_q_heads // num_kv_heads
    bm = block_rows
    if bm & (bm - 1) or bm < 16:
        raise ValueError(f"block_rows must be a power of two >= 16, got {bm}")
    block_kv = max(block_kv, page_size)
    ppb = block_kv // page_size
    (pos, qs, seq_lens, seq_group, plen, table, t, s_count, n_groups,
     pw) = host_inputs(md, ppb)

    # Candidate items before chunking: (table row, kv_lo, kv_hi, rows[], his[]).
    raw = []
    # Shared prefixes: all members' rows together.
    # A row slot's limit is its causal one (min(pos + 1, seq_len)); the item's KV range does the
    # clipping to the prefix, so the sliding window (measured from pos + 1) stays right. Members
    # with different prefix_lens in one group form separate row sets.
    for gi in range(n_groups):
        members = [s for s in range(s_count)
                   if seq_group[s] == gi and seq_lens[s] > 0 and plen[s] > 0]
        for pl_val in sorted({int(plen[s]) for s in members}):
            rows, his = [], []
            for s in members:
                if plen[s] != pl_val:
                    continue
                toks = np.arange(qs[s], qs[s + 1])
                hi = np.minimum(pos[toks] + 1, seq_lens[s])
                for tk, h in zip(toks, hi):
                    if h > 0:
                        rows.extend(int(tk) * g + j for j in range(g))
                        his.extend([int(h)] * g)
            for r0 in range(0, len(rows), bm):
                rr, hh = rows[r0:r0 + bm], his[r0:r0 + bm]
                raw.append((s_count + gi, 0, min(pl_val, max(hh)), rr, hh))
    # Each request's own (unique) part, in blocks of bm // g tokens.
    bq = max(1, bm // g)
    for s in range(s_count):
        if seq_lens[s] <= 0:
            continue
        toks = np.arange(qs[s], qs[s + 1])
        for b0 in range(0, len(toks), bq):
            tb = toks[b0:b0 + bq]
            hi = np.minimum(pos[tb] + 1, seq_lens[s])
            lo = int(plen[s])
            if hi.max(initial=0) <= lo:
                continue                               # empty suffix: prefix partial only
            rows = [int(tk) * g + j for tk in tb for j in range(g)]
            his = [int(h) for h in hi for _ in range(g)]
            raw.append((s, lo, int(hi.max()), rows, his))

    # Cost model: an item costs ~ the KV tokens it reads; aim at `waves` programs per SM.
    total = sum(max(0, hi - lo) for _, lo, hi, _, _ in raw)
    target_items = max(1, int(waves * num_sms / num_kv_heads))
    if chunk_len is None:
        chunk_len = max(min_chunk, -(-max(1, total // target_items) // block_kv) * block_kv)
    items = []
    for row, lo, hi, rows, his in raw:
        for c0, c1 in _chunks(lo, hi, chunk_len, block_kv):
            items.append((row, c0, c1, rows, his))
    # Longest first; ties keep (chunk, row block) neighbours adjacent for L2 reuse of a chunk.
    order = sorted(range(len(items)), key=lambda i: -(items[i][2] - items[i][1]))
    items = [items[i] for i in order]

    w_need = max(1, len(items))
    w = num_items or _pow2_at_least(w_need)
    if w < w_need:
        raise ValueError(f"num_items={w} < {w_need} needed")
    pt_base = np.zeros((w,), np.int32)
    kv_start = np.zeros((w,), np.int32)
    kv_end = np.zeros((w,), np.int32)          # pad items: empty range
    rows_a = np.zeros((w, bm), np.int32)
    hi_a = np.zeros((w, bm), np.int32)
    parts: list[list[int]] = [[] for _ in range(t * g)]
    for wi, (row, c0, c1, rows, his) in enumerate(items):
        pt_base[wi] = row * pw
        kv_start[wi] = c0
        kv_end[wi] = c1
        n = len(rows)
        rows_a[wi, :n] = rows
        hi_a[wi, :n] = his
        for i, r in enumerate(rows):
            # A row whose visible range misses this chunk entirely adds nothing; skip it.
            if his[i] > c0:
                parts[r].append(wi * bm + i)
    k_need = max(1, max(len(x) for x in parts) if parts else 1)
    k = num_partials or _pow2_at_least(k_need)
    if k < k_need:
        raise ValueError(f"num_partials={k} < {k_need} needed")
    midx = np.full((t * g, k), -1, np.int32)
    for r, lst in enumerate(parts):
        midx[r, :len(lst)] = lst
    work = WorkItems(page_table=table.reshape(-1), pt_base=pt_base, kv_start=kv_start,
                     kv_end=kv_end, rows=rows_a, row_hi=hi_a, merge_idx=midx, pt_width=pw)
    return dataclasses.replace(md, work=work)
