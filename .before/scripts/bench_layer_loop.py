"""How the decoder's layer loop reaches its weights: a stack of Llama-3-8B-shaped layers (QKV, O,
gate-up, down matmuls; no attention) run three ways, timed against the weight-read floor.

  scan_stacked   lax.scan over params stacked on a leading layer axis (per-layer dynamic slice)
  loop_stacked   Python loop, static slice w[i] of the stacked params
  loop_list      Python loop over separate per-layer arrays

The engine profile showed 4 device copies per layer per step (`memcpy128`): the scan's dynamic
slice of each stacked weight is materialised before cuBLAS reads it, so every step reads and
writes the weights once more. Run it once plain and once with
XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true to see whether XLA can let the GEMM read the
slice in place.

  python3 scripts/bench_layer_loop.py --tokens=256,2048
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["256", "2048"], "rows per forward")
flags.DEFINE_list("variants", ["scan_stacked", "loop_stacked", "loop_list"], "variants")
flags.DEFINE_integer("layers", 32, "layers")
flags.DEFINE_integer("hidden", 4096, "hidden size")
flags.DEFINE_integer("ffn", 14336, "intermediate size")
flags.DEFINE_integer("qkv", 6144, "fused qkv width")
flags.DEFINE_integer("reps", 10, "timed repeats")
flags.DEFINE_string("out", "", "JSON path")


def layer(x, w):
    h = x * w["norm"]
    qkv = jnp.dot(h, w["qkv"])
    x = x + jnp.dot(qkv[:, :x.shape[1]], w["o"])
    gate, up = jnp.split(jnp.dot(x, w["gate_up"]), 2, axis=-1)
    return x + jnp.dot(jax.nn.silu(gate) * up, w["down"])


def main(argv):
    del argv
    L, d, f, q = FLAGS.layers, FLAGS.hidden, FLAGS.ffn, FLAGS.qkv
    dt = jnp.bfloat16
    ks = jax.random.split(jax.random.key(0), 5)
    shapes = dict(norm=(d,), qkv=(d, q), o=(d, d), gate_up=(d, 2 * f), down=(f, d))
    stacked = {k: (jax.random.normal(kk, (L,) + s, dt) * 0.02) for (k, s), kk in
               zip(shapes.items(), ks)}
    wbytes = sum(int(np.prod(s)) * 2 for s in shapes.values()) * L
    dev = jax.devices()[0]
    flags_env = os.environ.get("XLA_FLAGS", "")
    recs = []

    def scan_stacked(x, st):
        return jax.lax.scan(lambda x, w: (layer(x, w), None), x, st)[0]

    def loop_stacked(x, st):
        for i in range(L):
            x = layer(x, {k: v[i] for k, v in st.items()})
        return x

    def loop_list(x, lst):
        for w in lst:
            x = layer(x, w)
        return x

    lst = None
    for vname in FLAGS.variants:
        # "+dsf": the same program compiled with XLA's dynamic-slice fusion on, per program
        # (compiler_options), instead of process-wide through XLA_FLAGS.
        name, _, opt = vname.partition("+")
        copts = {"xla_gpu_enable_dynamic_slice_fusion": True} if opt == "dsf" else None
        if name == "loop_list" and lst is None:
            lst = [{k: v[i] for k, v in stacked.items()} for i in range(L)]
            jax.block_until_ready(lst)
        fn = dict(scan_stacked=scan_stacked, loop_stacked=loop_stacked, loop_list=loop_list)[name]
        arg = lst if name == "loop_list" else stacked
        for t in map(int, FLAGS.tokens):
            x = jax.random.normal(jax.random.key(t), (t, d), dt)
            t0 = time.perf_counter()
            jf = jax.jit(fn).lower(x, arg).compile(compiler_options=copts)
            comp = time.perf_counter() - t0
            y = jf(x, arg)
            y.block_until_ready()
            ts = []
            for _ in range(FLAGS.reps):
                t0 = time.perf_counter()
                jf(x, arg).block_until_ready()
                ts.append(time.perf_counter() - t0)
            sec = float(np.median(ts))
            flops = 2 * t * wbytes / 2
            r = dict(variant=vname, tokens=t, seconds=sec, compile_seconds=comp,
                     weight_bytes=wbytes, weight_read_tb_s=wbytes / sec / 1e12,
                     tflops=flops / sec / 1e12, xla_flags=flags_env, device=dev.device_kind,
                     jax_version=jax.__version__)
            recs.append(r)
            print(f"{vname:18s} T={t:5d} {sec * 1e3:8.3f} ms  weights at {r['weight_read_tb_s']:.2f} TB/s"
                  f"  {r['tflops']:6.1f} TFLOP/s  compile {comp:.1f}s  flags={flags_env!r}", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(recs, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
