"""What one planned step costs on a device: the engine's step-time model, from measurements.

Fitted by least squares on 2,600 timed plans of Llama-3-8B (dummy bf16) on an H200, four
workloads from full prefill steps to 1-row fused decode blocks, synchronous host and device
(session of issue #18; mean error 6 % a plan, under 4 % on each workload's total):

    plan   = host + sum over its steps of device step
    host   = 3.54 ms + 23.4 us per row                      (schedule, inputs, commit)
    step   = weights / bandwidth + 0.95 ms                  (4.68 ms for Llama-3-8B)
             + padded tokens * 2 * matmul params / 7.25e14 FLOP/s     (20.7 us a token)
             + KV tokens decode rows read * kv bytes / 3.72e12 B/s     (35 ns a token)
             + prefill (query, key) pairs * 4 * heads * head dim * layers / 1.38e14 FLOP/s

The parts add up: a step's matmuls and its attention run one after the other, so mixing prefill
and decode in one step saves the fixed costs of the steps it replaces (and padding), not the
larger of compute and memory time. With host/device overlap (an engine setting
`async_scheduling`, where it exists) a plan costs the larger of host and device.

The H100 row scales the H200's rates by the ceilings measured on each (copy bandwidth 2.45 vs
4.3 TB/s, bf16 matmul 0.69 vs 0.79 PFLOP/s); it is not fitted.
"""
from __future__ import annotations

import dataclasses

from jaxserve.config import ModelConfig
from jaxserve.scheduler.density import matmul_params


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    hbm_bandwidth: float            # copy bandwidth measured (bytes/s): the density's memory rate
    peak_flops: float               # bf16 matmul chain measured (FLOP/s): the density's compute rate
    memory_bytes: float
    # Step-time model (see the module docstring).
    plan_seconds: float = 3.54e-3
    row_seconds: float = 23.4e-6
    step_seconds: float = 0.95e-3
    weight_bandwidth: float = 4.3e12
    matmul_flops: float = 7.25e14
    kv_bandwidth: float = 3.72e12
    attention_flops: float = 1.38e14


_H200 = DeviceProfile("h200", hbm_bandwidth=4.3e12, peak_flops=7.9e14, memory_bytes=141e9)
_S_BW, _S_FL = 2.45 / 4.3, 0.69 / 0.79
DEVICES = {
    "h200": _H200,
    "h100": dataclasses.replace(
        _H200, name="h100", hbm_bandwidth=2.2e12, peak_flops=6.3e14, memory_bytes=80e9,
        weight_bandwidth=_H200.weight_bandwidth * _S_BW, kv_bandwidth=_H200.kv_bandwidth * _S_BW,
        matmul_flops=_H200.matmul_flops * _S_FL, attention_flops=_H200.attention_flops * _S_FL),
}


def device_profile(kind: str = "") -> DeviceProfile:
    """The profile for a device name or `jax.Device.device_kind` ("NVIDIA H200", ...); the H200's
    when unknown (a CPU run still gets a ranking of policies as on the GPU it stands in for)."""
    k = kind.lower()
    for name, prof in DEVICES.items():
        if name in k:
            return prof
    return _H200


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """`DeviceProfile` applied to one model."""

    profile: DeviceProfile
    token: float                    # seconds per padded token of a step
    step: float                     # seconds per step, whatever it holds
    kv: float                       # seconds per KV token a decode row reads
    pair: float                     # seconds per prefill (query, key) pair

    @classmethod
    def make(cls, prof: DeviceProfile, cfg: ModelConfig, dtype_bytes: int = 2) -> "StepCosts":
        weights = cfg.num_params() * dtype_bytes
        return cls(prof, 2.0 * matmul_params(cfg) / prof.matmul_flops,
                   prof.step_seconds + weights / prof.weight_bandwidth,
                   cfg.kv_bytes_per_token(dtype_bytes) / prof.kv_bandwidth,
                   4.0 * cfg.num_heads * cfg.head_dim * cfg.num_layers / prof.attention_flops)

    def plan_terms(self, plan, page_size: int, shared_prefix_attention: bool = True):
        """(rows, KV tokens its decode rows read in its first step, decode rows, prefill
        (query, key) pairs) of one `StepPlan`. A cascade group's shared pages are read once a
        step for all its rows."""
        reads = 0.0
        pairs = 0.0
        decoders = 0
        groups: dict = {}
        for row in plan.rows:
            if row.samples and row.num_tokens == 1:
                reads += row.end
                decoders += 1
                if shared_prefix_attention and row.group is not None and row.group_pages:
                    shared = len(row.group_pages) * page_size
                    reads -= shared
                    groups[row.group] = shared
            else:
                pairs += row.num_tokens * (row.start + row.num_tokens / 2)
        return len(plan.rows), reads + sum(groups.values()), decoders, pairs

    def seconds(self, rows: int, padded_tokens: int, steps: int, reads: float, decoders: int,
                pairs: float, overlap: bool = False) -> float:
        """A plan of `steps` device steps (a fused block when more than one), whose decode rows
        read `reads` KV tokens in the first step and one more each a step after."""
        host = self.profile.plan_seconds + self.profile.row_seconds * rows
        device = (steps * (self.step + self.token * padded_tokens) + self.pair * pairs
                  + self.kv * (steps * reads + decoders * steps * (steps - 1) / 2))
        return max(host, device) if overlap else host + device

    def plan(self, plan, padded_tokens: int, page_size: int, overlap: bool = False,
             shared_prefix_attention: bool = True) -> float:
        """Seconds one `StepPlan` takes."""
        rows, reads, decoders, pairs = self.plan_terms(plan, page_size, shared_prefix_attention)
        return self.seconds(rows, padded_tokens, plan.decode_steps, reads, decoders, pairs, overlap)
