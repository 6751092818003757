"""What a batch will cost, before running it: request and token counts, the global prefix tree
(optimal reuse, groups, depth), KV memory, the projected run time on a named device from the
roofline, and each schedule policy's time from a host-only simulation of the scheduler
(`engine/simulate.py`, the step-time model fitted on the H200). Nothing touches the model's
weights. Output lengths are each request's max_tokens: a dry run cannot sample them (a real run
under blendserve or auto estimates the ones that are not fixed from a probe of the batch)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.cost_model import DEVICES as PROFILES, StepCosts
from jaxserve.tools.roofline import workload_floor
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler.partition import CostModel, WorkItem, partition
from jaxserve.scheduler.planner import plan_batch
from jaxserve.scheduler.sequence import Sample

# Ceilings measured on the lent GPUs here (benchmarks/README.md): copy bandwidth, bf16 matmul.
DEVICES = {name: dict(hbm_bandwidth=p.hbm_bandwidth, peak_flops=p.peak_flops,
                      memory_bytes=p.memory_bytes) for name, p in PROFILES.items()}
SIMULATE_MAX_SAMPLES = 20000     # larger batches skip the per-policy simulation (host time)


def weights_bytes_per_device(cfg: ModelConfig, tensor_parallel_size: int,
                             dtype_bytes: int = 2) -> int:
    """Weight bytes one device holds when the model is split over `tensor_parallel_size`."""
    tp = tensor_parallel_size
    whole = (2 * cfg.num_layers + 1) * cfg.hidden_size                  # the norms
    vocab = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    if cfg.vocab_size % tp:
        whole += vocab
    return ((cfg.num_params() - whole) // tp + whole) * dtype_bytes


def _share(cfg: ModelConfig, prompts, params, dev: dict, *, policy: str,
           max_num_batched_tokens: int, max_num_seqs: int, dtype_bytes: int, tp: int = 1) -> dict:
    """The plan, floor and KV of one engine running `prompts` (a whole batch or one replica's)."""
    seqs = [Sample(prompt_ids=list(p), index=i, params=sp, request=i)
            for i, (p, sp) in enumerate(zip(prompts, params))]
    # As the engine does: a request asking for prompt logprobs prefills its whole prompt itself.
    own = [s for s in seqs if s.wants_prompt_logprobs]
    plan = plan_batch([s for s in seqs if not s.wants_prompt_logprobs] if own else seqs,
                      sharing=True, policy="batchllm" if policy == "auto" else policy,
                      model_cfg=cfg)
    tree = plan.tree
    prompt_tokens = sum(len(p) for p in prompts)
    optimal = (tree.optimal_prefill_tokens + sum(len(s.prompt_ids) for s in own)
               if tree is not None else prompt_tokens)
    out_tokens = [sp.max_tokens for sp in params]
    kv_tok = cfg.kv_bytes_per_token(dtype_bytes)
    # KV held if every request ran at once at full length: shared prefixes once, plus own parts.
    shared_tokens = sum(p.num_tokens - (p.prefix.num_tokens if p.prefix else 0) for p in plan.prefixes)
    own_tokens = sum(len(s.prompt_ids) - s.base + sp.max_tokens for s, sp in zip(seqs, params))
    fl = workload_floor(cfg, [len(p) for p in prompts], out_tokens,
                        [s.base for s in seqs], optimal_prefill_tokens=optimal,
                        peak_flops=dev["peak_flops"] * tp, hbm_bandwidth=dev["hbm_bandwidth"] * tp,
                        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                        dtype_bytes=dtype_bytes)
    return dict(seqs=seqs, plan=plan, optimal=optimal, floor=fl,
                kv_bytes=(shared_tokens + own_tokens) * kv_tok)


def analyse(cfg: ModelConfig, prompts: list[list[int]], params: list[SamplingParams], *,
            device: str = "h100", page_size: int = 16, max_num_batched_tokens: Optional[int] = None,
            max_num_seqs: Optional[int] = None, dtype_bytes: int = 2, policy: str = "batchllm",
            num_errors: int = 0, tensor_parallel_size: int = 1,
            data_parallel_size: int = 1, engine: Optional[EngineConfig] = None) -> dict:
    """Per device, for `data_parallel_size` replicas of `tensor_parallel_size` devices each: the
    batch split as the engine splits it (`scheduler.partition`); the projected time is the
    slowest replica's floor and the memory per device its share of the weights plus the largest
    replica's KV share. `max_num_batched_tokens` / `max_num_seqs` None: the engine's defaults on
    that device. `engine`: the run's settings for the per-policy simulation (default: these
    sizes with EngineConfig's other defaults; one replica's device)."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
    tp = tensor_parallel_size
    if tp > 1:
        from jaxserve.runner.mesh import check_tensor_parallel

        check_tensor_parallel(cfg, tp)
    dev = DEVICES[device]
    big = dev["memory_bytes"] >= 70 * 2 ** 30      # engine.sizing.resolve_batch_limits
    kw = dict(policy=policy, max_num_batched_tokens=max_num_batched_tokens or (16384 if big else 8192),
              max_num_seqs=max_num_seqs or (1024 if big else 256), dtype_bytes=dtype_bytes, tp=tp)
    whole = _share(cfg, prompts, params, dev, **kw)
    plan, tree, optimal, fl = whole["plan"], whole["plan"].tree, whole["optimal"], whole["floor"]
    prompt_tokens = sum(len(p) for p in prompts)
    out_tokens = [sp.max_tokens for sp in params]
    group_sizes: dict = {}
    for s in whole["seqs"]:
        if s.group is not None:
            group_sizes[id(s.group)] = group_sizes.get(id(s.group), 0) + 1
    kv_tok = cfg.kv_bytes_per_token(dtype_bytes)
    weights = cfg.num_params() * dtype_bytes
    weights_dev = weights_bytes_per_device(cfg, tp, dtype_bytes)
    ecfg = engine or EngineConfig(page_size=page_size)
    ecfg = dataclasses.replace(ecfg, max_num_batched_tokens=kw["max_num_batched_tokens"],
                               max_num_seqs=kw["max_num_seqs"])
    projected = (simulate_policies(cfg, prompts, params, device=device, ecfg=ecfg,
                                   dtype_bytes=dtype_bytes)
                 if len(prompts) <= SIMULATE_MAX_SAMPLES and tp == 1 and data_parallel_size == 1
                 else {})
    d = dict(
        output_lengths="max_tokens (a dry run cannot sample them)",
        projected_seconds_by_policy=projected,
        num_requests=len(prompts) + num_errors, num_valid=len(prompts), num_errors=num_errors,
        prompt_tokens=prompt_tokens, output_tokens_max=sum(out_tokens),
        optimal_prefill_tokens=optimal,
        optimal_reuse_ratio=1 - optimal / prompt_tokens if prompt_tokens else 0.0,
        num_shared_prefixes=len(plan.prefixes), num_groups=plan.num_groups,
        group_size_max=max(group_sizes.values(), default=0),
        group_size_mean=(sum(group_sizes.values()) / len(group_sizes)) if group_sizes else 0.0,
        tree_depth=tree.depth_levels() if tree is not None else 0,
        kv_bytes_all_at_once=whole["kv_bytes"],
        kv_bytes_per_token=kv_tok, weights_bytes=weights,
        device=device, device_memory_bytes=dev["memory_bytes"],
        projected_seconds=fl.seconds, projected_bound=fl.bound,
        floor_flops=fl.flops, floor_bytes=fl.bytes,
        tensor_parallel_size=tp, data_parallel_size=data_parallel_size,
        weights_bytes_per_device=weights_dev, kv_bytes_per_token_per_device=kv_tok // tp,
        kv_bytes_all_at_once_per_device=whole["kv_bytes"] // tp,
        memory_per_device_bytes=weights_dev + whole["kv_bytes"] // tp)
    if data_parallel_size > 1:
        d.update(_replicas(cfg, prompts, params, dev, data_parallel_size, kw, weights_dev))
    return d


def _replicas(cfg, prompts, params, dev, m: int, kw: dict, weights_dev: int) -> dict:
    cost = CostModel.for_model(cfg, kw["dtype_bytes"], peak_flops=dev["peak_flops"],
                               hbm_bandwidth=dev["hbm_bandwidth"])
    part = partition([WorkItem(p, sp.max_tokens, sp.n, shareable=sp.prompt_logprobs is None)
                      for p, sp in zip(prompts, params)], m, cost=cost)
    shares = [_share(cfg, [prompts[i] for i in idx], [params[i] for i in idx], dev, **kw)
              if idx else None for idx in part.parts]
    secs = [s["floor"].seconds if s else 0.0 for s in shares]
    slowest = max(range(m), key=secs.__getitem__)
    kv = max((s["kv_bytes"] for s in shares if s), default=0)
    return dict(replica_requests=[len(idx) for idx in part.parts],
                replica_projected_seconds=secs,
                projected_seconds=secs[slowest],
                projected_bound=shares[slowest]["floor"].bound if shares[slowest] else "compute",
                dp_split_groups=part.split_groups,
                dp_duplicated_prefix_tokens=part.duplicated_prefix_tokens,
                kv_bytes_all_at_once_per_replica=kv,
                memory_per_device_bytes=weights_dev + kv // kw["tp"])


def simulate_policies(cfg: ModelConfig, prompts, params, *, device: str, ecfg: EngineConfig,
                      dtype_bytes: int = 2) -> dict:
    """Projected seconds of each candidate policy (what `schedule_policy="auto"` compares), with
    the KV pages the device's memory holds beside the weights."""
    from jaxserve.engine.simulate import CANDIDATES, simulate

    prof = PROFILES[device]
    max_len = ecfg.max_model_len or max(len(p) + sp.max_tokens for p, sp in zip(prompts, params))
    page_bytes = cfg.kv_bytes_per_token(dtype_bytes) * ecfg.page_size
    pages = ecfg.num_pages or int((ecfg.kv_cache_memory_fraction * prof.memory_bytes
                                   - cfg.num_params() * dtype_bytes) // page_bytes)
    per_seq = -(-max_len // ecfg.page_size)
    if pages < per_seq + 1:
        return {}        # the longest request's KV does not fit beside the weights: nothing runs
    pages = min(pages, ecfg.max_num_seqs * per_seq + 1)
    from jaxserve.engine.sizing import bucket_set

    buckets = bucket_set(ecfg, ecfg.max_num_batched_tokens, ecfg.max_num_seqs, per_seq, "gpu")
    costs = StepCosts.make(prof, cfg, dtype_bytes)
    samples = [Sample(prompt_ids=list(p), index=i, params=sp, request=i, max_len=max_len)
               for i, (p, sp) in enumerate(zip(prompts, params))]
    fused = ecfg.fused_decode_steps or 8
    return {pol: round(simulate(samples, pol, dataclasses.replace(ecfg, num_pages=pages), cfg,
                                costs, num_pages=pages, buckets=buckets, fused_decode_steps=fused,
                                keep_trace=False).seconds, 2)
            for pol in CANDIDATES}


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
    m = d.get("data_parallel_size", 1)
    if m > 1:
        reqs, secs = d["replica_requests"], d["replica_projected_seconds"]
        rows += [
            ("data parallel replicas", f"{m} (requests {min(reqs)}..{max(reqs)}, floors "
                                       f"{min(secs):,.1f}..{max(secs):,.1f} s)"),
            ("groups split / prefix tokens repeated",
             f"{d['dp_split_groups']} / {d['dp_duplicated_prefix_tokens']:,}"),
        ]
    rows += [
        ("memory per device (weights + KV)", f"{d['memory_per_device_bytes'] / gib:,.2f} GiB of "
                                             f"{d['device_memory_bytes'] / gib:,.0f}"),
        (f"projected time on {m * tp} x {d['device']}" if m * tp > 1 else
         f"projected time on {d['device']}",
         f"{d['projected_seconds']:,.1f} s ({d['projected_bound']}-bound floor"
         f"{', slowest replica' if m > 1 else ''})"),
        ("output lengths", d["output_lengths"]),
    ]
    proj = d.get("projected_seconds_by_policy") or {}
    if proj:
        best = min(proj, key=proj.get)
        rows.append(("simulated time by policy", ", ".join(f"{k} {v:,.1f} s" for k, v in proj.items())
                     + f" (auto: {best})"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
