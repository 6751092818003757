"""Configuration dataclasses: what the model is (ModelConfig) and how the engine runs it (EngineConfig).

Both are validated at construction so that a field we cannot honour fails at start-up with a message
that names it, not deep inside a jitted step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration we cannot honour; the message names the source and the field."""


# The HF architectures `jaxserve.models.REGISTRY` implements, and the `model_type` of each. Listed
# here because models imports this module; tests/test_batch_io.py checks that the two agree.
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. Only the types whose math we implement are accepted."""

    rope_type: str = "default"  # "default" | "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        src = self.name or self.architecture
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim"):
            v = getattr(self, field)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{src}: field '{field}' must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{src}: num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads}")
        if self.rope_scaling.rope_type not in ("default", "llama3", "linear"):
            raise ConfigError(f"{src}: field 'rope_scaling.rope_type'={self.rope_scaling.rope_type!r} "
                              "is not supported (supported: default, llama3, linear)")

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads + 2 * self.num_kv_heads) + self.num_heads * hd * d
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    # ---- construction from the sources users have --------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a HF `config.json` dict (transformers 4 `rope_scaling`/`rope_theta` and 5 `rope_parameters`)."""
        # The architecture first: a GPT-2 or Mamba config lacks Llama's fields, and "required
        # field 'hidden_size' is missing" would hide that the model itself is unsupported.
        archs = cfg.get("architectures")
        model_type = cfg.get("model_type", "")
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        if isinstance(archs, list) and archs:
            arch = archs[0]
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ConfigError(f"{source}: architecture {arch!r} is not supported "
                                  f"(supported: {supported})")
        elif model_type:
            by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
            if model_type not in by_type:
                raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                                  f"(supported: {', '.join(by_type)})")
            arch = by_type[model_type]
        else:
            raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' says which "
                              f"model this is (supported: {supported})")

        def need(key):
            if key not in cfg:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return cfg[key]

        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"{source}: field 'hidden_act'={cfg['hidden_act']!r} is not supported (only silu)")
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{source}: field 'mlp_bias'=true is not supported")
        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        head_dim = cfg.get("head_dim") or hidden // heads
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling_d = cfg.get("rope_scaling") or {}
        if rope_params and not rope_scaling_d:
            rope_scaling_d = rope_params
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rtype = rope_scaling_d.get("rope_type", rope_scaling_d.get("type", "default")) or "default"
        if rtype not in ("default", "llama3", "linear"):
            raise ConfigError(f"{source}: field 'rope_scaling.rope_type'={rtype!r} is not supported "
                              "(supported: default, llama3, linear)")
        scaling = RopeScaling(
            rope_type=rtype,
            factor=float(rope_scaling_d.get("factor", 1.0) or 1.0),
            low_freq_factor=float(rope_scaling_d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_scaling_d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_scaling_d.get(
                "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))),
        )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
        try:
            return cls(
                architecture=arch,
                vocab_size=need("vocab_size"),
                hidden_size=hidden,
                intermediate_size=need("intermediate_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=cfg.get("_name_or_path", "") or source,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str) -> "ModelConfig":
        if not os.path.exists(path):
            raise ConfigError(f"{path}: file not found")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(cfg, source=path)


def rope_inv_freq(cfg: ModelConfig):
    """Inverse RoPE frequencies (numpy float64), with llama3/linear scaling applied as HF does."""
    import numpy as np

    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / rs.factor
    elif rs.rope_type == "llama3":
        old_ctx = rs.original_max_position_embeddings
        low_wavelen = old_ctx / rs.low_freq_factor
        high_wavelen = old_ctx / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_medium, smoothed, scaled)
    return inv


def _field(default, help: str, choices=None):
    md = {"help": help}
    if choices is not None:
        md["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=md)


DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULE_POLICIES = ("fifo", "batchllm", "blendserve", "auto")
LAYER_LOOPS = ("auto", "scan", "unrolled")
LOAD_FORMATS = ("auto", "dummy", "safetensors", "gguf")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine loads and runs a model. The one definition of every engine setting: `LLM(...)`
    takes these as keyword arguments and every script's flags are derived from them
    (`jaxserve.tools.cli_flags`). Validated here, once, at start-up."""

    dtype: str = _field("auto", "weights and KV dtype: auto (bfloat16 on GPU/TPU, float32 on CPU)",
                        DTYPES)
    load_format: str = _field("auto", "weight source: auto (by path), dummy (random weights at the "
                              "model's shape), safetensors, gguf", LOAD_FORMATS)
    seed: int = _field(0, "engine seed: dummy weights, and samples without their own seed")
    tensor_parallel_size: int = _field(1, "devices one model is split over (Megatron-style tensor "
                                       "parallelism; across processes after "
                                       "jax.distributed.initialize)")
    data_parallel_size: int = _field(1, "engine replicas, one per device group (of "
                                     "tensor_parallel_size devices), each running a part of the "
                                     "batch split by prefix subtree")
    page_size: int = _field(16, "tokens per KV page (a power of two)")
    max_num_batched_tokens: Optional[int] = _field(None, "token budget of one step (the largest "
                                                   "token bucket; default: from the device)")
    max_num_seqs: Optional[int] = _field(None, "sequences (rows) in one step (default: from the "
                                         "device)")
    max_model_len: Optional[int] = _field(None, "prompt + output tokens per request (default: the "
                                          "model's context, capped by what the KV cache holds)")
    num_pages: Optional[int] = _field(None, "KV pages per layer (default: sized from device memory)")
    kv_cache_memory_fraction: float = _field(0.9, "fraction of device memory, after the weights, "
                                             "for the KV cache")
    cpu_kv_cache_bytes: int = _field(2 << 30, "KV budget where the device reports no memory (CPU)")
    attention_impl: str = _field("auto", "attention implementation: auto, reference, pallas_gpu, "
                                 "pallas_gpu_interpret, ... (pallas_kernels.IMPLEMENTATIONS)")
    token_bucket_mid_from: Optional[int] = _field(
        None, "token buckets are powers of two, and from this many tokens on also 1.5x each "
        "(0: powers of two only; default: 256 on GPU/TPU, 0 on CPU). Past ~200 tokens a step's "
        "matmuls are compute-bound on an accelerator, so a step padded to the next power of two "
        "pays for up to twice its tokens (the H200's 716-row decode steps ran in 1024-token "
        "programs); each extra bucket is one more program to compile")
    token_bucket_quarter_from: Optional[int] = _field(
        None, "from this many tokens on, token buckets also at 1.25x and 1.75x of each power of "
        "two (0: never; default: 8192 on GPU/TPU, 0 on CPU). A prefill step whose rows are all "
        "taken stops short of its token budget (BatchLLM on the H200: 13,760 of 16,384 tokens), "
        "and at these sizes each padded token costs its full share of the matmuls")
    page_bucket_growth: int = _field(4, "page-table width buckets grow by this factor (1: one "
                                     "bucket; only the CPU reference attention uses more)")
    fused_decode_steps: Optional[int] = _field(None, "decode steps fused into one program when only "
                                               "decodes run (default: 8 on GPU/TPU, 1 on CPU)")
    fuse_while_stalled: bool = _field(True, "fuse decode steps also while samples wait that did "
                                      "not fit in the KV pool at the last step (none can start "
                                      "before a running one ends; one stopping on EOS inside a "
                                      "block frees its pages at the block's end); off: only "
                                      "when nothing waits")
    global_prefix_sharing: bool = _field(True, "compute each prefix shared across the batch once")
    # H100: the document workload 22.5 s with it (36.8 s when fused blocks did not keep it); 5 %
    # slower where nothing is shared (no-sharing workload 39.2 vs 37.2 s: a host list per step).
    shared_prefix_attention: bool = _field(True, "read a group's shared prefix once per step in "
                                           "attention (GPU kernel's shared-prefix work lists)")
    schedule_policy: str = _field("batchllm", "admission order: fifo (input order), batchllm "
                                  "(prefix groups together), blendserve (resource-aware: compute- "
                                  "and memory-heavy work blended), auto (the one a host-only "
                                  "simulation of this batch projects fastest)", SCHEDULE_POLICIES)
    blend_density_order: bool = _field(True, "blendserve: order prefix-tree siblings by compute "
                                       "density (off: by batchllm's decode/prefill ratio)")
    blend_dual_scan: bool = _field(True, "blendserve: take units from both ends of the density "
                                   "order (off: from the memory-heavy end on)")
    blend_admission: bool = _field(True, "blendserve: each step admit from the compute- or the "
                                   "memory-heavy queue to keep the running mix near the batch's "
                                   "density (off: strictly in plan order)")
    output_len_sample_fraction: float = _field(0.01, "blendserve/auto: fraction of the requests "
                                               "whose length is not fixed (no ignore_eos, or stop "
                                               "strings) run to completion first (at least a few) "
                                               "to estimate the others' output lengths; 0: use "
                                               "max_tokens")
    admission_control: bool = _field(True, "admit only what fits at full length (no preemption)")
    async_scheduling: bool = _field(True, "overlap host and device: plan and send step N + 1 "
                                    "while step N runs (its tokens reach the host a step late; a "
                                    "finished row costs at most one dropped step); batches with "
                                    "penalties run in turn (their history needs every token)")
    gpu_command_buffers: bool = _field(False, "XLA's GPU command buffers (CUDA graphs) in the step "
                                       "programs (off: every step's buffers change, and updating "
                                       "the graphs cost 3 % end to end on the H200)")
    launch_thread: bool = _field(False, "transfer each step's inputs and launch its program from a "
                                 "worker thread, so the host goes on planning while a launch "
                                 "queues behind the device")
    # scan: compile time independent of depth; unrolled: no per-step copies of each layer's
    # weights (faster on GPU), longer compiles.
    layer_loop: str = _field("auto", "decoder layer loop: scan over stacked weights, or unrolled "
                             "over per-layer arrays (faster on GPU); auto: unrolled on GPU",
                             LAYER_LOOPS)
    compilation_cache_dir: str = _field("auto", "persistent XLA compilation cache: auto "
                                        "($JAXSERVE_COMPILATION_CACHE_DIR, else "
                                        "~/.cache/jaxserve/xla), a folder, or off")

    def __post_init__(self):
        def pos_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"engine: field '{name}' must be a positive integer, got {v!r}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"engine: field '{f.name}'={getattr(self, f.name)!r} must be one "
                                  f"of {', '.join(choices)}")
        for name in ("page_size", "page_bucket_growth", "cpu_kv_cache_bytes",
                     "tensor_parallel_size", "data_parallel_size"):
            pos_int(name)
        for name in ("max_model_len", "num_pages", "fused_decode_steps", "max_num_batched_tokens",
                     "max_num_seqs"):
            if getattr(self, name) is not None:
                pos_int(name)
        for name in ("token_bucket_mid_from", "token_bucket_quarter_from"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"engine: field '{name}' must be an integer >= 0 "
                                  f"(0: never), got {v!r}")
        if self.page_size & (self.page_size - 1):
            raise ConfigError(f"engine: field 'page_size'={self.page_size} must be a power of two "
                              "(GPU kernels tile pages with power-of-two blocks)")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError("engine: field 'num_pages' must be >= 2 (page 0 is the sink)")
        if not 0 <= self.output_len_sample_fraction < 1:
            raise ConfigError("engine: field 'output_len_sample_fraction' must be in [0, 1), got "
                              f"{self.output_len_sample_fraction!r}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError("engine: field 'kv_cache_memory_fraction' must be in (0, 1], got "
                              f"{self.kv_cache_memory_fraction!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """From keyword arguments, naming the valid ones when one is unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine setting {unknown[0]!r}; valid: {', '.join(sorted(names))}")
        return cls(**kwargs)
