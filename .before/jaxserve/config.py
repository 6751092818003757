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

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

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
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]

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
        model_type = cfg.get("model_type", "")
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


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. Sizes are validated here, once, at start-up."""

    page_size: int = 16
    max_num_batched_tokens: int = 512     # token budget of one step (and the largest token bucket)
    max_num_seqs: int = 256               # rows (requests) in one step
    max_model_len: Optional[int] = None   # prompt + output; None -> the model's max positions
    num_pages: Optional[int] = None       # KV pages per layer; None -> sized from memory
    kv_cache_memory_fraction: float = 0.9 # of device memory, after weights, for the KV cache
    cpu_kv_cache_bytes: int = 2 << 30     # KV budget where the device reports no memory (CPU)
    attention_impl: str = "auto"          # "auto" | "reference" | a pallas_kernels implementation
    page_bucket_growth: int = 4           # page-table width buckets grow by this factor (1: one bucket)
    fused_decode_steps: int = 1           # >1: decode-only stretches run this many steps per program
    global_prefix_sharing: bool = True    # compute each prefix shared across the batch once
    # Read a group's shared prefix once per step, in single steps and fused decode blocks
    # (host-built work lists for the GPU kernel; ignored by the reference attention). H100: the
    # document workload 22.5 s with it (36.8 s before fused blocks kept it); it costs 5 % where
    # nothing is shared (no-sharing workload 39.2 vs 37.2 s: a host-built list per step).
    shared_prefix_attention: bool = True
    schedule_policy: str = "batchllm"     # "fifo" | "batchllm" | "blendserve"
    admission_control: bool = True        # admit only what fits at full length: no preemption
    seed: int = 0
    compile_on_init: bool = True
    # "scan": lax.scan over stacked layers (compile time independent of depth).
    # "unrolled": a Python loop over per-layer weight arrays: no per-step copies of each layer's
    # weights (faster on GPU), longer compile (H100, Llama-3-8B: ~60-75 s in parallel threads).
    # "auto": unrolled on GPU, scan elsewhere.
    layer_loop: str = "auto"

    def __post_init__(self):
        def pos_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"engine: field '{name}' must be a positive integer, got {v!r}")

        for name in ("page_size", "max_num_batched_tokens", "max_num_seqs", "fused_decode_steps"):
            pos_int(name)
        if self.page_size & (self.page_size - 1):
            raise ConfigError(f"engine: field 'page_size'={self.page_size} must be a power of two "
                              "(GPU kernels tile pages with power-of-two blocks)")
        if self.max_model_len is not None:
            pos_int("max_model_len")
        if self.num_pages is not None:
            pos_int("num_pages")
            if self.num_pages < 2:
                raise ConfigError("engine: field 'num_pages' must be >= 2 (page 0 is the sink)")
        if self.schedule_policy not in ("fifo", "batchllm", "blendserve"):
            raise ConfigError(f"engine: field 'schedule_policy'={self.schedule_policy!r} must be one "
                              "of fifo, batchllm, blendserve")
        if self.layer_loop not in ("auto", "scan", "unrolled"):
            raise ConfigError(f"engine: field 'layer_loop'={self.layer_loop!r} must be one of "
                              "auto, scan, unrolled")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError("engine: field 'kv_cache_memory_fraction' must be in (0, 1], got "
                              f"{self.kv_cache_memory_fraction!r}")
