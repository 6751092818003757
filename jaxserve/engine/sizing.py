"""Engine decisions made once at start-up from the config, the model and the device: which
attention implementation and layer loop run, how many KV pages fit, the longest request, the
step buckets."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

import pallas_kernels
from jaxserve.config import ConfigError, EngineConfig, ModelConfig
from jaxserve.runner import distributed
from jaxserve.runner.buckets import BucketSet


def resolve_attention_impl(name: str) -> str:
    if name == "auto":
        return pallas_kernels.default_impl()
    if name not in pallas_kernels.IMPLEMENTATIONS:
        raise ConfigError(f"engine: field 'attention_impl'={name!r} is not available here "
                          f"(available: auto, {', '.join(sorted(pallas_kernels.IMPLEMENTATIONS))})")
    return name


def resolve_layer_loop(name: str) -> str:
    # auto: unrolled on GPU, where the scan's per-step copies of each layer's weights cost ~2x in
    # the matmuls (H100: 16.9 vs 7.6 ms for 32 layers at 256 rows); the scan elsewhere (faster
    # compiles, no copies that matter).
    if name == "auto":
        return "unrolled" if jax.default_backend() == "gpu" else "scan"
    return name


def resolve_fused_steps(n: Optional[int]) -> int:
    # Host round trips cost more than a few wasted rows on an accelerator (H100, Llama-3-8B:
    # 9.8 s vs 13.2 s for 256 x 512/128 with 8 fused steps); on CPU the extra programs only add
    # compile time.
    if n is None:
        return 1 if jax.default_backend() == "cpu" else 8
    return n


def _device_memory(device=None) -> Optional[int]:
    try:
        stats = (device or jax.devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
        return None
    return stats.get("bytes_limit") if stats else None


def resolve_batch_limits(ecfg: EngineConfig, device=None) -> tuple[int, int]:
    """(tokens per step, rows per step). Defaults from the device, as vLLM's offline defaults: an
    accelerator of >= 70 GiB runs 16,384 tokens and 1,024 rows a step (prefill matmuls are near
    their peak rate well before 16k rows, and decode steps amortise the weights over 1,024 rows);
    a smaller one 8,192 and 256; the CPU 512 and 256 (compile time dominates there)."""
    mem = _device_memory(device) if jax.default_backend() != "cpu" else None
    if mem is not None and mem >= 70 * 2 ** 30:
        tokens, rows = 16384, 1024
    elif jax.default_backend() != "cpu":
        tokens, rows = 8192, 256
    else:
        tokens, rows = 512, 256
    return (ecfg.max_num_batched_tokens or tokens), (ecfg.max_num_seqs or rows)


def device_kv_budget(device, ecfg: EngineConfig) -> float:
    """Bytes of KV cache `device` can hold after what it holds now (the weights)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without memory stats)
        stats = None
    if stats and "bytes_limit" in stats:
        return ecfg.kv_cache_memory_fraction * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return ecfg.cpu_kv_cache_bytes


