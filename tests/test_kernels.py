"""Attention kernels against the pure-jnp reference.

CPU (CI): the GPU Pallas kernel in interpret mode. GPU (`-m gpu`): the same cases compiled.
Every case draws fresh random caches and queries (never zeros), fills every page of the pool
(also pages nobody should read: a wrong page index shows up as a wrong answer), and compares
only tokens that have keys (pad rows give 0 in the kernels and a don't-care in the reference).
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import reference
from tests import cascade_oracle
from pallas_kernels.metadata import AttentionMetadata, PrefixGroups

NUM_LAYERS = 2          # cases run on layer 1, so the page offset is exercised

ON_GPU = jax.default_backend() == "gpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@dataclasses.dataclass
class Case:
    q: jax.Array
    k_cache: jax.Array
    v_cache: jax.Array
    md: AttentionMetadata
    page_offset: int
    sm_scale: float
    valid: np.ndarray            # bool[T]: token has at least one key
    page_size: int
    hq: int
    hkv: int


def make_case(seed, *, seqs, groups=(), page_size=16, hkv=2, g=4, d=64, dtype=jnp.float32,
              pad_tokens=3, extra_pages=5):
    """Build a random step.

    seqs: list of (kv_len, q_len): the row's KV length after this step and its query tokens
      (the last q_len positions). groups: list of (prefix_len, [row indices]); members share the
      prefix's full pages physically; a partial last prefix page is copied into each member
      (its own tokens follow in that page), and the group keeps its own copy.
    """
    rng = np.random.default_rng(seed)
    s_count = len(seqs)
    owner = {}
    for gi, (plen, members) in enumerate(groups):
        for m in members:
            assert seqs[m][0] >= plen, "member shorter than its prefix"
            owner[m] = gi
    next_page = [1]                                           # page 0 is the sink

    def alloc(n):
        out = list(range(next_page[0], next_page[0] + n))
        next_page[0] += n
        return out

    group_pages, group_full = [], []
    for plen, _ in groups:
        full = plen // page_size
        pages = alloc(full)
        group_full.append(pages)
        group_pages.append(pages + (alloc(1) if plen % page_size else []))
    row_pages = []
    for s, (kv_len, _) in enumerate(seqs):
        n = -(-kv_len // page_size)
        if s in owner:
            shared = group_full[owner[s]]
            row_pages.append(shared + alloc(n - len(shared)))
        else:
            row_pages.append(alloc(n))
    num_pages = next_page[0] + extra_pages
    total_pages = NUM_LAYERS * num_pages
    layer = 1
    off = layer * num_pages
    shape = (hkv, total_pages, page_size, d)
    kc = rng.standard_normal(shape, dtype=np.float32)
    vc = rng.standard_normal(shape, dtype=np.float32)
    # Copy each group's prefix tokens into its members' pages (partial last page included) so
    # the two page lists hold the same prefix KV.
    for gi, (plen, members) in enumerate(groups):
        for m in members:
            for tok in range(plen):
                src = group_pages[gi][tok // page_size] + off
                dst = row_pages[m][tok // page_size] + off
                kc[:, dst, tok % page_size] = kc[:, src, tok % page_size]
                vc[:, dst, tok % page_size] = vc[:, src, tok % page_size]
    pmax = max(len(p) for p in row_pages)
    s_tot = s_count + 1                                       # + one pad row
    page_table = np.zeros((s_tot, pmax), np.int32)
    for s, pages in enumerate(row_pages):
        page_table[s, :len(pages)] = pages
    positions, token_seq, qstart = [], [], [0]
    seq_lens = np.zeros((s_tot,), np.int32)
    for s, (kv_len, q_len) in enumerate(seqs):
        positions += list(range(kv_len - q_len, kv_len))
        token_seq += [s] * q_len
        qstart.append(qstart[-1] + q_len)
        seq_lens[s] = kv_len
    positions += [0] * pad_tokens
    token_seq += [s_count] * pad_tokens
    qstart.append(qstart[-1] + pad_tokens)
    t = len(positions)
    md = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        token_seq=jnp.asarray(token_seq, jnp.int32),
        slot_mapping=jnp.zeros((t,), jnp.int32),
        query_start=jnp.asarray(qstart, jnp.int32),
        seq_lens=jnp.asarray(seq_lens),
        page_table=jnp.asarray(page_table))
    if groups:
        pg = max(1, max(len(p) for p in group_pages))
        gpt = np.zeros((len(groups), pg), np.int32)
        for gi, p in enumerate(group_pages):
            gpt[gi, :len(p)] = p
        seq_group = np.full((s_tot,), -1, np.int32)
        prefix_lens = np.zeros((s_tot,), np.int32)
        for gi, (plen, members) in enumerate(groups):
            for m in members:
                seq_group[m] = gi
                prefix_lens[m] = plen
        md = dataclasses.replace(md, groups=PrefixGroups(
            seq_group=jnp.asarray(seq_group), prefix_lens=jnp.asarray(prefix_lens),
            page_table=jnp.asarray(gpt), lens=jnp.asarray([p for p, _ in groups], jnp.int32)))
    q = rng.standard_normal((t, hkv * g, d), dtype=np.float32)
    valid = np.array([seq_lens[s] > 0 for s in token_seq])
    return Case(q=jnp.asarray(q, dtype), k_cache=jnp.asarray(kc, dtype),
                v_cache=jnp.asarray(vc, dtype), md=md, page_offset=off,
                sm_scale=d ** -0.5, valid=valid, page_size=page_size, hq=hkv * g, hkv=hkv)


def reference_out(c: Case, sliding_window=None):
    return reference.ragged_paged_attention(
        c.q, c.k_cache, c.v_cache, c.md, page_offset=c.page_offset, sm_scale=c.sm_scale,
        sliding_window=sliding_window)


def assert_close(out, ref, c: Case, dtype):
    out = np.asarray(out.astype(jnp.float32))[c.valid]
    ref = np.asarray(ref.astype(jnp.float32))[c.valid]
    assert np.all(np.isfinite(out)), "non-finite output"
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    err = np.max(np.abs(out - ref))
    if dtype == jnp.float32:
        # Interpret mode computes in exact f32; compiled Triton f32 dots use IEEE (HIGHEST).
        assert rel < 2e-5 and err < 1e-4, (rel, err)
    else:
        # bf16 inputs; p is rounded to bf16 before the PV product, partials stored in bf16.
        assert rel < 1.5e-2 and err < 6e-2, (rel, err)


# ---------------------------------------------------------------------------------------------
# Pure-jnp cascade reference
# ---------------------------------------------------------------------------------------------

CASCADE_SHAPES = [
    # seqs, groups
    ([(40, 1), (33, 1), (16, 16), (1, 1)], [(16, [0, 1])]),
    ([(37, 5), (29, 1), (21, 1)], [(21, [0, 1, 2])]),                # empty suffix for row 2
    ([(24, 24), (30, 1)], [(13, [0, 1])]),                           # member prefilling its prefix
]


@pytest.mark.parametrize("seqs,groups", CASCADE_SHAPES)
@pytest.mark.parametrize("window", [None, 7])
def test_cascade_reference_matches_reference(seqs, groups, window):
    c = make_case(1, seqs=seqs, groups=groups, page_size=8)
    got = reference.cascade_attention(c.q, c.k_cache, c.v_cache, c.md,
                                      page_offset=c.page_offset, sm_scale=c.sm_scale,
                                      sliding_window=window)
    assert_close(got, reference_out(c, window), c, jnp.float32)


def test_merge_partials_is_exact_and_handles_empty():
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.standard_normal((3, 10)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)

    def part(sl):
        w = jax.nn.softmax(s[:, sl], axis=-1)
        return w @ v[sl], jax.scipy.special.logsumexp(s[:, sl], axis=-1)

    full, _ = part(slice(0, 10))
    o1, l1 = part(slice(0, 4))
    o2, l2 = part(slice(4, 10))
    o, lse = reference.merge_partials(o1, l1, o2, l2)
    np.testing.assert_allclose(o, full, rtol=1e-5, atol=1e-6)
    empty = jnp.full((3,), -jnp.inf)
    o, lse = reference.merge_partials(o1, l1, jnp.zeros_like(o1), empty)
    np.testing.assert_allclose(o, o1, rtol=1e-6)
    o, lse = reference.merge_partials(o1, empty, o2, empty)
    assert np.all(np.asarray(o) == 0) and np.all(np.isneginf(np.asarray(lse)))


# ---------------------------------------------------------------------------------------------
# GPU Pallas kernel (interpret mode on CPU, compiled with -m gpu)
# ---------------------------------------------------------------------------------------------

def host_work(md, *, num_q_heads, num_kv_heads, page_size, **kw):
    """The host-built (shared-prefix) work list of `md` with its `groups`."""
    from pallas_kernels.gpu import cascade
    md = jax.device_get(md)
    return cascade.build_cascade_work(md, md.groups, num_q_heads=num_q_heads,
                                      num_kv_heads=num_kv_heads, page_size=page_size, **kw)


def run_kernel(c: Case, *, interpret, sliding_window=None, cascade=False, block_rows=None,
               kv_splits=None, chunk_len=None, block_kv=None, own_block_rows=None,
               num_partials=None, min_chunk=256, **kw):
    from pallas_kernels.gpu import kernel, work_items
    if cascade:
        work = host_work(c.md, num_q_heads=c.hq, num_kv_heads=c.hkv, page_size=c.page_size,
                         block_kv=block_kv or 64, num_sms=4, chunk_len=chunk_len,
                         own_block_rows=own_block_rows, num_partials=num_partials,
                         min_chunk=min_chunk,
                         **({"block_rows": block_rows} if block_rows else {}))
        assert (work.own is not None) == bool(own_block_rows and own_block_rows != block_rows)
    else:
        work = work_items.device_work_items(c.md, num_q_heads=c.hq, num_kv_heads=c.hkv,
                                            page_size=c.page_size, head_dim=c.q.shape[-1],
                                            block_rows=block_rows, kv_splits=kv_splits,
                                            block_kv=block_kv)
    md = dataclasses.replace(c.md, work=work)
    fn = jax.jit(lambda q, kc, vc, md, off: kernel.ragged_paged_attention(
        q, kc, vc, md, page_offset=off, sm_scale=c.sm_scale, sliding_window=sliding_window,
        interpret=interpret, block_kv=block_kv, **kw))
    # page_offset traced, as inside the model's layer scan.
    return fn(c.q, c.k_cache, c.v_cache, md, jnp.int32(c.page_offset))


MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="compiled", marks=[pytest.mark.gpu, gpu_only])]

DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}

# Ragged lengths: 1, exact page boundaries (16, 32, 64), one past / before a boundary, a
# prefill chunk starting mid-sequence, a full prefill, and decode rows.
MIXED = [(1, 1), (16, 1), (33, 1), (64, 7), (47, 47), (95, 30), (32, 1), (63, 1)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("page_size,g,dtype,d", [
    (16, 4, "f32", 64), (16, 4, "bf16", 128), (8, 1, "bf16", 64), (32, 8, "f32", 64),
    (16, 8, "bf16", 64), (8, 4, "bf16", 128),
])
def test_pallas_no_sharing(interpret, page_size, g, dtype, d):
    c = make_case(10 + page_size + g + d, seqs=MIXED, page_size=page_size, g=g, d=d,
                  dtype=DT[dtype])
    assert_close(run_kernel(c, interpret=interpret), reference_out(c), c, DT[dtype])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("block_rows,kv_splits", [(16, 3), (64, 1), (32, 2)])
def test_pallas_block_shapes_and_kv_splits(interpret, block_rows, kv_splits):
    c = make_case(20 + block_rows, seqs=MIXED, page_size=16, g=4, d=64)
    out = run_kernel(c, interpret=interpret, block_rows=block_rows, kv_splits=kv_splits,
                     block_kv=32)
    assert_close(out, reference_out(c), c, jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
def test_pallas_decode_only_long_context(interpret):
    c = make_case(3, seqs=[(300, 1), (129, 1), (256, 1), (1, 1)], page_size=16, g=4, d=128,
                  dtype=jnp.bfloat16, pad_tokens=4)
    assert_close(run_kernel(c, interpret=interpret), reference_out(c), c, jnp.bfloat16)


@pytest.mark.parametrize("interpret", MODES)
def test_pallas_sliding_window(interpret):
    c = make_case(4, seqs=MIXED, page_size=8, g=2, d=64)
    out = run_kernel(c, interpret=interpret, sliding_window=9)
    assert_close(out, reference_out(c, 9), c, jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
def test_pallas_head_dim_padded(interpret):
    c = make_case(5, seqs=[(20, 20), (9, 1)], page_size=8, g=3, d=80)
    assert_close(run_kernel(c, interpret=interpret), reference_out(c), c, jnp.float32)


# Cascade: group sizes 1..64, empty suffixes, members in prefill, prefix not page-aligned,
# several groups next to ungrouped rows, chunked prefixes (chunk_len small).
CASCADE_KERNEL = [
    # id, seqs, groups, page_size, g, dtype, chunk_len, block_rows
    ("g1", [(40, 1), (9, 1)], [(32, [0])], 16, 4, "f32", None, 64),
    ("g3_empty_suffix", [(48, 1), (40, 1), (33, 1)], [(32, [0, 1, 2])], 16, 8, "bf16", None, 64),
    ("two_groups_mixed", [(70, 1), (66, 4), (37, 1), (41, 9), (19, 1), (50, 50)],
     [(64, [0, 1]), (32, [2, 3])], 16, 4, "f32", 32, 32),
    ("unaligned_prefix", [(30, 1), (27, 1), (44, 12)], [(21, [0, 1, 2])], 8, 1, "f32", 16, 16),
    ("prefill_in_prefix", [(24, 24), (30, 1), (26, 3)], [(13, [0, 1, 2])], 8, 4, "bf16", None,
     32),
    ("g64_gqa8", [(48 + (i % 5), 1) for i in range(64)], [(48, list(range(64)))], 16, 8,
     "bf16", 16, 64),
    ("g16_gqa1_chunked", [(128 + i, 1) for i in range(16)], [(128, list(range(16)))], 32, 1,
     "f32", 32, 16),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("name,seqs,groups,page_size,g,dtype,chunk_len,block_rows",
                         CASCADE_KERNEL, ids=[c[0] for c in CASCADE_KERNEL])
def test_pallas_cascade(interpret, name, seqs, groups, page_size, g, dtype, chunk_len,
                        block_rows):
    c = make_case(hash(name) % 1000, seqs=seqs, groups=groups, page_size=page_size, g=g,
                  d=64, dtype=DT[dtype])
    out = run_kernel(c, interpret=interpret, cascade=True, chunk_len=chunk_len,
                     block_rows=block_rows, block_kv=32)
    assert_close(out, reference_out(c), c, DT[dtype])


# Cases whose requests' own parts can run as a second list of smaller items.
OWN_LIST = [c for c in CASCADE_KERNEL if c[0] in ("g3_empty_suffix", "two_groups_mixed",
                                                  "prefill_in_prefix", "g64_gqa8")] + [
    # No group in the step: the first list holds only pad items, whose slots the kernel never
    # stores (NaN in interpret mode), and the merge must not read them into any row.
    ("no_groups", MIXED, (), 16, 4, "f32", None, 64)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("name,seqs,groups,page_size,g,dtype,chunk_len,block_rows", OWN_LIST,
                         ids=[c[0] for c in OWN_LIST])
def test_pallas_cascade_own_list(interpret, name, seqs, groups, page_size, g, dtype, chunk_len,
                                 block_rows, monkeypatch):
    """Shared items of 64 (or 32) rows and the requests' own parts as a second launch of 16-row
    items, merged together: the reference's output, for members with empty suffixes, prefill
    members, chunked ranges and G = 8 (two decode tokens' heads fill 16 rows). Pad tokens
    round the step to 16 tokens, as the engine's buckets do, and the Pallas merge (opt-in,
    JAXSERVE_MERGE=pallas) merges the two launches; the cascade cases above take the XLA one."""
    from pallas_kernels.gpu import merge as merge_kernel
    monkeypatch.setenv("JAXSERVE_MERGE", "pallas")
    q_tokens = sum(q for _, q in seqs)
    c = make_case(hash(name) % 1000 + 1, seqs=seqs, groups=groups, page_size=page_size, g=g,
                  d=64, dtype=DT[dtype], pad_tokens=3 + (-(q_tokens + 3)) % 16)
    assert merge_kernel.block_rows(c.q.shape[0] * g)
    out = run_kernel(c, interpret=interpret, cascade=True, chunk_len=chunk_len,
                     block_rows=max(block_rows, 32), own_block_rows=16, block_kv=32)
    assert_close(out, reference_out(c), c, DT[dtype])


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("mode", ["prefetch_pages", "prefetch_kv"])
def test_pallas_prefetch(interpret, mode):
    """Page ids loaded one block ahead (prefetch_pages), or K/V tiles gathered one block ahead
    with page ids two ahead (prefetch_kv): same output, with and without groups, on items of
    one block, two blocks, several blocks and empty items (chunked prefixes, members with empty
    suffixes)."""
    c = make_case(31, seqs=MIXED, page_size=16, g=4, d=64)
    assert_close(run_kernel(c, interpret=interpret, block_kv=32, kv_splits=2, **{mode: True}),
                 reference_out(c), c, jnp.float32)
    name, seqs, groups, ps, g, dtype, chunk, bm = CASCADE_KERNEL[2]
    c = make_case(32, seqs=seqs, groups=groups, page_size=ps, g=g, d=64, dtype=DT[dtype])
    out = run_kernel(c, interpret=interpret, cascade=True, chunk_len=chunk, block_rows=bm,
                     block_kv=32, **{mode: True})
    assert_close(out, reference_out(c), c, DT[dtype])


@pytest.mark.parametrize("interpret", MODES)
def test_pallas_cascade_window(interpret):
    c = make_case(7, seqs=[(40, 1), (36, 3)], groups=[(32, [0, 1])], page_size=8, g=4, d=64)
    out = run_kernel(c, interpret=interpret, cascade=True, sliding_window=11, block_kv=32,
                     chunk_len=16)
    assert_close(out, reference_out(c, 11), c, jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("block_rows,own_block_rows", [(16, None), (32, 16)],
                         ids=["one_list", "own_list"])
def test_pallas_cascade_list_advanced_over_fused_decode_steps(interpret, block_rows,
                                                              own_block_rows):
    """A fused decode block keeps its first step's host-built list and advances it on device
    (`advance_work_items`): at every later step the kernel must equal the reference on that
    step's metadata. Chunked prefixes and suffixes (chunk 16), two groups beside ungrouped rows,
    suffixes that cross pages during the block."""
    from pallas_kernels.gpu import kernel
    from pallas_kernels.gpu.work_items import advance_work_items

    n_adv = 5
    final = [(70, 1), (66, 1), (41, 1), (45, 1), (19, 1), (90, 1)]
    c = make_case(41, seqs=final, groups=[(48, [0, 1]), (32, [2, 3])], page_size=8, g=4, d=64)
    real = np.asarray(c.md.seq_lens) > 0

    def at_step(i):     # metadata of block step i: every real row n_adv - i tokens short
        back = n_adv - i
        return dataclasses.replace(
            c.md, positions=jnp.maximum(c.md.positions - back, 0),
            seq_lens=jnp.where(jnp.asarray(real), c.md.seq_lens - back, 0))

    md0 = dataclasses.replace(at_step(0), work=host_work(
        at_step(0), num_q_heads=c.hq, num_kv_heads=c.hkv, page_size=8, block_rows=block_rows,
        block_kv=16, chunk_len=16, num_sms=4, own_block_rows=own_block_rows))
    fn = jax.jit(lambda q, kc, vc, md, off: kernel.ragged_paged_attention(
        q, kc, vc, md, page_offset=off, sm_scale=c.sm_scale, interpret=interpret, block_kv=16))
    for i in range(n_adv + 1):
        md_i = dataclasses.replace(md0, work=advance_work_items(
            jax.tree.map(jnp.asarray, md0.work), jnp.int32(i), 8))
        out = fn(c.q, c.k_cache, c.v_cache, md_i, jnp.int32(c.page_offset))
        ref = reference.ragged_paged_attention(c.q, c.k_cache, c.v_cache, at_step(i),
                                               page_offset=c.page_offset, sm_scale=c.sm_scale)
        assert_close(out, ref, c, jnp.float32)


def test_cascade_work_list_reads_prefix_once_per_row_block():
    """64 decode members x G=8 rows = 512 rows: 8 row blocks of 64, each reading the prefix
    (split in chunks) once, instead of 64 per-request reads."""
    c = make_case(8, seqs=[(4096 + 16, 1)] * 64, groups=[(4096, list(range(64)))],
                  page_size=16, g=8, d=64, hkv=1, pad_tokens=0)
    w = host_work(c.md, num_q_heads=8, num_kv_heads=1, page_size=16, block_rows=64, block_kv=64,
                  chunk_len=1024)
    pw = w.pt_width
    live = w.kv_end > w.kv_start
    shared = live & (w.pt_base // pw == 65)                  # group row after 64 + 1 pad rows
    prefix_tokens_read = int(np.sum((w.kv_end - w.kv_start)[shared]))
    assert prefix_tokens_read == 8 * 4096
    unique = live & ~shared
    assert int(np.sum((w.kv_end - w.kv_start)[unique])) == 64 * 16
    # every live query row gets 4 prefix chunks + 1 suffix partial
    tok_rows = w.merge_idx[: 64 * 8]
    assert np.all(np.sum(tok_rows >= 0, axis=1) == 5)


def test_dispatcher_and_default_impl():
    assert "pallas_gpu" in pallas_kernels.IMPLEMENTATIONS
    expect = "pallas_gpu" if ON_GPU else "reference"
    assert pallas_kernels.default_impl() == expect
    impl = "pallas_gpu" if ON_GPU else "pallas_gpu_interpret"
    for groups, shared in [((), False), ([(8, [0, 1])], True)]:
        c = make_case(9, seqs=[(17, 3), (13, 1), (5, 1)], groups=groups, page_size=8, g=2, d=64)
        spec = pallas_kernels.AttentionSpec(impl, c.hq, c.hkv, 64, 8, shared_prefix=shared)
        md = pallas_kernels.host_prepare(jax.device_get(c.md), jax.device_get(c.md.groups), spec)
        assert (md.work is not None) == shared     # the host builds a list only with groups
        md = pallas_kernels.device_prepare(jax.tree.map(jnp.asarray, md), spec)
        out = pallas_kernels.ragged_paged_attention(
            c.q, c.k_cache, c.v_cache, md, spec=spec, page_offset=c.page_offset,
            sm_scale=c.sm_scale)
        assert_close(out, reference_out(c), c, jnp.float32)


@pytest.mark.parametrize("interpret", MODES)
def test_work_items_built_once_per_step(interpret):
    """The device work list built once per step (traced, before the layer loop) serves every
    layer of a scan over a traced page offset."""
    from pallas_kernels.gpu import kernel
    c = make_case(11, seqs=MIXED, page_size=16, g=4, d=64)
    num_pages = c.page_offset                     # layer 1 starts at page num_pages
    spec = pallas_kernels.AttentionSpec("pallas_gpu_interpret", c.hq, c.hkv, 64, c.page_size)

    @jax.jit
    def two_layers(q, kc, vc, md):
        md = pallas_kernels.device_prepare(md, spec)

        def layer(carry, li):
            out = kernel.ragged_paged_attention(q, kc, vc, md, page_offset=li * num_pages,
                                                sm_scale=c.sm_scale, interpret=interpret)
            return carry, out
        return jax.lax.scan(layer, 0, jnp.arange(NUM_LAYERS, dtype=jnp.int32))[1]

    out = two_layers(c.q, c.k_cache, c.v_cache, c.md)
    assert_close(out[1], reference_out(c), c, jnp.float32)
    ref0 = reference.ragged_paged_attention(c.q, c.k_cache, c.v_cache, c.md, page_offset=0,
                                            sm_scale=c.sm_scale)
    assert_close(out[0], ref0, c, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Host work-list builder: vectorised form == loop form
# ---------------------------------------------------------------------------------------------

def random_step_metadata(rng, *, page_size, max_rows=40):
    """Random step metadata with groups (only the fields the work-list builder reads): ragged
    query lengths (1, prefill chunks, decode-only steps), groups of 2..64 members whose prefix
    lengths may differ, empty suffixes, pad rows with seq_len 0 (some in the middle), rows with
    a group id but prefix 0, and trailing pad tokens."""
    mode = rng.choice(["decode", "prefill", "mixed"])
    n_groups = int(rng.integers(0, 4))
    sizes = [int(rng.integers(2, 65)) if rng.random() < 0.3 else int(rng.integers(2, 9))
             for _ in range(n_groups)]
    s_real = max(sum(sizes) + int(rng.integers(0, 6)), 1)
    s_count = s_real + int(rng.integers(0, 4))                # + pad rows
    group_len = [int(rng.integers(1, 300)) for _ in range(n_groups)]
    seq_group = np.full(s_count, -1, np.int32)
    prefix_lens = np.zeros(s_count, np.int32)
    perm = rng.permutation(s_real)
    at = 0
    for gi, n in enumerate(sizes):
        for m in perm[at:at + n]:
            seq_group[m] = gi
            # Members usually share the group's length; some use a shorter (page-cut) one, a
            # few none at all.
            u = rng.random()
            prefix_lens[m] = (group_len[gi] if u < 0.7 else
                              (group_len[gi] // page_size) * page_size if u < 0.9 else 0)
        at += n
    seq_lens = np.zeros(s_count, np.int32)
    qlen = np.zeros(s_count, np.int64)
    pad = set(rng.choice(s_count, s_count - s_real, replace=False).tolist())
    for s in range(s_count):
        if s in pad:
            seq_group[s], prefix_lens[s] = -1, 0
            qlen[s] = int(rng.integers(0, 3))                  # pad tokens may sit on pad rows
            continue
        base = int(prefix_lens[s])
        if mode == "decode" or (mode == "mixed" and rng.random() < 0.5):
            q = 1
        else:
            q = int(rng.choice([1, int(rng.integers(1, 20)), int(rng.integers(1, 300))]))
        own = int(rng.choice([0, 1, int(rng.integers(0, 40)), int(rng.integers(0, 700))]))
        kv = max(base + own, q, 1)
        seq_lens[s] = kv
        qlen[s] = q
    qs = np.concatenate([[0], np.cumsum(qlen)]).astype(np.int32)
    positions = np.zeros(int(qs[-1]), np.int32)
    for s in range(s_count):
        if seq_lens[s] > 0:
            positions[qs[s]:qs[s + 1]] = np.arange(seq_lens[s] - qlen[s], seq_lens[s])
    t = int(qs[-1]) + int(rng.integers(0, 5))
    positions = np.concatenate([positions, np.zeros(t - qs[-1], np.int32)])
    qs[-1] = t                                                 # trailing pad tokens: last row
    pages = int(-(-max(int(seq_lens.max()), 1) // page_size))
    page_table = rng.integers(0, 1000, (s_count, pages)).astype(np.int32)
    md = AttentionMetadata(positions=positions, token_seq=np.zeros(t, np.int32),
                           slot_mapping=np.zeros(t, np.int32), query_start=qs,
                           seq_lens=seq_lens, page_table=page_table)
    if n_groups:
        pg = max(1, -(-max(group_len) // page_size))
        md = dataclasses.replace(md, groups=PrefixGroups(
            seq_group=seq_group, prefix_lens=prefix_lens,
            page_table=rng.integers(0, 1000, (n_groups, pg)).astype(np.int32),
            lens=np.asarray(group_len, np.int32)))
    return md


def test_cascade_builder_vectorised_matches_loops():
    from pallas_kernels.gpu import cascade
    rng = np.random.default_rng(1234)
    for case in range(300):
        page_size = int(rng.choice([8, 16, 32]))
        g = int(rng.choice([1, 4, 8]))
        hkv = int(rng.choice([1, 2, 8]))
        md = random_step_metadata(rng, page_size=page_size)
        kw = dict(num_q_heads=g * hkv, num_kv_heads=hkv, page_size=page_size,
                  block_rows=int(rng.choice([16, 32, 64, 128])),
                  block_kv=int(rng.choice([page_size, 64, 128])),
                  num_sms=int(rng.choice([4, 132])))
        u = rng.random()
        if u < 0.2:
            kw["chunk_len"] = int(rng.choice([8, 16, 32, 100, 256]))   # incl. < block_kv
        elif u < 0.4:
            kw["num_items"] = 4096
            kw["num_partials"] = 64
        want = cascade_oracle.build_cascade_work_loops(md, md.groups, **kw)
        got = cascade.build_cascade_work(md, md.groups, **kw)
        assert got.pt_width == want.pt_width, case
        for f in ("page_table", "pt_base", "kv_start", "kv_end", "rows", "row_hi", "merge_idx"):
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and a.shape == b.shape, (case, f, a.shape, b.shape)
            assert np.array_equal(a, b), (case, f, kw)


def test_chunk_bounds_matches_chunks():
    from pallas_kernels.gpu import cascade
    rng = np.random.default_rng(7)
    for _ in range(200):
        align = int(rng.choice([8, 16, 32, 64, 128]))
        length = int(rng.choice([align, 2 * align, 256, int(rng.integers(1, 600))]))
        lo = rng.integers(0, 500, 20)
        hi = lo + rng.integers(-3, 3000, 20)
        want = [(i, a, b) for i in range(20)
                for a, b in cascade._chunks(int(lo[i]), int(hi[i]), length, align)]
        src, c0, c1 = cascade._chunk_bounds(lo, hi, length, align)
        assert list(zip(src.tolist(), c0.tolist(), c1.tolist())) == want, (length, align)


def test_cascade_builder_vectorised_matches_loops_engine_layout():
    """A full decode bucket with the engine's static sizes (`block_sizes.host_layout`): 16 groups
    of 16 members sharing a 2000-token prefix, G=4."""
    from pallas_kernels.gpu import block_sizes, cascade
    t = s = 256
    p, ps, plen = 152, 16, 2000
    rng = np.random.default_rng(3)
    seq_lens = np.full(s, plen + 300, np.int32)
    pt = rng.integers(1, 10 ** 5, (s, p)).astype(np.int32)
    md = AttentionMetadata(
        positions=seq_lens - 1, token_seq=np.arange(s, dtype=np.int32),
        slot_mapping=np.zeros(t, np.int32), query_start=np.arange(s + 1, dtype=np.int32),
        seq_lens=seq_lens, page_table=pt)
    groups = PrefixGroups(
        seq_group=np.repeat(np.arange(16), 16).astype(np.int32),
        prefix_lens=np.full(s, plen, np.int32),
        page_table=np.pad(pt[::16, :plen // ps], ((0, s - 16), (0, p - plen // ps))),
        lens=np.pad(np.full(16, plen, np.int32), (0, s - 16)))
    lay = block_sizes.host_layout(t, s, p, num_q_heads=32, num_kv_heads=8, page_size=ps,
                                  head_dim=128)
    # The oracle builds one list: it gets the room of both of the engine's lists.
    kw = dict(num_q_heads=32, num_kv_heads=8, page_size=ps, block_rows=lay["block_rows"],
              block_kv=lay["block_kv"], num_sms=lay["num_sms"], waves=lay["waves"],
              num_items=lay["num_items"] + lay["num_own_items"],
              num_partials=lay["num_partials"])
    want = cascade_oracle.build_cascade_work_loops(md, groups, **kw)
    got = cascade.build_cascade_work(md, groups, **kw)
    for f in ("page_table", "pt_base", "kv_start", "kv_end", "rows", "row_hi", "merge_idx"):
        assert np.array_equal(getattr(got, f), getattr(want, f)), f
    # The engine's own sizes: a decode bucket gets a second list of 16-row own items, and
    # both lists fit their static sizes.
    assert lay["own_block_rows"] == 16
    split = cascade.build_cascade_work(
        md, groups, **{**kw, "num_items": lay["num_items"]},
        own_block_rows=lay["own_block_rows"], num_own_items=lay["num_own_items"])
    assert split.rows.shape == (lay["num_items"], 64)
    assert split.own.rows.shape == (lay["num_own_items"], 16)
    assert attended(split, ps, 8) == attended(got, ps, 8)


def test_host_layout_bounds_partials_where_steps_need_no_split():
    """The merge's K in the engine's buckets (Llama-3-8B heads, H100/H200 SMs, 2,432-token
    rows): 2 in prefill buckets, DECODE_PARTIALS in decode buckets of many rows, the full
    bound (splits for a few long rows) in small ones. A BatchLLM prefill step (64 members
    prefill 200 tokens over 4 prefixes of 2,000, beside 960 decode members) fits K = 2 at the
    cost model's own chunks: the bound changes no item, only the width of merge_idx."""
    from pallas_kernels.gpu import block_sizes, cascade
    kw = dict(num_q_heads=32, num_kv_heads=8, page_size=16, head_dim=128)
    lay = {t: block_sizes.host_layout(t, min(t, 1024), 152, **kw) for t in (64, 1024, 16384)}
    assert lay[16384]["num_partials"] == 2
    assert lay[1024]["num_partials"] == block_sizes.DECODE_PARTIALS
    assert lay[64]["num_partials"] == 2432 // 256 + 1 + 4

    ps, plen, s = 16, 2000, 1024
    q = np.array([200] * 64 + [1] * 960)
    seq_lens = np.array([plen + 200] * 64 + [plen + 150 + i % 200 for i in range(960)])
    qs = np.concatenate([[0], np.cumsum(q)]).astype(np.int32)
    t = 16384
    positions = np.zeros(t, np.int32)
    for i in range(s):
        positions[qs[i]:qs[i + 1]] = np.arange(seq_lens[i] - q[i], seq_lens[i])
    qs[-1] = t
    rng = np.random.default_rng(5)
    pt = rng.integers(1, 10 ** 5, (s, 152)).astype(np.int32)
    group = np.concatenate([np.repeat(np.arange(4), 16), np.arange(960) % 4]).astype(np.int32)
    md = AttentionMetadata(positions=positions, token_seq=np.zeros(t, np.int32),
                           slot_mapping=np.zeros(t, np.int32), query_start=qs,
                           seq_lens=seq_lens.astype(np.int32), page_table=pt)
    gpt = np.zeros((s, 152), np.int32)
    gpt[:4, :plen // ps] = pt[:4, :plen // ps]
    groups = PrefixGroups(seq_group=group, prefix_lens=np.full(s, plen, np.int32),
                          page_table=gpt, lens=np.pad(np.full(4, plen, np.int32), (0, s - 4)))
    la = lay[16384]
    args = dict(num_q_heads=32, num_kv_heads=8, page_size=ps, block_rows=la["block_rows"],
                block_kv=la["block_kv"], num_sms=la["num_sms"], waves=la["waves"],
                num_items=la["num_items"])
    # The bound before: every chunk of a full row's range, whatever the bucket.
    free = cascade.build_cascade_work(md, groups, **args, num_partials=2432 // 256 + 1 + 3)
    got = cascade.build_cascade_work(md, groups, **args, num_partials=2)
    assert (free.merge_idx[:, 2:] == -1).all()
    assert np.array_equal(got.merge_idx, free.merge_idx[:, :2])
    for f in ("pt_base", "kv_start", "kv_end", "rows", "row_hi"):
        assert np.array_equal(getattr(got, f), getattr(free, f)), f


def attended(work, page_size, g):
    """For every query row of a work list, the (page id, offset) KV slots its partials read,
    with how often each is read, through the list's items as the kernel sees them: item range
    [kv_start, kv_end) clipped to the row slot's causal limit. Returned as the sorted rows
    (query row, page id, offset), one per read, so that two lists compare with ==."""
    pw = work.pt_width
    table = np.asarray(work.page_table).reshape(-1, pw)
    lists = [work] + ([work.own] if work.own is not None else [])
    li, wi, si = [], [], []                               # (list, item, slot) per flat index
    for n, it in enumerate(lists):
        w, bm = it.rows.shape
        li.append(np.full(w * bm, n))
        wi.append(np.repeat(np.arange(w), bm))
        si.append(np.tile(np.arange(bm), w))
    li, wi, si = (np.concatenate(x) for x in (li, wi, si))
    midx = np.asarray(work.merge_idx)
    r, k = np.nonzero(midx >= 0)
    f = midx[r, k]
    lo, hi, base = (np.zeros(f.shape[0], np.int64) for _ in range(3))
    for n, it in enumerate(lists):
        m = li[f] == n
        w_, s_ = wi[f][m], si[f][m]
        assert (np.asarray(it.rows)[w_, s_] == r[m]).all()
        lo[m] = np.asarray(it.kv_start)[w_]
        hi[m] = np.minimum(np.asarray(it.kv_end)[w_], np.asarray(it.row_hi)[w_, s_])
        base[m] = np.asarray(it.pt_base)[w_] // pw
    n_read = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(f.shape[0]), n_read)
    pos = lo[src] + (np.arange(src.shape[0]) - (np.cumsum(n_read) - n_read)[src])
    out = np.stack([r[src], table[base[src], pos // page_size], pos % page_size], 1)
    return _Reads(out[np.lexsort(out.T[::-1])])


class _Reads:
    """Sorted (row, page, offset) reads; == compares them exactly (multiplicity included)."""

    def __init__(self, a):
        self.a = a

    def __eq__(self, other):
        return self.a.shape == other.a.shape and bool((self.a == other.a).all())

    def __repr__(self):
        return f"_Reads({self.a.shape[0]} reads)"


def test_cascade_own_list_reads_what_one_list_reads():
    """Random steps (groups, empty suffixes, prefill and decode rows, pad rows): with the own
    parts as a second list of smaller items, every query row reads exactly the KV slots, each
    as often, that the one-list form (checked against the loop oracle) has it read."""
    from pallas_kernels.gpu import cascade
    rng = np.random.default_rng(99)
    for case in range(60):
        page_size = int(rng.choice([8, 16]))
        g = int(rng.choice([1, 4, 8]))
        md = random_step_metadata(rng, page_size=page_size, max_rows=12)
        kw = dict(num_q_heads=g * 2, num_kv_heads=2, page_size=page_size,
                  block_rows=int(rng.choice([32, 64])), block_kv=int(rng.choice([page_size, 64])),
                  num_sms=4, chunk_len=int(rng.choice([32, 64])) if rng.random() < 0.5 else None)
        one = cascade.build_cascade_work(md, md.groups, **kw)
        two = cascade.build_cascade_work(md, md.groups, **kw, own_block_rows=16)
        assert two.own is not None and two.own.rows.shape[1] == 16
        assert attended(two, page_size, g) == attended(one, page_size, g), case


def test_cascade_builder_fits_a_small_partials_bound():
    """A bucket's static K (`num_partials`) below what the cost model's chunks need: the builder
    lengthens the chunks until every row fits (two partials at most once a chunk holds the
    longest range: the row's shared prefix and its own part), and every query row still reads
    exactly the KV slots, each once, that the unbounded list has it read. Without that the
    builder raises (num_partials < needed)."""
    from pallas_kernels.gpu import cascade
    rng = np.random.default_rng(7)
    lengthened = 0
    for case in range(30):
        page_size = int(rng.choice([8, 16]))
        g = int(rng.choice([1, 4, 8]))
        md = random_step_metadata(rng, page_size=page_size, max_rows=12)
        kw = dict(num_q_heads=g * 2, num_kv_heads=2, page_size=page_size, block_rows=64,
                  block_kv=int(rng.choice([page_size, 32])), num_sms=64, min_chunk=32,
                  own_block_rows=16 if rng.random() < 0.5 else None)
        free = cascade.build_cascade_work(md, md.groups, **kw)
        need = int((np.asarray(free.merge_idx) >= 0).sum(1).max())
        want = attended(free, page_size, g)
        for cap in (2, 3):
            got = cascade.build_cascade_work(md, md.groups, **kw, num_partials=cap)
            assert got.merge_idx.shape[1] == cap
            assert attended(got, page_size, g) == want, (case, cap)
        lengthened += need > 2
    assert lengthened >= 5           # the random steps do need more than two at their chunks


@pytest.mark.parametrize("interpret", MODES)
def test_pallas_cascade_with_two_partials(interpret):
    """The kernel over a list built for K = 2 (what prefill buckets compile): chunks that would
    have split the prefix and the suffixes are lengthened, and the output is the reference's."""
    c = make_case(17, seqs=[(150, 20), (140, 1), (160, 7), (40, 40), (30, 1)],
                  groups=[(128, [0, 1, 2])], page_size=16, g=4, d=64, dtype=jnp.float32)
    out = run_kernel(c, interpret=interpret, cascade=True, block_rows=64, block_kv=32,
                     num_partials=2, min_chunk=32)
    assert_close(out, reference_out(c), c, jnp.float32)


def test_merge_lowers_without_nested_calls():
    """The merge is lax ops only: a nested jitted call (jnp.where, floor_divide) inside a
    stream-annotated computation gets no stream on XLA GPU ("No ExecutionStreamId found")."""
    from pallas_kernels.gpu import kernel
    for k in (1, 3):
        o = jnp.ones((4, 2, 16, 8), jnp.bfloat16)
        lse = jnp.ones((4, 2, 16), jnp.float32)
        midx = jnp.zeros((32, k), jnp.int32)
        text = jax.jit(lambda o, l, m: kernel.merge([(o, l)], m, 8, 2, 4, jnp.bfloat16)).lower(
            o, lse, midx).as_text()
        assert " call @" not in text


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("k,g,t,tail", [(1, 4, 8, None), (3, 4, 16, None), (4, 1, 64, None),
                                        (8, 8, 4, None), (2, 7, 16, None), (13, 4, 64, 96)])
def test_merge_kernel_matches_xla_merge_and_oracle(interpret, k, g, t, tail):
    """The Pallas merge reads only the partials merge_idx lists: slots nobody lists hold NaN
    (as unstored pad rows do) and must not reach any row; two launches of different row
    blocks; rows with no partial give 0; K not a power of two; G = 7 (not a power of two).
    `tail`: rows from there on have at most two partials and the last block none, so blocks
    stop at their own last slot (2 or 0 of K = 13) while the first ones run all K."""
    from pallas_kernels.gpu import kernel, merge as merge_kernel
    rng = np.random.default_rng(k * 100 + g * 10 + t)
    hkv, d = 2, 64
    # (W, BM) of the two launches
    shapes = [(5, 16), (7, 8)] if tail is None else [(40, 16), (30, 8)]
    n_slots = sum(w * bm for w, bm in shapes)
    parts = []
    for w, bm in shapes:
        o = rng.standard_normal((w, hkv, bm, d)).astype(np.float32)
        lse = rng.standard_normal((w, hkv, bm)).astype(np.float32) * 3
        parts.append([o, lse])
    midx = np.full((t * g, k), -1, np.int32)
    free = rng.permutation(n_slots)
    used = 0
    for r in range(t * g):
        n = int(rng.integers(0, k + 1)) if r % 5 else 0        # every fifth row has none
        if tail is not None and r >= tail:
            n = min(n, 2) if r < t * g - 64 else 0
        n = min(n, n_slots - used)
        midx[r, :n] = np.sort(free[used:used + n])
        used += n
    listed = np.zeros(n_slots, bool)
    listed[midx[midx >= 0]] = True
    base = 0
    for (w, bm), p in zip(shapes, parts):
        mask = ~listed[base:base + w * bm].reshape(w, bm)      # [W, BM] unlisted slots
        p[0][np.broadcast_to(mask[:, None, :, None], p[0].shape)] = np.nan
        p[1][np.broadcast_to(mask[:, None, :], p[1].shape)] = np.nan
        base += w * bm
    jparts = [(jnp.asarray(o, jnp.bfloat16), jnp.asarray(lse)) for o, lse in parts]
    got = jax.jit(lambda ps, m: merge_kernel.merge(ps, m, t, hkv, g, jnp.float32,
                                                   interpret=interpret))(jparts, jnp.asarray(midx))
    want = kernel.merge(jparts, jnp.asarray(midx), t, hkv, g, jnp.float32)
    # numpy oracle over the same bf16-rounded partials
    flat_o = np.concatenate([np.asarray(o.astype(jnp.float32)).transpose(0, 2, 1, 3)
                             .reshape(-1, hkv, d) for o, _ in jparts])
    flat_l = np.concatenate([np.asarray(l).transpose(0, 2, 1).reshape(-1, hkv) for _, l in jparts])
    ref = np.zeros((t, hkv * g, d), np.float64)
    for r in range(t * g):
        ids = midx[r][midx[r] >= 0]
        if not ids.size:
            continue
        lse = flat_l[ids].astype(np.float64)                   # [n, Hkv]
        wgt = np.exp(lse - lse.max(0))
        o = (wgt[..., None] * flat_o[ids]).sum(0) / wgt.sum(0)[:, None]
        for h in range(hkv):
            ref[r // g, h * g + r % g] = o[h]
    np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_merge_kernel_block_rows():
    from pallas_kernels.gpu import merge as merge_kernel
    assert merge_kernel.block_rows(4 * 16384) == 64
    assert merge_kernel.block_rows(7 * 16) == 16
    assert merge_kernel.block_rows(4 * 89) is None             # falls back to the XLA merge
