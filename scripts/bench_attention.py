"""Benchmark paged attention at Llama-3-8B heads (32 q, 8 KV, head dim 128), bf16, on one GPU.

Cases:
  a  64 requests x 4k context, decode, no sharing
  b  64 requests sharing a 4k prefix + 256 unique tokens each, decode
  c  256 requests in 16 groups sharing 2k + 512 unique each, decode
  d  mixed step: 4 prefill chunks of 512 tokens (context 2048) + 128 decode rows (1k..4k)
  e, f, g  decode steps of the engine's H200 runs without sharing (716 / 308 / 1024 rows)
  h  a BatchLLM prefill step: 4 groups x 16 members prefilling 200 tokens over a 2000-token
     shared prefix, beside 960 decode rows in 60 such groups (13,760 tokens)
  i  a document prefill step: 4 documents of 4096 tokens, 64 questions of 64 tokens each
     (16,384 tokens)

Peers in the same run: the XLA reference (`pallas_kernels.reference`), JAX's Pallas
`paged_attention` (decode cases, read per request), dense cuDNN / XLA attention on contiguous
KV (decode cases), and a large elementwise pass for the HBM bandwidth.

Timing: each implementation is jitted once and called on R input sets (distinct KV pages, page
tables and queries; together several times the L2) back to back with asynchronous dispatch,
synchronised once; seconds = median over repeats of (wall time) / R. Host dispatch (~tens of
microseconds a call) overlaps the GPU work only when a call takes longer than that.

  python3 scripts/bench_attention.py --cases=a,b,c,d --out=benchmarks/results/attention_h100.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pallas_kernels import reference  # noqa: E402
from pallas_kernels.gpu import block_sizes, cascade, kernel, work_items  # noqa: E402
from pallas_kernels.metadata import AttentionMetadata, PrefixGroups  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("cases", ["a", "b", "c", "d"], "cases to run")
flags.DEFINE_list("impls", ["pallas_gpu", "pallas_gpu_cascade", "jax_paged_attention",
                            "cudnn_dense", "xla_reference", "pallas_gpu_hostwork", "xla_dense",
                            "pallas_gpu_variants", "pallas_gpu_cascade_variants",
                            "cudnn_prefill", "stacked_prefix"],
                  "implementations, in run order (most important first)")
flags.DEFINE_list("variants", [], "extra pallas_gpu configs, '+'-joined, e.g. "
                  "'bk=128+splits=4+warps=4+stages=3+bm=16' (each becomes pallas_gpu[...])")
flags.DEFINE_list("cascade_variants", [], "extra cascade configs, e.g. 'bm=32+bk=64+chunk=512'; "
                  "own=N puts the requests' own parts in a second list of N-row items; xlamerge=1 / "
                  "pallasmerge=1 choose the merge (JAXSERVE_MERGE); partials=K pads merge_idx to K "
                  "slots (the engine's static bound; default: as many as the step needs)")
flags.DEFINE_list("mgpu_configs", ["64x128x2", "64x64x2", "128x128x2"],
                  "stacked_prefix: JAX's Mosaic GPU flash attention configs 'block_qxblock_kv"
                  "xmax_concurrent_steps', each timed beside cuDNN")
flags.DEFINE_integer("bw_mib", 1024, "size of each buffer of the bandwidth pass (MiB)")
flags.DEFINE_bool("interpret", False, "run the Pallas kernels in interpret mode (CPU smoke test)")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("reps", 7, "timed repeats (median)")
flags.DEFINE_integer("sets", 0, "input sets per timed program (0: per-case default)")
flags.DEFINE_string("out", "", "JSON output path (list of records)")
flags.DEFINE_string("commit", "", "commit id to record (default: git rev-parse)")
flags.DEFINE_enum("timing", "dispatch", ["program", "dispatch", "layers"],
                  "dispatch: one call per input set, enqueued back to back (the host stays "
                  "ahead of the GPU); program: all sets inside one jitted program (measured "
                  "slower on the H100, 0.121 vs 0.076 ms on case b: kept for comparison); "
                  "layers: our kernels run R times in one program on one set's inputs, each "
                  "call on another set's pages through the page offset, as the engine's step "
                  "runs one work list through 32 layers (peers: dispatch)")
flags.DEFINE_bool("also_dispatch", False, "with --timing=program, also record the dispatch time")
flags.DEFINE_list("trace_cases", [], "cases whose implementations also get a per-kernel GPU "
                  "time breakdown from a device trace")
flags.DEFINE_string("trace_dir", "/tmp/bench_attention_trace", "raw traces go here")
flags.DEFINE_float("scale", 1.0, "shrink factor for smoke runs on CPU (context lengths)")

HQ, HKV, D = 32, 8, 128
T0 = time.perf_counter()
DTYPE = jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """One request set: per-request (kv_len, q_len), optional groups (prefix_len, members)."""
    seqs: list
    groups: list


def case_batch(name: str, scale: float) -> Batch:
    # lengths stay multiples of 16 so shared prefixes end on a page boundary (page sizes <= 16)
    s = lambda n: max(16, int(n * scale) // 16 * 16)             # noqa: E731
    if name == "a":
        return Batch([(s(4096), 1)] * 64, [])
    if name == "b":
        return Batch([(s(4096) + s(256), 1)] * 64, [(s(4096), list(range(64)))])
    if name == "c":
        return Batch([(s(2048) + s(512), 1)] * 256,
                     [(s(2048), list(range(16 * gi, 16 * gi + 16))) for gi in range(16)])
    if name == "d":
        rng = np.random.default_rng(0)
        seqs = [(s(2048), s(512))] * 4 + [(int(x), 1) for x in rng.integers(s(1024), s(4096), 128)]
        return Batch(seqs, [])
    # Decode steps of the engine's H200 runs at default sizes (no sharing): the decode-heavy
    # workload's first wave (716 rows the KV pool holds, mid-run context), its second wave, and
    # no-sharing's 1024 rows.
    if name == "e":
        return Batch([(s(640), 1)] * 716, [])
    if name == "f":
        return Batch([(s(1024), 1)] * 308, [])
    if name == "g":
        return Batch([(s(640), 1)] * 1024, [])
    # Prefill steps of the shared workloads at the engine's H200 sizes (16,384 tokens, 1,024
    # rows), where the shared items run at a fraction of the tensor-core rate (call S).
    if name == "h":
        pre, own, m = s(2000), s(200), 16
        seqs = [(pre + own, own)] * (4 * m) + [(pre + own + 48, 1)] * (60 * m)
        return Batch(seqs, [(pre, list(range(m * gi, m * gi + m))) for gi in range(64)])
    if name == "i":
        doc, qlen, m = s(4096), max(16, int(64 * scale) // 16 * 16), 64
        return Batch([(doc + qlen, qlen)] * (4 * m),
                     [(doc, list(range(m * gi, m * gi + m))) for gi in range(4)])
    raise ValueError(name)


def attention_flops(batch: Batch) -> float:
    """Matmul FLOPs of causal attention (QK^T and PV, 2 per MAC): a query at position p sees p + 1
    keys."""
    vis = sum(ql * kv - ql * (ql - 1) / 2 for kv, ql in batch.seqs)
    return 4.0 * vis * HQ * D


def build_metadata(batch: Batch, ps: int, page_base: int):
    """Numpy metadata; pages of this set start at page_base (sets do not overlap)."""
    nxt = [page_base]

    def alloc(n):
        out = list(range(nxt[0], nxt[0] + n))
        nxt[0] += n
        return out

    owner = {m: gi for gi, (_, ms) in enumerate(batch.groups) for m in ms}
    gpages = [alloc(pl // ps) for pl, _ in batch.groups]       # prefixes are page-aligned here
    rows = []
    for i, (kv, _) in enumerate(batch.seqs):
        n = -(-kv // ps)
        shared = gpages[owner[i]] if i in owner else []
        rows.append(shared + alloc(n - len(shared)))
    s_count = len(batch.seqs)
    pmax = max(len(r) for r in rows)
    pt = np.zeros((s_count, pmax), np.int32)
    for i, r in enumerate(rows):
        pt[i, :len(r)] = r
    pos, tseq, qs = [], [], [0]
    for i, (kv, ql) in enumerate(batch.seqs):
        pos += list(range(kv - ql, kv))
        tseq += [i] * ql
        qs.append(qs[-1] + ql)
    md = AttentionMetadata(
        positions=np.asarray(pos, np.int32), token_seq=np.asarray(tseq, np.int32),
        slot_mapping=np.zeros((len(pos),), np.int32), query_start=np.asarray(qs, np.int32),
        seq_lens=np.asarray([kv for kv, _ in batch.seqs], np.int32), page_table=pt)
    if batch.groups:
        gpt = np.asarray(gpages, np.int32)
        sg = np.full((s_count,), -1, np.int32)
        pl_ = np.zeros((s_count,), np.int32)
        for gi, (pl, ms) in enumerate(batch.groups):
            sg[ms] = gi
            pl_[ms] = pl
        groups = PrefixGroups(seq_group=sg, prefix_lens=pl_, page_table=gpt,
                              lens=np.asarray([p for p, _ in batch.groups], np.int32))
    else:
        groups = None
    return md, groups, nxt[0]


def unique_kv_bytes(batch: Batch) -> int:
    """Bytes of distinct KV a step must read at least once (K and V, all KV heads)."""
    per_tok = HKV * D * 2 * jnp.dtype(DTYPE).itemsize
    shared = {m: pl for pl, ms in batch.groups for m in ms}
    toks = sum(pl for pl, _ in batch.groups) + sum(kv - shared.get(i, 0)
                                                   for i, (kv, _) in enumerate(batch.seqs))
    return int(toks * per_tok)


def numpy_oracle(q, k_cache, v_cache, md, sm_scale, tokens):
    """float64 causal attention of the given tokens over their pages: [len(tokens), HQ, D]."""
    qn = np.asarray(q[np.asarray(tokens)].astype(jnp.float32), np.float64)
    out = np.zeros_like(qn)
    g = HQ // HKV
    for n, tok in enumerate(tokens):
        s = int(md.token_seq[tok])
        pos = int(md.positions[tok])
        kv = min(pos + 1, int(md.seq_lens[s]))
        ps = k_cache.shape[2]
        pages = np.asarray(md.page_table[s][: -(-kv // ps)])
        k = np.asarray(k_cache[:, pages].astype(jnp.float32), np.float64).reshape(HKV, -1, D)[:, :kv]
        v = np.asarray(v_cache[:, pages].astype(jnp.float32), np.float64).reshape(HKV, -1, D)[:, :kv]
        for h in range(HQ):
            sc = k[h // g] @ qn[n, h] * sm_scale
            w = np.exp(sc - sc.max())
            out[n, h] = (w / w.sum()) @ v[h // g]
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_sets(fn, arg_sets, reps, consts=(), mode="dispatch"):
    """Median seconds per set of `fn` over R distinct input sets.

    mode "dispatch": one call per set, enqueued back to back and synchronised once (the host
    runs ahead, so this is GPU time plus the gaps between launches). mode "program": one jitted
    program evaluates all R sets one after another (on the H100 this measured slower than
    dispatch for small cases). `kernel_breakdown` gives the GPU kernels' own time.

    `consts` (the KV caches) are passed as arguments, never closed over: a closed-over array is
    embedded in the program as a constant (4.3 GB for case a), which made each compile take
    minutes on the H100 machine.
    """
    if mode == "program":
        f = jax.jit(lambda c, sets: [fn(*c, *a) for a in sets])
        run = lambda: f(tuple(consts), list(arg_sets))            # noqa: E731
    else:
        f = jax.jit(fn)
        run = lambda: [f(*consts, *a) for a in arg_sets]          # noqa: E731
    return _timed(run, reps, len(arg_sets))


def _timed(run, reps: int, calls: int):
    """(median, min) seconds per call over `reps` runs of `run` (each `calls` calls) after one
    warm-up run, the last run's outputs, and `run` itself (for a traced pass)."""
    out = run()
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return float(np.median(times)), float(np.min(times)), out, run


