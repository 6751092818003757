"""Per-step attention metadata: the one description of a ragged token batch that every attention
implementation (reference, GPU Pallas, TPU Pallas) reads.

Shapes are static per bucket (T tokens, S sequences, P pages per sequence); the host fills the
arrays with numpy and pads: pad tokens belong to a pad sequence with `seq_lens == 0` and write their
K/V into the sink page 0, which is never handed to a request.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WorkItems:
    """Precomputed work list of the GPU attention kernel (`pallas_kernels.gpu`).

    A work item is (a block of BM query rows, one KV range over one page-table row). A query row is
    (token t, q head j within its KV head's group of G), encoded `t * G + j`; the kernel runs every
    item once per KV head and writes a partial (output, log-sum-exp) per row; `merge_idx` lists,
    for every query row, the partials to merge. Shared-prefix groups become items whose rows are
    all the group members' rows and whose page-table row is the group's prefix (read once per row
    block instead of once per request). Built on the host by
    `pallas_kernels.cascade.build_cascade_metadata` (numpy) or on device by
    `pallas_kernels.gpu.build_work_items` (jnp, no sharing).
    """

    page_table: jax.Array  # int32[NR * PW] flattened page-table rows (layer-local page ids)
    pt_base: jax.Array     # int32[W]      offset of the item's row in `page_table` (row * PW)
    kv_start: jax.Array    # int32[W]      KV positions [kv_start, kv_end) of the item ...
    kv_end: jax.Array      # int32[W]      ... (kv_end <= kv_start: empty item, partials -inf)
    rows: jax.Array        # int32[W, BM]  query row t * G + j of each row slot (0 for pad slots)
    row_hi: jax.Array      # int32[W, BM]  causal limit of the slot, min(pos + 1, seq_len); 0 = pad
    merge_idx: jax.Array   # int32[T * G, K] flat w * BM + i of each partial of a query row, -1 none

    # Pages per page-table row (static: the kernel reads `pages_per_block` pages at a time and
    # the width is a multiple of it, so no read leaves its row).
    pt_width: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def block_rows(self) -> int:
        return self.rows.shape[1]


def advance_work_items(work: WorkItems, steps, page_size: int) -> WorkItems:
    """The work list of a decode step `steps` tokens later, from the list built for a decode step
    (one token per row): every row's causal limit moves by `steps`, and so does the end of each
    item that reaches its rows' limits (the item holding the rows' newest tokens); items that end
    before (a shared prefix, an earlier chunk of a split range) are unchanged, and so are the
    partials each row merges. Lets a fused block of decode steps keep the host-built shared-prefix
    list of its first step instead of falling back to reading every row's whole context.
    Limits are capped at the page-table width (rows that finished inside the block keep
    computing into discarded outputs)."""
    cap = work.pt_width * page_size
    live = work.row_hi > 0
    item_hi = jnp.max(work.row_hi, axis=1)
    tail = (work.kv_end > work.kv_start) & (work.kv_end >= item_hi)
    return dataclasses.replace(
        work,
        kv_end=jnp.where(tail, jnp.minimum(work.kv_end + steps, cap), work.kv_end),
        row_hi=jnp.where(live, jnp.minimum(work.row_hi + steps, cap), 0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Layout of one step's ragged batch over the paged KV cache.

    KV cache layout (per K and V): `[num_kv_heads, num_layers * num_pages, page_size, head_dim]`.
    Layer `l` owns pages `[l * num_pages, (l + 1) * num_pages)`; page ids here are layer-local and the
    model adds `layer * num_pages` (see `layer_page_offset`), so one array is carried through the
    layer scan and never sliced (slicing it would copy every layer's KV into the kernel each step).
    """

    positions: jax.Array      # int32[T]   absolute position of each token in its sequence
    token_seq: jax.Array      # int32[T]   sequence row of each token (pad tokens -> a pad row)
    slot_mapping: jax.Array   # int32[T]   layer-local flat slot (page * page_size + offset) for the new K/V
    query_start: jax.Array    # int32[S+1] tokens of row s are [query_start[s], query_start[s+1])
    seq_lens: jax.Array       # int32[S]   KV length of row s after this step's tokens (0 for pad rows)
    page_table: jax.Array     # int32[S, P] layer-local page ids of row s (pad entries -> sink page 0)
    # Shared-prefix (cascade) groups, all optional: None means no sharing in this step.
    # Row s's first `prefix_lens[s]` KV tokens are its group's shared prefix, stored in the pages
    # `group_page_table[seq_group[s]]`; the same pages also start `page_table[s]`, so a kernel that
    # ignores the groups still computes the right answer.
    seq_group: Optional[jax.Array] = None         # int32[S]  group id of row s, -1 for none
    prefix_lens: Optional[jax.Array] = None       # int32[S]  shared KV tokens of row s (0 for none)
    group_page_table: Optional[jax.Array] = None  # int32[G, Pg] pages of each group's shared prefix
    group_lens: Optional[jax.Array] = None        # int32[G]  shared prefix length of each group
    # Precomputed GPU work list (see `WorkItems`); set by `pallas_kernels.build_cascade_metadata`
    # on the host when groups are used. None: the GPU kernel builds a no-sharing list on device.
    work: Optional[WorkItems] = None

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def pages_per_seq(self) -> int:
        return self.page_table.shape[1]


def layer_slots(md: AttentionMetadata, layer: jax.Array, num_pages: int, page_size: int) -> jax.Array:
    """Global flat slots of this step's new tokens in `layer`'s part of the cache."""
    return md.slot_mapping + layer * (num_pages * page_size)


def write_kv(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
             slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V `[T, Hkv, D]` into the caches at global flat `slots` `[T]`.

    The caches are reshaped to `[Hkv, pages * page_size, D]` (a bitcast) so the update is one
    scatter per cache; XLA performs it in place on the donated/carried buffer.
    """
    hkv, npages, ps, d = k_cache.shape
    kf = k_cache.reshape(hkv, npages * ps, d).at[:, slots].set(
        jnp.swapaxes(k, 0, 1).astype(k_cache.dtype), mode="promise_in_bounds")
    vf = v_cache.reshape(hkv, npages * ps, d).at[:, slots].set(
        jnp.swapaxes(v, 0, 1).astype(v_cache.dtype), mode="promise_in_bounds")
    return kf.reshape(k_cache.shape), vf.reshape(v_cache.shape)
