"""Probe: what cuDNN's packed (THD) attention returns for segments of unequal lengths with unused
(-1) segment slots, the form an engine step would hand it (GPU only).

Checks the output and the log-sum-exp residual against a float64 oracle on every segment, and
reads off how the residual [segments, Hq, T] is indexed: by the row's index within its segment
("local") or by its packed position ("global"). Then times one call at two engine-like shapes
(device time over many passes inside one program) beside the gathers that build its inputs.

  python3 scripts/probe_cudnn_packed.py --out=/tmp/probe.json
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "JSON output")
flags.DEFINE_integer("reps", 20, "passes timed inside one program")


def oracle(q, k, v, qo, ql, ko, kl, scale):
    """float64: per segment, rows [qo, qo+ql) over keys [ko, ko+kl); GQA by head groups."""
    q, k, v = (np.asarray(x.astype(jnp.float32), np.float64)[0] for x in (q, k, v))
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    o = np.zeros_like(q)
    lse = np.full(q.shape[:2], -np.inf)
    for a, n, b, m in zip(qo, ql, ko, kl):
        if n <= 0:
            continue
        kr = np.repeat(k[b:b + m], g, axis=1)
        vr = np.repeat(v[b:b + m], g, axis=1)
        s = np.einsum("rhd,phd->rhp", q[a:a + n], kr) * scale
        mx = s.max(-1, keepdims=True)
        p = np.exp(s - mx)
        o[a:a + n] = np.einsum("rhp,phd->rhd", p / p.sum(-1, keepdims=True), vr)
        lse[a:a + n] = mx[..., 0] + np.log(p.sum(-1))
    return o, lse


def call(fa, scale):
    def fn(q, k, v, ql, kl, qo, ko):
        return fa.dot_product_attention(q, k, v, q_seqlen=ql, kv_seqlen=kl, q_offsets=qo,
                                        kv_offsets=ko, scale=scale,
                                        mask_type=fa.MaskType.PADDING, return_residual=True)
    return fn


def check(fa, rng, *, tp, tk, hq, hkv, d, qlens, klens, nseg):
    scale = d ** -0.5
    q = jnp.asarray(rng.standard_normal((1, tp, hq, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, tk, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, tk, hkv, d)), jnp.bfloat16)
    qo = np.cumsum([0] + qlens)
    ko = np.cumsum([0] + klens)
    assert qo[-1] <= tp and ko[-1] <= tk
    pad = nseg - len(qlens)
    ql = np.array([qlens + [-1] * pad], np.int32)
    kl = np.array([klens + [-1] * pad], np.int32)
    qoa = np.array([list(qo) + [-1] * pad], np.int32)
    koa = np.array([list(ko) + [-1] * pad], np.int32)
    out, lse = jax.jit(call(fa, scale))(q, k, v, *(jnp.asarray(x) for x in (ql, kl, qoa, koa)))
    want_o, want_l = oracle(q, k, v, qo[:-1], qlens, ko[:-1], klens, scale)
    got_o = np.asarray(out.astype(jnp.float32))[0]
    lse = np.asarray(lse)
    res = dict(shape=list(lse.shape), tp=tp, tk=tk, qlens=qlens, klens=klens, nseg=nseg)
    rows = np.concatenate([np.arange(a, a + n) for a, n in zip(qo[:-1], qlens)])
    res["o_rel_err"] = float(np.linalg.norm(got_o[rows] - want_o[rows])
                             / np.linalg.norm(want_o[rows]))
    res["o_finite_outside"] = bool(np.all(np.isfinite(np.delete(got_o, rows, axis=0))))
    for name in ("local", "global"):
        err = 0.0
        for s, (a, n) in enumerate(zip(qo[:-1], qlens)):
            idx = np.arange(n) if name == "local" else np.arange(a, a + n)
            got = lse[s][:, idx].T                                   # [n, Hq]
            err = max(err, float(np.max(np.abs(got - want_l[a:a + n]))))
        res[f"lse_err_{name}"] = err
    return res


def timed(fn, args, reps):
    """Seconds per call: `reps` calls chained in one program, device-synchronised."""
    def many(q, *rest):
        # q rides in the carry and one element of it depends on the last call's output, so XLA
        # can neither hoist the call out of the loop nor drop a pass.
        def body(i, carry):
            q, acc = carry
            o, l = fn(q, *rest)
            acc = acc + o[0, 0, 0, 0].astype(jnp.float32) + l[0, 0, 0]
            return q.at[0, 0, 0, 0].add((acc * 0).astype(q.dtype)), acc
        return jax.lax.fori_loop(0, reps, body, (q, jnp.float32(0)))[1]
    f = jax.jit(many)
    f(*args).block_until_ready()
    best = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main(argv):
    del argv
    from jax._src.cudnn import fused_attention_stablehlo as fa
    rng = np.random.default_rng(0)
    results = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, checks=[],
                   timings=[])
    cases = [
        dict(tp=1024, tk=2048, hq=32, hkv=8, d=128, qlens=[200, 37, 513, 64],
             klens=[512, 1024, 48, 400], nseg=8),
        dict(tp=512, tk=512, hq=8, hkv=8, d=64, qlens=[5, 300], klens=[16, 128], nseg=2),
        dict(tp=256, tk=1024, hq=12, hkv=4, d=128, qlens=[100], klens=[1000], nseg=4),
    ]
    for c in cases:
        try:
            r = check(fa, rng, **c)
        except Exception as e:  # noqa: BLE001
            r = dict(case=c, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(r), flush=True)
        results["checks"].append(r)
    # Engine-like shapes: BatchLLM's prefill step (4 groups x 3,072 stacked queries over 2,000)
    # and a document step (4 x 4,096 queries over 4,096), in 8 and 16 segment slots over a
    # 16,384-row buffer; and a step with only the dummy segment (1 row over 16 keys), the cost
    # of a prefill bucket whose groups all decode.
    hq, hkv, d = 32, 8, 128
    tp = tk = 16384
    q = jnp.asarray(rng.standard_normal((1, tp, hq, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((1, tk, hkv, d)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((1, tk, hkv, d)), jnp.bfloat16)
    for name, nseg, used, qlen, klen in [("batchllm_h", 8, 4, 3072, 2000),
                                         ("batchllm_h", 16, 4, 3072, 2000),
                                         ("document_i", 8, 4, 4096, 4096),
                                         ("dummy_only", 8, 1, 1, 16)]:
        pad = nseg - used
        ql = np.array([[qlen] * used + [-1] * pad], np.int32)
        kl = np.array([[klen] * used + [-1] * pad], np.int32)
        qo = np.array([[i * qlen for i in range(used + 1)] + [-1] * pad], np.int32)
        ko = np.array([[i * klen for i in range(used + 1)] + [-1] * pad], np.int32)
        args = (q, k, v) + tuple(jnp.asarray(x) for x in (ql, kl, qo, ko))
        try:
            sec = timed(call(fa, d ** -0.5), args, FLAGS.reps)
            flops = 4.0 * used * qlen * klen * hq * d
            r = dict(name=name, nseg=nseg, used=used, seconds=sec, tflops=flops / sec / 1e12)
        except Exception as e:  # noqa: BLE001
            r = dict(name=name, nseg=nseg, error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(r), flush=True)
        results["timings"].append(r)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
