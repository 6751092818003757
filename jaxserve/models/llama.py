"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, SmolLM2) in Flax NNX.

One forward pass takes a flat ragged batch of tokens (prefill chunks and decode tokens of many
requests together) plus the paged KV cache, writes the new K/V into the pages, and returns logits
only for the rows asked for.

Layers are stacked (every per-layer parameter has a leading `num_layers` axis) and run with
`lax.scan`: compile time is independent of depth, which matters because every token bucket is
compiled up front. Q/K/V and gate/up are fused into single matmuls.

Under tensor parallelism the whole forward runs per device inside `shard_map` (the runner wraps
it; `ForwardOptions.tp_axis` names the mesh axis): each device holds its query / KV heads'
columns of `qkv_proj` and its columns of `gate_up_proj` (laid out per shard at load time,
`tp_column_order`), the matching rows of `o_proj` and `down_proj`, whose partial products are
summed with one `psum` each per layer (Megatron), and a slice of the vocabulary: the embedding
lookup is masked and summed, the logits of the sampled rows are gathered.
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
from pallas_kernels import AttentionMetadata, AttentionSpec


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

    attention: AttentionSpec
    tp_axis: Optional[str] = None   # mesh axis of tensor parallelism (inside shard_map), or None
    tp_size: int = 1

    def reduce(self, x):
        """Sum the partial products of a row-parallel matmul over the devices."""
        return x if self.tp_axis is None else jax.lax.psum(x, self.tp_axis)


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


