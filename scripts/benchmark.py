"""End-to-end throughput on a synthetic workload, with dummy weights at a real model shape.

  python scripts/benchmark.py --workload=nosharing --scale=0.25 --model=llama-3-8b
  python scripts/benchmark.py --workload=batchllm --scale=0.05 --engine=hf --hf_batch_size=64

Reports compile + warm-up time apart from the run, requests/s and input/output/total tokens/s,
prefill tokens computed, the workload's floor on this device (FLOPs and bytes over a copy bandwidth
and a bf16 matmul rate measured in the same run) and the achieved fraction of it. Writes a JSON
record (`e2e_*.json`) and a PNG of per-step token fill and throughput to --results_dir.
Output lengths are fixed (ignore_eos), so every engine does the same work.
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

from jaxserve.tools.cli_flags import (define_distributed_flags, define_engine_flags,  # noqa: E402
                                      engine_kwargs, initialize_distributed)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "preset name (dummy weights) or checkpoint path")
flags.DEFINE_enum("engine", "jaxserve", ["jaxserve", "hf"], "engine to run the workload through")
flags.DEFINE_string("workload", "nosharing", "named workload (jaxserve.workloads.PRESETS) or a "
                    "JSONL file from make_workload.py")
flags.DEFINE_float("scale", 1.0, "scale the number of requests/groups of a named workload")
flags.DEFINE_integer("max_requests", None, "run only the first N requests (e.g. a slow peer)")
define_engine_flags(load_format="dummy", max_model_len=4608)
flags.DEFINE_integer("hf_batch_size", 64, "HF peer: requests per generate() call")
flags.DEFINE_enum("hf_mode", "generate", ["generate", "static_compile", "continuous"],
                  "HF peer: generate() with its default dynamic cache; generate() with a static "
                  "cache under torch.compile; or continuous batching (generate_batch, paged cache)")
flags.DEFINE_string("hf_cache_implementation", "dynamic", "HF peer, generate mode: generate()'s "
                    "KV cache (dynamic is its default; static preallocates)")
flags.DEFINE_integer("hf_max_batch_tokens", 0, "HF peer: also cap a generate() batch at this many "
                     "padded tokens (rows x (prompt + output)); 0: only --hf_batch_size")
flags.DEFINE_bool("hf_group_by_shape", True, "HF peer: batch requests of the same (prompt length, "
                  "output length) together, the peer's best case (a generate() batch pads every "
                  "row to its longest prompt and runs to its longest output)")
flags.DEFINE_bool("measure_ceilings", True, "measure copy bandwidth and matmul rate for the floor")
flags.DEFINE_string("ceilings", "", "take the ceilings from this JSON of scripts/measure_ceilings.py "
                    "(measured earlier in the same device call) instead of measuring them")
flags.DEFINE_string("results_dir", os.path.join(ROOT, "benchmarks", "results"), "where results go")
flags.DEFINE_string("tag", "", "suffix for the result file name")
flags.DEFINE_integer("workload_seed", 0, "workload seed")
flags.DEFINE_bool("save_trace", False, "also write the per-step trace (seconds since start at each "
                  "commit, tokens computed, generated, padded) as STEM.trace.json")
define_distributed_flags()


def _commit() -> str:
    # The device machine's copy of the tree may carry a stale .git: device scripts pass the real
    # commit in JAXSERVE_COMMIT, which wins.
    if os.environ.get("JAXSERVE_COMMIT", "unknown") != "unknown":
        return os.environ["JAXSERVE_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001  (the device copy of the tree may have no .git)
        return os.environ.get("JAXSERVE_COMMIT", "unknown")


def load_workload(vocab_size: int) -> tuple[str, list[dict]]:
    from jaxserve.tools import workloads

    if os.path.exists(FLAGS.workload):
        with open(FLAGS.workload) as f:
            reqs = [json.loads(x) for x in f if x.strip()]
        name = os.path.splitext(os.path.basename(FLAGS.workload))[0]
    else:
        reqs = workloads.preset(FLAGS.workload, vocab_size=vocab_size, scale=FLAGS.scale,
                                seed=FLAGS.workload_seed)
        name = FLAGS.workload + (f"_x{FLAGS.scale:g}" if FLAGS.scale != 1 else "")
    if FLAGS.max_requests:
        reqs = reqs[:FLAGS.max_requests]
        name += f"_first{FLAGS.max_requests}"
    return name, reqs


def run_jaxserve(cfg_holder: dict, reqs: list[dict]) -> dict:
    import jax.tree_util as jtu

    from jaxserve import LLM, SamplingParams

    llm = LLM(FLAGS.model, **engine_kwargs(FLAGS))
    cfg_holder["cfg"] = llm.model_config
    runner = llm.engine.runner
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
              for r in reqs]
    t1 = time.perf_counter()
    n_prog = llm.compile(prompts, params)
    compile_s = time.perf_counter() - t1
    compile_info = dict(llm.engine.last_compile)
    t2 = time.perf_counter()
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    warm_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    run_s = time.perf_counter() - t3
    st = llm.stats()
    errors = [o.error for o in outs if o.finish_reason == "error"]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    assert all(len(o.token_ids) == r["max_tokens"] for o, r in zip(outs, reqs))
    return dict(
        run_seconds=run_s, compile_seconds=compile_s, warmup_seconds=warm_s,
        compiled_programs=n_prog, load_seconds=llm.load_seconds,
        weights_bytes=sum(x.nbytes for x in jtu.tree_leaves(runner.params)),
        kv_cache_bytes=runner.kv_bytes, num_kv_pages=llm.engine.num_pages,
        kv_capacity_tokens=(llm.engine.num_pages - 1) * llm.engine_config.page_size,
        max_num_seqs=llm.engine.sizes.max_num_seqs,
        max_num_batched_tokens=llm.engine.sizes.max_num_batched_tokens,
        dropped_tokens=st["dropped_tokens"], mid_run_compiles=st["mid_run_compiles"],
        computed_prefill_tokens=st["computed_prefill_tokens"],
        optimal_prefill_tokens=st["optimal_prefill_tokens"], reuse_ratio=st["reuse_ratio"],
        num_groups=st["num_groups"], num_steps=st["num_steps"], fused_blocks=st["fused_blocks"],
        token_fill_mean=st["token_fill_mean"], peak_kv_pool_use=st["peak_kv_pool_use"],
        preemptions=st["preemptions"], attention_impl=st["attention_impl"],
        schedule_policy_run=st["schedule_policy"], projected_seconds=st["projected_seconds"],
        fused_decode_steps=llm.engine.sizes.fused_decode_steps,
        compile_cache_hits=compile_info.get("cache_hits", 0),
        trace=llm.engine.last_stats.trace)


def hf_batches(reqs: list[dict], bs: int, max_tokens: int) -> list[list[dict]]:
    """Consecutive batches of at most `bs` requests and, when `max_tokens` > 0, at most
    `max_tokens` padded tokens (rows x (longest prompt + longest output)): long-prompt batches
    stay small enough to fit while short ones keep the large batch."""
    out, cur = [], []
    for r in reqs:
        nxt = cur + [r]
        width = max(len(x["prompt_token_ids"]) for x in nxt) + max(x["max_tokens"] for x in nxt)
        if cur and (len(nxt) > bs or (max_tokens > 0 and len(nxt) * width > max_tokens)):
            out.append(cur)
            nxt = [r]
        cur = nxt
    if cur:
        out.append(cur)
    return out


def _torch_device() -> str:
    """The peer's device: the GPU, or the CPU where there is none (a smoke test of this script)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_hf(cfg_holder: dict, reqs: list[dict]) -> dict:
    """HF transformers generate, bf16, batched (left padding), on the same GPU: the peer users run
    without a serving engine. Same shape, random weights, fixed output lengths."""
    import torch
    import transformers

    from jaxserve.weights import presets

    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in presets.preset_dict(FLAGS.model).items()
                                                  if k not in ("architectures",)})
    cfg_holder["cfg"] = presets.load_preset(FLAGS.model)
    dev = _torch_device()
    t0 = time.perf_counter()
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    bs = FLAGS.hf_batch_size

    def gen(batch, max_out=None):
        n = max(len(r["prompt_token_ids"]) for r in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, r in enumerate(batch):
            p = r["prompt_token_ids"]
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        out_len = min(max(r["max_tokens"] for r in batch), max_out or 1 << 30)
        with torch.no_grad():
            kw = ({} if FLAGS.hf_cache_implementation == "dynamic"
                  else dict(cache_implementation=FLAGS.hf_cache_implementation))
            model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=out_len,
                           min_new_tokens=out_len, do_sample=False, pad_token_id=0, **kw)
        _torch_sync()

    if FLAGS.hf_mode == "continuous":
        return run_hf_continuous(model, reqs, load_s)
    if FLAGS.hf_mode == "static_compile":
        # generate() compiles the forward pass when the cache is static and a compile config is
        # set; each new (batch, length) shape compiles once, so batches are grouped by shape.
        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = transformers.CompileConfig(fullgraph=True)
    t1 = time.perf_counter()
    gen(reqs[:min(4, len(reqs))], max_out=8)         # CUDA kernels and allocator warm-up
    warm_s = time.perf_counter() - t1
    if FLAGS.hf_group_by_shape:
        reqs = sorted(reqs, key=lambda r: (len(r["prompt_token_ids"]), r["max_tokens"]))
    trace = []
    t2 = time.perf_counter()
    for batch in hf_batches(reqs, bs, FLAGS.hf_max_batch_tokens):
        gen(batch)
        n_tok = sum(len(r["prompt_token_ids"]) + r["max_tokens"] for r in batch)
        trace.append((time.perf_counter() - t2, n_tok, sum(r["max_tokens"] for r in batch), n_tok))
    run_s = time.perf_counter() - t2
    return dict(run_seconds=run_s, compile_seconds=0.0, warmup_seconds=warm_s, load_seconds=load_s,
                computed_prefill_tokens=sum(len(r["prompt_token_ids"]) for r in reqs),
                hf_batch_size=bs, hf_group_by_shape=FLAGS.hf_group_by_shape,
                hf_cache_implementation=FLAGS.hf_cache_implementation,
                hf_max_batch_tokens=FLAGS.hf_max_batch_tokens, hf_mode=FLAGS.hf_mode,
                transformers_version=transformers.__version__, trace=trace)


