"""The prefilling members' shared prefixes as one packed flash-attention call (`PackedPrefix`).

A step's work list may hand the prefixes of groups whose members prefill to this path instead of
the kernel's shared items: their query tokens are gathered into packed rows (segment by segment),
each segment's prefix pages into one contiguous KV buffer, and one call computes every
segment's rows against its prefix, with the log-sum-exp the LSE merge needs. No mask but the
segments' is needed: every key of a prefix precedes every query of its members.

On a CUDA GPU with a Hopper-class chip the call is cuDNN's flash attention in its packed (THD)
layout (`jax._src.cudnn.fused_attention_stablehlo`, `q_offsets` / `kv_offsets`,
`return_residual=True`): on the H200 it runs the prefix part of BatchLLM's and the document
workload's prefill steps at 455-690 TFLOP/s, where the kernel's 64-row shared items reach
200-300 (benchmarks/README.md, calls AA-AB). Elsewhere (CPU tests, interpret mode) the same
function in jnp (`segments_reference`).

cuDNN's residual is the softmax statistic of shape [NS, Hq, Tp]: segment s's rows at their index
within the segment (`_lse_of_rows` reads it so).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import MASK_VALUE
from pallas_kernels.metadata import PackedPrefix


def gather_inputs(q, k_cache, v_cache, packed: PackedPrefix, page_offset):
    """q [T, Hq, D] and the caches [Hkv, pages, ps, D] -> packed q [1, Tp, Hq, D] and the
    segments' contiguous K, V [1, C * ps, Hkv, D] (cuDNN's BTNH layout)."""
    hkv, _, ps, d = k_cache.shape
    qp = q[packed.q_tokens][None]
    pages = packed.kv_pages + page_offset

    def kv(cache):
        return cache[:, pages].transpose(1, 2, 0, 3).reshape(1, -1, hkv, d)

    return qp, kv(k_cache), kv(v_cache)


def _row_bounds(packed: PackedPrefix):
    """Per packed row: its segment's KV range [lo, hi), empty for rows outside every segment."""
    seg = packed.q_seg
    rows = jnp.arange(seg.shape[0], dtype=jnp.int32)
    qo, ql = packed.q_offsets[seg], packed.q_lens[seg]
    inside = (ql > 0) & (rows >= qo) & (rows < qo + ql)
    lo = packed.kv_offsets[seg]
    hi = jnp.where(inside, lo + packed.kv_lens[seg], lo)
    return lo, hi


def segments_reference(qp, kp, vp, packed: PackedPrefix, *, sm_scale: float):
    """The packed call in jnp, float32 (CPU tests): qp [1, Tp, Hq, D], kp/vp [1, Tk, Hkv, D] ->
    (o [Tp, Hq, D] in qp's dtype, lse [Tp, Hq]; rows outside every segment: 0 and -inf)."""
    _, tp, hq, d = qp.shape
    hkv = kp.shape[2]
    g = hq // hkv
    prec = lax.Precision.HIGHEST
    q = qp[0].reshape(tp, hkv, g, d).astype(jnp.float32)
    k, v = kp[0].astype(jnp.float32), vp[0].astype(jnp.float32)
    s = jnp.einsum("phgd,khd->phgk", q, k, precision=prec) * sm_scale
    lo, hi = _row_bounds(packed)
    kpos = jnp.arange(k.shape[0], dtype=jnp.int32)
    valid = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])      # [Tp, Tk]
    s = jnp.where(valid[:, None, None, :], s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - m), 0.0)
    den = jnp.sum(p, axis=-1)
    o = jnp.einsum("phgk,khd->phgd", p, v, precision=prec) / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.where(den > 0, m[..., 0] + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return o.reshape(tp, hq, d).astype(qp.dtype), lse.reshape(tp, hq)


def _cudnn(qp, kp, vp, packed: PackedPrefix, *, sm_scale: float):
    """cuDNN's packed flash attention: (o [Tp, Hq, D], lse [Tp, Hq])."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    o, stat = fa.dot_product_attention(
        qp, kp, vp, q_seqlen=packed.q_lens[None], kv_seqlen=packed.kv_lens[None],
        q_offsets=packed.q_offsets[None], kv_offsets=packed.kv_offsets[None], scale=sm_scale,
        mask_type=fa.MaskType.PADDING, return_residual=True)
    return o[0], _lse_of_rows(stat, packed)


def _lse_of_rows(stat, packed: PackedPrefix):
    """cuDNN's statistic [NS, Hq, Tp] (segment s's rows at their index within it) -> [Tp, Hq]."""
    seg = packed.q_seg
    local = jnp.arange(seg.shape[0], dtype=jnp.int32) - jnp.maximum(packed.q_offsets[seg], 0)
    local = jnp.clip(local, 0, stat.shape[-1] - 1)
    return stat[seg, :, local]


def use_cudnn(dtype, head_dim: int) -> bool:
    """cuDNN's packed layout: a CUDA GPU of compute capability >= 9.0, bf16/f16, head dim a
    multiple of 8 up to 256."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if head_dim % 8 or head_dim > 256:
        return False
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    if dev.platform != "gpu" or not hasattr(dev, "compute_capability"):
        return False
    return tuple(int(x) for x in dev.compute_capability.split(".")) >= (9, 0)


def partials(q, k_cache, v_cache, packed: PackedPrefix, page_offset, *, sm_scale: float,
             interpret: bool):
    """The segments' partials in the kernel's form: (o [Tp, Hkv, G, D], lse float32
    [Tp, Hkv, G]); q head j of KV head h is q head h * G + j."""
    tp = packed.q_tokens.shape[0]
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[0]
    qp, kp, vp = gather_inputs(q, k_cache, v_cache, packed, page_offset)
    if interpret:
        o, lse = segments_reference(qp, kp, vp, packed, sm_scale=sm_scale)
    elif use_cudnn(q.dtype, d):
        o, lse = _cudnn(qp, kp, vp, packed, sm_scale=sm_scale)
    else:
        # The jnp form materialises [Tp, Hq, Tk] scores: never at a real step's size.
        raise ValueError(f"packed prefix segments need cuDNN (a Hopper GPU, bf16/f16, head dim "
                         f"<= 256); got {q.dtype}, head dim {d} on {jax.devices()[0]}: build "
                         f"the work list without them (pallas_kernels.packed_prefix_available)")
    g = hq // hkv
    return o.reshape(tp, hkv, g, d), lse.astype(jnp.float32).reshape(tp, hkv, g)
