"""LSE merge of the attention kernel's partials as a Pallas (Triton) kernel (opt-in:
JAXSERVE_MERGE=pallas; the default is the XLA merge, `kernel.merge`).

The attention kernel writes one partial (output normalised over its KV range, log-sum-exp) per
query row and item; `merge_idx` [T * G, K] lists each row's partials, -1 padded to K, the
step's most partials per row. The XLA merge gathers all K slots of every row and combines them.
Here each program takes a block of RB query rows of one KV head and reads only the partials
that exist: the loads of slot k are masked by merge_idx >= 0, and a masked lane fetches
nothing. Two passes over the K slots: the log-sum-exps alone (4 bytes a slot) give the row's
maximum, then the outputs are read once and weighted. Rows are scattered straight into the
[T, Hq, D] output (q head h * G + j of token t), so no transpose follows.

Measured on the H200 (benchmarks/README.md, calls AA and AC) it loses to the XLA merge: at K = 2
(every slot used) 86-106 us against 76-95 us a layer; in BatchLLM's steps (K = 12-13, most
slots empty) 1.51 s against 1.04 s of the x0.25 run, with every row's K masked slots still
stepped through. Its loops now stop at the last slot the block's rows use (what the XLA merge,
gathering all K for every row, cannot do); not measured on the device yet.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MIN_BLOCK_ROWS = 16      # fewer rows a program than this: the caller takes the XLA merge
MAX_BLOCK_ROWS = 64


def block_rows(tg: int):
    """Rows per program: the largest power of two up to MAX_BLOCK_ROWS dividing T * G (every
    program writes whole rows and none runs past the end), or None where that is below
    MIN_BLOCK_ROWS (an odd token count: the caller uses the XLA merge)."""
    rb = MAX_BLOCK_ROWS
    while rb >= MIN_BLOCK_ROWS:
        if tg % rb == 0:
            return rb
        rb //= 2
    return None


def _kernel(midx_ref, *refs, parts, k: int, g: int, hq: int, rb: int):
    *part_refs, out_ref = refs
    h = pl.program_id(0)
    r0 = pl.program_id(1) * rb
    rows = r0 + lax.broadcasted_iota(jnp.int32, (rb,), 0)             # [RB] t * G + j
    d = out_ref.shape[-1]

    def slot(kk):
        """Row-wise (flat partial index, mask) of each part for slot kk."""
        idx = midx_ref[pl.ds(r0, rb), kk]                              # [RB]
        out, base = [], 0
        for w, hkv, bm in parts:
            local = idx - base
            mine = (idx >= 0) & (local >= 0) & (local < w * bm)
            local = jnp.where(mine, local, 0)
            flat = (lax.div(local, bm) * hkv + h) * bm + lax.rem(local, bm)
            out.append((flat, mine))
            base += w * bm
        return out

    def load_lse(kk):
        v = jnp.full((rb,), -jnp.inf, jnp.float32)
        for (flat, mine), (o_ref, lse_ref) in zip(slot(kk), _pairs(part_refs)):
            v = jnp.where(mine, pltriton.load(lse_ref.at[flat], mask=mine, other=-jnp.inf), v)
        return v

    # Loops over the slots, not unrolled: with K unrolled (K masked [RB, D] gathers per part)
    # BatchLLM's step programs (K = 12-13) compiled ~2.5x slower than before and a document run
    # did not finish compiling in 270 s (H200, benchmarks/README.md call AC). They run to the
    # last slot any row of the block uses, not to K: K is the bucket's bound (a long row's
    # chunks), and most rows of a step have one to three partials.
    def last_used(kk, n):
        used = jnp.max((midx_ref[pl.ds(r0, rb), kk] >= 0).astype(jnp.int32))
        return jnp.maximum(n, used * (kk + 1))

    n = lax.fori_loop(0, k, last_used, jnp.int32(0))
    mx = lax.fori_loop(0, n, lambda kk, mx: jnp.maximum(mx, load_lse(kk)),
                       jnp.full((rb,), -jnp.inf, jnp.float32))
    mx = jnp.where(mx > -jnp.inf, mx, 0.0)
    # Both dimensions indexed by arrays (row gather x all columns): the form both the Triton
    # lowering and interpret mode take for a masked gather.
    cols = lax.broadcasted_iota(jnp.int32, (1, d), 1)

    def accumulate(kk, carry):
        acc, den = carry
        wgt = jnp.exp(load_lse(kk) - mx)                               # -inf (no partial) -> 0
        for (flat, mine), (o_ref, _) in zip(slot(kk), _pairs(part_refs)):
            m2 = jnp.broadcast_to(mine[:, None], (rb, d))
            o_k = pltriton.load(o_ref.at[flat[:, None], cols], mask=m2,
                                other=0.0).astype(jnp.float32)
            acc = acc + wgt[:, None] * o_k
        return acc, den + wgt

    acc, den = lax.fori_loop(0, n, accumulate, (jnp.zeros((rb, d), jnp.float32),
                                                jnp.zeros((rb,), jnp.float32)))
    out = acc / jnp.where(den > 0, den, 1.0)[:, None]
    qrow = lax.div(rows, g) * hq + h * g + lax.rem(rows, g)
    pltriton.store(out_ref.at[qrow[:, None], cols], out.astype(out_ref.dtype))


def _pairs(flat_refs):
    return list(zip(flat_refs[0::2], flat_refs[1::2]))


def merge(parts, merge_idx, t: int, hkv: int, g: int, out_dtype, *, interpret: bool = False):
    """Same contract as `kernel.merge`: `parts` [(o [W, Hkv, BM, D], lse [W, Hkv, BM])] (one per
    launch), merge_idx [T * G, K] -> [T, Hkv * G, D], rows with no partial 0. T * G must have a
    power-of-two divisor of at least MIN_BLOCK_ROWS (`block_rows`)."""
    tg, k = merge_idx.shape
    if tg != t * g:
        raise ValueError(f"merge_idx has {tg} rows, expected {t} x {g}")
    rb = block_rows(tg)
    if rb is None:
        raise ValueError(f"{tg} query rows have no power-of-two block of >= {MIN_BLOCK_ROWS}")
    d = parts[0][0].shape[-1]
    hq = hkv * g
    shapes = tuple((o.shape[0], o.shape[1], o.shape[2]) for o, _ in parts)
    flat = []
    specs = [pl.BlockSpec(merge_idx.shape, lambda h, i: (0, 0))]
    for o, lse in parts:
        n = o.shape[0] * o.shape[1] * o.shape[2]
        flat += [o.reshape(n, d), lse.reshape(n)]
        specs += [pl.BlockSpec((n, d), lambda h, i: (0, 0)), pl.BlockSpec((n,), lambda h, i: (0,))]
    out = pl.pallas_call(
        functools.partial(_kernel, parts=shapes, k=k, g=g, hq=hq, rb=rb),
        grid=(hkv, tg // rb),
        in_specs=specs,
        out_specs=pl.BlockSpec((t * hq, d), lambda h, i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((t * hq, d), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"merge_partials_k{k}",
    )(merge_idx, *flat)
    return out.reshape(t, hq, d)
