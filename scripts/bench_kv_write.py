"""Time the KV-cache write of a step (`pallas_kernels.write_kv`'s scatter) inside one program:
32 layers' writes at their layer offsets, as the engine's unrolled layer loop does them, with
and without XLA's `unique_indices` promise, at decode and prefill token counts.

  python3 scripts/bench_kv_write.py --tokens=1024,16384 --out=/tmp/kv_write.json

Each variant: one jitted program of `--layers` writes into donated caches of the engine's
layout `[Hkv, layers * pages, page_size, D]`; best of `--reps` timed runs after a warm-up,
divided by the layer count. The slots are distinct random slots of real pages plus, as in a
padded step, a tail of pad tokens on the sink page.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("tokens", "1024,16384", "tokens per step, comma-separated")
flags.DEFINE_integer("layers", 32, "writes per program (one per layer)")
flags.DEFINE_integer("pages", 4096, "pages per layer")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("kv_heads", 8, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_float("pad_share", 0.05, "share of the step's tokens that are pads (sink page)")
flags.DEFINE_integer("reps", 20, "timed runs")
flags.DEFINE_string("out", "", "JSON path")


def main(argv):
    del argv
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    L, P, ps, hkv, d = FLAGS.layers, FLAGS.pages, FLAGS.page_size, FLAGS.kv_heads, FLAGS.head_dim

    def write(kc, vc, k, v, slots, unique):
        kf = kc.reshape(hkv, -1, d).at[:, slots].set(
            jnp.swapaxes(k, 0, 1), mode="promise_in_bounds", unique_indices=unique)
        vf = vc.reshape(hkv, -1, d).at[:, slots].set(
            jnp.swapaxes(v, 0, 1), mode="promise_in_bounds", unique_indices=unique)
        return kf.reshape(kc.shape), vf.reshape(vc.shape)

    @functools.partial(jax.jit, static_argnames=("unique",), donate_argnums=(0, 1))
    def step(kc, vc, k, v, slots, unique):
        for li in range(L):
            kc, vc = write(kc, vc, k * (1 + li), v, slots + li * P * ps, unique)
        return kc, vc

    rng = np.random.default_rng(0)
    records = []
    for t in [int(x) for x in FLAGS.tokens.split(",")]:
        npad = int(t * FLAGS.pad_share)
        real = rng.choice(np.arange(ps, P * ps), t - npad, replace=False)
        slots = jnp.asarray(np.concatenate([real, np.arange(npad) % ps]).astype(np.int32))
        k = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((t, hkv, d)), jnp.bfloat16)
        kc = jnp.zeros((hkv, L * P, ps, d), jnp.bfloat16)
        vc = jnp.zeros((hkv, L * P, ps, d), jnp.bfloat16)
        outs = {}
        for unique in (False, True):
            kc, vc = step(kc, vc, k, v, slots, unique=unique)
            jax.block_until_ready(kc)
            best = float("inf")
            for _ in range(FLAGS.reps):
                t0 = time.perf_counter()
                kc, vc = step(kc, vc, k, v, slots, unique=unique)
                jax.block_until_ready(kc)
                best = min(best, time.perf_counter() - t0)
            # The written values of real slots, to check both variants write the same thing.
            outs[unique] = np.asarray(kc.reshape(hkv, -1, d)[:, real[:64] + (L - 1) * P * ps]
                                      .astype(jnp.float32))
            rec = dict(tokens=t, unique_indices=unique, ms_per_layer=best / L * 1e3,
                       bytes_per_layer=2 * t * hkv * d * 2,
                       gb_per_s=2 * t * hkv * d * 2 / (best / L) / 1e9)
            print(json.dumps(rec), flush=True)
            records.append(rec)
        same = bool(np.array_equal(outs[False], outs[True]))
        print(f"# tokens {t}: real slots identical across variants: {same}", flush=True)
        records.append(dict(tokens=t, identical=same))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(records=records, device=jax.devices()[0].device_kind,
                           jax_version=jax.__version__, command=" ".join(sys.argv),
                           commit=os.environ.get("JAXSERVE_COMMIT", "unknown")), f, indent=1)


if __name__ == "__main__":
    app.run(main)
