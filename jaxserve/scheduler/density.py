"""Compute density of requests and of groups of them (BlendServe's resource model).

A request with prompt length p and output length d costs, on a device of `peak_flops` and
`hbm_bandwidth`,

    T_comp = 2 * P * (tokens it computes) / peak_flops          (P: the model's matmul parameters)
    T_mem  = (p * d + d * d / 2) * kv_bytes_per_token / hbm_bandwidth

where `p * d + d * d / 2` is the KV its decode reads (its context, summed over its d decode steps).
Its density is rho = T_comp / T_mem: above the batch's own density it is compute-heavy, below it
memory-heavy. A group below a shared prefix of s tokens computes the prefix once and reads it once
per decode step for all its members (cascade attention), so both terms shrink: the group's
density is (1 - saved) * T_comp / T_mem of its members taken alone.

Only ratios of densities are used to order and admit work, so the constants matter only for a
density's absolute value (whether a request would be compute-bound on its own).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.config import ModelConfig

# Ceilings of the device the densities are taken on when none is named (an H200: copy bandwidth
# and bf16 matmul rate measured here, benchmarks/README.md).
DEFAULT_PEAK_FLOPS = 7.9e14
DEFAULT_HBM_BANDWIDTH = 4.3e12


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (the embedding lookup does not)."""
    emb = cfg.vocab_size * cfg.hidden_size
    return cfg.num_params() - (0 if cfg.tie_word_embeddings else emb) - cfg.hidden_size


@dataclasses.dataclass(frozen=True)
class DensityModel:
    comp_per_token: float = 1.0      # seconds of compute per token computed
    mem_per_kv_read: float = 1.0     # seconds of memory traffic per KV token read

    @classmethod
    def for_model(cls, cfg: ModelConfig, *, peak_flops: float = DEFAULT_PEAK_FLOPS,
                  hbm_bandwidth: float = DEFAULT_HBM_BANDWIDTH, kv_itemsize: int = 2):
        return cls(2.0 * matmul_params(cfg) / peak_flops,
                   cfg.kv_bytes_per_token(kv_itemsize) / hbm_bandwidth)

    def comp(self, tokens: float) -> float:
        return self.comp_per_token * tokens

    def mem(self, kv_reads: float) -> float:
        return self.mem_per_kv_read * kv_reads

    def density(self, tokens: float, kv_reads: float) -> float:
        return self.comp(tokens) / max(self.mem(kv_reads), 1e-30)


def kv_reads(context: int, decode: int) -> float:
    """KV tokens read by `decode` decode steps starting at `context` tokens of context."""
    return context * decode + decode * decode / 2


@dataclasses.dataclass
class Costs:
    """Tokens a set of requests computes and KV tokens its decode reads (shared parts once)."""

    tokens: float = 0.0
    kv: float = 0.0

    def add(self, other: "Costs") -> "Costs":
        self.tokens += other.tokens
        self.kv += other.kv
        return self

    def density(self, model: DensityModel) -> float:
        return model.density(self.tokens, self.kv)


def request_costs(prompt_len: int, output_len: int, shared_len: int = 0) -> Costs:
    """One request below a shared prefix of `shared_len` tokens (computed and read elsewhere)."""
    own = prompt_len - shared_len
    return Costs(own + output_len, kv_reads(own, output_len))


def prefix_share(s, pending_only: bool = False) -> float:
    """A sample's share of its shared prefixes' prefill: each prefix's own tokens over the samples
    below it (`pending_only`: of the prefixes not computed yet)."""
    share = 0.0
    p = s.prefix
    while p is not None:
        if not pending_only or p.num_computed < p.num_tokens:
            share += (p.num_tokens - p.base) / max(p.num_members, 1)
        p = p.prefix
    return share


def expected_len(s) -> int:
    """A sample's output length for planning: the estimate when there is one, else max_tokens."""
    e: Optional[int] = getattr(s, "expected_output_len", None)
    return s.params.max_tokens if e is None else e
