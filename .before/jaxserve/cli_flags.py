"""The engine's absl flags, defined once for every script (run_batch, benchmark, ...): the same
names, defaults and help everywhere, and one place that maps them onto `LLM(...)`."""
from __future__ import annotations

from absl import flags

# Engine flags whose default differs per script are passed to `define_engine_flags`.
_LLM_ARGS = ("dtype", "load_format", "page_size", "max_num_batched_tokens", "max_num_seqs",
             "max_model_len", "num_pages", "attention_impl", "fused_decode_steps",
             "global_prefix_sharing", "shared_prefix_attention", "schedule_policy",
             "admission_control", "layer_loop")


def define_engine_flags(*, load_formats=("auto", "dummy", "safetensors", "gguf"),
                        load_format="auto", max_num_batched_tokens=512, max_num_seqs=256,
                        max_model_len=None) -> None:
    flags.DEFINE_enum("load_format", load_format, list(load_formats), "weight source")
    flags.DEFINE_string("dtype", "auto", "auto (bf16 on GPU/TPU, fp32 on CPU), float32, bfloat16")
    flags.DEFINE_integer("max_num_batched_tokens", max_num_batched_tokens, "token budget of one step")
    flags.DEFINE_integer("max_num_seqs", max_num_seqs, "requests (rows) in one step")
    flags.DEFINE_integer("max_model_len", max_model_len, "prompt + output tokens per request "
                         "(default: the model's maximum)")
    flags.DEFINE_integer("page_size", 16, "tokens per KV page")
    flags.DEFINE_integer("num_pages", None, "KV pages (default: sized from device memory)")
    flags.DEFINE_string("attention_impl", "auto", "auto | reference | pallas_gpu")
    flags.DEFINE_integer("fused_decode_steps", None, "decode steps fused into one program when "
                         "only decodes run (default: 8 on GPU/TPU, 1 on CPU)")
    flags.DEFINE_bool("global_prefix_sharing", True, "compute prefixes shared across the batch once")
    flags.DEFINE_bool("shared_prefix_attention", True, "read a group's shared prefix once per step "
                      "(GPU kernel's shared-prefix work lists; ~5 % slower where nothing is shared)")
    flags.DEFINE_enum("schedule_policy", "batchllm", ["fifo", "batchllm", "blendserve"],
                      "admission order")
    flags.DEFINE_enum("layer_loop", "auto", ["auto", "scan", "unrolled"],
                      "decoder layer loop: scan over stacked weights or unrolled over per-layer "
                      "arrays (faster on GPU); auto: unrolled on GPU, scan elsewhere")
    flags.DEFINE_bool("admission_control", True,
                      "admit only what fits at full length (no preemption)")


def engine_kwargs(FLAGS) -> dict:
    """`LLM(...)` keyword arguments from the flags defined above."""
    return {name: FLAGS[name].value for name in _LLM_ARGS}
