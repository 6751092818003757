"""The floor of a workload on a device: FLOPs and bytes it must at least cost, over ceilings
measured on that device. Used by the benchmark (achieved fraction of the floor) and by dry runs.

FLOPs: 2 x matmul parameters x tokens that must be computed (prefill with every shared prefix once,
plus one decode token per output token) + attention (QK^T and PV over each token's context).
Bytes: the weights once per step, times the fewest steps the engine can take (budget-limited
prefill, at least one step per output token of the longest request, and decode steps of at most
as many rows as the step limit and the KV memory hold at once), plus the KV each decode token must
read, with a shared prefix read once per group per step.

Ceilings are measured inside one program each (`measure_ceilings`): many passes of a large copy
and a chain of large bf16 matmuls, timed over the whole program, best of a few sizes. A single
host-timed op reads 20-30 % low (launch and synchronisation in every measurement), which would
make every floor fraction look better than it is.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

from jaxserve.config import ModelConfig
from jaxserve.scheduler.density import matmul_params


@dataclasses.dataclass
class Floor:
    flops: float
    bytes: float
    compute_seconds: float
    memory_seconds: float
    # The same work when the weight matmuls and attention cannot overlap each other (one stream:
    # XLA:GPU runs a step's kernels one after another), each bounded by the larger of its own
    # FLOPs and bytes: max(weights x steps / bw, matmul FLOPs / rate) + max(KV reads / bw,
    # attention FLOPs / rate). `seconds` (everything overlapped) is the floor; this one says how
    # much of the gap to it only overlap can close.
    serial_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def workload_floor(cfg: ModelConfig, prompt_lens: Sequence[int], output_lens: Sequence[int],
                   shared_lens: Optional[Sequence[int]] = None, *,
                   optimal_prefill_tokens: Optional[int] = None, peak_flops: float,
                   hbm_bandwidth: float, max_num_batched_tokens: int, max_num_seqs: int,
                   dtype_bytes: int = 2, kv_capacity_tokens: Optional[int] = None) -> Floor:
    """`shared_lens[i]`: prompt tokens of request i that it shares with others (KV read once per
    group); with `optimal_prefill_tokens` from the prefix tree. `kv_capacity_tokens`: tokens the KV
    cache holds, which bounds the rows a decode step can run (each at its full length)."""
    n = len(prompt_lens)
    shared = list(shared_lens) if shared_lens is not None else [0] * n
    prefill = optimal_prefill_tokens if optimal_prefill_tokens is not None else sum(prompt_lens)
    decode = sum(output_lens)
    L, hq, hd = cfg.num_layers, cfg.num_heads, cfg.head_dim
    mm_flops = 2.0 * matmul_params(cfg) * (prefill + decode)
    # Attention: 4 * context * hq * hd per token per layer (QK^T and PV, 2 FLOPs per MAC).
    attn_ctx = 0.0
    for p, d, s in zip(prompt_lens, output_lens, shared):
        own = p - s
        attn_ctx += own * (s + own / 2) + d * (p + d / 2)
    attn_ctx += sum(s * s / 2 for s in set(shared))  # each distinct shared prefix once (approx.)
    attn_flops = 4.0 * attn_ctx * hq * hd * L
    flops = mm_flops + attn_flops
    weights = cfg.num_params() * dtype_bytes
    rows = max_num_seqs
    if kv_capacity_tokens is not None and n:
        mean_len = (sum(prompt_lens) - sum(shared) + decode) / n + 1
        rows = max(1, min(rows, int(kv_capacity_tokens // mean_len)))
    steps = max(-(-(prefill + decode) // max_num_batched_tokens), max(output_lens, default=0),
                -(-decode // rows))
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
    serial = (max(weights * steps / hbm_bandwidth, mm_flops / peak_flops)
              + max(kv_reads * kv_tok / hbm_bandwidth, attn_flops / peak_flops))
    return Floor(flops, total_bytes, flops / peak_flops, total_bytes / hbm_bandwidth, serial)


def batch_floor(cfg: ModelConfig, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                tree=None, *, peak_flops: float, hbm_bandwidth: float,
                max_num_batched_tokens: int, max_num_seqs: int,
                kv_capacity_tokens: Optional[int] = None, tensor_parallel: int = 1,
                data_parallel: int = 1) -> Floor:
    """The floor of a batch of token prompts as a benchmark record states it: shared prefixes
    from the batch's prefix tree (`tree`, built here when None), ceilings and step sizes of one
    device. The ceilings are one device's, and a run on tp x dp devices has that many; the dp
    replicas run side by side, so per step they hold dp times the rows, tokens and KV of one (a
    floor that assumes the split is perfectly balanced)."""
    from jaxserve.scheduler.prefix_tree import build_prefix_tree

    tree = tree if tree is not None else build_prefix_tree([list(p) for p in prompts])
    shared = [nd.depth if nd is not None else 0 for nd in tree.leaf_node]
    n, dp = tensor_parallel * data_parallel, data_parallel
    return workload_floor(cfg, [len(p) for p in prompts], output_lens, shared,
                          optimal_prefill_tokens=tree.optimal_prefill_tokens,
                          peak_flops=peak_flops * n, hbm_bandwidth=hbm_bandwidth * n,
                          max_num_batched_tokens=max_num_batched_tokens * dp,
                          max_num_seqs=max_num_seqs * dp,
                          kv_capacity_tokens=kv_capacity_tokens * dp if kv_capacity_tokens
                          else kv_capacity_tokens)


def _program_seconds(fn, *args, repeats: int = 3) -> float:
    """Best wall time of a whole (long) program over a few runs, after a compile-and-warm-up run."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings(copy_bytes=(1 << 30, 4 << 30), matmul_sizes=(8192, 16384),
                     passes: int = 40) -> tuple[float, float]:
    """(HBM bandwidth in bytes/s counting read + write, bf16 matmul FLOP/s), each the best of one
    program making `passes` passes over a few shapes: a copy (x -> x + 1 over the whole array:
    every pass reads and writes it; several sizes and element types, since narrow elementwise
    kernels do not always reach the widest loads) and a chain of square bf16 matmuls (the
    variants of `matmul_rates`)."""
    return (max(copy_rates(copy_bytes, passes).values()),
            max(matmul_rates(matmul_sizes, passes).values()))


