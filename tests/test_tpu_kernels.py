"""TPU Pallas attention (`pallas_kernels.tpu`) against the pure-jnp reference, in TPU interpret
mode on CPU (`pltpu.InterpretParams`: simulated HBM / VMEM / SMEM, DMAs and semaphores;
uninitialised VMEM reads as NaN, out-of-bounds reads raise).

Every case draws a fresh random cache and queries (`tests.test_kernels.make_case`: every page of
the pool is filled, also pages nobody should read) and compares only tokens of rows with keys;
pad tokens must be finite. float32: max |out - ref| / max |ref| < 1e-5. bf16: the kernel's
float32 output (`out_dtype=float32`) against the reference on the same bf16 values in float32,
< 2e-3 of max |ref| (the kernel rounds probabilities to bf16 before the PV matmul, as on the
MXU); the bf16 output itself is checked to within bf16 rounding.

Interpret mode costs milliseconds per DMA and per loop step, so shapes are small (head_dim 128
or 64 padded to 128, page size 8 or 16, 1-2 KV heads, <= ~60 tokens); block sizes are small too
so that rows span several query blocks and contexts several KV blocks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import pallas_kernels
from pallas_kernels import reference
from pallas_kernels import tpu
from pallas_kernels.tpu import block_sizes, kernel
from tests.test_kernels import make_case

DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _interpret_state():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    return interpret_pallas_call


def run(c, *, window=None, interpret=None, jit=True, **kw):
    """The kernel under jit with a traced page offset (as in the model's layer scan)."""
    interpret = interpret or pltpu.InterpretParams(out_of_bounds_reads="raise",
                                                   uninitialized_memory="nan")

    def f(q, kc, vc, md, off):
        return tpu.ragged_paged_attention(q, kc, vc, md, page_offset=off, sm_scale=c.sm_scale,
                                          sliding_window=window, interpret=interpret, **kw)
    if jit:
        f = jax.jit(f)
    return f(c.q, c.k_cache, c.v_cache, c.md, jnp.int32(c.page_offset))


def ref32(c, window=None, md=None):
    """The reference on the case's values in float32 (bf16 inputs upcast exactly)."""
    return reference.ragged_paged_attention(
        c.q.astype(jnp.float32), c.k_cache.astype(jnp.float32),
        c.v_cache.astype(jnp.float32), md or c.md, page_offset=c.page_offset,
        sm_scale=c.sm_scale, sliding_window=window)


def check(out, ref, c, dtype):
    out_all = np.asarray(out.astype(jnp.float32))
    assert np.all(np.isfinite(out_all)), "non-finite output (pad tokens included)"
    o = out_all[c.valid]
    r = np.asarray(ref.astype(jnp.float32))[c.valid]
    err = np.max(np.abs(o - r)) / np.max(np.abs(r))
    tol = 1e-5 if dtype == jnp.float32 else 2e-3
    assert err < tol, (err, tol)


def check_case(c, dtype, *, window=None, **kw):
    if dtype == jnp.float32:
        check(run(c, window=window, **kw), ref32(c, window), c, dtype)
    else:
        out = run(c, window=window, out_dtype=jnp.float32, **kw)
        assert out.dtype == jnp.float32
        check(out, ref32(c, window), c, dtype)


def boundary_rows(ps):
    """Ragged rows around page boundaries: (kv_len, q_len). A decode token at 1 key, exactly one
    page, one below and one above; a whole two-page prefill; a 7-token chunk starting
    mid-page of a 3-page context; a decode row one below two pages."""
    return [(1, 1), (ps, 1), (ps - 1, 1), (ps + 1, 1), (2 * ps, 2 * ps), (3 * ps + 3, 7),
            (2 * ps - 1, 1)]


# ---------------------------------------------------------------------------------------------
# No sharing: ragged rows, page boundaries, prefill chunks mixed with decode, GQA, dtypes
# ---------------------------------------------------------------------------------------------

NO_SHARING = [
    # page_size, G, dtype, head_dim, hkv, q_tokens, kv_pages
    pytest.param(8, 1, "f32", 128, 2, 8, 2, id="ps8_g1_f32"),
    pytest.param(16, 4, "bf16", 128, 1, 4, 2, id="ps16_g4_bf16"),
    pytest.param(8, 8, "f32", 64, 1, 2, 3, id="ps8_g8_f32_d64pad"),
    pytest.param(16, 2, "bf16", 64, 2, 8, 1, id="ps16_g2_bf16_d64pad", marks=pytest.mark.slow),
    pytest.param(8, 4, "bf16", 128, 2, 4, 4, id="ps8_g4_bf16", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("page_size,g,dtype,d,hkv,q_tokens,kv_pages", NO_SHARING)
def test_no_sharing(page_size, g, dtype, d, hkv, q_tokens, kv_pages):
    c = make_case(100 + page_size + g + d, seqs=boundary_rows(page_size), page_size=page_size,
                  g=g, d=d, hkv=hkv, dtype=DT[dtype])
    check_case(c, DT[dtype], q_tokens=q_tokens, kv_pages=kv_pages)


def test_cache_allocated_with_padded_head_dim():
    """head_dim 64 with the cache allocated at 128 (zeros past 64): only q is padded, same
    answer as the unpadded cache."""
    c = make_case(23, seqs=[(19, 5), (9, 1)], page_size=8, g=2, d=64, hkv=1)
    pad = ((0, 0), (0, 0), (0, 0), (0, 64))
    out = tpu.ragged_paged_attention(
        c.q, jnp.pad(c.k_cache, pad), jnp.pad(c.v_cache, pad), c.md, page_offset=c.page_offset,
        sm_scale=c.sm_scale, q_tokens=4, kv_pages=2, interpret=pltpu.InterpretParams())
    assert out.shape == c.q.shape
    check(out, ref32(c), c, jnp.float32)


def test_bf16_output_dtype_and_rounding():
    """The default output dtype is q's; bf16 output within bf16 rounding of the reference."""
    c = make_case(7, seqs=[(20, 4), (9, 1)], page_size=16, g=4, d=128, hkv=1,
                  dtype=jnp.bfloat16)
    out = run(c, q_tokens=4, kv_pages=1)
    assert out.dtype == jnp.bfloat16
    o = np.asarray(out.astype(jnp.float32))[c.valid]
    r = np.asarray(ref32(c))[c.valid]
    # one bf16 ulp of the value (2^-7 relative) plus the kernel's own bf16-p error
    assert np.all(np.abs(o - r) <= 2.0 ** -7 * np.abs(r) + 2e-3 * np.max(np.abs(r)))


@pytest.mark.parametrize("q_tokens,kv_pages", [
    pytest.param(16, 8, id="one_block_covers_all"),     # KV block longer than every context
    pytest.param(2, 1, id="one_page_blocks"),           # many q blocks, one-page KV blocks
])
def test_block_shapes(q_tokens, kv_pages):
    c = make_case(21, seqs=[(30, 1), (17, 9), (8, 1), (1, 1)], page_size=8, g=4, d=128, hkv=1)
    check_case(c, jnp.float32, q_tokens=q_tokens, kv_pages=kv_pages)


@pytest.mark.slow
def test_decode_only_long_context():
    c = make_case(3, seqs=[(300, 1), (129, 1), (256, 1), (1, 1)], page_size=16, g=4, d=128,
                  hkv=1, dtype=jnp.bfloat16, pad_tokens=4)
    check_case(c, jnp.bfloat16, q_tokens=4, kv_pages=8)


def test_sliding_window():
    c = make_case(4, seqs=[(40, 1), (29, 12), (9, 1), (3, 3)], page_size=8, g=2, d=128, hkv=1)
    check_case(c, jnp.float32, window=9, q_tokens=4, kv_pages=2)


def test_layer_scan_traced_offset():
    """Two layers in a scan, page offset li * num_pages traced: each layer reads its own pages."""
    c = make_case(11, seqs=[(19, 5), (9, 1)], page_size=8, g=2, d=128, hkv=1)
    num_pages = c.page_offset
    interp = pltpu.InterpretParams()

    @jax.jit
    def two_layers(q, kc, vc, md):
        def layer(carry, li):
            return carry, tpu.ragged_paged_attention(
                q, kc, vc, md, page_offset=li * num_pages, sm_scale=c.sm_scale,
                interpret=interp, q_tokens=4, kv_pages=2)
        return jax.lax.scan(layer, 0, jnp.arange(2, dtype=jnp.int32))[1]

    out = two_layers(c.q, c.k_cache, c.v_cache, c.md)
    check(out[1], ref32(c), c, jnp.float32)
    ref0 = reference.ragged_paged_attention(c.q, c.k_cache, c.v_cache, c.md, page_offset=0,
                                            sm_scale=c.sm_scale)
    check(out[0], ref0, c, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Shared-prefix (cascade) groups
# ---------------------------------------------------------------------------------------------

CASCADE = [
    # id, seqs, groups, page_size, G, dtype, hkv
    pytest.param([(40, 1), (9, 1)], [(32, [0])], 16, 4, "f32", 1, id="one_member"),
    # Row 2's whole context is the prefix + its one token; row 3's token is the prefix's last
    # (seq_len == prefix_len: empty suffix).
    pytest.param([(48, 1), (40, 1), (33, 1), (32, 1)], [(32, [0, 1, 2, 3])], 16, 8, "bf16", 1,
                 id="empty_suffixes_g8"),
    # Two groups of different prefix lengths next to ungrouped rows, a member in prefill.
    pytest.param([(45, 1), (42, 4), (27, 1), (29, 9), (19, 1), (12, 12)],
                 [(40, [0, 1]), (24, [2, 3])], 8, 4, "f32", 2, id="two_groups_mixed"),
    # Prefix not page-aligned; a member prefilling across the prefix end.
    pytest.param([(30, 1), (27, 1), (28, 10)], [(21, [0, 1, 2])], 8, 1, "f32", 1,
                 id="unaligned_prefix_g1"),
    pytest.param([(24, 24), (30, 1), (26, 3)], [(13, [0, 1, 2])], 8, 4, "bf16", 1,
                 id="prefill_in_prefix", marks=pytest.mark.slow),
    pytest.param([(33 + (i % 3), 1) for i in range(12)], [(32, list(range(12)))], 16, 8,
                 "bf16", 1, id="twelve_members_g8", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("seqs,groups,page_size,g,dtype,hkv", CASCADE)
def test_cascade(seqs, groups, page_size, g, dtype, hkv):
    c = make_case(sum(s for s, _ in seqs) + g, seqs=seqs, groups=groups, page_size=page_size,
                  g=g, d=128, hkv=hkv, dtype=DT[dtype])
    qt = max(4, block_sizes.sublane_rows(DT[dtype]) // g)      # >= one sublane tile of rows
    check_case(c, DT[dtype], q_tokens=qt, kv_pages=2, prefix_q_tokens=qt, prefix_kv_pages=2)


def test_cascade_members_with_different_prefix_lens():
    """Members of one group may use a shorter (page-cut) part of its prefix: the prefix
    partial ends at each row's own prefix_len and its suffix starts there."""
    c = make_case(12, seqs=[(30, 1), (27, 2), (25, 1)], groups=[(21, [0, 1, 2])], page_size=8,
                  g=2, d=128, hkv=1)
    md = dataclasses.replace(c.md, groups=dataclasses.replace(
        c.md.groups, prefix_lens=c.md.groups.prefix_lens.at[1].set(16).at[2].set(8)))
    c = dataclasses.replace(c, md=md)
    check_case(c, jnp.float32, q_tokens=4, kv_pages=2, prefix_q_tokens=4, prefix_kv_pages=1)


def test_cascade_sliding_window():
    c = make_case(13, seqs=[(40, 1), (36, 3), (20, 1)], groups=[(32, [0, 1])], page_size=8,
                  g=4, d=128, hkv=1)
    check_case(c, jnp.float32, window=11, q_tokens=4, kv_pages=2, prefix_q_tokens=4,
               prefix_kv_pages=2)


@pytest.mark.parametrize("num_blocks,fits", [
    (2, [True, False]), pytest.param(1, [False, False], marks=pytest.mark.slow)])
def test_cascade_fewer_prefix_blocks_falls_back(num_blocks, fits):
    """With fewer prefix blocks than the groups need, the groups that do not fit (in id order)
    are computed without sharing, still exactly."""
    c = make_case(22, seqs=[(45, 1), (42, 4), (27, 1), (29, 9), (12, 12)],
                  groups=[(40, [0, 1]), (24, [2, 3])], page_size=8, g=2, d=128, hkv=1)
    pb = kernel.prefix_blocks(c.md, prefix_q_tokens=4, kv_block=16, window=None,
                              num_blocks=num_blocks)
    assert np.asarray(pb["group_fits"]).tolist() == fits      # group 0: 2 blocks, group 1: 3
    check_case(c, jnp.float32, q_tokens=4, kv_pages=2, prefix_q_tokens=4, prefix_kv_pages=2,
               num_prefix_blocks=num_blocks)


def test_groups_ignored_gives_same_answer():
    """use_groups=False reads every row's whole context through its own page table."""
    c = make_case(14, seqs=[(40, 1), (35, 2)], groups=[(32, [0, 1])], page_size=8, g=2, d=128,
                  hkv=1)
    check_case(c, jnp.float32, q_tokens=4, kv_pages=2, use_groups=False)


def test_prefix_read_once_per_group_block():
    """The prefix kernel's work list: a group of 12 decode members x G = 4 rows, in blocks of 4
    tokens, reads the prefix 3 times (once per block), not 12; the rows kernel reads each
    member from its prefix length on."""
    ps, plen = 16, 64
    c = make_case(15, seqs=[(plen + 1 + i, 1) for i in range(12)] + [(20, 3)],
                  groups=[(plen, list(range(12)))], page_size=ps, g=4, d=128, hkv=1)
    md = c.md
    bk = 2 * ps
    pb = kernel.prefix_blocks(md, prefix_q_tokens=4, kv_block=bk, window=None)
    f = np.asarray(pb["items"]).reshape(-1, kernel.NF)
    live = f[:, kernel.F_B1] > f[:, kernel.F_B0]
    assert live.sum() == 3
    assert np.all(f[live, kernel.F_B1] - f[live, kernel.F_B0] == plen // bk)
    assert np.all(np.asarray(pb["tok_pos"])[:12] >= 0)          # every member token placed
    assert np.all(np.asarray(pb["tok_pos"])[12:] == -1)         # ungrouped and pad tokens not
    plens = jnp.where(md.groups.seq_group >= 0, md.groups.prefix_lens, 0)
    items, steps, ni = kernel.row_items(md, q_tokens=4, kv_block=bk, prefix_lens=plens,
                                        window=None)
    r = np.asarray(items).reshape(-1, kernel.NF)
    rl = r[r[:, kernel.F_B1] > r[:, kernel.F_B0]]
    member = rl[:, kernel.F_LO] == plen
    assert member.sum() == 12 and np.all(rl[member, kernel.F_B0] == plen // bk)
    assert np.all(rl[member, kernel.F_B1] - rl[member, kernel.F_B0] == 1)


# ---------------------------------------------------------------------------------------------
# Interpret-mode checks: races, out-of-bounds reads
# ---------------------------------------------------------------------------------------------

RACES = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise",
                              uninitialized_memory="nan")


def test_race_detector_reports_a_racy_kernel():
    """The detector this file relies on does fire: a VMEM read before its DMA's wait."""
    def racy(x_hbm, o_ref, buf, sem):
        cp = pltpu.make_async_copy(x_hbm, buf, sem)
        cp.start()
        o_ref[...] = buf[...] + 1.0
        cp.wait()

    x = jnp.ones((8, 128), jnp.float32)
    pl.pallas_call(racy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                   in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                   scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA],
                   interpret=pltpu.InterpretParams(detect_races=True,
                                                   uninitialized_memory="zero"))(x)
    jax.effects_barrier()
    assert _interpret_state().races.races_found


@pytest.fixture
def race_states(monkeypatch):
    """Every race-detection state the interpreter creates (it makes a new one per pallas_call,
    so checking the module's `races` after a call sees only that call's last kernel)."""
    ipc = _interpret_state()
    made = []

    class Recording(ipc.RaceDetectionState):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(ipc, "RaceDetectionState", Recording)
    return made


@pytest.mark.parametrize("dma_mode", ["eager", pytest.param("on_wait", marks=pytest.mark.slow)])
def test_no_races_prefix_and_rows_kernels(dma_mode, race_states, capfd):
    """Race detection on for every kernel: the prefix kernel alone, compared with the
    reference's prefix partial (o and lse), then the whole call (prefix and rows kernels, two
    KV heads, so the KV stream crosses grid steps and heads), compared with the reference.
    Every DMA started is also waited for: the interpreter prints the semaphores left with a
    non-zero count at kernel exit (a DMA issued twice would leave one)."""
    c = make_case(16, seqs=[(26, 1), (21, 3), (17, 1), (7, 7)], groups=[(16, [0, 1, 2])],
                  page_size=8, g=2, d=128, hkv=2)
    params = dataclasses.replace(RACES, dma_execution_mode=dma_mode)
    o1, lse1 = kernel.prefix_partial(c.q, c.k_cache, c.v_cache, c.md,
                                     page_offset=c.page_offset, sm_scale=c.sm_scale,
                                     interpret=params, prefix_q_tokens=4, prefix_kv_pages=1)
    (ro1, rl1), _ = reference.cascade_attention_partials(
        c.q, c.k_cache, c.v_cache, c.md, page_offset=c.page_offset, sm_scale=c.sm_scale)
    lse1, rl1 = np.asarray(lse1), np.asarray(rl1)
    assert np.array_equal(np.isneginf(lse1), np.isneginf(rl1))   # same tokens have a prefix
    fin = np.isfinite(rl1)
    assert fin.any()
    np.testing.assert_allclose(lse1[fin], rl1[fin], rtol=1e-5, atol=1e-5)
    has = fin.all(axis=1)
    np.testing.assert_allclose(np.asarray(o1)[has], np.asarray(ro1)[has], rtol=1e-5, atol=1e-5)

    out = run(c, interpret=params, jit=False, q_tokens=4, kv_pages=2, prefix_q_tokens=4,
              prefix_kv_pages=1)
    check(out, ref32(c), c, jnp.float32)
    jax.effects_barrier()
    assert len(race_states) == 3                  # prefix; prefix + rows
    assert not any(r.races_found for r in race_states)
    printed = capfd.readouterr().out
    assert "non-zero count" not in printed and "RACE" not in printed, printed


def test_out_of_bounds_page_read_raises():
    """A page id past the cache is an out-of-bounds DMA read, and interpret mode raises."""
    c = make_case(17, seqs=[(17, 3), (5, 1)], page_size=8, g=2, d=128, hkv=1)
    pt = np.asarray(c.md.page_table).copy()
    pt[0, 1] = c.k_cache.shape[1]            # + the layer offset: past the last page
    c = dataclasses.replace(c, md=dataclasses.replace(c.md, page_table=jnp.asarray(pt)))
    try:
        with pytest.raises(Exception, match="Out-of-bounds read"):
            jax.block_until_ready(run(c, q_tokens=4, kv_pages=2))
    finally:
        pltpu.reset_tpu_interpret_mode_state()


# ---------------------------------------------------------------------------------------------
# Block sizes and the VMEM budget
# ---------------------------------------------------------------------------------------------

def test_vmem_budget_refuses_oversized_blocks():
    c = make_case(18, seqs=[(9, 1)], page_size=16, g=4, d=128, hkv=1)
    # 4096 pages x 16 tokens per KV block: K and V double buffers alone are 64 MiB in f32.
    with pytest.raises(block_sizes.VmemBudgetError) as e:
        run(c, kv_pages=4096, vmem_limit_bytes=16 * block_sizes.MiB)
    msg = str(e.value)
    assert "kv_pages=4096" in msg and "q_tokens=" in msg and "16.0 MiB" in msg, msg
    assert "kv_buffers" in msg
    with pytest.raises(block_sizes.VmemBudgetError, match="physical"):
        run(c, vmem_limit_bytes=200 * block_sizes.MiB)
    # The same blocks fit once the limit is raised (the check counts, it does not guess).
    need = block_sizes.vmem_bytes(kernel="rows", rows=2 * 4, kv_tokens=64 * 16, head_dim=128,
                                  q_dtype=jnp.float32, kv_dtype=jnp.float32,
                                  out_dtype=jnp.float32)["total"]
    block_sizes.check_budget(kernel="rows", q_tokens=2, kv_pages=64, num_q_per_kv=4,
                             page_size=16, head_dim=128, q_dtype=jnp.float32,
                             kv_dtype=jnp.float32, out_dtype=jnp.float32,
                             vmem_limit_bytes=need)
    with pytest.raises(block_sizes.VmemBudgetError):
        block_sizes.check_budget(kernel="rows", q_tokens=2, kv_pages=64, num_q_per_kv=4,
                                 page_size=16, head_dim=128, q_dtype=jnp.float32,
                                 kv_dtype=jnp.float32, out_dtype=jnp.float32,
                                 vmem_limit_bytes=need - 1)


def test_block_rows_must_fill_sublane_tiles():
    c = make_case(19, seqs=[(9, 1)], page_size=16, g=2, d=128, hkv=1, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="sublane"):
        run(c, q_tokens=4)                  # 8 rows, bf16 needs 16


def test_vmem_table_in_doc_is_current():
    """The VMEM table in block_sizes' docstring is what `vmem_bytes` computes today."""
    doc = [" ".join(line.split()) for line in block_sizes.__doc__.splitlines()]
    for line in block_sizes.vmem_table().splitlines():
        assert " ".join(line.split()) in doc, line


def test_defaults_fit_every_generation():
    for g in (1, 2, 4, 8):
        for ps in (8, 16, 64):
            for dt in (jnp.float32, jnp.bfloat16):
                bs = block_sizes.default_block_sizes(num_q_per_kv=g, page_size=ps, dtype=dt)
                for gen in block_sizes.GENERATIONS:
                    for kern, qt, kp in (("rows", bs.q_tokens, bs.kv_pages),
                                         ("prefix", bs.prefix_q_tokens, bs.prefix_kv_pages)):
                        block_sizes.check_budget(
                            kernel=kern, q_tokens=qt, kv_pages=kp, num_q_per_kv=g,
                            page_size=ps, head_dim=128, q_dtype=dt, kv_dtype=dt,
                            out_dtype=dt, with_prefix=True, generation=gen)


# ---------------------------------------------------------------------------------------------
# Dispatcher and model
# ---------------------------------------------------------------------------------------------

def test_dispatcher_pallas_tpu():
    assert "pallas_tpu" in pallas_kernels.IMPLEMENTATIONS
    if jax.default_backend() == "cpu":
        assert pallas_kernels.default_impl() == "reference"
    c = make_case(9, seqs=[(17, 3), (9, 1)], groups=[(8, [0, 1])], page_size=8, g=2, d=128,
                  hkv=1)
    spec = pallas_kernels.AttentionSpec("pallas_tpu", c.hq, c.hkv, 128, 8, shared_prefix=True)
    host = jax.device_get(c.md)
    md = pallas_kernels.host_prepare(dataclasses.replace(host, groups=None), host.groups, spec)
    assert md.groups is not None and md.work is None     # the kernel reads the groups itself
    md = pallas_kernels.device_prepare(jax.tree.map(jnp.asarray, md), spec)
    out = pallas_kernels.ragged_paged_attention(c.q, c.k_cache, c.v_cache, md, spec=spec,
                                                page_offset=c.page_offset, sm_scale=c.sm_scale)
    check(out, ref32(c), c, jnp.float32)


@pytest.mark.slow
def test_model_forward_pallas_tpu_equals_reference():
    """A jitted forward of a tiny random Llama (2 layers in a scan, GQA 2, head_dim 32 padded
    to 128 by the kernel) with attention_impl="pallas_tpu" equals the reference forward."""
    from flax import nnx

    from jaxserve.config import ModelConfig
    from jaxserve.models.llama import ForwardOptions, LlamaForCausalLM

    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=32)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    ps = 8
    c = make_case(20, seqs=[(13, 5), (9, 1), (4, 4)], page_size=ps, g=2, d=32, hkv=2)
    md = c.md
    # Each real token writes its K/V at its position in its row's pages; pad tokens into the
    # sink page 0.
    pt = np.asarray(md.page_table)
    seq = np.asarray(md.token_seq)
    pos = np.asarray(md.positions)
    real = np.asarray(md.seq_lens)[seq] > 0
    slots = np.where(real, pt[seq, pos // ps] * ps + pos % ps, 0).astype(np.int32)
    md = dataclasses.replace(md, slot_mapping=jnp.asarray(slots))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, md.num_tokens), jnp.int32)
    rows = jnp.asarray(np.asarray(md.query_start)[1:4] - 1)     # last token of each real row
    graph, state = nnx.split(model)
    fwd = jax.jit(lambda state, ids, md, kc, vc, impl: nnx.merge(graph, state)(
        ids, md, kc, vc, rows, ForwardOptions(pallas_kernels.AttentionSpec(
            impl, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, ps))), static_argnums=5)
    # make_case's cache has 2 layers of pages (layer 1 at page_offset), as the model expects.
    lr, kr, vr = fwd(state, ids, md, c.k_cache, c.v_cache, "reference")
    lt, kt, vt = fwd(state, ids, md, c.k_cache, c.v_cache, "pallas_tpu")
    np.testing.assert_allclose(np.asarray(lt), np.asarray(lr), rtol=1e-5, atol=1e-5)
    # Same K/V written everywhere but in the sink pages (page 0 of each layer), which take the
    # pad tokens' writes: their attention output is a don't-care, so what they write differs.
    keep = np.ones(c.k_cache.shape[1], bool)
    keep[[0, c.page_offset]] = False
    np.testing.assert_allclose(np.asarray(kt)[:, keep], np.asarray(kr)[:, keep], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(vt)[:, keep], np.asarray(vr)[:, keep], rtol=1e-5,
                               atol=1e-5)
