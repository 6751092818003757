"""Tiny random HF checkpoints, built with transformers and saved with `save_pretrained`: the outside
oracle for the model and engine tests. Built once per session (see `tiny_model` fixtures)."""
from __future__ import annotations

import os

import torch
import transformers

VOCAB = 384


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(kw)
    return base


KINDS = {
    # Llama 3.1-style rope scaling, GQA 2, sharded into several files.
    "llama3": lambda: transformers.LlamaConfig(**_common(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    # Mistral with a sliding window shorter than the longest test sequence.
    "mistral": lambda: transformers.MistralConfig(**_common(sliding_window=48, num_key_value_heads=1,
                                                           rope_theta=10000.0)),
    # Qwen2: q/k/v bias, head_dim 16 with 8 heads over hidden 64... keep GQA 4.
    "qwen2": lambda: transformers.Qwen2Config(**_common(num_attention_heads=8, num_key_value_heads=2,
                                                       rope_theta=1000000.0, use_sliding_window=False)),
    # Tied input/output embeddings (SmolLM2-style), no GQA.
    "tied": lambda: transformers.LlamaConfig(**_common(tie_word_embeddings=True, num_key_value_heads=4)),
}

MODEL_CLASSES = {
    "llama3": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "tied": transformers.LlamaForCausalLM,
}


def build(kind: str, root: str, seed: int = 0):
    """Create and save a tiny model; returns (directory, the torch model in float32 eval mode)."""
    torch.manual_seed(seed)
    cfg = KINDS[kind]()
    model = MODEL_CLASSES[kind](cfg).eval().float()
    # Random init leaves biases at 0 and norms at 1: perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = os.path.join(root, kind)
    model.save_pretrained(path, max_shard_size="200KB" if kind == "llama3" else "50MB")
    return path, model
