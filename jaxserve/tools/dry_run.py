"""What a batch will cost, before running it: request and token counts, the global prefix tree
(optimal reuse, groups, depth), KV memory, and the projected run time on a named device from the
roofline. Nothing touches the model's weights.

With tensor parallelism over N devices the figures are per device: each holds 1 / N of the split
weights (norms, and a vocabulary that does not divide, whole) and of the KV cache, and does 1 / N
of the FLOPs and byte traffic (the per-layer all-reduces over the interconnect are not counted).
"""
from __future__ import annotations

from typing import Optional

from jaxserve.config import ModelConfig
from jaxserve.tools.roofline import workload_floor
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler.planner import plan_batch
from jaxserve.scheduler.sequence import Sample

# Ceilings measured on the lent GPUs here (benchmarks/README.md): copy bandwidth, bf16 matmul.
DEVICES = {
    "h100": dict(hbm_bandwidth=2.2e12, peak_flops=6.3e14, memory_bytes=80e9),
    "h200": dict(hbm_bandwidth=4.3e12, peak_flops=7.9e14, memory_bytes=141e9),
}


def weights_bytes_per_device(cfg: ModelConfig, tensor_parallel_size: int,
                             dtype_bytes: int = 2) -> int:
    """Weight bytes one device holds when the model is split over `tensor_parallel_size`."""
    tp = tensor_parallel_size
    whole = (2 * cfg.num_layers + 1) * cfg.hidden_size                  # the norms
    vocab = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    if cfg.vocab_size % tp:
        whole += vocab
    return ((cfg.num_params() - whole) // tp + whole) * dtype_bytes


def analyse(cfg: ModelConfig, prompts: list[list[int]], params: list[SamplingParams], *,
            device: str = "h100", page_size: int = 16, max_num_batched_tokens: Optional[int] = None,
            max_num_seqs: Optional[int] = None, dtype_bytes: int = 2, policy: str = "batchllm",
            num_errors: int = 0, tensor_parallel_size: int = 1) -> dict:
    """`max_num_batched_tokens` / `max_num_seqs` None: the engine's defaults on that device."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    tp = tensor_parallel_size
    if tp > 1:
        from jaxserve.runner.mesh import check_tensor_parallel

        check_tensor_parallel(cfg, tp)
    dev = DEVICES[device]
    big = dev["memory_bytes"] >= 70 * 2 ** 30      # engine.sizing.resolve_batch_limits
    max_num_batched_tokens = max_num_batched_tokens or (16384 if big else 8192)
    max_num_seqs = max_num_seqs or (1024 if big else 256)
    seqs = [Sample(prompt_ids=list(p), index=i, params=sp, request=i)
            for i, (p, sp) in enumerate(zip(prompts, params))]
    # As the engine does: a request asking for prompt logprobs prefills its whole prompt itself.
    own = [s for s in seqs if s.wants_prompt_logprobs]
    plan = plan_batch([s for s in seqs if not s.wants_prompt_logprobs] if own else seqs,
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
                        peak_flops=dev["peak_flops"] * tp, hbm_bandwidth=dev["hbm_bandwidth"] * tp,
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
        tensor_parallel_size=tp,
        weights_bytes_per_device=weights_bytes_per_device(cfg, tp, dtype_bytes),
        kv_bytes_per_token_per_device=kv_tok // tp,
        kv_bytes_all_at_once_per_device=(shared_tokens + own_tokens) * kv_tok // tp,
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
    ]
    tp = d.get("tensor_parallel_size", 1)
    if tp > 1:
        rows += [
            ("tensor parallel devices", str(tp)),
            ("KV if all ran at once, per device",
             f"{d['kv_bytes_all_at_once_per_device'] / gib:,.2f} GiB"),
            ("weights per device", f"{d['weights_bytes_per_device'] / gib:,.2f} GiB"),
        ]
    on = f"{tp} x {d['device']}" if tp > 1 else d["device"]
    rows.append((f"projected time on {on}",
                 f"{d['projected_seconds']:,.1f} s ({d['projected_bound']}-bound floor)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
