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

from jaxserve.tools.cli_flags import define_engine_flags, engine_kwargs  # noqa: E402
from jaxserve.tools.trace_summary import summarise  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "preset name (dummy weights)")
flags.DEFINE_string("workload", "nosharing", "named workload or JSONL file")
flags.DEFINE_float("scale", 0.25, "scale of a named workload")
flags.DEFINE_integer("max_requests", None, "first N requests only")
flags.DEFINE_integer("output_len", None, "override every request's max_tokens")
define_engine_flags(load_format="dummy", max_model_len=4608)
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

    from jaxserve import LLM, SamplingParams
    from jaxserve.tools import workloads
    from jaxserve.weights import presets
    from jaxserve.runner import model_runner
    from jaxserve.scheduler import scheduler

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
    llm = LLM(FLAGS.model, **engine_kwargs(FLAGS))
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
              for r in reqs]
    t0 = time.perf_counter()
    llm.compile(prompts, params)
    print(f"# compile {time.perf_counter() - t0:.1f}s", flush=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)

    tm = Timers()
    tm.wrap(model_runner, "build_step_inputs", "host: build step inputs")
    tm.wrap(llm.engine.runner, "dispatch", "dispatch (build inputs + send)")
    tm.wrap(model_runner.Pending, "result", "wait for the step + copy tokens back")
    # A step already finished when the host comes to read it means the device ran out of work
    # (the host, not the device, set the pace of that step).
    ready = collections.Counter()
    timed_result = model_runner.Pending.result

    def result(self):
        ready[self.is_ready()] += 1
        return timed_result(self)

    model_runner.Pending.result = result
    for name in ("schedule", "schedule_decode_block", "commit"):
        tm.wrap(scheduler.Scheduler, name, f"host: scheduler.{name}")

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
    ready_share = ready[True] / max(sum(ready.values()), 1)
    print(f"# steps already finished when read: {ready[True]} of {sum(ready.values())} "
          f"({ready_share:.0%})", flush=True)
    jax.profiler.start_trace(FLAGS.trace_dir)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall_traced = time.perf_counter() - t0
    jax.profiler.stop_trace()
    summ = summarise(FLAGS.trace_dir, FLAGS.top)
    summ["gpu_idle_fraction"] = 1 - summ["gpu_busy_s"] / summ["gpu_span_s"] if summ["gpu_span_s"] else None
    summ.update(wall_untraced_s=wall_plain, wall_traced_s=wall_traced, host_timers=host,
                steps_finished_when_read=ready_share,
                commit=os.environ.get("JAXSERVE_COMMIT", "unknown"),
                stats={k: v for k, v in st.items() if isinstance(v, (int, float, str))},
                device=jax.devices()[0].device_kind, command=" ".join(sys.argv))
    print(f"# traced run {wall_traced:.2f}s; GPU busy {summ['gpu_busy_s']:.2f}s of span "
          f"{summ['gpu_span_s']:.2f}s (idle {summ['gpu_idle_fraction'] or 0:.1%}); kernel sum "
          f"{summ['kernel_total_s']:.2f}s")
    print("# lines:", summ["lines"])
    print("# categories:", {k: round(v, 3) for k, v in summ["categories"].items()})
    gaps = summ.get("gaps") or {}
    print("# idle gaps (s by size):", {k: round(v, 3) for k, v in gaps.get("seconds", {}).items()},
          "counts:", gaps.get("counts"))
    for g in gaps.get("largest", [])[:12]:
        print(f"  {g['ms']:8.2f} ms at {g['at_s']:7.2f}s  after {g['after'][:45]}  "
              f"before {g['before'][:45]}")
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
