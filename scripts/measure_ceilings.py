"""The device's copy bandwidth and bf16 matmul rate two ways: inside one program of many passes
(`roofline.measure_ceilings`, the ceilings every floor uses) and as a single host-timed op (what
host timing of one call reports), so the gap between them is on record.

  python3 scripts/measure_ceilings.py --out=benchmarks/results/ceilings_h200.json
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