def copy_rates(copy_bytes=(1 << 30, 4 << 30), passes: int = 40) -> dict[str, float]:
    """Bytes/s (read + write) of one program of `passes` in-place elementwise passes, per
    "<dtype> <MiB>" variant."""
    import functools

    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=1)
    def copies(x, n):
        return jax.lax.fori_loop(0, n, lambda i, x: x + jnp.asarray(1, x.dtype), x)

    out = {}
    for size in copy_bytes:
        for dtype in (jnp.float32, jnp.int32, jnp.bfloat16):
            x = jnp.ones((size // jnp.dtype(dtype).itemsize,), dtype)
            out[f"{jnp.dtype(dtype).name} {size >> 20}MiB"] = (
                2 * size * passes / _program_seconds(copies, x, passes))
            del x
    return out


def matmul_rates(matmul_sizes=(8192, 16384), passes: int = 40) -> dict[str, float]:
    """FLOP/s of one program chaining `passes` bf16 matmuls of n x n, per "<n> <layout>
    <backend>" variant: B as stored ("nn") or contracted on its last axis ("nt", the layout
    cuBLAS prefers on Hopper), and on GPU XLA's own choice of GEMM kernel beside cuBLAS only
    (Triton GEMMs off); plus "<n> nt xla identity": B the identity, whose operands toggle few
    bits, so a GPU that lowers its clock under load draws less power and runs nearer its peak
    clock (the rate the tensor cores reach at all, above what random weights get)."""
    import jax
    import jax.numpy as jnp

    def chain(layout):
        dims = (((1,), (0,)), ((), ())) if layout == "nn" else (((1,), (1,)), ((), ()))
        return lambda a, b, n: jax.lax.fori_loop(
            0, n, lambda i, x: jax.lax.dot_general(x, b, dims), a)

    backends = {"xla": {}}
    if jax.default_backend() == "gpu":
        backends["cublas"] = {"xla_gpu_enable_triton_gemm": False}
    out = {}
    for n in matmul_sizes:
        a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        # Scaled so the chain's values stay O(1) (no overflow to inf, no denormals).
        b = (jax.random.normal(jax.random.key(2), (n, n), jnp.float32) / n ** 0.5).astype(jnp.bfloat16)
        for layout in ("nn", "nt"):
            for name, opts in backends.items():
                fn = jax.jit(chain(layout), static_argnums=2).lower(a, b, passes).compile(opts)
                out[f"{n} {layout} {name}"] = (2 * n ** 3 * passes
                                               / _program_seconds(lambda a, b: fn(a, b), a, b))
        if jax.default_backend() == "gpu":
            eye = jnp.eye(n, dtype=jnp.bfloat16)
            fn = jax.jit(chain("nt"), static_argnums=2).lower(a, eye, passes).compile()
            out[f"{n} nt xla identity"] = (2 * n ** 3 * passes
                                           / _program_seconds(lambda a, b: fn(a, b), a, eye))
            del eye
        del a, b
    return out
