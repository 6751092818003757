"""Where a warm engine run's time goes: host phases timed in-process, GPU kernels from a JAX
device trace, summarised as text (no TensorBoard needed).

  python3 scripts/profile_engine.py --model=llama-3-8b --workload=nosharing --scale=0.25 \
      --output_len=64 --fused_decode_steps=8

Prints: wall time split into scheduling, input building, device wait and commit on the host; GPU
busy time (union of kernel intervals) against the wall; GPU time per compiled program (XLA module)
and per kernel, top N; the same grouped into attention / matmul / other. Writes the summary as
JSON to --out when given.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.cli_flags import define_engine_flags, engine_kwargs  # noqa: E402
from jaxserve.trace_summary import summarise  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "preset name (dummy weights)")
flags.DEFINE_string("workload", "nosharing", "named workload or JSONL file")
flags.DEFINE_float("scale", 0.25, "scale of a named workload")
flags.DEFINE_integer("max_requests", None, "first N requests only")
flags.DEFINE_integer("output_len", None, "override every request's max_tokens")
define_engine_flags(load_formats=("auto", "dummy"), load_format="dummy",
                    max_num_batched_tokens=2048, max_num_seqs=256, max_model_len=4608)
flags.DEFINE_string("trace_dir", "/tmp/jaxserve_trace", "where the raw trace goes")
flags.DEFINE_integer("top", 25, "kernels to list")
flags.DEFINE_string("out", "", "JSON summary path")


class Timers:
    def __init__(self):
        self.s = collections.defaultdict(float)
        self.n = collections.defaultdict(int)

    def wrap(self, obj, attr, label):
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[label] += time.perf_counter() - t0
                self.n[label] += 1

        setattr(obj, attr, timed)


def main(argv):
    del argv
    import jax

    from jaxserve import LLM, SamplingParams, presets, workloads
    from jaxserve.runner import model_runner
    from jaxserve.scheduler import batcher

    vocab = presets.load_preset(FLAGS.model).vocab_size
    if os.path.exists(FLAGS.workload):
        reqs = [json.loads(x) for x in open(FLAGS.workload) if x.strip()]
    else:
        reqs = workloads.preset(FLAGS.workload, vocab_size=vocab, scale=FLAGS.scale, seed=0)
    if FLAGS.max_requests:
        reqs = reqs[:FLAGS.max_requests]
    if FLAGS.output_len:
        for r in reqs:
            r["max_tokens"] = FLAGS.output_len
    llm = LLM(FLAGS.model, compile_on_init=False, **engine_kwargs(FLAGS))
    t0 = time.perf_counter()
    llm.engine.runner.compile_all(llm.engine_config.fused_decode_steps)
    print(f"# compile {time.perf_counter() - t0:.1f}s", flush=True)
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
              for r in reqs]
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)

    tm = Timers()
    tm.wrap(model_runner, "build_step_inputs", "host: build step inputs")
    tm.wrap(model_runner, "build_decode_block_inputs", "host: build block inputs")
    tm.wrap(llm.engine.runner, "execute", "execute (build + dispatch + wait)")
    tm.wrap(llm.engine.runner, "execute_block", "execute_block (build + dispatch + wait)")
    for name in ("schedule", "schedule_decode_block", "commit", "commit_block"):
        tm.wrap(batcher.Scheduler, name, f"host: scheduler.{name}")

    # An untraced run first (the trace itself costs host time), then the traced one.
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall_plain = time.perf_counter() - t0
    st = llm.stats()
    host = {k: (round(v, 4), tm.n[k]) for k, v in sorted(tm.s.items())}
    print(f"# untraced run {wall_plain:.2f}s, steps {st['num_steps']}, fused blocks "
          f"{st['fused_blocks']}, prefill {st['computed_prefill_tokens']}, "
          f"decode {st['decode_tokens']}", flush=True)
    for k, (s, n) in host.items():
        print(f"  {k:45s} {s:8.3f}s  {n:6d} calls", flush=True)
    jax.profiler.start_trace(FLAGS.trace_dir)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall_traced = time.perf_counter() - t0
    jax.profiler.stop_trace()
    summ = summarise(FLAGS.trace_dir, FLAGS.top)
    summ.update(wall_untraced_s=wall_plain, wall_traced_s=wall_traced, host_timers=host,
                stats={k: v for k, v in st.items() if isinstance(v, (int, float, str))},
                device=jax.devices()[0].device_kind, command=" ".join(sys.argv))
    print(f"# traced run {wall_traced:.2f}s; GPU busy {summ['gpu_busy_s']:.2f}s of span "
          f"{summ['gpu_span_s']:.2f}s; kernel sum {summ['kernel_total_s']:.2f}s")
    print("# lines:", summ["lines"])
    print("# categories:", {k: round(v, 3) for k, v in summ["categories"].items()})
    print("# modules (s, count):")
    for k, s, n in summ["modules"]:
        print(f"  {s:8.3f}s {n:6d}  {k[:100]}")
    print("# kernels (s, count):")
    for k, s, n in summ["kernels"]:
        print(f"  {s:8.3f}s {n:7d}  {k}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(summ, f, indent=1)


if __name__ == "__main__":
    app.run(main)
