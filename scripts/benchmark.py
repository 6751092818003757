"""End-to-end throughput of jaxserve on a synthetic workload with dummy weights at a real shape.

  python scripts/benchmark.py --model=llama-3-8b --num_requests=256 --input_len=512 --output_len=128

Reports model load time and device memory, compile time (all buckets, up front) apart from the
run, and run time with input/output/total tokens/s; writes one JSON record to --results_dir.
Output lengths are fixed (ignore_eos) so every engine and run does the same work.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "preset name (dummy weights) or checkpoint path")
flags.DEFINE_enum("load_format", "dummy", ["auto", "dummy"], "weights")
flags.DEFINE_integer("num_requests", 256, "requests")
flags.DEFINE_integer("input_len", 512, "prompt tokens per request (random ids, no sharing)")
flags.DEFINE_integer("output_len", 128, "generated tokens per request (EOS ignored)")
flags.DEFINE_integer("max_num_batched_tokens", 2048, "token budget per step")
flags.DEFINE_integer("max_num_seqs", 256, "rows per step")
flags.DEFINE_integer("max_model_len", 1024, "max prompt + output")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_string("attention_impl", "auto", "attention implementation")
flags.DEFINE_string("dtype", "auto", "dtype")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "where JSON goes")
flags.DEFINE_string("tag", "", "suffix for the result file name")
flags.DEFINE_integer("seed", 0, "workload seed")
flags.DEFINE_bool("global_prefix_sharing", True, "compute prefixes shared across the batch once")
flags.DEFINE_bool("shared_prefix_attention", True, "read a group's shared prefix once per step")
flags.DEFINE_enum("schedule_policy", "batchllm", ["fifo", "batchllm", "blendserve"], "admission order")
flags.DEFINE_bool("admission_control", True, "admit only what fits at full length (no preemption)")
flags.DEFINE_integer("fused_decode_steps", 1, "decode steps fused into one program")


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001  (the device copy of the tree may have no .git)
        return os.environ.get("JAXSERVE_COMMIT", "unknown")


def main(argv):
    del argv
    import jax
    import numpy as np

    from jaxserve import LLM, SamplingParams

    dev = jax.devices()[0]
    t0 = time.perf_counter()
    llm = LLM(FLAGS.model, load_format=FLAGS.load_format, dtype=FLAGS.dtype,
              max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs,
              max_model_len=FLAGS.max_model_len, page_size=FLAGS.page_size,
              attention_impl=FLAGS.attention_impl, compile_on_init=False,
              fused_decode_steps=FLAGS.fused_decode_steps,
              global_prefix_sharing=FLAGS.global_prefix_sharing,
              shared_prefix_attention=FLAGS.shared_prefix_attention,
              schedule_policy=FLAGS.schedule_policy, admission_control=FLAGS.admission_control)
    load_s = llm.load_seconds
    import jax.tree_util as jtu
    weights_bytes = sum(x.nbytes for x in jtu.tree_leaves(llm.engine.runner.params))
    bytes_after_init = (dev.memory_stats() or {}).get("bytes_in_use")   # weights + KV cache
    runner = llm.engine.runner
    t1 = time.perf_counter()
    n_prog = runner.compile_all(FLAGS.fused_decode_steps)
    compile_s = time.perf_counter() - t1
    cfg = llm.model_config
    rng = np.random.default_rng(FLAGS.seed)
    prompts = [rng.integers(0, cfg.vocab_size, FLAGS.input_len).tolist()
               for _ in range(FLAGS.num_requests)]
    sp = SamplingParams(max_tokens=FLAGS.output_len, temperature=0.0, ignore_eos=True)
    # Warm-up: a few requests through every code path (first dispatches, host caches).
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    warm_s = time.perf_counter() - t1 - compile_s
    t2 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    run_s = time.perf_counter() - t2
    st = llm.stats()
    assert all(len(o.token_ids) == FLAGS.output_len for o in outs)
    n_in = FLAGS.num_requests * FLAGS.input_len
    n_out = FLAGS.num_requests * FLAGS.output_len
    rec = dict(
        workload=f"nosharing_{FLAGS.num_requests}x{FLAGS.input_len}in{FLAGS.output_len}out",
        engine="jaxserve", model_shape=FLAGS.model, device=dev.device_kind,
        jax_version=jax.__version__, commit=_commit(), num_requests=FLAGS.num_requests,
        input_len=FLAGS.input_len, output_len=FLAGS.output_len,
        load_seconds=load_s, weights_bytes=weights_bytes, bytes_in_use_after_init=bytes_after_init,
        kv_cache_bytes=runner.kv_bytes, num_kv_pages=llm.engine.num_pages,
        peak_bytes_in_use=(dev.memory_stats() or {}).get("peak_bytes_in_use"),
        compile_seconds=compile_s, compiled_programs=n_prog, warmup_seconds=warm_s,
        run_seconds=run_s, requests_per_s=FLAGS.num_requests / run_s,
        input_tokens_per_s=n_in / run_s, output_tokens_per_s=n_out / run_s,
        total_tokens_per_s=(n_in + n_out) / run_s,
        computed_prefill_tokens=st["computed_prefill_tokens"], num_steps=st["num_steps"],
        token_fill_mean=st["token_fill_mean"], peak_kv_pool_use=st["peak_kv_pool_use"],
        preemptions=st["preemptions"], attention_impl=st["attention_impl"],
        fused_decode_steps=FLAGS.fused_decode_steps, fused_blocks=st["fused_blocks"],
        max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs,
        command=" ".join(sys.argv))
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    name = (f"e2e_{rec['workload']}_{FLAGS.model}_{rec['attention_impl']}"
            f"_fuse{FLAGS.fused_decode_steps}{FLAGS.tag}.json")
    with open(os.path.join(FLAGS.results_dir, name), "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps(rec, indent=1))
    del t0


if __name__ == "__main__":
    app.run(main)