def kv_budget_pages(cfg: ModelConfig, ecfg: EngineConfig, kv_dtype, devices=None) -> int:
    """Pages per layer the memory left after the weights holds (or the explicit `num_pages`).
    `devices`: the ones holding the KV cache, each its 1 / tensor_parallel_size of the KV heads
    (default: the first device); the tightest one sizes the cache, agreed across processes."""
    if ecfg.num_pages is not None:
        return ecfg.num_pages
    tp = ecfg.tensor_parallel_size
    page_bytes = cfg.kv_bytes_per_token(jnp.dtype(kv_dtype).itemsize) * ecfg.page_size // tp
    budget = min(device_kv_budget(d, ecfg) for d in (devices or jax.devices()[:1]))
    pages = distributed.agree_min(int(budget // page_bytes))
    if pages < 2:
        raise ConfigError(f"engine: no memory left for the KV cache ({budget / 2**30:.2f} GiB "
                          f"budget, {page_bytes} bytes per page); lower max_model_len or set num_pages")
    return pages


def resolve_max_model_len(cfg: ModelConfig, ecfg: EngineConfig, pages: int) -> int:
    """An explicit `max_model_len` is checked against the model; the default is the model's
    context, capped by what the KV pages hold (one request at full length, as vLLM does)."""
    cap = (pages - 2) * ecfg.page_size       # the sink, and a prefix's copy-on-write page
    if ecfg.max_model_len is not None:
        n = ecfg.max_model_len
        if n > cfg.max_position_embeddings and cfg.rope_scaling.rope_type == "default":
            raise ConfigError(f"engine: max_model_len={n} exceeds the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}")
        return n
    if cap < 2:
        raise ConfigError(f"engine: {pages} KV pages hold no request; raise num_pages")
    return min(cfg.max_position_embeddings, cap)


# Where 1.5x token buckets start on an accelerator: past the tokens at which a step's matmuls
# turn compute-bound (matmul rate over copy bandwidth, ~165 on the H200), padding costs compute.
MID_BUCKETS_FROM = 256


def resolve_token_bucket_mid_from(ecfg: EngineConfig, platform: str) -> int:
    """`token_bucket_mid_from`, its default resolved: MID_BUCKETS_FROM on an accelerator, 0 (powers
    of two only) on CPU, where compile time counts more than padding."""
    if ecfg.token_bucket_mid_from is not None:
        return ecfg.token_bucket_mid_from
    return 0 if platform == "cpu" else MID_BUCKETS_FROM


# Where 1.25x / 1.75x buckets start on an accelerator: a prefill step held back by the row limit
# pads to the next bucket, and past 8,192 tokens a quarter-step gap is >= 2,048 tokens of matmuls
# (~40 ms of Llama-3-8B on the H200); the host-only simulation of BatchLLM x1 at the H200's sizes
# projects 88.9 -> 83.2 s (token fill 0.88 -> 0.97) for two more programs.
QUARTER_BUCKETS_FROM = 8192


def resolve_token_bucket_quarter_from(ecfg: EngineConfig, platform: str) -> int:
    """`token_bucket_quarter_from`, its default resolved: QUARTER_BUCKETS_FROM on an accelerator,
    0 on CPU."""
    if ecfg.token_bucket_quarter_from is not None:
        return ecfg.token_bucket_quarter_from
    return 0 if platform == "cpu" else QUARTER_BUCKETS_FROM


def bucket_set(ecfg: EngineConfig, budget: int, rows: int, pages_per_seq: int, platform: str,
               page_growth: int = 1) -> BucketSet:
    """The step buckets of `ecfg` on `platform`."""
    return BucketSet.make(budget, rows, pages_per_seq, page_growth=page_growth,
                          mid_from=resolve_token_bucket_mid_from(ecfg, platform),
                          quarter_from=resolve_token_bucket_quarter_from(ecfg, platform))


@dataclasses.dataclass(frozen=True)
class Sizes:
    attention_impl: str
    layer_loop: str
    fused_decode_steps: int
    num_pages: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    buckets: BucketSet


def plan_sizes(cfg: ModelConfig, ecfg: EngineConfig, kv_dtype, *, unstack=None,
               devices=None) -> Sizes:
    """Everything sized at start-up. `unstack()` (the unrolled layer loop's weight split) runs
    before the KV cache is sized from the memory left on `devices` (see `kv_budget_pages`)."""
    impl = resolve_attention_impl(ecfg.attention_impl)
    loop = resolve_layer_loop(ecfg.layer_loop)
    if loop == "unrolled" and unstack is not None:
        unstack()
    pages = kv_budget_pages(cfg, ecfg, kv_dtype, devices)
    max_len = resolve_max_model_len(cfg, ecfg, pages)
    budget, rows = resolve_batch_limits(ecfg, devices[0] if devices else None)
    pages_per_seq = -(-max_len // ecfg.page_size)
    # Never more than every row at full length needs (plus the sink).
    if ecfg.num_pages is None:
        pages = min(pages, rows * pages_per_seq + 1)
    # Page-width buckets only pay where attention cost grows with the page-table width: the
    # gather-based reference on CPU. The Pallas kernels stop at each row's length, and on an
    # accelerator the reference is only a peer, so one width keeps compile time down there.
    growth = (ecfg.page_bucket_growth
              if impl == "reference" and jax.default_backend() == "cpu" else 1)
    buckets = bucket_set(ecfg, budget, rows, pages_per_seq, jax.default_backend(), growth)
    return Sizes(impl, loop, resolve_fused_steps(ecfg.fused_decode_steps), pages, max_len, budget,
                 rows, buckets)
