"""The device's copy bandwidth and bf16 matmul rate two ways: inside one program of many passes
(`roofline.measure_ceilings`, the ceilings every floor uses) and as a single host-timed op (what
host timing of one call reports), so the gap between them is on record.

  python3 scripts/measure_ceilings.py --out=benchmarks/results/ceilings_h200.json

`--peer=torch` measures the same two rates with PyTorch instead (CUDA events around a chain of
matmuls and of in-place adds, no JAX in the process, so run it in its own process): the peer's
number beside ours says whether a ceiling is the hardware's or XLA's.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "JSON output")
flags.DEFINE_enum("peer", "", ["", "torch"], "measure with this framework instead of JAX")


def torch_rates(passes: int = 40) -> dict:
    """PyTorch's copy (x += 1, read + write) and bf16 matmul rates, each the best of a few timed
    chains of `passes` ops (CUDA events), per variant."""
    import torch

    def timed(fn, repeats=3):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        return best

    copies, matmuls = {}, {}
    for size in (1 << 30, 4 << 30):
        for dt in (torch.float32, torch.bfloat16):
            x = torch.ones(size // torch.tensor([], dtype=dt).element_size(), dtype=dt,
                           device="cuda")
            copies[f"{str(dt).split('.')[-1]} {size >> 20}MiB"] = (
                2 * size * passes / timed(lambda: [x.add_(1) for _ in range(passes)]))
            del x
    for n in (8192, 16384):
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = (torch.randn(n, n, device="cuda") / n ** 0.5).to(torch.bfloat16)

        def chain(b=b):
            x = a
            for _ in range(passes):
                x = x @ b
            return x
        matmuls[f"{n} torch"] = 2 * n ** 3 * passes / timed(chain)
        bt = b.t().contiguous()
        matmuls[f"{n} torch nt"] = 2 * n ** 3 * passes / timed(lambda: chain(bt.t()))
        del a, b, bt
    return dict(device=torch.cuda.get_device_name(), torch_version=torch.__version__,
                copy_variants=copies, matmul_variants=matmuls,
                copy_bytes_per_s=max(copies.values()), bf16_flops=max(matmuls.values()))


def host_timed(repeats: int = 10):
    import jax
    import jax.numpy as jnp

    def bench(fn, *args):
        fn(*args).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    size = 1 << 30
    x = jax.random.normal(jax.random.key(0), (size // 4,), jnp.float32)
    bw = 2 * size / bench(jax.jit(lambda a: a * 1.0001 + 1.0), x)
    del x
    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    flops = 2 * n ** 3 / bench(jax.jit(lambda a, b: jnp.dot(a, b)), a, b)
    return bw, flops


def main(argv):
    del argv
    if FLAGS.peer == "torch":
        rec = dict(torch_rates(), commit=os.environ.get("JAXSERVE_COMMIT", "unknown"),
                   command="python3 " + " ".join(sys.argv))
        print(json.dumps(rec, indent=1))
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(rec, f, indent=1)
        return
    import jax

    from jaxserve.tools import roofline

    t0 = time.perf_counter()
    copies, matmuls = roofline.copy_rates(), roofline.matmul_rates()
    bw, flops = max(copies.values()), max(matmuls.values())
    t1 = time.perf_counter()
    hbw, hflops = host_timed()
    rec = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__,
               commit=os.environ.get("JAXSERVE_COMMIT", "unknown"),
               one_program_copy_bytes_per_s=bw, one_program_bf16_flops=flops,
               host_timed_copy_bytes_per_s=hbw, host_timed_bf16_flops=hflops,
               copy_variants=copies, matmul_variants=matmuls,
               seconds=t1 - t0, command="python3 " + " ".join(sys.argv))
    print(json.dumps(rec, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    app.run(main)
