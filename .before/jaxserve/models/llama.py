"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2) in Flax NNX.

One forward pass takes a flat ragged batch of tokens (prefill chunks and decode tokens of many
requests together) plus the paged KV cache, writes the new K/V into the pages, and returns logits
only for the rows asked for.

Layers are stacked (every per-layer parameter has a leading `num_layers` axis) and run with
`lax.scan`: compile time is independent of depth, which matters because every token bucket is
compiled up front. Q/K/V and gate/up are fused into single matmuls.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels
from jaxserve.config import ModelConfig, rope_inv_freq
from pallas_kernels.metadata import AttentionMetadata


def rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * w.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
    """HF (non-interleaved, rotate-half) RoPE. x: [T, H, D]; positions: [T]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, D/2]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
    """Static choices for the forward pass (part of the jit cache key)."""

    attention_impl: str = "reference"


class DecoderLayers(nnx.Module):
    """All decoder layers, each parameter stacked along a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        L, d, f, hd = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        init = nnx.initializers.normal(0.02)
        self.input_norm = nnx.Param(jnp.ones((L, d), dtype))
        self.qkv_proj = nnx.Param(init(rngs.params(), (L, d, qkv), dtype))
        if cfg.attention_bias:
            self.qkv_bias = nnx.Param(init(rngs.params(), (L, qkv), dtype))
        self.o_proj = nnx.Param(init(rngs.params(), (L, cfg.num_heads * hd, d), dtype))
        self.post_norm = nnx.Param(jnp.ones((L, d), dtype))
        self.gate_up_proj = nnx.Param(init(rngs.params(), (L, d, 2 * f), dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (L, f, d), dtype))


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d, v = cfg.hidden_size, cfg.vocab_size
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (v, d), dtype))
        self.layers = DecoderLayers(cfg, dtype=dtype, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((d,), dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(init(rngs.params(), (d, v), dtype))

    def unstack_layers(self) -> None:
        """Replace each stacked layer parameter [L, ...] by a tuple of L arrays, in place, one
        parameter at a time. The forward pass then runs an unrolled layer loop instead of
        `lax.scan`: faster on GPU (no weight copies), slower to compile. Call before the KV cache
        is sized.

        On an accelerator each parameter goes through host memory: its device buffer is freed
        before the L slices are placed, so they fill exactly the hole it leaves. Slicing on device
        instead puts the slices elsewhere and leaves a hole per parameter: on the H100 the free
        memory then summed to the KV budget but had no contiguous block for the second KV cache
        (19.23 GiB out of memory in `jnp.zeros`, session 3). Costs one copy of the weights each
        way over PCIe; peak extra host memory is the largest parameter."""
        for name, var in vars(self.layers).items():
            if isinstance(var, nnx.Param) and not isinstance(var.value, (tuple, list)):
                stacked = var.value
                n = stacked.shape[0]
                sharding = stacked.sharding
                if (isinstance(sharding, jax.sharding.SingleDeviceSharding)
                        and stacked.device.platform != "cpu"):
                    host = np.asarray(jax.device_get(stacked))
                    stacked.delete()
                    var.value = tuple(jax.device_put(host[i], sharding) for i in range(n))
                    del host
                else:
                    var.value = tuple(stacked[i] for i in range(n))
                del stacked
                jax.block_until_ready(var.value)

    def compute_logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: hidden states [R, hidden] -> logits float32 [R, vocab]."""
        dtype = self.embed.value.dtype
        prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        h = rms_norm(x, self.final_norm.value, self.cfg.rms_norm_eps)
        head = self.embed.value.T if self.cfg.tie_word_embeddings else self.lm_head.value
        return jnp.dot(h, head, precision=prec, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, md: AttentionMetadata, k_cache: jax.Array,
                 v_cache: jax.Array, logits_indices: jax.Array,
                 opts: ForwardOptions = ForwardOptions(), return_hidden: bool = False):
        """input_ids [T]; logits_indices [S] rows whose logits are returned.

        Returns (logits float32 [S, vocab], k_cache, v_cache), plus the final hidden states of all
        T rows (before the final norm; `compute_logits` turns them into logits) when
        `return_hidden` (prompt logprobs need logits at every prompt position).
        """
        cfg = self.cfg
        num_pages = k_cache.shape[1] // cfg.num_layers
        page_size = k_cache.shape[2]
        dtype = self.embed.value.dtype
        prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
        hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        t = input_ids.shape[0]
        x = self.embed.value[input_ids]
        lp = {k: v.value for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}
        sm_scale = hd ** -0.5
        # Once per step, not per layer: e.g. the GPU kernel's work list.
        md = pallas_kernels.prepare_step(md, impl=opts.attention_impl, num_q_heads=hq,
                                         num_kv_heads=hkv, page_size=page_size, head_dim=hd)

        def layer(carry, args):
            x, kc, vc = carry
            w, li = args
            h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
            qkv = jnp.dot(h, w["qkv_proj"], precision=prec)
            if "qkv_bias" in w:
                qkv = qkv + w["qkv_bias"]
            q, k, v = jnp.split(qkv, [hq * hd, (hq + hkv) * hd], axis=-1)
            q = apply_rope(q.reshape(t, hq, hd), md.positions, inv_freq)
            k = apply_rope(k.reshape(t, hkv, hd), md.positions, inv_freq)
            v = v.reshape(t, hkv, hd)
            slots = pallas_kernels.layer_slots(md, li, num_pages, page_size)
            kc, vc = pallas_kernels.write_kv(kc, vc, k, v, slots)
            attn = pallas_kernels.ragged_paged_attention(
                q, kc, vc, md, page_offset=li * num_pages, sm_scale=sm_scale,
                sliding_window=cfg.sliding_window, impl=opts.attention_impl)
            x = x + jnp.dot(attn.reshape(t, hq * hd), w["o_proj"], precision=prec)
            h = rms_norm(x, w["post_norm"], cfg.rms_norm_eps)
            gate, up = jnp.split(jnp.dot(h, w["gate_up_proj"], precision=prec), 2, axis=-1)
            x = x + jnp.dot(jax.nn.silu(gate) * up, w["down_proj"], precision=prec)
            return (x, kc, vc), None

        if isinstance(lp["qkv_proj"], (tuple, list)):
            # Per-layer arrays (`unstack_layers`): an unrolled loop whose matmuls read each
            # layer's weights in place. A scan's per-layer dynamic slice of a stacked weight is
            # copied before cuBLAS reads it (H100: 4 copies per layer per step, 17 ms against
            # 7.6 ms for the 32 layers' matmuls at 256 rows; benchmarks/README.md).
            carry = (x, k_cache, v_cache)
            for li in range(cfg.num_layers):
                carry, _ = layer(carry, ({k: v[li] for k, v in lp.items()}, li))
            x, k_cache, v_cache = carry
        else:
            (x, k_cache, v_cache), _ = jax.lax.scan(
                layer, (x, k_cache, v_cache), (lp, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
        logits = self.compute_logits(x[logits_indices])
        if return_hidden:
            return logits, k_cache, v_cache, x
        return logits, k_cache, v_cache


# ---- HF weight-name map ---------------------------------------------------------------------
# HF tensors are torch Linear weights [out, in]; ours are [in, out] and fused. Each entry maps a
# parameter path to the HF tensor names it is built from (concatenated along `out`), `{i}` = layer.
HF_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_norm": ("model.layers.{i}.input_layernorm.weight",),
    "qkv_proj": ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                 "model.layers.{i}.self_attn.v_proj.weight"),
    "qkv_bias": ("model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                 "model.layers.{i}.self_attn.v_proj.bias"),
    "o_proj": ("model.layers.{i}.self_attn.o_proj.weight",),
    "post_norm": ("model.layers.{i}.post_attention_layernorm.weight",),
    "gate_up_proj": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "down_proj": ("model.layers.{i}.mlp.down_proj.weight",),
}
HF_TOP_MAP: dict[str, str] = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}


def hf_expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> expected shape, for the tensors this model needs (layer-0 names for layers)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {
        "model.embed_tokens.weight": (cfg.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
        "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
        "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
        "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if cfg.attention_bias:
        per_layer.update({
            "self_attn.q_proj.bias": (cfg.num_heads * hd,),
            "self_attn.k_proj.bias": (cfg.num_kv_heads * hd,),
            "self_attn.v_proj.bias": (cfg.num_kv_heads * hd,),
        })
    for i in range(cfg.num_layers):
        for k, s in per_layer.items():
            shapes[f"model.layers.{i}.{k}"] = s
    return shapes


def hf_to_param(name: str, parts: list[np.ndarray]) -> np.ndarray:
    """Turn the HF tensors of one (layer's) parameter into our orientation."""
    if name in ("input_norm", "post_norm", "final_norm", "qkv_bias"):
        return np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
    if name == "embed":
        return parts[0]
    # Linear weights: HF [out, in] -> ours [in, out], fused along out.
    return np.concatenate([p.T for p in parts], axis=1) if len(parts) > 1 else parts[0].T