def run_hf_continuous(model, reqs: list[dict], load_s: float) -> dict:
    """transformers' continuous batching (`generate_batch`: paged KV cache, requests join and
    leave every step), one call per distinct output length (its GenerationConfig fixes
    max_new_tokens for the call); EOS off so every request produces exactly its tokens."""
    import transformers
    from transformers.generation import GenerationConfig

    def config(n_out):
        return GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=None,
                                pad_token_id=0)

    t1 = time.perf_counter()
    model.generate_batch([r["prompt_token_ids"] for r in reqs[:4]], generation_config=config(8))
    _torch_sync()
    warm_s = time.perf_counter() - t1
    by_len: dict = {}
    for r in reqs:
        by_len.setdefault(r["max_tokens"], []).append(r)
    trace = []
    produced = 0
    t2 = time.perf_counter()
    for n_out, group in sorted(by_len.items()):
        out = model.generate_batch([r["prompt_token_ids"] for r in group],
                                   generation_config=config(n_out))
        _torch_sync()
        produced += sum(len(o.generated_tokens) for o in out.values())
        n_tok = sum(len(r["prompt_token_ids"]) + n_out for r in group)
        trace.append((time.perf_counter() - t2, n_tok, n_out * len(group), n_tok))
    run_s = time.perf_counter() - t2
    expect = sum(r["max_tokens"] for r in reqs)
    if produced != expect:
        raise SystemExit(f"generate_batch produced {produced} tokens, {expect} expected")
    return dict(run_seconds=run_s, compile_seconds=0.0, warmup_seconds=warm_s, load_seconds=load_s,
                computed_prefill_tokens=sum(len(r["prompt_token_ids"]) for r in reqs),
                hf_mode="continuous", hf_calls=len(by_len),
                transformers_version=transformers.__version__, trace=trace)


