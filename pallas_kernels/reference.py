"""Pure-jnp attention over the paged KV cache: the oracle every kernel is tested against, and the
CPU path of the engine.

It gathers each token's pages and computes causal softmax attention in float32. Tokens are processed
in chunks (`lax.map`) so memory stays O(chunk * pages_per_seq * page_size) instead of
O(tokens * context): a 256-token prefill step over a 2k context would otherwise gather gigabytes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.metadata import AttentionMetadata

# Finite mask value: a fully masked row (pad tokens) gives a uniform, finite softmax instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def ragged_paged_attention(
    q: jax.Array,          # [T, Hq, D]
    k_cache: jax.Array,    # [Hkv, total_pages, page_size, D]
    v_cache: jax.Array,
    md: AttentionMetadata,
    *,
    page_offset: jax.Array | int = 0,   # layer * num_pages
    sm_scale: float,
    sliding_window: Optional[int] = None,
    token_chunk: int = 16,
) -> jax.Array:
    t, hq, d = q.shape
    hkv, _, ps, _ = k_cache.shape
    g = hq // hkv
    p = md.page_table.shape[1]
    kv_len = p * ps
    chunk = min(token_chunk, t)
    pad = (-t) % chunk
    pages = md.page_table + page_offset
    prec = _precision(q.dtype)

    def one_chunk(args):
        qc, seq, pos = args                                  # [C,Hq,D], [C], [C]
        c = qc.shape[0]
        pg = pages[seq]                                      # [C, P]
        k = k_cache[:, pg].reshape(hkv, c, kv_len, d).astype(jnp.float32)
        v = v_cache[:, pg].reshape(hkv, c, kv_len, d).astype(jnp.float32)
        qg = qc.reshape(c, hkv, g, d).astype(jnp.float32)
        s = jnp.einsum("chgd,hcld->chgl", qg, k, precision=prec) * sm_scale
        kpos = jnp.arange(kv_len, dtype=jnp.int32)
        valid = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < md.seq_lens[seq][:, None])
        if sliding_window is not None:
            valid &= kpos[None, :] > pos[:, None] - sliding_window
        s = jnp.where(valid[:, None, None, :], s, MASK_VALUE)
        w = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("chgl,hcld->chgd", w, v, precision=prec)
        return o.reshape(c, hq, d).astype(q.dtype)

    qs, seqs, poss = q, md.token_seq, md.positions
    if pad:
        qs = jnp.pad(qs, ((0, pad), (0, 0), (0, 0)))
        seqs = jnp.pad(seqs, (0, pad))
        poss = jnp.pad(poss, (0, pad))
    n = (t + pad) // chunk
    out = jax.lax.map(one_chunk, (qs.reshape(n, chunk, hq, d), seqs.reshape(n, chunk),
                                  poss.reshape(n, chunk)))
    return out.reshape(t + pad, hq, d)[:t]
