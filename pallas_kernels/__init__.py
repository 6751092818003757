"""Attention over the paged KV cache behind one interface.

`ragged_paged_attention(q, k_cache, v_cache, md, spec=...)` computes causal attention for one step's
ragged token batch (prefill chunks and decode tokens of many requests). Implementations
(`IMPLEMENTATIONS`):
  - "reference": pure jnp (gathers pages); the oracle of every test and the CPU path.
  - "pallas_gpu": the GPU Pallas kernel (Triton lowering), `pallas_kernels.gpu`: one launch over
    work items covers prefill chunks, decode tokens and shared-prefix (cascade) groups.
  - "pallas_gpu_interpret": the same kernel in Pallas interpret mode (CPU tests).
  - "pallas_tpu": the TPU Pallas (Mosaic) kernels, `pallas_kernels.tpu`: they read the step's
    shared-prefix groups (`md.groups`) themselves. Compiled on a TPU backend, in TPU interpret
    mode elsewhere (CPU tests run the whole engine through them).

Each implementation says what metadata it reads beyond the base fields, and the runner builds it
through the three functions here, never anywhere else:
  - `host_prepare(md, groups, spec)`: on the host, per step, numpy: e.g. the GPU kernel's work
    list with the step's shared-prefix groups;
  - `device_prepare(md, spec)`: traced, once per step before the layer loop: e.g. the GPU kernel's
    no-sharing work list when the host built none;
  - `advance(md0, md, steps, spec)`: traced, for decode step `steps` of a fused block, given the
    block's first-step metadata `md0` and the advanced base fields in `md`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

from pallas_kernels import reference
from pallas_kernels.metadata import AttentionMetadata, PrefixGroups, WorkItems, layer_slots, write_kv


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static description of a model's attention (part of every compiled program's key)."""

    impl: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    # Use the step's shared-prefix groups (read a group's prefix once per step), where the
    # implementation supports them.
    shared_prefix: bool = False
    # Prefilling members' shared prefixes as one packed flash-attention call a step (GPU
    # backends; `packed_prefix_available` says where it can run).
    packed_prefix: bool = False


@dataclasses.dataclass(frozen=True)
class Backend:
    attention: Callable                        # (q, k, v, md, *, page_offset, sm_scale, sliding_window)
    supports_groups: bool = False
    host_prepare: Optional[Callable] = None    # (md, groups, spec) -> md        host, numpy
    device_prepare: Optional[Callable] = None  # (md, spec) -> md                traced
    advance: Optional[Callable] = None         # (md0, md, steps, spec) -> md    traced


# ---- GPU -------------------------------------------------------------------------------------

def _gpu_attention(interpret: bool):
    def attention(q, k_cache, v_cache, md, **kw):
        from pallas_kernels.gpu import kernel
        return kernel.ragged_paged_attention(q, k_cache, v_cache, md, interpret=interpret, **kw)
    return attention


def _gpu_host_prepare(md: AttentionMetadata, groups, spec: AttentionSpec) -> AttentionMetadata:
    if not spec.shared_prefix:
        return md          # the device builds a no-sharing list (device_prepare)
    from pallas_kernels.gpu import block_sizes, cascade

    lay = block_sizes.host_layout(md.num_tokens, md.num_seqs, md.pages_per_seq,
                                  num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
                                  page_size=spec.page_size, head_dim=spec.head_dim,
                                  packed=spec.packed_prefix)
    work = cascade.build_cascade_work(
        md, groups, num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
        page_size=spec.page_size, block_rows=lay["block_rows"], block_kv=lay["block_kv"],
        num_sms=lay["num_sms"], waves=lay["waves"], num_items=lay["num_items"],
        num_partials=lay["num_partials"], own_block_rows=lay["own_block_rows"],
        num_own_items=lay["num_own_items"], packed_segments=lay["packed_segments"],
        packed_pages=lay["packed_pages"])
    return dataclasses.replace(md, work=work)


def _gpu_device_prepare(md: AttentionMetadata, spec: AttentionSpec) -> AttentionMetadata:
    if md.work is not None:
        return md
    from pallas_kernels.gpu import work_items

    return dataclasses.replace(md, work=work_items.device_work_items(
        md, num_q_heads=spec.num_q_heads, num_kv_heads=spec.num_kv_heads,
        page_size=spec.page_size, head_dim=spec.head_dim))


