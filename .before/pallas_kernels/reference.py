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


# ---------------------------------------------------------------------------------------------
# Shared-prefix (cascade) attention, pure jnp: the oracle of the cascade kernels.
#
# Attention over a row's KV splits into disjoint KV ranges (the group's shared prefix, the row's
# own suffix); each range gives a partial output normalised over that range and its log-sum-exp,
# and `merge_partials` combines them exactly: L = logaddexp(l1, l2), o = e^(l1-L) o1 + e^(l2-L) o2.
# ---------------------------------------------------------------------------------------------

def paged_attention_partial(
    q: jax.Array,            # [T, Hq, D]
    k_cache: jax.Array,      # [Hkv, total_pages, page_size, D]
    v_cache: jax.Array,
    pages: jax.Array,        # int32[T, P] global page ids each token reads (offset already added)
    kv_lo: jax.Array,        # int32[T]   first KV position the token attends to
    kv_hi: jax.Array,        # int32[T]   one past the last KV position (kv_hi <= kv_lo: empty)
    *,
    sm_scale: float,
    token_chunk: int = 16,
) -> tuple[jax.Array, jax.Array]:
    """Attention of each token over KV positions [kv_lo, kv_hi) of its page list.

    Returns (out float32 [T, Hq, D] normalised over that range, lse float32 [T, Hq]); an empty range
    gives out 0 and lse -inf, the identity of `merge_partials`.
    """
    t, hq, d = q.shape
    hkv, _, ps, _ = k_cache.shape
    g = hq // hkv
    p = pages.shape[1]
    kv_len = p * ps
    chunk = min(token_chunk, t)
    pad = (-t) % chunk
    prec = _precision(q.dtype)

    def one_chunk(args):
        qc, pg, lo, hi = args
        c = qc.shape[0]
        k = k_cache[:, pg].reshape(hkv, c, kv_len, d).astype(jnp.float32)
        v = v_cache[:, pg].reshape(hkv, c, kv_len, d).astype(jnp.float32)
        qg = qc.reshape(c, hkv, g, d).astype(jnp.float32)
        s = jnp.einsum("chgd,hcld->chgl", qg, k, precision=prec) * sm_scale
        kpos = jnp.arange(kv_len, dtype=jnp.int32)
        valid = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        e = jnp.exp(s - m_safe)
        den = jnp.sum(e, axis=-1, keepdims=True)
        o = jnp.einsum("chgl,hcld->chgd", e, v, precision=prec) / jnp.where(den > 0, den, 1.0)
        lse = jnp.where(den[..., 0] > 0, jnp.log(jnp.where(den[..., 0] > 0, den[..., 0], 1.0))
                        + m_safe[..., 0], -jnp.inf)
        return o.reshape(c, hq, d), lse.reshape(c, hq)

    qs, pgs, los, his = q, pages, kv_lo, kv_hi
    if pad:
        qs = jnp.pad(qs, ((0, pad), (0, 0), (0, 0)))
        pgs = jnp.pad(pgs, ((0, pad), (0, 0)))
        los = jnp.pad(los, (0, pad))
        his = jnp.pad(his, (0, pad))
    n = (t + pad) // chunk
    o, lse = jax.lax.map(one_chunk, (qs.reshape(n, chunk, hq, d), pgs.reshape(n, chunk, p),
                                     los.reshape(n, chunk), his.reshape(n, chunk)))
    return o.reshape(t + pad, hq, d)[:t], lse.reshape(t + pad, hq)[:t]


def merge_partials(o1, lse1, o2, lse2):
    """Exact log-sum-exp merge of two partial attentions over disjoint KV ranges.

    o: [..., D] (normalised over its own range), lse: [...]; -inf marks an empty partial. Two empty
    partials give o = 0, lse = -inf (no NaN).
    """
    lse = jnp.logaddexp(lse1, lse2)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.exp(lse1 - lse_safe)
    w2 = jnp.exp(lse2 - lse_safe)
    o = (w1[..., None] * o1.astype(jnp.float32) + w2[..., None] * o2.astype(jnp.float32))
    return o, lse


def cascade_attention_partials(
    q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0, sm_scale: float,
    sliding_window: Optional[int] = None):
    """The two cascade partials of every token: (o_prefix, lse_prefix), (o_suffix, lse_suffix).

    Prefix: KV [0, min(pos + 1, prefix_lens[s])) read through `group_page_table[seq_group[s]]`;
    suffix: KV [prefix_lens[s], min(pos + 1, seq_lens[s])) through `page_table[s]`. Without cascade
    fields the prefix is empty for every token.
    """
    t = q.shape[0]
    seq = md.token_seq
    pos = md.positions
    hi = jnp.minimum(pos + 1, md.seq_lens[seq])
    lo_win = (jnp.zeros_like(pos) if sliding_window is None
              else jnp.maximum(pos + 1 - sliding_window, 0))
    if md.seq_group is None:
        plen = jnp.zeros((t,), jnp.int32)
        gpages = jnp.zeros((t, 1), jnp.int32) + page_offset
    else:
        grp = md.seq_group[seq]
        plen = jnp.where(grp >= 0, md.prefix_lens[seq], 0)
        gpages = md.group_page_table[jnp.maximum(grp, 0)] + page_offset
    pre = paged_attention_partial(q, k_cache, v_cache, gpages, lo_win, jnp.minimum(hi, plen),
                                  sm_scale=sm_scale)
    suf = paged_attention_partial(q, k_cache, v_cache, md.page_table[seq] + page_offset,
                                  jnp.maximum(lo_win, plen), hi, sm_scale=sm_scale)
    return pre, suf


def cascade_attention(q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0,
                      sm_scale: float, sliding_window: Optional[int] = None) -> jax.Array:
    """Shared-prefix attention as prefix partial + suffix partial + LSE merge (pure jnp).

    Equals `ragged_paged_attention` on every token that has at least one visible KV position;
    tokens with none (pad rows) give 0.
    """
    (o1, l1), (o2, l2) = cascade_attention_partials(
        q, k_cache, v_cache, md, page_offset=page_offset, sm_scale=sm_scale,
        sliding_window=sliding_window)
    o, _ = merge_partials(o1, l1, o2, l2)
    return o.astype(q.dtype)
