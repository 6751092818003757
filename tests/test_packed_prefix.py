"""Prefilling members' shared prefixes as dense segments (`WorkItems.packed`, one packed
flash-attention call a step) against the pure-jnp reference.

CPU (CI): the kernel in interpret mode, the segments through their jnp form. GPU (`-m gpu`): the
kernel compiled and the segments through cuDNN's packed layout (bf16: cuDNN takes no float32).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from tests.test_kernels import (DT, MODES, assert_close, host_work, make_case, reference_out)


def packed_work(c, *, segments, pages, **kw):
    kw = {"block_kv": 32, "num_sms": 4, **kw}
    return host_work(c.md, num_q_heads=c.hq, num_kv_heads=c.hkv, page_size=c.page_size,
                     packed_segments=segments, packed_pages=pages, **kw)


def run_packed(c, work, *, interpret):
    from pallas_kernels.gpu import kernel
    md = dataclasses.replace(c.md, work=work)
    fn = jax.jit(lambda q, kc, vc, md, off: kernel.ragged_paged_attention(
        q, kc, vc, md, page_offset=off, sm_scale=c.sm_scale, interpret=interpret, block_kv=32))
    return fn(c.q, c.k_cache, c.v_cache, md, jnp.int32(c.page_offset))


def used_segments(work) -> int:
    """Segments some token merges (a dummy segment is merged into none)."""
    seg = np.asarray(work.packed.token_seg)
    return len(np.unique(seg[seg >= 0]))


# id, seqs (kv_len, q_len), groups (prefix_len, rows), page_size, g, d, segments, pages,
# segments expected in use
PACKED = [
    # group 0: two members prefill their suffixes beside a decoding member (which stays a shared
    # item), with another group's decode rows between them (two runs: two segments, each with
    # its copy of the prefix); group 1 decodes only; an ungrouped prefill row.
    ("prefill_beside_decode", [(70, 6), (66, 1), (45, 1), (75, 11), (41, 1), (19, 1), (90, 9)],
     [(64, [0, 1, 3]), (32, [2, 4])], 16, 4, 64, 8, 64, 2),
    # adjacent prefilling members: one run, one segment
    ("adjacent_members", [(40, 1), (70, 6), (75, 11), (66, 2), (19, 1)], [(64, [1, 2, 3])], 16,
     4, 64, 8, 64, 1),
    # a member prefills the (unaligned) prefix itself: its tokens inside the prefix need the
    # causal mask and stay shared items, those past it join the next member's run.
    ("prefill_in_prefix", [(24, 24), (30, 4), (26, 3)], [(13, [0, 1, 2])], 8, 4, 64, 8, 16, 1),
    # three prefilling groups, two segments: the largest two are packed, the third stays.
    ("over_segments", [(40, 8), (41, 9), (70, 6), (72, 8), (36, 4), (35, 3), (9, 1)],
     [(32, [0, 1]), (64, [2, 3]), (32, [4, 5])], 16, 2, 64, 2, 64, 2),
    # KV capacity of 5 pages: the 64-token prefix (4 pages) fits, the next 32 (2 pages) does not.
    ("over_pages", [(40, 8), (41, 9), (70, 6), (72, 8)], [(32, [0, 1]), (64, [2, 3])], 16, 4,
     128, 8, 5, 1),
    # no GQA, and G = 8
    ("gqa1", [(53, 5), (55, 7), (20, 20)], [(48, [0, 1])], 16, 1, 64, 8, 16, 1),
    ("gqa8", [(53, 5), (55, 7), (49, 1)], [(48, [0, 1, 2])], 8, 8, 128, 8, 16, 1),
    # members whose chunks start inside the prefix: their tokens before its end stay shared
    # items and cut the run in two
    ("chunks_cross_prefix", [(50, 5), (52, 7), (20, 20)], [(48, [0, 1])], 16, 2, 64, 8, 16, 2),
    # decode only: nothing to pack (a dummy segment merged into no token)
    ("decode_only", [(40, 1), (41, 1), (70, 1)], [(32, [0, 1, 2])], 16, 4, 64, 8, 16, 0),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("name,seqs,groups,ps,g,d,segments,pages,expect", PACKED,
                         ids=[p[0] for p in PACKED])
def test_packed_segments_match_reference(interpret, dtype, name, seqs, groups, ps, g, d,
                                         segments, pages, expect):
    if not interpret and dtype == "f32":
        pytest.skip("cuDNN takes bf16/f16 only (a float32 model keeps its shared items)")
    c = make_case(hash(name) % 1000 + 7, seqs=seqs, groups=groups, page_size=ps, g=g, d=d,
                  dtype=DT[dtype])
    work = packed_work(c, segments=segments, pages=pages, chunk_len=32)
    assert used_segments(work) == expect
    assert_close(run_packed(c, work, interpret=interpret), reference_out(c), c, DT[dtype])


def test_packed_segments_take_their_tokens_from_the_shared_items():
    """The prefilling members' prefix is read once by the segment and by no shared item (a
    decoding member keeps its shared item); their merge lists keep only their own parts, and the
    segment names their tokens; offsets and lengths are cuDNN's (-1 in unused slots); the KV
    buffer lists the group's prefix pages."""
    seqs = [(66, 1), (70, 6), (75, 11), (41, 1), (45, 1)]
    c = make_case(3, seqs=seqs, groups=[(64, [0, 1, 2]), (32, [3, 4])], page_size=16, g=4, d=64)
    base = packed_work(c, segments=0, pages=0, chunk_len=1024)
    work = packed_work(c, segments=4, pages=16, chunk_len=1024)
    assert base.packed is None
    p = jax.device_get(work.packed)
    # rows 1-2's 17 tokens (tokens 1..17) form one run
    assert list(p.q_lens) == [17, -1, -1, -1] and list(p.q_offsets) == [1, 18, -1, -1, -1]
    assert list(p.kv_lens) == [64, -1, -1, -1] and list(p.kv_offsets) == [0, 64, -1, -1, -1]
    assert list(np.flatnonzero(p.token_seg >= 0)) == list(range(1, 18))
    gpt = np.asarray(c.md.groups.page_table)
    assert list(p.kv_pages[:4]) == list(gpt[0, :4]) and not p.kv_pages[4:].any()

    def shared_reads(w, group_row):
        live = w.kv_end > w.kv_start
        mine = live & (w.pt_base // w.pt_width == group_row)
        return int(np.sum((w.kv_end - w.kv_start)[mine]))

    s_rows = len(seqs) + 1                                 # + the pad row
    # group 0's prefix: read by two 64-row blocks for rows 0-2's 72 query rows; packed, by one
    # block for row 0's decode token only
    assert shared_reads(base, s_rows) == 128 and shared_reads(work, s_rows) == 64
    rows_of = lambda w, t: np.asarray(w.merge_idx)[t * 4:(t + 1) * 4]        # noqa: E731
    for t in range(1, 18):           # one partial fewer each: the prefix's, now the segment's
        assert np.all((rows_of(work, t) >= 0).sum(1) == (rows_of(base, t) >= 0).sum(1) - 1)
    assert np.array_equal(rows_of(work, 0) >= 0, rows_of(base, 0) >= 0)
    assert shared_reads(work, s_rows + 1) == shared_reads(base, s_rows + 1)   # group 1 kept


def test_cudnn_statistic_read_by_segment_and_row_within_it():
    """cuDNN's statistic is [segments, Hq, T] with segment s's rows at their index within s
    (probed on an H100, benchmarks/README.md call AD): `_lse_of_tokens` must give each token of
    a segment its row's value and -inf to every other token, never a slot outside the rows (NaN
    here)."""
    from pallas_kernels.gpu import packed_prefix
    seqs = [(40, 1), (70, 6), (75, 11), (45, 1), (50, 9), (52, 7), (19, 1)]
    c = make_case(5, seqs=seqs, groups=[(64, [1, 2]), (32, [3, 4, 5])], page_size=16, g=4, d=64)
    p = jax.device_get(packed_work(c, segments=4, pages=16).packed)
    t, hq = c.q.shape[:2]
    rng = np.random.default_rng(0)
    want = rng.standard_normal((t, hq)).astype(np.float32)
    stat = np.full((4, hq, t), np.nan, np.float32)
    used = [s for s in range(4) if p.q_lens[s] > 0]
    assert len(used) == 2
    for s in used:
        a, n = p.q_offsets[s], p.q_lens[s]
        stat[s, :, :n] = want[a:a + n].T
    got = np.asarray(packed_prefix._lse_of_tokens(jnp.asarray(stat),
                                                  jax.tree.map(jnp.asarray, p)))
    inside = p.token_seg >= 0
    np.testing.assert_array_equal(got[inside], want[inside])
    assert np.all(np.isneginf(got[~inside]))


def test_packed_prefix_availability(monkeypatch):
    """Opt-in (JAXSERVE_PACKED_PREFIX=1), for the GPU backends without a sliding window
    (interpret mode: the jnp form; compiled: where cuDNN's packed layout runs), never for the
    reference or the TPU kernels."""
    avail = pallas_kernels.packed_prefix_available
    monkeypatch.delenv("JAXSERVE_PACKED_PREFIX", raising=False)
    assert not avail("pallas_gpu_interpret", jnp.float32, 64, None)     # opt-in for now
    monkeypatch.setenv("JAXSERVE_PACKED_PREFIX", "1")
    assert avail("pallas_gpu_interpret", jnp.float32, 64, None)
    assert not avail("pallas_gpu_interpret", jnp.float32, 64, 4096)
    assert not avail("reference", jnp.bfloat16, 128, None)
    assert not avail("pallas_tpu", jnp.bfloat16, 128, None)
    on_hopper = jax.default_backend() == "gpu" and all(
        int(x) >= y for x, y in zip(jax.devices()[0].compute_capability.split("."), (9, 0)))
    assert avail("pallas_gpu", jnp.bfloat16, 128, None) == on_hopper
    assert not avail("pallas_gpu", jnp.float32, 128, None)
    monkeypatch.setenv("JAXSERVE_PACKED_PREFIX", "0")
    assert not avail("pallas_gpu_interpret", jnp.float32, 64, None)
    monkeypatch.setenv("JAXSERVE_PACKED_PREFIX", "2")
    with pytest.raises(ValueError, match="JAXSERVE_PACKED_PREFIX"):
        avail("pallas_gpu_interpret", jnp.float32, 64, None)


def test_host_layout_packs_prefill_buckets_only():
    from pallas_kernels.gpu import block_sizes
    kw = dict(num_q_heads=32, num_kv_heads=8, page_size=16, head_dim=128)
    pre = block_sizes.host_layout(16384, 1024, 152, packed=True, **kw)
    dec = block_sizes.host_layout(1024, 1024, 152, packed=True, **kw)
    off = block_sizes.host_layout(16384, 1024, 152, packed=False, **kw)
    assert pre["packed_segments"] == block_sizes.PACKED_SEGMENTS
    assert pre["packed_pages"] == 1024              # the bucket's tokens in pages
    assert dec["packed_segments"] == 0 and off["packed_segments"] == 0
    doc = block_sizes.host_layout(16384, 1024, 2048, packed=True, **kw)
    assert doc["packed_pages"] == 2048              # a whole row's table at least