def _gpu_advance(md0: AttentionMetadata, md: AttentionMetadata, steps,
                 spec: AttentionSpec) -> AttentionMetadata:
    if md0.work is None:
        return dataclasses.replace(md, work=None)   # device_prepare rebuilds it for this step
    from pallas_kernels.gpu import work_items

    return dataclasses.replace(md, work=work_items.advance_work_items(md0.work, steps,
                                                                      spec.page_size))


_GPU = dict(supports_groups=True, host_prepare=_gpu_host_prepare,
            device_prepare=_gpu_device_prepare, advance=_gpu_advance)


# ---- TPU -------------------------------------------------------------------------------------

def _tpu_attention(q, k_cache, v_cache, md, **kw):
    from pallas_kernels.tpu import kernel
    return kernel.ragged_paged_attention(q, k_cache, v_cache, md, **kw)


def _tpu_host_prepare(md: AttentionMetadata, groups, spec: AttentionSpec) -> AttentionMetadata:
    # The kernels build their work lists from the groups with jnp inside the step (fused decode
    # steps included: the groups do not move), so the host only hands the groups on.
    return dataclasses.replace(md, groups=groups) if groups is not None else md


IMPLEMENTATIONS: dict[str, Backend] = {
    "reference": Backend(reference.ragged_paged_attention),
    "pallas_gpu": Backend(_gpu_attention(False), **_GPU),
    "pallas_gpu_interpret": Backend(_gpu_attention(True), **_GPU),
    "pallas_tpu": Backend(_tpu_attention, supports_groups=True, host_prepare=_tpu_host_prepare),
}


def packed_prefix_available(impl: str, dtype, head_dim: int,
                            sliding_window: Optional[int]) -> bool:
    """Whether `AttentionSpec.packed_prefix` can be on: the GPU backends, no sliding window (a
    segment sees its whole prefix), the switch on (JAXSERVE_PACKED_PREFIX), and cuDNN's packed
    layout on the device (interpret mode: its jnp form)."""
    if impl not in ("pallas_gpu", "pallas_gpu_interpret") or sliding_window is not None:
        return False
    from pallas_kernels.gpu import block_sizes, packed_prefix
    if not block_sizes.packed_prefix_enabled():
        return False
    return impl == "pallas_gpu_interpret" or packed_prefix.use_cudnn(dtype, head_dim)


def default_impl() -> str:
    """"pallas_gpu" on a CUDA backend, "pallas_tpu" on a TPU, else the pure-jnp reference."""
    try:
        backend_name = jax.default_backend()
    except RuntimeError:  # pragma: no cover - no backend initialised
        return "reference"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend_name, "reference")


def backend(impl: str) -> Backend:
    try:
        return IMPLEMENTATIONS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; "
                         f"available: {sorted(IMPLEMENTATIONS)}") from None


def uses_groups(spec: AttentionSpec) -> bool:
    """Whether the runner should hand this step's shared-prefix groups to `host_prepare`."""
    return spec.shared_prefix and backend(spec.impl).supports_groups


def host_prepare(md: AttentionMetadata, groups: Optional[PrefixGroups],
                 spec: AttentionSpec) -> AttentionMetadata:
    fn = backend(spec.impl).host_prepare
    return fn(md, groups if uses_groups(spec) else None, spec) if fn else md


def device_prepare(md: AttentionMetadata, spec: AttentionSpec) -> AttentionMetadata:
    fn = backend(spec.impl).device_prepare
    return fn(md, spec) if fn else md


def advance(md0: AttentionMetadata, md: AttentionMetadata, steps,
            spec: AttentionSpec) -> AttentionMetadata:
    fn = backend(spec.impl).advance
    return fn(md0, md, steps, spec) if fn else md


def ragged_paged_attention(q, k_cache, v_cache, md: AttentionMetadata, *, spec: AttentionSpec,
                           page_offset=0, sm_scale: float,
                           sliding_window: Optional[int] = None) -> jax.Array:
    return backend(spec.impl).attention(q, k_cache, v_cache, md, page_offset=page_offset,
                                        sm_scale=sm_scale, sliding_window=sliding_window)


__all__ = ["AttentionMetadata", "AttentionSpec", "PrefixGroups", "WorkItems",
           "ragged_paged_attention", "host_prepare", "device_prepare", "advance", "uses_groups",
           "write_kv", "layer_slots", "IMPLEMENTATIONS", "default_impl", "backend",
           "packed_prefix_available"]
