"""The prefilling members' shared prefixes as one packed flash-attention call (`PackedPrefix`).

A step's work list may hand the prefixes of groups whose members prefill to this path instead of
the kernel's shared items: segments are runs of the step's own tokens, read in place; each
segment's prefix pages are gathered into one contiguous KV buffer, and one call computes every
segment's tokens against its prefix, with the log-sum-exp the LSE merge needs, written in token
order (the merge takes it as one more partial of each token, no index needed). No mask but the
segments' is needed: every key of a prefix precedes every query of its members.

On a CUDA GPU with a Hopper-class chip the call is cuDNN's flash attention in its packed (THD)
layout (`jax._src.cudnn.fused_attention_stablehlo`, `q_offsets` / `kv_offsets`,
`return_residual=True`): on the H200 it runs the prefix part of BatchLLM's and the document
workload's prefill steps at 455-690 TFLOP/s, where the kernel's 64-row shared items reach
200-300 (benchmarks/README.md, calls AA-AB). Elsewhere (CPU tests, interpret mode) the same
function in jnp (`segments_reference`).

cuDNN's residual is the softmax statistic of shape [NS, Hq, T]: segment s's rows at their index
within the segment (`_lse_of_tokens` reads it so; checked on an H100, scripts/probe_cudnn_packed.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import MASK_VALUE
from pallas_kernels.metadata import PackedPrefix


def gather_kv(k_cache, v_cache, packed: PackedPrefix, page_offset):
    """The segments' prefixes as contiguous K, V [1, C * ps, Hkv, D] (cuDNN's BTNH layout) from
    the caches [Hkv, pages, ps, D]."""
    hkv, _, ps, d = k_cache.shape
    pages = packed.kv_pages + page_offset

    def kv(cache):
        return cache[:, pages].transpose(1, 2, 0, 3).reshape(1, -1, hkv, d)

    return kv(k_cache), kv(v_cache)


def segments_reference(q, kp, vp, packed: PackedPrefix, *, sm_scale: float):
    """The packed call in jnp, float32 (CPU tests): q [T, Hq, D], kp/vp [1, Tk, Hkv, D] ->
    (o [T, Hq, D] in q's dtype, lse [T, Hq]; tokens outside every segment: 0 and -inf)."""
    t, hq, d = q.shape
    hkv = kp.shape[2]
    g = hq // hkv
    prec = lax.Precision.HIGHEST
    qf = q.reshape(t, hkv, g, d).astype(jnp.float32)
    k, v = kp[0].astype(jnp.float32), vp[0].astype(jnp.float32)
    s = jnp.einsum("thgd,khd->thgk", qf, k, precision=prec) * sm_scale
    seg = packed.token_seg
    lo = packed.kv_offsets[jnp.maximum(seg, 0)]
    hi = jnp.where(seg >= 0, lo + packed.kv_lens[jnp.maximum(seg, 0)], lo)
    kpos = jnp.arange(k.shape[0], dtype=jnp.int32)
    valid = (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])       # [T, Tk]
    s = jnp.where(valid[:, None, None, :], s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(valid[:, None, None, :], jnp.exp(s - m), 0.0)
    den = jnp.sum(p, axis=-1)
    safe = jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("thgk,khd->thgd", p, v, precision=prec) / safe[..., None]
    lse = jnp.where(den > 0, m[..., 0] + jnp.log(safe), -jnp.inf)
    return o.reshape(t, hq, d).astype(q.dtype), lse.reshape(t, hq)


def _cudnn(q, kp, vp, packed: PackedPrefix, *, sm_scale: float):
    """cuDNN's packed flash attention over the step's queries in place: (o [T, Hq, D],
    lse [T, Hq], -inf outside every segment)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    o, stat = fa.dot_product_attention(
        q[None], kp, vp, q_seqlen=packed.q_lens[None], kv_seqlen=packed.kv_lens[None],
        q_offsets=packed.q_offsets[None], kv_offsets=packed.kv_offsets[None], scale=sm_scale,
        mask_type=fa.MaskType.PADDING, return_residual=True)
    return o[0], _lse_of_tokens(stat, packed)


def _lse_of_tokens(stat, packed: PackedPrefix):
    """cuDNN's statistic [NS, Hq, T] (segment s's rows at their index within it) -> [T, Hq],
    -inf for tokens outside every segment."""
    seg = packed.token_seg
    s = jnp.maximum(seg, 0)
    local = jnp.arange(seg.shape[0], dtype=jnp.int32) - jnp.maximum(packed.q_offsets[s], 0)
    local = jnp.clip(local, 0, stat.shape[-1] - 1)
    lse = stat[s, :, local]                                                      # [T, Hq]
    return jnp.where((seg >= 0)[:, None], lse, -jnp.inf)


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


def dense_partial(q, k_cache, v_cache, packed: PackedPrefix, page_offset, *, sm_scale: float,
                  interpret: bool):
    """The segments' partial of every step token, in token order: (o [T, Hq, D], lse float32
    [T, Hq], -inf for tokens in no segment), which the merge adds to each token's own partials."""
    d = q.shape[2]
    kp, vp = gather_kv(k_cache, v_cache, packed, page_offset)
    if interpret:
        o, lse = segments_reference(q, kp, vp, packed, sm_scale=sm_scale)
    elif use_cudnn(q.dtype, d):
        o, lse = _cudnn(q, kp, vp, packed, sm_scale=sm_scale)
    else:
        # The jnp form materialises [T, Hq, Tk] scores: never at a real step's size.
        raise ValueError(f"packed prefix segments need cuDNN (a Hopper GPU, bf16/f16, head dim "
                         f"<= 256); got {q.dtype}, head dim {d} on {jax.devices()[0]}: build "
                         f"the work list without them (pallas_kernels.packed_prefix_available)")
    return o, lse.astype(jnp.float32)
