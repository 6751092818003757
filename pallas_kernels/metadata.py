"""Per-step attention metadata: the device-side description of one step's ragged token batch over
the paged KV cache, read by every attention implementation.

Shapes are static per bucket (T tokens, S sequence rows, P pages per row); the runner fills the
arrays on the host with numpy and pads them: pad tokens belong to a pad row with `seq_lens == 0`
and write their K/V into the sink page 0, which is never handed to a request.

Only what a kernel reads on the device lives here. The two optional parts are set by the runner
for the implementations that read them (`pallas_kernels.host_prepare`):
  * `groups` (`PrefixGroups`): shared-prefix groups as device arrays, for implementations that
    split attention into a group prefix part and a per-row suffix part themselves (TPU);
  * `work` (`WorkItems`): the GPU kernel's precomputed work list, built from the groups on the
    host or, without sharing, on the device before the layer loop.

KV cache layout (per K and V): `[num_kv_heads, num_layers * num_pages, page_size, head_dim]`.
Layer `l` owns pages `[l * num_pages, (l + 1) * num_pages)`; page ids here are layer-local and the
model passes `page_offset = layer * num_pages`, so one array is carried through the layer loop and
never sliced (a slice would copy every layer's KV into the kernel each step).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixGroups:
    """One level of shared-prefix groups in a step. Row s's first `prefix_lens[s]` KV tokens are
    its group's shared prefix, held in the pages `page_table[seq_group[s]]`; the same pages also
    start the row's own page table, so an implementation that ignores the groups still computes
    the right answer. Shared prefixes are whole pages."""

    seq_group: jax.Array     # int32[S]     group of row s, -1 for none
    prefix_lens: jax.Array   # int32[S]     shared KV tokens of row s (0 for none)
    page_table: jax.Array    # int32[G, Pg] layer-local pages of each group's prefix
    lens: jax.Array          # int32[G]     prefix length of each group (0: unused group slot)

    @property
    def num_groups(self) -> int:
        return self.lens.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OwnItems:
    """A second item list of a host-built `WorkItems`, with its own row-block size BM' (decode-sized
    items for the requests' own parts beside 64-row shared-prefix items): the same fields as the
    first list's, over the same page table, run as a second kernel launch; the first list's
    `merge_idx` addresses its partials after the first list's (flat W * BM + w * BM' + i)."""

    pt_base: jax.Array     # int32[W']
    kv_start: jax.Array    # int32[W']
    kv_end: jax.Array      # int32[W']
    rows: jax.Array        # int32[W', BM']
    row_hi: jax.Array      # int32[W', BM']

    @property
    def block_rows(self) -> int:
        return self.rows.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedPrefix:
    """The shared prefixes of a step's prefilling group members as dense segments, for one packed
    flash-attention call (cuDNN's THD layout on the GPU) instead of the kernel's shared items.

    Segment s is a run of consecutive step tokens `[q_offsets[s], q_offsets[s] + q_lens[s])`, all
    of one (group, prefix length) set and each seeing the whole prefix, against that prefix,
    gathered from `kv_pages` into one contiguous KV buffer at tokens `[kv_offsets[s],
    kv_offsets[s] + kv_lens[s])`. The call reads the step's queries in place and writes its
    output in token order, so the merge takes it as one more partial of every token
    (`token_seg` >= 0) without an index. No mask but the segments' is needed: every key of a
    prefix precedes every query of its members. Unused segment slots hold -1 (cuDNN's
    convention).
    """

    token_seg: jax.Array   # int32[T]      segment of step token t (-1: none)
    q_lens: jax.Array      # int32[NS]     tokens of segment s (-1: unused slot)
    q_offsets: jax.Array   # int32[NS + 1] first token of segment s, then the last one's end (-1)
    kv_pages: jax.Array    # int32[C]      layer-local pages of the contiguous KV (pad: sink 0)
    kv_lens: jax.Array     # int32[NS]     prefix tokens of segment s (-1: unused slot)
    kv_offsets: jax.Array  # int32[NS + 1] first KV token of segment s, then the end (-1: unused)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WorkItems:
    """Work list of the GPU attention kernel (`pallas_kernels.gpu`).

    A work item is (a block of BM query rows, one KV range over one page-table row). A query row is
    (token t, q head j within its KV head's group of G), encoded `t * G + j`; the kernel runs every
    item once per KV head and writes a partial (output, log-sum-exp) per row; `merge_idx` lists,
    for every query row, the partials to merge. Shared-prefix groups become items whose rows are
    all the group members' rows and whose page-table row is the group's prefix (read once per row
    block instead of once per request).
    """

    page_table: jax.Array  # int32[NR * PW] flattened page-table rows (layer-local page ids)
    pt_base: jax.Array     # int32[W]      offset of the item's row in `page_table` (row * PW)
    kv_start: jax.Array    # int32[W]      KV positions [kv_start, kv_end) of the item ...
    kv_end: jax.Array      # int32[W]      ... (kv_end <= kv_start: empty item, partials -inf)
    rows: jax.Array        # int32[W, BM]  query row t * G + j of each row slot (0 for pad slots)
    row_hi: jax.Array      # int32[W, BM]  causal limit of the slot, min(pos + 1, seq_len); 0 = pad
    merge_idx: jax.Array   # int32[T * G, K] flat w * BM + i of each partial of a query row, -1 none
    own: Optional[OwnItems] = None   # a second list of smaller items (host-built lists only)
    # Prefilling members' shared prefixes as dense segments (host-built lists of prefill buckets).
    packed: Optional[PackedPrefix] = None

    # Pages per page-table row (static: the kernel reads `pages_per_block` pages at a time and
    # the width is a multiple of it, so no read leaves its row).
    pt_width: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def block_rows(self) -> int:
        return self.rows.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Layout of one step's ragged batch over the paged KV cache (see the module docstring)."""

    positions: jax.Array      # int32[T]    absolute position of each token in its sequence
    token_seq: jax.Array      # int32[T]    sequence row of each token (pad tokens -> a pad row)
    slot_mapping: jax.Array   # int32[T]    layer-local flat slot (page * page_size + offset) of the new K/V
    query_start: jax.Array    # int32[S+1]  tokens of row s are [query_start[s], query_start[s+1])
    seq_lens: jax.Array       # int32[S]    KV length of row s after this step's tokens (0: pad row)
    page_table: jax.Array     # int32[S, P] layer-local page ids of row s (pad entries -> sink page 0)
    groups: Optional[PrefixGroups] = None   # shared-prefix groups (implementations that read them)
    work: Optional[WorkItems] = None        # the GPU kernel's work list

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

    `unique_indices`: a real token's slot is its own (a page belongs to one request), so only
    pad tokens and finished rows share slots, all in the sink page 0, whose contents no query
    reads unmasked; which duplicate lands there does not matter. Without the promise XLA:GPU
    emits a scatter that keeps colliding writes well defined, 4x (1,024 tokens) to 11x
    (16,384) slower on the H200 (`scripts/bench_kv_write.py`), ~15 % of a 1,024-row decode
    step.
    """
    hkv, npages, ps, d = k_cache.shape
    kf = k_cache.reshape(hkv, npages * ps, d).at[:, slots].set(
        jnp.swapaxes(k, 0, 1).astype(k_cache.dtype), mode="promise_in_bounds",
        unique_indices=True)
    vf = v_cache.reshape(hkv, npages * ps, d).at[:, slots].set(
        jnp.swapaxes(v, 0, 1).astype(v_cache.dtype), mode="promise_in_bounds",
        unique_indices=True)
    return kf.reshape(k_cache.shape), vf.reshape(v_cache.shape)
