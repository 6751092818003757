"""Every block size of the GPU attention kernel, in one place: the kernel, both work-list builders
and the runner's static layout read them from here.

Measured on the H100 (benchmarks/attention.md): 64 KV tokens per block at head dim 128 reads the
cache at 84 % of HBM bandwidth on a 64 x 4k decode batch (128 has not been measured); shared-prefix
items hold 64 query rows in every bucket (a group's prefix is read once per row block of its
members' rows, so 16-row blocks read it 4x as often: on the document workload that was 4.2 s of
6.9 s of GPU time).
"""
from __future__ import annotations

import os
from typing import Optional

import jax

from pallas_kernels.common import pow2_at_least

SHARED_BLOCK_ROWS = 64      # query rows per item of host-built (shared-prefix) work lists
MIN_SPLIT_TOKENS = 256      # a KV split costs a partial write and a merge: never shorter


# Environment switches that change the kernels' block sizes or loops: whatever caches a compiled
# program must key on them (`env_overrides`), or a run with a switch set loads programs built
# without it, whose inputs have other shapes.
ENV_SWITCHES = ("JAXSERVE_ATTN_PREFETCH", "JAXSERVE_SHARED_BLOCK_ROWS", "JAXSERVE_MERGE",
                "JAXSERVE_PACKED_PREFIX")


def env_overrides() -> dict:
    """The kernel switches set in the environment, name -> value."""
    return {k: os.environ[k] for k in ENV_SWITCHES if os.environ.get(k)}


PREFETCH_MODES = ("none", "pages", "kv")
MERGE_IMPLS = ("pallas", "xla")


def merge_impl() -> str:
    """How a step's attention partials are merged: "xla" (`kernel.merge`, one fusion gathering
    every slot of merge_idx; the default) or "pallas" (`pallas_kernels.gpu.merge`, reads only the
    partials a row has; slower on the H200 at the engine's steps, benchmarks/README.md call AC).
    JAXSERVE_MERGE chooses, so one build can time both end to end."""
    impl = os.environ.get("JAXSERVE_MERGE") or "xla"
    if impl not in MERGE_IMPLS:
        raise ValueError(f"JAXSERVE_MERGE={impl!r}: expected one of {MERGE_IMPLS}")
    return impl


DECODE_BLOCK_ROWS = 16      # items this small are decode rows: one token x G q heads each

# Partials per query row (the merge's K) in decode buckets with many rows: room for a prefix or
# a suffix split in two where a few long rows would otherwise leave SMs idle.
DECODE_PARTIALS = 4

# Dense segments of a prefill bucket's packed prefix call (`cascade._packed_segments`): cuDNN's
# statistic is [segments, Hq, T] float32 (33 MB a layer at 8 x 32 heads x 16,384 tokens).
PACKED_SEGMENTS = 8


def packed_prefix_enabled() -> bool:
    """Whether prefill buckets run their prefilling members' shared prefixes as one packed
    flash-attention call (`pallas_kernels.gpu.packed_prefix`): JAXSERVE_PACKED_PREFIX=1. Off by
    default until a device A/B shows it wins: its first form ran BatchLLM x0.25 5.8 % slower on
    an H100 (benchmarks/README.md call AD); the present form (queries in place, the partial as
    one more merge slot) has not run on a GPU yet."""
    env = os.environ.get("JAXSERVE_PACKED_PREFIX", "0")
    if env not in ("0", "1"):
        raise ValueError(f"JAXSERVE_PACKED_PREFIX={env!r}: expected 0 or 1")
    return env == "1"


