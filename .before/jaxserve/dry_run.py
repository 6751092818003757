"""What a batch will cost, before running it: request and token counts, the global prefix tree
(optimal reuse, groups, depth), KV memory, and the projected run time on a named device from the
roofline. Nothing touches the model's weights."""
from __future__ import annotations

from typing import Optional

from jaxserve.config import ModelConfig
from jaxserve.roofline import workload_floor
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler.planner import plan_batch
from jaxserve.scheduler.sequence import Sequence

# Ceilings measured on the lent GPUs here (benchmarks/README.md): copy bandwidth, bf16 matmul.
DEVICES = {
    "h100": dict(hbm_bandwidth=2.2e12, peak_flops=6.3e14, memory_bytes=80e9),
    "h200": dict(hbm_bandwidth=4.3e12, peak_flops=7.9e14, memory_bytes=141e9),
}


def analyse(cfg: ModelConfig, prompts: list[list[int]], params: list[SamplingParams], *,
            device: str = "h100", page_size: int = 16, max_num_batched_tokens: int = 2048,
            max_num_seqs: int = 256, dtype_bytes: int = 2, policy: str = "batchllm",
            num_errors: int = 0) -> dict:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    dev = DEVICES[device]
    seqs = [Sequence(index=i, prompt_ids=list(p), params=sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    # As the engine does: a request asking for prompt logprobs prefills its whole prompt itself.
    own = [s for s in seqs if s.params.prompt_logprobs is not None]
    plan = plan_batch([s for s in seqs if s.params.prompt_logprobs is None] if own else seqs,
                      sharing=True, policy=policy, model_cfg=cfg)
    tree = plan.tree
    prompt_tokens = sum(len(p) for p in prompts)
    optimal = (tree.optimal_prefill_tokens + sum(len(s.prompt_ids) for s in own)
               if tree is not None else prompt_tokens)
    out_tokens = [sp.max_tokens for sp in params]
    group_sizes: dict = {}
    for s in seqs:
        if s.group is not None:
            group_sizes[id(s.group)] = group_sizes.get(id(s.group), 0) + 1
    kv_tok = cfg.kv_bytes_per_token(dtype_bytes)
    # KV held if every request ran at once at full length: shared prefixes once, plus own parts.
    shared_tokens = sum(p.num_tokens - (p.prefix.num_tokens if p.prefix else 0) for p in plan.prefixes)
    own_tokens = sum(len(s.prompt_ids) - s.base + sp.max_tokens for s, sp in zip(seqs, params))
    weights = cfg.num_params() * dtype_bytes
    fl = workload_floor(cfg, [len(p) for p in prompts], out_tokens,
                        [s.base for s in seqs], optimal_prefill_tokens=optimal,
                        peak_flops=dev["peak_flops"], hbm_bandwidth=dev["hbm_bandwidth"],
                        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        dtype_bytes=dtype_bytes)
    return dict(
        num_requests=len(prompts) + num_errors, num_valid=len(prompts), num_errors=num_errors,
        prompt_tokens=prompt_tokens, output_tokens_max=sum(out_tokens),
        optimal_prefill_tokens=optimal,
        optimal_reuse_ratio=1 - optimal / prompt_tokens if prompt_tokens else 0.0,
        num_shared_prefixes=len(plan.prefixes), num_groups=plan.num_groups,
        group_size_max=max(group_sizes.values(), default=0),
        group_size_mean=(sum(group_sizes.values()) / len(group_sizes)) if group_sizes else 0.0,
        tree_depth=tree.depth_levels() if tree is not None else 0,
        kv_bytes_all_at_once=(shared_tokens + own_tokens) * kv_tok,
        kv_bytes_per_token=kv_tok, weights_bytes=weights,
        device=device, device_memory_bytes=dev["memory_bytes"],
        projected_seconds=fl.seconds, projected_bound=fl.bound,
        floor_flops=fl.flops, floor_bytes=fl.bytes)


def format_table(d: dict) -> str:
    gib = 2 ** 30
    rows = [
        ("requests (valid / errors)", f"{d['num_requests']} ({d['num_valid']} / {d['num_errors']})"),
        ("prompt tokens", f"{d['prompt_tokens']:,}"),
        ("output tokens (max)", f"{d['output_tokens_max']:,}"),
        ("prefill tokens with sharing", f"{d['optimal_prefill_tokens']:,}"),
        ("optimal reuse ratio", f"{d['optimal_reuse_ratio']:.3f}"),
        ("shared prefixes / groups", f"{d['num_shared_prefixes']} / {d['num_groups']}"),
        ("group size (mean / max)", f"{d['group_size_mean']:.1f} / {d['group_size_max']}"),
        ("prefix tree depth", str(d["tree_depth"])),
        ("KV if all ran at once", f"{d['kv_bytes_all_at_once'] / gib:,.2f} GiB"),
        ("weights", f"{d['weights_bytes'] / gib:,.2f} GiB"),
        (f"projected time on {d['device']}", f"{d['projected_seconds']:,.1f} s ({d['projected_bound']}-bound floor)"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
