"""Attention over the paged KV cache behind one interface.

`ragged_paged_attention(q, k_cache, v_cache, md, impl=...)` computes causal attention for one
step's ragged token batch (prefill chunks and decode tokens of many requests). Implementations:
  - "reference": pure jnp (gather pages); the oracle for every test and the CPU path.
  - "pallas_gpu": GPU Pallas kernel (Triton lowering), `pallas_kernels.gpu`; one launch over
    work items covers prefill chunks, decode tokens and shared-prefix (cascade) groups. The
    groups are used when `md.work` was built by `build_cascade_metadata` (host, numpy); without
    it the kernel builds a no-sharing work list on device (still correct, since `page_table`
    also covers the prefix pages).
  - "pallas_gpu_interpret": the same kernel in Pallas interpret mode (CPU tests).
Others register themselves in `IMPLEMENTATIONS`.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

from pallas_kernels.metadata import AttentionMetadata, layer_slots, write_kv
from pallas_kernels import reference
from pallas_kernels.metadata import WorkItems
from pallas_kernels.cascade import build_cascade_metadata


def _pallas_gpu(q, k_cache, v_cache, md, **kw):
    from pallas_kernels import gpu
    return gpu.ragged_paged_attention(q, k_cache, v_cache, md, **kw)


def _pallas_gpu_interpret(q, k_cache, v_cache, md, **kw):
    from pallas_kernels import gpu
    return gpu.ragged_paged_attention(q, k_cache, v_cache, md, interpret=True, **kw)


IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference.ragged_paged_attention,
    "pallas_gpu": _pallas_gpu,
    "pallas_gpu_interpret": _pallas_gpu_interpret,
}


PALLAS_GPU = ("pallas_gpu", "pallas_gpu_interpret")


def prepare_step(md: AttentionMetadata, *, impl: str, num_q_heads: int, num_kv_heads: int,
                 page_size: int, head_dim: int) -> AttentionMetadata:
    """Per-step work done once before the layer loop (traceable): the GPU kernel's work list."""
    if impl in PALLAS_GPU and md.work is None:
        from pallas_kernels import gpu

        return gpu.with_work_items(md, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                   page_size=page_size, head_dim=head_dim)
    return md


def cascade_layout(num_tokens: int, num_seqs: int, pages_per_seq: int, *, num_q_heads: int,
                   num_kv_heads: int, page_size: int, head_dim: int, num_sms: int = 132,
                   waves: float = 2.0) -> dict:
    """Static sizes of a host-built shared-prefix work list for one step bucket.

    Items: each row's own part in blocks of bm/g tokens (<= T/bq + S), each group's member rows in
    blocks of bm (<= T*g/bm + groups, groups <= S/2), plus the pieces long ranges are cut into
    (<= 2 per item longer than a chunk, and chunks are >= total/target, so <= 2*target of them).
    Partials per query row: the chunks of its prefix and of its suffix (chunks >= 256 tokens).
    """
    from pallas_kernels import gpu

    g = num_q_heads // num_kv_heads
    # 64-row items in every bucket, decode buckets included: a group's prefix is read once per
    # row block of its members' rows, so 16-row blocks read it 4x as often. H100, document
    # workload (64 questions x 4 heads = 256 rows per group and KV head): with 16-row blocks the
    # prefix reads made attention 4.2 s of 6.9 s of GPU time (profile_document_x0.25_*_s3).
    # Suffix items hold one decode token's G rows either way; their tiles were never the cost.
    bm = max(64, gpu._pow2_at_least(g))
    bq = max(1, bm // g)
    dp = gpu._pow2_at_least(max(head_dim, 16))
    block_kv = gpu._default_block_kv(dp, page_size)
    target = max(1, int(waves * num_sms / num_kv_heads))
    items = (-(-num_tokens // bq) + num_seqs + -(-num_tokens * g // bm) + num_seqs // 2
             + 2 * target)
    items = -(-items // 64) * 64
    partials = -(-pages_per_seq * page_size // 256) + 3
    ppb = block_kv // page_size
    pw = -(-pages_per_seq // ppb) * ppb
    return dict(block_rows=bm, block_kv=block_kv, num_items=items, num_partials=partials,
                num_groups=num_seqs, pt_width=pw, num_sms=num_sms, waves=waves)


def default_impl() -> str:
    """"pallas_gpu" on a CUDA backend, else the pure-jnp reference."""
    try:
        if jax.default_backend() == "gpu":
            return "pallas_gpu"
    except RuntimeError:  # pragma: no cover - no backend initialised
        pass
    return "reference"


def ragged_paged_attention(q, k_cache, v_cache, md: AttentionMetadata, *, page_offset=0,
                           sm_scale: float, sliding_window: Optional[int] = None,
                           impl: str = "reference") -> jax.Array:
    try:
        fn = IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"available: {sorted(IMPLEMENTATIONS)}") from None
    return fn(q, k_cache, v_cache, md, page_offset=page_offset, sm_scale=sm_scale,
              sliding_window=sliding_window)


__all__ = ["AttentionMetadata", "WorkItems", "ragged_paged_attention", "write_kv", "layer_slots",
           "build_cascade_metadata", "IMPLEMENTATIONS", "default_impl"]