def time_layers(fn, args, reps, consts, offsets):
    """Median seconds per call of `fn(*consts, *args, off=o)` for each page offset in `offsets`,
    all inside one jitted program (the engine's step: one work list, one call per layer at the
    layer's page offset). The program's fixed launch cost is spread over len(offsets) calls."""
    f = jax.jit(lambda c, a: [fn(*c, *a, off=o) for o in offsets])
    run = lambda: f(tuple(consts), tuple(args))                  # noqa: E731
    return _timed(run, reps, len(offsets))


def kernel_breakdown(run, nsets: int, trace_dir: str) -> dict:
    """From a device trace of one more `run()`: GPU time per kernel name per set, GPU busy time
    (union of kernel intervals) and span (first start to last end) per set, and the idle gaps
    between consecutive kernels (where the GPU waited for the host)."""
    from jaxserve.tools.trace_summary import summarise

    jax.profiler.start_trace(trace_dir)
    jax.block_until_ready(run())
    jax.profiler.stop_trace()
    summ = summarise(trace_dir, 12, events=True)
    ev = summ["events"]
    gaps = np.asarray([max(0, b[0] - a[1]) for a, b in zip(ev, ev[1:])], np.float64) / 1e9
    return dict(
        kernels=[(k, s / nsets, n // max(1, nsets)) for k, s, n in summ["kernels"]],
        busy=summ["gpu_busy_s"] / nsets, span=summ["gpu_span_s"] / nsets,
        gaps_total=float(gaps.sum()) / nsets, gap_median=float(np.median(gaps)) if gaps.size else 0.0,
        gap_max=float(gaps.max()) if gaps.size else 0.0, kernels_per_set=len(ev) / nsets)


def hbm_bandwidth(reps):
    """Bytes read + written per second of a 1 GiB bf16 elementwise pass (4 buffers)."""
    n = (FLAGS.bw_mib << 20) // 2
    keys = jax.random.split(jax.random.key(1), 4)
    xs = [jax.random.normal(k, (n,), jnp.bfloat16) for k in keys]
    sec, _, out, _ = time_sets(lambda x: x * 2 + 1, [(x,) for x in xs], reps, mode="dispatch")
    del out, xs
    return 2 * n * 2 / sec


def stacked_prefix_peers(case, batch, record, sm_scale):
    """The prefix part of a cascade step as dense attention: per group with prefilling members,
    every member's query tokens stacked into one sequence over the group's prefix (no mask: all
    of a member's tokens follow the prefix). This is the work a shared-prefix item does; cuDNN
    and JAX's Mosaic GPU flash attention (FlashAttention-3 on Hopper: TMA, wgmma, warp-specialised
    loads) say what rate a kernel reaches at the shape. Mosaic needs the query length a multiple
    of 2 x block_q and the KV a multiple of block_kv: the inputs are zero-padded, and FLOPs are
    counted over the unpadded shape (the useful work)."""
    pre = [(p, [m for m in mem if batch.seqs[m][1] > 1]) for p, mem in batch.groups]
    pre = [(p, mem) for p, mem in pre if mem]
    qls = {batch.seqs[m][1] for _, mem in pre for m in mem}
    if not pre or len({(p, len(mem)) for p, mem in pre}) != 1 or len(qls) != 1:
        return
    (plen, mem), ng, ql = pre[0], len(pre), qls.pop()
    sq = len(mem) * ql
    flops = 4.0 * ng * sq * plen * HQ * D
    ka, kb_, kc_ = jax.random.split(jax.random.key(11), 3)
    q = jax.random.normal(ka, (ng, sq, HQ, D), DTYPE)
    k = jax.random.normal(kb_, (ng, plen, HKV, D), DTYPE)
    v = jax.random.normal(kc_, (ng, plen, HKV, D), DTYPE)
    shape = f"{ng} groups x {len(mem)} members x {ql} queries stacked ({sq}) over a {plen}-token prefix"
    record("cudnn_stacked", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=sm_scale, implementation="cudnn"), [(q, k, v)],
        f"jax.nn.dot_product_attention(cudnn), {shape}, no mask", consts=(), own_flops=flops,
        oracle=False)
    cudnn_packed_probe(case, q, k, v, record, sm_scale, flops, shape)
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu
    except Exception as e:  # pragma: no cover - Mosaic GPU needs a Hopper-class GPU build
        print(f"{case} mgpu_stacked unavailable: {type(e).__name__}: {e}")
        return
    for cfg in FLAGS.mgpu_configs:
        bq, bkv, steps = (int(x) for x in cfg.split("x"))
        sq_p, pl_p = -(-sq // (2 * bq)) * 2 * bq, -(-plen // bkv) * bkv
        qp = jnp.pad(q, ((0, 0), (0, sq_p - sq), (0, 0), (0, 0)))
        kp = jnp.pad(k, ((0, 0), (0, pl_p - plen), (0, 0), (0, 0)))
        vp = jnp.pad(v, ((0, 0), (0, pl_p - plen), (0, 0), (0, 0)))
        conf = attention_mgpu.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps)
        # The kernel applies no softmax scale: q is scaled inside the timed program, as a
        # caller would have to. Its padded keys are not masked: a rate, not an output.
        # float16: the kernel's shared-memory buffers are float16 whatever the inputs (the
        # rate of bf16 and f16 wgmma is the same)
        qp, kp, vp = (x.astype(jnp.float16) for x in (qp, kp, vp))
        record(f"mgpu_stacked[{cfg}]", lambda q, k, v, conf=conf: attention_mgpu.attention(
            (q * sm_scale).astype(q.dtype), k, v, conf), [(qp, kp, vp)],
            f"jax attention_mgpu (FA3, Mosaic GPU) {shape}, padded to {sq_p} x {pl_p}",
            consts=(), own_flops=flops, oracle=False)


def cudnn_packed_probe(case, q, k, v, record, sm_scale, flops, shape):
    """The prefix part as one cuDNN call in the packed (THD) layout, with the log-sum-exp an LSE
    merge needs: every group's stacked queries one segment of a single row, its prefix the
    matching KV segment (`q_offsets` / `kv_offsets`), `return_residual=True`. This is the form
    an engine step could hand cuDNN (static shapes: the packed lengths are the step's buckets).
    Checked against a float64 oracle on a sample of rows of the second segment."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except Exception as e:  # pragma: no cover
        print(f"{case} cudnn_packed unavailable: {e}")
        return
    ng, sq, hq, d = q.shape
    plen = k.shape[1]
    qp, kp, vp = (x.reshape(1, ng * x.shape[1], *x.shape[2:]) for x in (q, k, v))
    qo = jnp.asarray([[i * sq for i in range(ng + 1)]], jnp.int32)
    ko = jnp.asarray([[i * plen for i in range(ng + 1)]], jnp.int32)
    ql = jnp.full((1, ng), sq, jnp.int32)
    kl = jnp.full((1, ng), plen, jnp.int32)

    def fn(q, k, v):
        return fa.dot_product_attention(q, k, v, q_seqlen=ql, kv_seqlen=kl, q_offsets=qo,
                                        kv_offsets=ko, scale=sm_scale,
                                        mask_type=fa.MaskType.PADDING, return_residual=True)
    note = f"cuDNN packed layout + log-sum-exp, {shape}"
    try:
        out, lse = jax.jit(fn)(qp, kp, vp)
        seg = min(1, ng - 1)
        rows = np.unique(np.linspace(0, sq - 1, 6).astype(int))
        qs = np.asarray(q[seg].astype(jnp.float32), np.float64)[rows]      # [r, Hq, D]
        ks = np.asarray(k[seg].astype(jnp.float32), np.float64)            # [P, Hkv, D]
        vs = np.asarray(v[seg].astype(jnp.float32), np.float64)
        g = hq // ks.shape[1]
        kr, vr = np.repeat(ks, g, axis=1), np.repeat(vs, g, axis=1)        # [P, Hq, D]
        sc = np.einsum("rhd,phd->rhp", qs, kr) * sm_scale
        mx = sc.max(-1, keepdims=True)
        p = np.exp(sc - mx)
        want_o = np.einsum("rhp,phd->rhd", p / p.sum(-1, keepdims=True), vr)
        want_l = (mx[..., 0] + np.log(p.sum(-1)))                           # [r, Hq]
        got_o = np.asarray(out[0, seg * sq + rows].astype(jnp.float32))
        rel = float(np.linalg.norm(got_o - want_o) / np.linalg.norm(want_o))
        lse_np = np.asarray(lse)
        # the residual's layout is read off its shape: [B * M, N, T] or [B, N, T]
        if lse_np.ndim == 3 and lse_np.shape[0] == ng:
            got_l = lse_np[seg][:, rows].T
        else:
            got_l = lse_np.reshape(-1, hq, ng * sq)[0][:, seg * sq + rows].T
        lse_err = float(np.max(np.abs(got_l - want_l)))
        note += f"; lse shape {list(lse_np.shape)}, output rel err {rel:.1e}, lse max abs err {lse_err:.1e}"
        print(f"{case} cudnn_packed_lse check: {note}", flush=True)
    except Exception as e:
        print(f"{case} cudnn_packed_lse FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return
    record("cudnn_packed_lse", fn, [(qp, kp, vp)], note, consts=(), own_flops=flops,
           oracle=False)


def parse_cfg(s: str) -> dict:
    out = {}
    for item in s.split("+"):
        if item:
            k, v = item.split("=")
            out[k] = int(v)
    return out


def commit_id():
    if FLAGS.commit:
        return FLAGS.commit
    if os.environ.get("JAXSERVE_COMMIT", "unknown") != "unknown":   # stale .git on the device
        return os.environ["JAXSERVE_COMMIT"]
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pallas_kernels"],
                               capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------------------------------

def main(argv):
    del argv

    def attend(q, kc, vc, md, **kw):   # interpret mode for CPU smoke tests
        return kernel.ragged_paged_attention(q, kc, vc, md, interpret=FLAGS.interpret, **kw)

    def device_list(md, **kw):         # the runner builds it once per step, inside the program
        return dataclasses.replace(md, work=work_items.device_work_items(
            md, num_q_heads=HQ, num_kv_heads=HKV, page_size=ps, head_dim=D, **kw))
    ps = FLAGS.page_size
    dev = jax.devices()[0]
    device = f"{dev.device_kind} ({jax.default_backend()})"
    commit = commit_id()
    reps = FLAGS.reps
    bw = hbm_bandwidth(reps)
    print(f"# device {device}, jax {jax.__version__}, HBM elementwise {bw / 1e12:.3f} TB/s",
          flush=True)
    sm_scale = D ** -0.5
    records = []
    table = []
    cmd = " ".join(sys.argv)

    def flush_json():
        # Written after every record: a later hang or timeout keeps what was measured.
        if FLAGS.out:
            os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
            with open(FLAGS.out, "w") as f:
                json.dump([dict(r, command=cmd) for r in records], f, indent=1)
    for case in FLAGS.cases:
        batch = case_batch(case, FLAGS.scale)
        print(f"# case {case}: building inputs (t={time.perf_counter() - T0:.1f}s)", flush=True)
        nsets = FLAGS.sets or {"a": 4, "b": 16, "c": 6, "d": 6, "e": 4, "f": 4, "g": 4,
                               "h": 3, "i": 3}[case]
        # Build R sets of metadata over disjoint pages, then one cache holding all of them.
        mds, mdgs = [], []
        base = 1
        for _ in range(nsets):
            md, mdg, base = build_metadata(batch, ps, base)
            mds.append(md)
            mdgs.append(mdg)
        total_pages = base + 1
        pages_per_set = (base - 1) // nsets       # every set has the same layout (layers mode)
        kk, kv_, kq = jax.random.split(jax.random.key(hash(case) % 1000), 3)
        k_cache = jax.random.normal(kk, (HKV, total_pages, ps, D), DTYPE)
        v_cache = jax.random.normal(kv_, (HKV, total_pages, ps, D), DTYPE)
        t = mds[0].num_tokens
        qs = [jax.random.normal(k, (t, HQ, D), DTYPE)
              for k in jax.random.split(kq, nsets)]
        ukv = unique_kv_bytes(batch)
        flops = attention_flops(batch)
        decode_only = all(ql == 1 for _, ql in batch.seqs)
        ref_out = None
        # Correctness check on a sample of tokens against a float64 numpy oracle (cheap, and
        # independent of XLA's GPU compiler and autotuner).
        sample = np.unique(np.linspace(0, t - 1, 12).astype(int))

        def record(impl, fn, arg_sets, note="", consts=None, offsettable=False, own_flops=None,
                   oracle=True):
            nonlocal ref_out
            t_start = time.perf_counter()
            print(f"{case:2s} {impl:34s} ... (t={t_start - T0:.1f}s)", flush=True)
            try:
                cs = (k_cache, v_cache) if consts is None else consts
                timing = FLAGS.timing
                if timing == "layers" and offsettable:
                    sec, best, out, run = time_layers(fn, arg_sets[0], reps, cs,
                                                      [j * pages_per_set for j in range(len(arg_sets))])
                else:
                    timing = "dispatch" if timing == "layers" else timing
                    sec, best, out, run = time_sets(fn, arg_sets, reps, cs, timing)
                extra = {}
                if FLAGS.also_dispatch and FLAGS.timing != "dispatch":
                    extra["seconds_dispatch"] = time_sets(fn, arg_sets, reps, cs, "dispatch")[0]
                if case in FLAGS.trace_cases:
                    kb = kernel_breakdown(run, len(arg_sets),
                                          os.path.join(FLAGS.trace_dir, f"{case}_{len(records)}"))
                    extra["gpu_kernels"] = kb["kernels"]
                    extra["gpu_kernel_seconds"] = sum(x[1] for x in kb["kernels"])
                    extra["gpu_busy_seconds"] = kb["busy"]
                    extra["gpu_span_seconds"] = kb["span"]
                    extra["gpu_idle_gaps"] = {k: kb[k] for k in ("gaps_total", "gap_median",
                                                                 "gap_max", "kernels_per_set")}
            except Exception as e:  # record failures instead of dying mid-run
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                print(f"{case:2s} {impl:34s} FAILED {msg}", flush=True)
                records.append(dict(case=case, impl=impl, device=device, error=msg,
                                    commit=commit, jax_version=jax.__version__))
                return
            if oracle:
                o0 = np.asarray(out[0].astype(jnp.float32)).reshape(t, HQ, D)
                if ref_out is None:
                    ref_out = numpy_oracle(qs[0], k_cache, v_cache, mds[0], sm_scale, sample)
                rel = float(np.linalg.norm(o0[sample] - ref_out) / np.linalg.norm(ref_out))
            else:        # a peer over other data (contiguous copies): no oracle of its own
                rel = float("nan")
            fl = flops if own_flops is None else own_flops
            frac = ukv / sec / bw
            wall = time.perf_counter() - t_start
            rec = dict(case=case, impl=impl, device=device, seconds=sec, seconds_min=best,
                       unique_kv_bytes=ukv, hbm_bandwidth_measured=bw, bw_fraction=frac,
                       attention_flops=fl, tflops_per_s=fl / sec / 1e12,
                       rel_err_vs_reference=rel, sets=len(arg_sets), page_size=ps,
                       num_tokens=t, num_seqs=len(batch.seqs), commit=commit,
                       jax_version=jax.__version__, note=note, wall_incl_compile_s=wall,
                       timing=timing, **extra)
            records.append(rec)
            table.append((case, impl, sec, frac, fl / sec / 1e12, rel))
            flush_json()
            print(f"{case:2s} {impl:34s} {sec * 1e3:8.4f} ms  {frac * 100:6.1f}% BW  "
                  f"{fl / sec / 1e12:6.1f} TFLOP/s  rel_err {rel:.2e}  "
                  f"(compile+check+timing {wall:.1f}s)", flush=True)
            if "seconds_dispatch" in extra:
                print(f"   dispatch-per-call timing {extra['seconds_dispatch'] * 1e3:.4f} ms", flush=True)
            if "gpu_busy_seconds" in extra:
                gi = extra["gpu_idle_gaps"]
                print(f"   gpu busy {extra['gpu_busy_seconds'] * 1e6:.2f} us/set, span "
                      f"{extra['gpu_span_seconds'] * 1e6:.2f} us/set, idle gaps "
                      f"{gi['gaps_total'] * 1e6:.2f} us/set (median {gi['gap_median'] * 1e6:.2f}, "
                      f"max {gi['gap_max'] * 1e6:.2f} us), {gi['kernels_per_set']:.1f} kernels/set",
                      flush=True)
            for kname, ksec, kn in extra.get("gpu_kernels", []):
                print(f"   gpu {ksec * 1e6:9.2f} us x{kn:<3d} {kname[:90]}", flush=True)

        mds_j = [jax.tree.map(jnp.asarray, m) for m in mds]
        for impl in FLAGS.impls:
            if impl == "pallas_gpu":
                record(impl, lambda kc, vc, q, md, off=0: attend(
                    q, kc, vc, device_list(md), sm_scale=sm_scale, page_offset=off),
                    list(zip(qs, mds_j)), "no sharing; work list built on device",
                    offsettable=True)
            elif impl == "pallas_gpu_variants":
                # Tuning variants of the no-sharing kernel (bk=128 at head dim 128 has not been
                # measured: run it alone, its compile is the slow one).
                for v in FLAGS.variants:
                    c = parse_cfg(v)
                    lw = dict(block_kv=c.get("bk"), kv_splits=c.get("splits"),
                              block_rows=c.get("bm"))
                    kw = dict(block_kv=c.get("bk"), num_warps=c.get("warps"),
                              num_stages=c.get("stages", 2), prefetch_pages=bool(c.get("pf", 0)),
                              prefetch_kv=bool(c.get("pfkv", 0)))
                    record(f"pallas_gpu[{v}]", lambda kc, vc, q, md, kw=kw, lw=lw: attend(
                        q, kc, vc, device_list(md, **lw), sm_scale=sm_scale, **kw),
                        list(zip(qs, mds_j)), "no sharing; variant")
            elif impl == "pallas_gpu_hostwork":
                # Same kernel, work list built on the host (as the engine can do once per step
                # for all layers): no device-side list building in the timed program.
                bm = block_sizes.device_block_rows(t, len(batch.seqs), HQ // HKV)
                mdw = [jax.tree.map(jnp.asarray, dataclasses.replace(m, work=cascade.build_cascade_work(
                    m, None, num_q_heads=HQ, num_kv_heads=HKV, page_size=ps, block_rows=bm,
                    block_kv=64, num_sms=getattr(dev, "core_count", 132))))
                    for m in mds]
                record(impl, lambda kc, vc, q, md: attend(
                    q, kc, vc, md, sm_scale=sm_scale, block_kv=64),
                    list(zip(qs, mdw)), f"no sharing; host work list bm={bm}")
            elif impl in ("pallas_gpu_cascade", "pallas_gpu_cascade_variants"):
                if mdgs[0] is None:
                    continue
                for v in ([""] if impl == "pallas_gpu_cascade" else FLAGS.cascade_variants):
                    c = parse_cfg(v) if v else {}
                    bk = c.get("bk", 64)
                    # packed=N: up to N prefilling runs' prefixes through cuDNN's packed call,
                    # over a KV buffer of the engine's size (block_sizes.host_layout)
                    npk = c.get("packed", 0)
                    pk_pages = max(mds[0].pages_per_seq, -(-t // ps)) if npk else 0
                    mdw = [jax.tree.map(jnp.asarray, dataclasses.replace(m, work=cascade.build_cascade_work(
                        m, g, num_q_heads=HQ, num_kv_heads=HKV, page_size=ps,
                        block_rows=c.get("bm", 64), block_kv=bk, chunk_len=c.get("chunk"),
                        own_block_rows=c.get("own"), num_partials=c.get("partials"),
                        num_sms=getattr(dev, "core_count", 132), packed_segments=npk,
                        packed_pages=pk_pages)))
                        for m, g in zip(mds, mdgs)]
                    w = mdw[0].work
                    note = (f"shared prefix; items={int(np.sum(np.asarray(w.kv_end) > np.asarray(w.kv_start)))}"
                            f" bm={w.rows.shape[1]} partials/row<={w.merge_idx.shape[1]}")
                    if w.packed is not None:
                        seg = np.asarray(w.packed.token_seg)
                        note += (f"; packed segments {len(np.unique(seg[seg >= 0]))}, "
                                 f"{int((seg >= 0).sum())} tokens")
                    # xlamerge=1 / pallasmerge=1: which merge (otherwise the default)
                    merge_impl = ("xla" if c.get("xlamerge") else
                                  "pallas" if c.get("pallasmerge") else None)

                    def cascade_fn(kc, vc, q, md, off=0, bk=bk, c=c, merge_impl=merge_impl):
                        return attend(q, kc, vc, md, page_offset=off, sm_scale=sm_scale,
                                      block_kv=bk, num_warps=c.get("warps"),
                                      num_stages=c.get("stages", 2),
                                      prefetch_pages=bool(c.get("pf", 0)),
                                      prefetch_kv=bool(c.get("pfkv", 0)), merge_impl=merge_impl)
                    record("pallas_gpu_cascade" + (f"[{v}]" if v else ""), cascade_fn,
                           list(zip(qs, mdw)), note, offsettable=True)
            elif impl == "xla_reference":
                record(impl, lambda kc, vc, q, md, off=0: reference.ragged_paged_attention(
                    q, kc, vc, md, sm_scale=sm_scale, page_offset=off), list(zip(qs, mds_j)),
                    "pure jnp gather + einsum, per request", offsettable=True)
            elif impl == "jax_paged_attention" and decode_only:
                try:
                    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
                except Exception as e:
                    print(f"{case} jax_paged_attention unavailable: {e}")
                    continue
                # Its page table must be a multiple of k_splits * pages_per_compute_block.
                mult = 16 * 8
                args = []
                for q, m in zip(qs, mds):
                    p = m.page_table.shape[1]
                    pp = -(-p // mult) * mult
                    bt = np.zeros((m.num_seqs, pp), np.int32)
                    bt[:, :p] = m.page_table
                    args.append((q, jnp.asarray(bt), jnp.asarray(m.seq_lens)))
                # It has no softmax-scale argument: scale q (part of the timed program, as
                # a user of it would have to).
                record(impl, lambda kc, vc, q, bt, ln: paged_attention(
                    (q * sm_scale).astype(q.dtype), kc, vc, bt, ln),
                       args, "jax.experimental.pallas.ops.gpu.paged_attention, defaults; "
                       "reads every request's KV (no sharing)")
            elif impl in ("cudnn_dense", "xla_dense") and decode_only:
                kvl = batch.seqs[0][0]
                if any(kv != kvl for kv, _ in batch.seqs):
                    continue
                n_tok = len(batch.seqs) * kvl * 2 * HKV * D * 2
                if n_tok * nsets > 24e9:
                    nsets_d = max(1, int(24e9 // n_tok))
                else:
                    nsets_d = nsets
                args = []
                for q, m in zip(qs[:nsets_d], mds[:nsets_d]):
                    pt = jnp.asarray(m.page_table)
                    # contiguous [B, L, Hkv, D] copies of the same KV (per request, no sharing)
                    kd = jnp.swapaxes(k_cache[:, pt].reshape(HKV, m.num_seqs, -1, D), 0, 1)
                    vd = jnp.swapaxes(v_cache[:, pt].reshape(HKV, m.num_seqs, -1, D), 0, 1)
                    kd = jnp.swapaxes(kd, 1, 2)[:, :kvl]
                    vd = jnp.swapaxes(vd, 1, 2)[:, :kvl]
                    args.append((q[:, None], kd, vd))
                implname = "cudnn" if impl == "cudnn_dense" else "xla"
                record(impl, lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, scale=sm_scale, implementation=implname)[:, 0], args,
                    f"jax.nn.dot_product_attention(implementation={implname!r}) on contiguous "
                    f"KV (no paging, no sharing)", consts=())
                del args
            elif impl == "cudnn_prefill":
                # The tensor-core rate dense flash attention reaches at this step's prefill
                # shape: the prefilling members' queries over contiguous copies of their whole
                # context, without the causal mask (its FLOPs are counted as such).
                pre = [(kv, ql) for kv, ql in batch.seqs if ql > 1]
                if not pre or len(set(pre)) != 1:
                    continue
                (kvl, ql), b = pre[0], len(pre)
                ka, kb_, kc_ = jax.random.split(jax.random.key(7), 3)
                args = [(jax.random.normal(ka, (b, ql, HQ, D), DTYPE),
                         jax.random.normal(kb_, (b, kvl, HKV, D), DTYPE),
                         jax.random.normal(kc_, (b, kvl, HKV, D), DTYPE))]
                record(impl, lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, scale=sm_scale, implementation="cudnn"), args,
                    f"jax.nn.dot_product_attention(cudnn), {b} x {ql} queries over {kvl} "
                    f"contiguous keys, no mask", consts=(), own_flops=4.0 * b * ql * kvl * HQ * D,
                    oracle=False)
                del args
            elif impl == "stacked_prefix":
                stacked_prefix_peers(case, batch, record, sm_scale)
        del k_cache, v_cache
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        cmd = " ".join(sys.argv)
        for r in records:
            r["command"] = cmd
        with open(FLAGS.out, "w") as f:
            json.dump(records, f, indent=1)
    print("\n# summary: case impl ms %BW(unique KV) TFLOP/s rel_err")
    for case, impl, sec, frac, tf, rel in table:
        print(f"{case} {impl:34s} {sec * 1e3:8.4f} {frac * 100:6.1f} {tf:6.1f} {rel:.1e}")


if __name__ == "__main__":
    app.run(main)
