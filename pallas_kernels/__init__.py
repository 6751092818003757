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
