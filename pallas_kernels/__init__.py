"""Attention over the paged KV cache behind one interface.

`ragged_paged_attention(q, k_cache, v_cache, md, impl=...)` computes causal attention for one
step's ragged token batch (prefill chunks and decode tokens of many requests). Implementations:
  - "reference": pure jnp (gather pages); the oracle for every test and the CPU path.
Others register themselves in `IMPLEMENTATIONS`.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

from pallas_kernels.metadata import AttentionMetadata, layer_slots, write_kv
from pallas_kernels import reference

IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference.ragged_paged_attention,
}


def default_impl() -> str:
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


__all__ = ["AttentionMetadata", "ragged_paged_attention", "write_kv", "layer_slots",
           "IMPLEMENTATIONS", "default_impl"]