def _unstack(stacked: jax.Array) -> tuple:
    """[L, ...] -> L arrays [...] with the same sharding less the layer axis (see
    `LlamaForCausalLM.unstack_layers`)."""
    n, layer_shape = stacked.shape[0], stacked.shape[1:]
    sharding = stacked.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        layer_sharding = jax.sharding.NamedSharding(sharding.mesh,
                                                    jax.sharding.PartitionSpec(*sharding.spec[1:]))
    else:
        layer_sharding = sharding
    shards = stacked.addressable_shards
    devices = [s.device for s in shards]
    if devices[0].platform != "cpu":
        host = [np.asarray(s.data) for s in shards]
        stacked.delete()
        pieces = [[jax.device_put(h[i], d) for h, d in zip(host, devices)] for i in range(n)]
        del host
    else:
        pieces = [[s.data[i] for s in shards] for i in range(n)]
    return tuple(jax.make_array_from_single_device_arrays(layer_shape, layer_sharding, p)
                 for p in pieces)


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

        Works shard by shard (a tensor-parallel parameter has one shard per device, a plain one
        has one): each layer's array keeps the parameter's sharding less its layer axis, and no
        device ever holds more than its own shard. On an accelerator each shard goes through host
        memory: its device buffer is freed before the L slices are placed, so they fill exactly
        the hole it leaves. Slicing on device instead puts the slices elsewhere and leaves a hole
        per parameter: on the H100 the free memory then summed to the KV budget but had no
        contiguous block for the second KV cache (19.23 GiB out of memory in `jnp.zeros`). Costs
        one copy of the weights each way over PCIe; peak extra host memory is the largest
        parameter's local shards."""
        for name, var in vars(self.layers).items():
            if isinstance(var, nnx.Param) and not isinstance(var.value, (tuple, list)):
                stacked = var.value
                var.value = _unstack(stacked)
                del stacked
                jax.block_until_ready(var.value)

    def embed_tokens(self, input_ids: jax.Array, opts: Optional[ForwardOptions] = None):
        """Embedding rows of `input_ids`. With the vocabulary sharded, each device looks up the ids
        in its slice (zeros elsewhere) and one psum assembles the rows (exact: one term is
        non-zero)."""
        emb = self.embed.value
        vl = emb.shape[0]
        if opts is None or opts.tp_axis is None or vl == self.cfg.vocab_size:
            return emb[input_ids]
        local = input_ids - jax.lax.axis_index(opts.tp_axis) * vl
        mine = (local >= 0) & (local < vl)
        rows = jnp.where(mine[:, None], emb[jnp.clip(local, 0, vl - 1)], jnp.zeros((), emb.dtype))
        return jax.lax.psum(rows, opts.tp_axis)

    def compute_logits(self, x: jax.Array, opts: Optional[ForwardOptions] = None) -> jax.Array:
        """Final norm and LM head: hidden states [R, hidden] -> logits float32 [R, vocab]. With
        the vocabulary sharded, each device computes its slice and the slices are gathered (only
        for the R rows asked for)."""
        dtype = self.embed.value.dtype
        prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        h = rms_norm(x, self.final_norm.value, self.cfg.rms_norm_eps)
        head = self.embed.value.T if self.cfg.tie_word_embeddings else self.lm_head.value
        logits = jnp.dot(h, head, precision=prec, preferred_element_type=jnp.float32)
        if opts is not None and opts.tp_axis is not None and head.shape[1] != self.cfg.vocab_size:
            logits = jax.lax.all_gather(logits, opts.tp_axis, axis=1, tiled=True)
        return logits

    def __call__(self, input_ids: jax.Array, md: AttentionMetadata, k_cache: jax.Array,
                 v_cache: jax.Array, logits_indices: jax.Array, opts: ForwardOptions,
                 return_hidden: bool = False):
        """input_ids [T]; logits_indices [S] rows whose logits are returned; `md` is the step's
        attention metadata, complete for `opts.attention` (the runner prepares it). Under tensor
        parallelism the arrays are this device's shards (local heads, local KV cache).

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
        hq, hkv, hd = cfg.num_heads // opts.tp_size, cfg.num_kv_heads // opts.tp_size, cfg.head_dim
        t = input_ids.shape[0]
        x = self.embed_tokens(input_ids, opts)
        lp = {k: v.value for k, v in vars(self.layers).items() if isinstance(v, nnx.Param)}
        sm_scale = hd ** -0.5

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
                q, kc, vc, md, spec=opts.attention, page_offset=li * num_pages,
                sm_scale=sm_scale, sliding_window=cfg.sliding_window)
            x = x + opts.reduce(jnp.dot(attn.reshape(t, hq * hd), w["o_proj"], precision=prec))
            h = rms_norm(x, w["post_norm"], cfg.rms_norm_eps)
            gate, up = jnp.split(jnp.dot(h, w["gate_up_proj"], precision=prec), 2, axis=-1)
            x = x + opts.reduce(jnp.dot(jax.nn.silu(gate) * up, w["down_proj"], precision=prec))
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
        logits = self.compute_logits(x[logits_indices], opts)
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


# ---- tensor parallelism -----------------------------------------------------------------------
# The axis (counted from the end, so stacked and per-layer arrays agree) that tensor parallelism
# splits across devices; parameters not named here are replicated. Column-parallel: qkv_proj,
# qkv_bias, gate_up_proj (by heads / columns); row-parallel: o_proj, down_proj; the vocabulary:
# embed (rows) and lm_head (columns), replicated instead when the vocabulary does not divide.
TP_SPLIT_AXES: dict[str, int] = {
    "qkv_proj": -1, "qkv_bias": -1, "gate_up_proj": -1,
    "o_proj": -2, "down_proj": -2,
    "embed": -2, "lm_head": -1,
}
TP_VOCAB_PARAMS = ("embed", "lm_head")


def tp_column_order(cfg: ModelConfig, name: str, tp: int) -> Optional[np.ndarray]:
    """The fused parameters' column order for `tp` shards, or None when the order is the
    checkpoint's. A contiguous split of the fused [q | k | v] axis would hand all K/V heads to the
    last devices; laid out in this order, shard i's contiguous block is [its q heads | its k heads
    | its v heads] (and [its gate | its up] columns), which is what the forward splits locally."""
    if tp == 1 or name not in ("qkv_proj", "qkv_bias", "gate_up_proj"):
        return None
    if name == "gate_up_proj":
        f = cfg.intermediate_size
        sizes = [f, f]
    else:
        hd = cfg.head_dim
        sizes = [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd]
    starts = np.cumsum([0] + sizes[:-1])
    order = [np.arange(st + i * (n // tp), st + (i + 1) * (n // tp))
             for i in range(tp) for st, n in zip(starts, sizes)]
    return np.concatenate(order)


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
