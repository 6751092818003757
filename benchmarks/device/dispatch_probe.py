"""Which part of launching a step program holds the host until the device is done.

The engine's profile on the H200 shows `dispatch` (build the step's inputs, launch its program)
taking as long as the step before it, so host/device overlap cannot show. This probe launches a
program shaped like a step (a chain of bf16 matmuls of ~STEP_MS, a donated "KV cache", ~20 small
int32 inputs, a small carry) back to back and reports the host time per launch and whether the
previous launch was still running when the next one returned, for each variant:

  numpy      inputs passed as numpy arrays (what the runner does)
  device     inputs transferred beforehand (jax.device_put, outside the timed launch)
  packed     the small inputs in one numpy buffer, split inside the program
  thread     inputs device_put and the program launched from a worker thread
  nodonate   numpy inputs, nothing donated
  pallas     numpy inputs, and a small Pallas kernel in the program (the attention kernels are
             Pallas: Triton custom calls on GPU)
  cond       numpy inputs, and a `lax.cond` on a device value at the start of the program (XLA:GPU
             copies a conditional's predicate to the host and waits for the stream)

  python3 benchmarks/device/dispatch_probe.py [--steps 30] [--step_ms 20] [--out probe.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

N_SMALL = 20


def _pallas_double(x):
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          interpret=jax.default_backend() == "cpu")(x)


def make_program(n_mm: int, size: int, donate: bool, packed: bool, pallas: bool = False,
                 cond: bool = False):
    def step(w, cache, small, carry):
        if packed:
            small = jnp.split(small, N_SMALL)
        if cond:
            carry = jax.lax.cond(carry[1] > 0, lambda c: c + 1, lambda c: c, carry)
        x = jnp.ones((size, size), jnp.bfloat16) * carry[0].astype(jnp.bfloat16)
        for _ in range(n_mm):
            x = (x @ w).astype(jnp.bfloat16)
        if pallas:
            x = x.at[:16, :128].set(_pallas_double(x[:16, :128]))
        tot = sum(jnp.sum(s) for s in small)
        cache = cache.at[0].add(x[0, 0].astype(cache.dtype) + tot.astype(cache.dtype))
        return cache, carry + 1, x[0, :8]

    return jax.jit(step, donate_argnums=(1,) if donate else ())


def run(variant: str, steps: int, n_mm: int, size: int, cache_mb: int) -> dict:
    dev = jax.devices()[0]
    w = jax.device_put(jnp.full((size, size), 1e-3, jnp.bfloat16), dev)
    cache = jax.device_put(jnp.zeros((cache_mb << 20) // 2, jnp.bfloat16), dev)
    carry = jax.device_put(jnp.zeros((256,), jnp.int32), dev)
    packed = variant == "packed"
    fn = make_program(n_mm, size, variant != "nodonate", packed, pallas=variant == "pallas",
                      cond=variant == "cond")
    rng = np.random.default_rng(0)

    def inputs():
        small = [rng.integers(0, 100, 2048, dtype=np.int32) for _ in range(N_SMALL)]
        return np.concatenate(small) if packed else small

    pool = concurrent.futures.ThreadPoolExecutor(1) if variant == "thread" else None

    def launch(cache, carry, small):
        if variant == "device":
            small = jax.device_put(small, dev)
        return fn(w, cache, small, carry)

    # warm-up (compile)
    cache, carry, out = launch(cache, carry, inputs())
    jax.block_until_ready(out)
    pre = [jax.device_put(inputs(), dev) for _ in range(steps)] if variant == "device" else None
    times, still_running = [], 0
    prev = None
    t_all = time.perf_counter()
    for i in range(steps):
        small = pre[i] if pre is not None else inputs()
        t0 = time.perf_counter()
        if pool is not None:
            cache, carry, out = pool.submit(
                lambda c=cache, k=carry, s=small: fn(w, c, jax.device_put(s, dev), k)).result()
        else:
            cache, carry, out = (fn(w, cache, small, carry) if variant == "device"
                                 else launch(cache, carry, small))
        times.append(time.perf_counter() - t0)
        if prev is not None and not prev.is_ready():
            still_running += 1
        prev = out
    jax.block_until_ready(out)
    wall = time.perf_counter() - t_all
    return dict(variant=variant, launch_ms_median=1e3 * float(np.median(times)),
                launch_ms_max=1e3 * float(np.max(times)), wall_s=wall, steps=steps,
                step_ms=1e3 * wall / steps,
                previous_still_running=still_running / max(steps - 1, 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--matmuls", type=int, default=40, help="matmuls per step (sets its length)")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--cache_mb", type=int, default=1024)
    ap.add_argument("--variants", default="numpy,device,packed,thread,nodonate,pallas,cond")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    res = [run(v, a.steps, a.matmuls, a.size, a.cache_mb) for v in a.variants.split(",")]
    for r in res:
        print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
                           results=res), f, indent=1)


if __name__ == "__main__":
    main()
