"""The floor of a workload on a device: FLOPs and bytes it must at least cost, over ceilings
measured on that device. Used by the benchmark (achieved fraction of the floor) and by dry runs.

FLOPs: 2 x matmul parameters x tokens that must be computed (prefill with every shared prefix once,
plus one decode token per output token) + attention (QK^T and PV over each token's context).
Bytes: the weights once per step, times the fewest steps the engine can take (budget-limited
prefill, and at least one step per output token of the longest request), plus the KV each decode
token must read, with a shared prefix read once per group per step.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

from jaxserve.config import ModelConfig


@dataclasses.dataclass
class Floor:
    flops: float
    bytes: float
    compute_seconds: float
    memory_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not)."""
    emb = cfg.vocab_size * cfg.hidden_size
    return cfg.num_params() - (0 if cfg.tie_word_embeddings else emb) - cfg.hidden_size


def workload_floor(cfg: ModelConfig, prompt_lens: Sequence[int], output_lens: Sequence[int],
                   shared_lens: Optional[Sequence[int]] = None, *,
                   optimal_prefill_tokens: Optional[int] = None, peak_flops: float,
                   hbm_bandwidth: float, max_num_batched_tokens: int, max_num_seqs: int,
                   dtype_bytes: int = 2) -> Floor:
    """`shared_lens[i]`: prompt tokens of request i that it shares with others (KV read once per
    group); with `optimal_prefill_tokens` from the prefix tree."""
    n = len(prompt_lens)
    shared = list(shared_lens) if shared_lens is not None else [0] * n
    prefill = optimal_prefill_tokens if optimal_prefill_tokens is not None else sum(prompt_lens)
    decode = sum(output_lens)
    L, hq, hd = cfg.num_layers, cfg.num_heads, cfg.head_dim
    flops = 2.0 * matmul_params(cfg) * (prefill + decode)
    # Attention: 4 * context * hq * hd per token per layer (QK^T and PV, 2 FLOPs per MAC).
    attn_ctx = 0.0
    for p, d, s in zip(prompt_lens, output_lens, shared):
        own = p - s
        attn_ctx += own * (s + own / 2) + d * (p + d / 2)
    attn_ctx += sum(s * s / 2 for s in set(shared))  # each distinct shared prefix once (approx.)
    flops += 4.0 * attn_ctx * hq * hd * L
    weights = cfg.num_params() * dtype_bytes
    steps = max(-(-(prefill + decode) // max_num_batched_tokens), max(output_lens, default=0),
                -(-decode // max_num_seqs))
    kv_tok = cfg.kv_bytes_per_token(dtype_bytes)
    kv_reads = 0.0
    for p, d, s in zip(prompt_lens, output_lens, shared):
        kv_reads += d * ((p - s) + d / 2)
    # Shared prefixes: read once per decode step of their group (groups of equal shared length
    # and equal output are approximated by counting each distinct prefix once per step).
    groups: dict = {}
    for s, d in zip(shared, output_lens):
        if s:
            groups[s] = max(groups.get(s, 0), d)
    kv_reads += sum(s * d for s, d in groups.items())
    total_bytes = weights * steps + kv_reads * kv_tok
    return Floor(flops, total_bytes, flops / peak_flops, total_bytes / hbm_bandwidth)


def measure_ceilings(size_bytes: int = 1 << 30, matmul_n: int = 8192, repeats: int = 10):
    """(HBM bandwidth in bytes/s counting read + write of a large copy, bf16 matmul FLOP/s)."""
    import jax
    import jax.numpy as jnp

    def bench(fn, *args):
        fn(*args).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    x = jax.random.normal(jax.random.key(0), (size_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001 + 1.0)
    bw = 2 * size_bytes / bench(copy, x)
    del x
    a = jax.random.normal(jax.random.key(1), (matmul_n, matmul_n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (matmul_n, matmul_n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
    flops = 2 * matmul_n ** 3 / bench(mm, a, b)
    return bw, flops
