"""Can a decode step's attention (memory-bound) run beside its matmuls (compute-bound) on one GPU?

The engine's step runs each layer's matmuls, then its attention, one after the other, so a decode
step costs their sum while its floor is their max (benchmarks/README.md: decode-heavy at 0.36 of
the floor, the sum capping it near 0.60). This probe times L Llama-3-8B layers of one decode step
(R rows at C tokens of context, bf16, the engine's Pallas kernel over a paged cache, KV writes
included) in one program per variant:

  mm       the matmuls alone (qkv, o, gate_up, down), all R rows
  attn     the KV write and attention alone, all R rows
  seq      the layer as the engine runs it
  split    two nano-batches of R/2 rows, interleaved, one stream (what splitting costs)
  streams  the same with every attention on a second stream (`compute_on("gpu_stream:1")`), so
           nano-batch A's attention can run while B's matmuls do (NanoFlow's schedule):
             qkv(A_l); {attn(A_l) || post(B_{l-1}), qkv(B_l)}; {attn(B_l) || post(A_l), qkv(A_{l+1})}

  streams_mm the other way round: attention on the main stream, each nano-batch's
           post-attention matmuls and next qkv on stream 1
  smoke_add, smoke_mm, smoke_pallas: one elementwise op, one matmul, or one attention call, on
           stream 1 (does the annotation compile at all)

If `streams` lands near max(mm, attn) rather than mm + attn, an overlapped decode layer is worth
building. The other way to the same overlap needs no annotation: run `split` inside a CUDA graph
whose nodes follow data dependencies instead of program order (XLA_FLAGS
`--xla_gpu_command_buffer_scheduling_mode=CONCURRENT` with command buffers on), so nano-batch A's
attention and B's matmuls, which share no buffer, may run at once
(benchmarks/device/probe_graphs.sh times `split` under each mode). Measured on the H200 (call
Q): `split` is 3-5 % slower than `seq` in every mode, CONCURRENT included: no overlap. Measured on the H200 (JAX 0.11.2, benchmarks/README.md, calls I-P): at 716 x 640, mm
0.49-0.51, attn 0.63 (0.80 before the decode prefetch), seq 1.06 (their sum). A nested jitted
call inside an annotated computation (jnp.where, jax.nn.silu) gets no stream ("No
ExecutionStreamId found for call-start"), so the kernel's merge and this probe's SiLU use lax
ops; with that the stream variants compile, but run ~11x slower than seq. Their outputs differ
from seq's (max_rel_diff ~0.6 at 716 rows), but so do `split`'s on one stream at 716 rows (0.0
at 1024): that difference is this probe's, not the streams'. Seconds are the best of a
few runs of the whole program (after a warm-up run), per layer.

  python3 scripts/probe_overlap.py --shapes=716x640,1024x640 --layers=8 --out=$OUT/overlap.json
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np
try:   # JAX <= 0.10: compute_on is a context manager, compute_on2 the function form
    from jax.experimental.compute_on import compute_on2 as _compute_on_fn
except ImportError:  # later JAX: compute_on is the function form
    from jax.experimental.compute_on import compute_on as _compute_on_fn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxserve.tools import roofline  # noqa: E402
from pallas_kernels.gpu import kernel, work_items  # noqa: E402
from pallas_kernels.metadata import AttentionMetadata, write_kv  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["716x640", "1024x640"], "ROWSxCONTEXT decode steps")
flags.DEFINE_integer("layers", 8, "layers in each program")
flags.DEFINE_list("variants", ["mm", "attn", "seq", "split", "streams", "streams_ro",
                               "streams2", "streams2_ro"],
                  "variants to time")
flags.DEFINE_integer("reps", 5, "timed runs (best)")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode (CPU smoke test)")
flags.DEFINE_integer("hidden", 4096, "hidden size")
flags.DEFINE_integer("intermediate", 14336, "MLP size")
flags.DEFINE_string("out", "", "JSON output")

HQ, HKV, D = 32, 8, 128


def metadata(rows: int, ctx: int, ps: int, first_page: int) -> AttentionMetadata:
    """One decode token per row at position ctx - 1; row r's pages are contiguous."""
    npg = -(-ctx // ps)
    pt = first_page + np.arange(rows * npg, dtype=np.int32).reshape(rows, npg)
    pos = np.full((rows,), ctx - 1, np.int32)
    slots = pt[:, (ctx - 1) // ps] * ps + (ctx - 1) % ps
    md = AttentionMetadata(
        positions=jnp.asarray(pos), token_seq=jnp.arange(rows, dtype=jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        query_start=jnp.arange(rows + 1, dtype=jnp.int32),
        seq_lens=jnp.full((rows,), ctx, jnp.int32), page_table=jnp.asarray(pt))
    return dataclasses.replace(md, work=work_items.device_work_items(
        md, num_q_heads=HQ, num_kv_heads=HKV, page_size=ps, head_dim=D))


def run_shape(rows: int, ctx: int, layers: int) -> dict:
    ps, hid, inter = FLAGS.page_size, FLAGS.hidden, FLAGS.intermediate
    dt = jnp.bfloat16
    half = rows // 2
    md_all = metadata(rows, ctx, ps, 1)
    md_a = metadata(half, ctx, ps, 1)
    md_b = metadata(rows - half, ctx, ps, 1 + half * -(-ctx // ps))
    # Arguments of every program, as the engine's step passes its metadata (not constants).
    mds = (md_all, md_a, md_b)
    pages = 1 + rows * -(-ctx // ps) + 1
    keys = iter(jax.random.split(jax.random.key(0), 8 * layers + 4))

    def w(shape, fan_in):
        return (jax.random.normal(next(keys), shape, jnp.float32) / fan_in ** 0.5).astype(dt)
    ws = [dict(qkv=w((hid, (HQ + 2 * HKV) * D), hid), o=w((HQ * D, hid), HQ * D),
               gu=w((hid, 2 * inter), hid), down=w((inter, hid), inter)) for _ in range(layers)]
    kc = jax.random.normal(next(keys), (HKV, layers * pages, ps, D), dt)
    vc = jax.random.normal(next(keys), (HKV, layers * pages, ps, D), dt)
    x0 = jax.random.normal(next(keys), (rows, hid), dt)
    scale = D ** -0.5

    def qkv(x, wl):
        q, k, v = jnp.split(x @ wl["qkv"], [HQ * D, (HQ + HKV) * D], axis=-1)
        n = x.shape[0]
        return q.reshape(n, HQ, D), k.reshape(n, HKV, D), v.reshape(n, HKV, D)

    def post(x, a, wl):
        x = x + a.reshape(x.shape[0], HQ * D) @ wl["o"]
        g, u = jnp.split(x @ wl["gu"], 2, axis=-1)
        # SiLU from the lax primitive: jax.nn.silu is a jitted function, and a nested call
        # inside a stream-annotated computation fails to get a stream ("No ExecutionStreamId").
        return x + (g * jax.lax.logistic(g) * u) @ wl["down"]

    def attend(kc, vc, q, k, v, md, li):
        slots = md.slot_mapping + li * pages * ps
        kc, vc = write_kv(kc, vc, k, v, slots)
        a = kernel.ragged_paged_attention(q, kc, vc, md, page_offset=li * pages, sm_scale=scale,
                                          interpret=FLAGS.interpret)
        return kc, vc, a

    def on_stream(stream, read_only):
        def att(kc, vc, q, k, v, md, li):
            if read_only:
                # The KV write stays on the main stream; only the read-only kernel (and its
                # merge) runs on the other one, so no cache buffer aliases across the async call.
                kc, vc = write_kv(kc, vc, k, v, md.slot_mapping + li * pages * ps)
                f = _compute_on_fn(
                    lambda kc, vc, q, md: kernel.ragged_paged_attention(
                        q, kc, vc, md, page_offset=li * pages, sm_scale=scale,
                        interpret=FLAGS.interpret),
                    compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)
                return kc, vc, f(kc, vc, q, md)
            f = _compute_on_fn(lambda kc, vc, q, k, v, md: attend(kc, vc, q, k, v, md, li),
                               compute_type=f"gpu_stream:{stream}",
                               out_memory_spaces=(jax.memory.Space.Device,) * 3)
            return f(kc, vc, q, k, v, md)
        return att

    def v_mm(ws, kc, vc, x, mds):
        for wl in ws:
            q, _, _ = qkv(x, wl)
            x = post(x, q, wl)
        return x, kc, vc

    def v_attn(ws, kc, vc, x, mds):
        q = jnp.broadcast_to(x[:, None, :D], (rows, HQ, D))
        k = q[:, :HKV]
        for li in range(layers):
            kc, vc, a = attend(kc, vc, q, k, k, mds[0], li)
            q = q + a.astype(q.dtype)
        return q, kc, vc

    def v_seq(ws, kc, vc, x, mds):
        for li, wl in enumerate(ws):
            q, k, v = qkv(x, wl)
            kc, vc, a = attend(kc, vc, q, k, v, mds[0], li)
            x = post(x, a, wl)
        return x, kc, vc

    def nano(att, att_b=None):
        att_b = att_b or att

        def f(ws, kc, vc, x, mds):
            xa, xb = x[:half], x[half:]
            qa, ka, va = qkv(xa, ws[0])
            ab = None
            for li, wl in enumerate(ws):
                kc, vc, aa = att(kc, vc, qa, ka, va, mds[1], li)
                if ab is not None:
                    xb = post(xb, ab, ws[li - 1])
                qb, kb, vb = qkv(xb, wl)
                kc, vc, ab = att_b(kc, vc, qb, kb, vb, mds[2], li)
                xa = post(xa, aa, wl)
                if li + 1 < layers:
                    qa, ka, va = qkv(xa, ws[li + 1])
            xb = post(xb, ab, ws[-1])
            return jnp.concatenate([xa, xb]), kc, vc
        return f

    # streams*: every attention on stream 1; streams2*: nano-batch A's on stream 1, B's on 2
    # (two async calls in flight on one stream is an execution context XLA rejects); *_ro: the
    # KV write on the main stream.
    def smoke_add(ws, kc, vc, x, mds):
        # The feature at all: one elementwise op on stream 1 beside a matmul on the main stream.
        y = _compute_on_fn(lambda a: a * 2, compute_type="gpu_stream:1",
                           out_memory_spaces=jax.memory.Space.Device)(x)
        return y + x @ ws[0]["o"][:hid], kc, vc

    def smoke_pallas(ws, kc, vc, x, mds):
        # One attention call (a Pallas custom call and its merge) on stream 1, nothing beside it.
        q, k, v = qkv(x, ws[0])
        kc, vc, a = on_stream(1, True)(kc, vc, q, k, v, mds[0], 0)
        return a.reshape(rows, HQ * D), kc, vc

    def smoke_mm(ws, kc, vc, x, mds):
        # One matmul (a cuBLAS / Triton GEMM, not an elementwise fusion) on stream 1.
        y = _compute_on_fn(lambda a, b: a @ b, compute_type="gpu_stream:1",
                           out_memory_spaces=jax.memory.Space.Device)(x, ws[0]["o"][:hid])
        return y + x, kc, vc

    def nano_mm(stream):
        # The other way round: attention stays on the main stream (its Pallas call cannot be
        # annotated: "No ExecutionStreamId found for call-start"), and each nano-batch's
        # post-attention matmuls plus the next layer's qkv run on `stream`.
        def pq(x, a, wp, wn):
            x = post(x, a, wp)
            return (x,) + qkv(x, wn)
        side = _compute_on_fn(pq, compute_type=f"gpu_stream:{stream}",
                              out_memory_spaces=(jax.memory.Space.Device,) * 4)

        def f(ws, kc, vc, x, mds):
            xa, xb = x[:half], x[half:]
            qa, ka, va = qkv(xa, ws[0])
            qb, kb, vb = qkv(xb, ws[0])
            ab = None
            for li, wl in enumerate(ws):
                kc, vc, aa = attend(kc, vc, qa, ka, va, mds[1], li)
                if ab is not None:
                    xb, qb, kb, vb = side(xb, ab, ws[li - 1], wl)
                kc, vc, ab = attend(kc, vc, qb, kb, vb, mds[2], li)
                if li + 1 < layers:
                    xa, qa, ka, va = side(xa, aa, wl, ws[li + 1])
                else:
                    xa = post(xa, aa, wl)
            xb = post(xb, ab, ws[-1])
            return jnp.concatenate([xa, xb]), kc, vc
        return f

    fns = dict(smoke_add=smoke_add, smoke_mm=smoke_mm, streams_mm=nano_mm(1), smoke_pallas=smoke_pallas, mm=v_mm, attn=v_attn, seq=v_seq, split=nano(attend),
               streams=nano(on_stream(1, False)), streams_ro=nano(on_stream(1, True)),
               streams2=nano(on_stream(1, False), on_stream(2, False)),
               streams2_ro=nano(on_stream(1, True), on_stream(2, True)))
    flops = 2 * rows * layers * sum(int(np.prod(a.shape)) for a in ws[0].values())
    kv_bytes = 2 * rows * ctx * HKV * D * 2 * layers
    rec = dict(rows=rows, context=ctx, layers=layers, matmul_flops=flops, kv_bytes=kv_bytes,
               weight_bytes=2 * layers * sum(int(np.prod(a.shape)) for a in ws[0].values()))
    outs = {}
    for name in FLAGS.variants:
        f = jax.jit(fns[name], donate_argnums=(1, 2))
        try:
            lowered = f.lower(ws, kc, vc, x0, mds)
            compiled = lowered.compile()
            text = compiled.as_text() or ""
            rec[f"{name}_stream_annotations"] = text.count('_xla_stream_annotation=')
            rec[f"{name}_async_calls"] = text.count("call-start")
            # Donation consumes the caches: each timed run gets the previous run's outputs.
            state = [kc, vc]

            def call(*_):
                o, state[0], state[1] = compiled(ws, state[0], state[1], x0, mds)
                return o
            kc = vc = None
            sec = roofline._program_seconds(call, repeats=FLAGS.reps)   # best run after a warm-up
            kc, vc = state
            out = call()
            kc, vc = state
            outs[name] = np.asarray(out.astype(jnp.float32))
            rec[f"{name}_ms_per_layer"] = 1e3 * sec / layers
            print(f"{rows}x{ctx} {name}: {1e3 * sec / layers:.3f} ms/layer "
                  f"(annotations {rec[f'{name}_stream_annotations']})", flush=True)
        except Exception as e:  # a variant that does not compile is a result too
            rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{rows}x{ctx} {name}: {rec[f'{name}_error']}", flush=True)
            if kc is None:
                kc = jax.random.normal(jax.random.key(5), (HKV, layers * pages, ps, D), dt)
                vc = jax.random.normal(jax.random.key(6), (HKV, layers * pages, ps, D), dt)
    # The nano-batched variants compute the same function as seq (up to bf16 rounding order).
    for name in ("split", "streams", "streams_ro", "streams2", "streams2_ro", "streams_mm"):
        if name in outs and "seq" in outs:
            ref = outs["seq"]
            rec[f"{name}_max_rel_diff"] = float(np.max(np.abs(outs[name] - ref))
                                                / (np.max(np.abs(ref)) + 1e-9))
    m = {k: rec.get(f"{k}_ms_per_layer") for k in ("mm", "attn", "seq")}
    if all(m.values()):
        rec["sum_ms"] = m["mm"] + m["attn"]
        rec["max_ms"] = max(m["mm"], m["attn"])
        for name in ("split", "streams", "streams_ro", "streams2", "streams2_ro", "streams_mm"):
            if rec.get(f"{name}_ms_per_layer"):
                ms = rec[f"{name}_ms_per_layer"]
                rec[f"{name}_over_seq"] = ms / m["seq"]
                # 0: no overlap (the sum); 1: perfect overlap (the max of the two parts).
                rec[f"{name}_overlap_achieved"] = (m["seq"] - ms) / max(1e-9, m["seq"] - rec["max_ms"])
    return rec


def main(argv):
    del argv
    dev = jax.devices()[0]
    records = []
    for s in FLAGS.shapes:
        rows, ctx = (int(v) for v in s.split("x"))
        rec = run_shape(rows, ctx, FLAGS.layers)
        rec.update(device=dev.device_kind, jax=jax.__version__,
                   commit=os.environ.get("JAXSERVE_COMMIT", "unknown"), command=" ".join(sys.argv),
                   xla_flags=os.environ.get("XLA_FLAGS", ""))
        records.append(rec)
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(records, f, indent=1)
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    app.run(main)