def prefetch_mode(block_rows: int) -> str:
    """How far the kernel's loop loads ahead: "none", "pages" (page ids one block ahead) or "kv"
    (K/V tiles one block ahead in registers, page ids two ahead).

    Decode items ("kv"): on the H200 at 716 / 1024 rows x 640 tokens, "kv" with 32-token blocks
    reads the KV 16 % / 27 % faster than no prefetch at 64 (benchmarks/README.md, call N); "pages"
    alone was -2 %..+5 %. Larger items keep "none" until measured. JAXSERVE_ATTN_PREFETCH
    overrides the choice for every item size, so one build can time all three end to end."""
    mode = os.environ.get("JAXSERVE_ATTN_PREFETCH") or (
        "kv" if block_rows <= DECODE_BLOCK_ROWS else "none")
    if mode not in PREFETCH_MODES:
        raise ValueError(f"JAXSERVE_ATTN_PREFETCH={mode!r}: expected one of {PREFETCH_MODES}")
    return mode


def shared_block_rows() -> int:
    """Query rows per shared item of host-built lists. A group's prefix is read once per item
    of its members' rows, so larger items read it less often (prefill chunks of many members:
    BatchLLM's prefill attention ran at ~20 % of the tensor-core rate in 64-row items, H200
    call S) but waste more rows on small groups. JAXSERVE_SHARED_BLOCK_ROWS (a power of two,
    16-256) overrides the default for every bucket, so one build can time the sizes end to
    end."""
    env = os.environ.get("JAXSERVE_SHARED_BLOCK_ROWS")
    if not env:
        return SHARED_BLOCK_ROWS
    bm = int(env)
    if bm < 16 or bm > 256 or bm & (bm - 1):
        raise ValueError(f"JAXSERVE_SHARED_BLOCK_ROWS={env!r}: expected a power of two in 16-256")
    return bm


def kernel_num_warps(block_rows: int, prefetch_kv: bool) -> int:
    """Warps per program: 2 for decode items with the "kv" prefetch (H200, call O: 716 / 1024
    rows x 640 tokens 0.64 / 0.87 ms against 0.68 / 0.92 with 4, and 64 rows x 4096 tokens 0.39
    against 0.61), 4 up to 64 rows, 8 from 128."""
    if block_rows <= DECODE_BLOCK_ROWS and prefetch_kv:
        return 2
    return 8 if block_rows >= 128 else 4


def kernel_block_kv(head_dim: int, page_size: int, block_rows: int, prefetch_kv: bool) -> int:
    """KV tokens per block inside the kernel for items of `block_rows` rows: 32 for decode items
    with the "kv" prefetch (two tiles each of K and V live in registers; 64 with it was 11 % /
    24 % slower on the H200, call N), else the work list's block."""
    if block_rows <= DECODE_BLOCK_ROWS and prefetch_kv:
        return max(32, page_size)
    return block_kv(head_dim, page_size)


def num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # pragma: no cover - no devices
        return 132


def padded_head_dim(head_dim: int) -> int:
    """Triton needs power-of-two block shapes: head dims are padded to the next one (>= 16)."""
    return pow2_at_least(max(head_dim, 16))


def block_kv(head_dim: int, page_size: int) -> int:
    """KV tokens per kernel block (a multiple of the page size)."""
    return max(64 if padded_head_dim(head_dim) >= 128 else 128, page_size)


def device_block_rows(num_tokens: int, num_seqs: int, g: int) -> int:
    """Rows per item of the device-built (no-sharing) list: decode-dominated steps use the smallest
    tensor-core tile (16) so a request's one token x G heads wastes few rows; prefill-heavy steps
    use 64 so a KV block is reused by more query rows."""
    small = max(16, pow2_at_least(g))
    return small if num_tokens <= 2 * num_seqs else max(64, small)