def main(argv):
    del argv
    if FLAGS.engine == "hf":
        # JAX only measures the ceilings here: keep it from reserving the GPU PyTorch needs.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
    initialize_distributed(FLAGS)    # multi-host: before JAX initialises its devices
    import jax

    from jaxserve.tools import roofline
    from jaxserve.weights import presets
    from jaxserve.scheduler.prefix_tree import build_prefix_tree

    vocab = presets.load_preset(FLAGS.model).vocab_size if presets.is_preset(FLAGS.model) else 32000
    name, reqs = load_workload(vocab)
    dev = jax.devices()[0]
    bw = flops = None
    if FLAGS.ceilings:
        with open(FLAGS.ceilings) as f:
            c = json.load(f)
        bw, flops = c["one_program_copy_bytes_per_s"], c["one_program_bf16_flops"]
    elif FLAGS.measure_ceilings and dev.platform == "gpu":
        bw, flops = roofline.measure_ceilings()
    holder: dict = {}
    res = run_jaxserve(holder, reqs) if FLAGS.engine == "jaxserve" else run_hf(holder, reqs)
    cfg = holder["cfg"]
    prompts = [r["prompt_token_ids"] for r in reqs]
    tree = build_prefix_tree(prompts)
    n_in = sum(len(p) for p in prompts)
    n_out = sum(r["max_tokens"] for r in reqs)
    run_s = res["run_seconds"]
    rec = dict(workload=name, engine=FLAGS.engine, model_shape=FLAGS.model, device=dev.device_kind,
               jax_version=jax.__version__, commit=_commit(), num_requests=len(reqs),
               input_tokens=n_in, output_tokens=n_out, requests_per_s=len(reqs) / run_s,
               input_tokens_per_s=n_in / run_s, output_tokens_per_s=n_out / run_s,
               total_tokens_per_s=(n_in + n_out) / run_s,
               workload_optimal_prefill_tokens=tree.optimal_prefill_tokens,
               hbm_bandwidth_measured=bw, matmul_flops_measured=flops,
               max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs,
               settings=dict(global_prefix_sharing=FLAGS.global_prefix_sharing,
                             shared_prefix_attention=FLAGS.shared_prefix_attention,
                             schedule_policy=FLAGS.schedule_policy,
                             blend_density_order=FLAGS.blend_density_order,
                             blend_dual_scan=FLAGS.blend_dual_scan,
                             blend_admission=FLAGS.blend_admission,
                             num_pages=FLAGS.num_pages,
                             fused_decode_steps=FLAGS.fused_decode_steps or "auto",
                             fuse_while_stalled=FLAGS.fuse_while_stalled,
                             token_bucket_mid_from=FLAGS.token_bucket_mid_from,
                             token_bucket_quarter_from=FLAGS.token_bucket_quarter_from,
                             admission_control=FLAGS.admission_control,
                             async_scheduling=FLAGS.async_scheduling,
                             gpu_command_buffers=FLAGS.gpu_command_buffers,
                             launch_thread=FLAGS.launch_thread,
                             tensor_parallel_size=FLAGS.tensor_parallel_size,
                             data_parallel_size=FLAGS.data_parallel_size),
               device_count=FLAGS.tensor_parallel_size * FLAGS.data_parallel_size,
               mesh=dict(tensor=FLAGS.tensor_parallel_size, data=FLAGS.data_parallel_size),
               command="python " + " ".join(sys.argv))
    trace = res.pop("trace")
    rec.update(res)
    if bw and flops and FLAGS.engine == "jaxserve":
        # A floor needs the engine's step sizes and KV capacity; the HF peer has neither (its
        # batches are its own), so its records carry the ceilings but no floor.
        fl = roofline.batch_floor(cfg, prompts, [r["max_tokens"] for r in reqs], tree,
                                  peak_flops=flops, hbm_bandwidth=bw,
                                  max_num_batched_tokens=rec["max_num_batched_tokens"],
                                  max_num_seqs=rec["max_num_seqs"],
                                  kv_capacity_tokens=res.get("kv_capacity_tokens"),
                                  tensor_parallel=FLAGS.tensor_parallel_size,
                                  data_parallel=FLAGS.data_parallel_size)
        rec.update(floor_seconds=fl.seconds, floor_bound=fl.bound, floor_flops=fl.flops,
                   floor_bytes=fl.bytes, floor_fraction=fl.seconds / run_s,
                   serial_floor_seconds=fl.serial_seconds,
                   serial_floor_fraction=fl.serial_seconds / run_s)
    else:
        rec.update(floor_seconds=None, floor_fraction=None)
    if jax.process_index() != 0:     # multi-host: process 0 writes the record
        return
    os.makedirs(FLAGS.results_dir, exist_ok=True)
    stem = f"e2e_{name}_{FLAGS.model}_{FLAGS.engine}{FLAGS.tag}"
    with open(os.path.join(FLAGS.results_dir, stem + ".json"), "w") as f:
        json.dump(rec, f, indent=1)
    if FLAGS.save_trace:
        with open(os.path.join(FLAGS.results_dir, stem + ".trace.json"), "w") as f:
            json.dump(trace, f)
    from jaxserve.tools.plotting import plot_trace

    plot_trace(trace, os.path.join(FLAGS.results_dir, stem + ".png"),
         f"{stem}: {rec['total_tokens_per_s']:,.0f} tok/s")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    app.run(main)