def kv_splits(num_blocks: int, hkv: int, kv_max: int, block: int,
              sms: Optional[int] = None) -> int:
    """Split each row block's KV range when (row blocks x KV heads) alone gives fewer than ~2
    waves of programs (flash-decoding)."""
    sms = sms or num_sms()
    want = -(-2 * sms // max(1, num_blocks * hkv))
    cap = max(1, kv_max // max(MIN_SPLIT_TOKENS, block))
    return int(max(1, min(want, cap)))


def host_layout(num_tokens: int, num_seqs: int, pages_per_seq: int, *, num_q_heads: int,
                num_kv_heads: int, page_size: int, head_dim: int, sms: int = 132,
                waves: float = 2.0, packed: bool = False) -> dict:
    """Static sizes of a host-built (shared-prefix) work list for one step bucket.

    Shared items hold bm = 64 rows (`shared_block_rows`). Where the device list's rule
    (`device_block_rows`) gives smaller items, the requests' own parts are a second list of
    those (`own_block_rows`: 16 in decode-dominated buckets, which run the kernel's decode loop;
    64 in prefill buckets when bm is raised past it); elsewhere they share the bm-row list
    (`own_block_rows` None).

    Items: each row's own part in blocks of bm'/g tokens (<= T/bq + S), each group's member rows
    in blocks of bm (<= T*g/bm + groups, groups <= S/2), plus the pieces long ranges are cut into
    (<= 2 per item longer than a chunk, and chunks are >= total/target, so <= 2*target of them,
    per list). Partials per query row (K, `num_partials`): the chunks of its prefix and of its
    suffix (chunks >= 256 tokens; one more when the two lists are chunked apart). Where the
    bucket's steps hold enough items without splitting a range (a step lands in the smallest
    bucket that holds it, so it has more than T / 2 tokens, in own items of bm'/g tokens:
    `unsplit_items`), K is 2 in prefill buckets (a row's shared prefix and its own part) and
    `DECODE_PARTIALS` in decode buckets, and the builder lengthens the chunks of a step that
    would need more (`cascade.build_cascade_work`). The XLA merge gathers every slot of every
    row, used or not, so its time grows with K: BatchLLM x0.25 spent 1.04 s merging at K = 13
    where its rows held at most 2 partials (H200, calls AA / AC).

    `packed` (the backend runs packed prefix segments): prefill buckets (64-row items for the
    own parts too) get `packed_segments` dense segments over a KV buffer of `packed_pages`
    pages, as many as the larger of a row's page table and the bucket's tokens: a step's
    prefilling groups together rarely hold more prefix than it has tokens (BatchLLM's prefill
    steps: 4 x 2,000 over 14,336; the document's: 4 x 4,096 over 16,384), and those beyond stay
    shared items.
    """
    g = num_q_heads // num_kv_heads
    bm = max(shared_block_rows(), pow2_at_least(g))
    small = device_block_rows(num_tokens, num_seqs, g)
    bm_own = small if small < bm else None
    bk = block_kv(head_dim, page_size)
    target = max(1, int(waves * sms / num_kv_heads))
    rnd = lambda n: -(-n // 64) * 64                               # noqa: E731
    own = -(-num_tokens // max(1, (bm_own or bm) // g)) + num_seqs
    shared = -(-num_tokens * g // bm) + num_seqs // 2
    if bm_own:
        items, own_items = rnd(shared + 2 * target), rnd(own + 2 * target)
    else:
        items, own_items = rnd(shared + own + 2 * target), 0
    partials = -(-pages_per_seq * page_size // MIN_SPLIT_TOKENS) + (4 if bm_own else 3)
    prefill = small >= SHARED_BLOCK_ROWS
    unsplit_items = (num_tokens // 2) // max(1, (bm_own or bm) // g)
    if unsplit_items >= target:
        partials = min(partials, 2 if prefill else DECODE_PARTIALS)
    ppb = bk // page_size
    pw = -(-pages_per_seq // ppb) * ppb
    # At least two slots: with one, JAX's cuDNN wrapper takes the offsets for an unpacked batch.
    segments = min(PACKED_SEGMENTS, max(2, num_seqs // 2)) if packed and prefill else 0
    packed_pages = max(pages_per_seq, -(-num_tokens // page_size)) if segments else 0
    return dict(block_rows=bm, block_kv=bk, num_items=items, num_partials=partials,
                own_block_rows=bm_own, num_own_items=own_items or None,
                num_groups=num_seqs, pt_width=pw, num_sms=sms, waves=waves,
                packed_segments=segments, packed_pages=packed_pages)
