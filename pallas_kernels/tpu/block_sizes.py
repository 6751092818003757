"""Block sizes of the TPU ragged paged attention kernels, and the VMEM / SMEM budget check.

This module is the single owner of the sizes: the kernels (`pallas_kernels.tpu.kernel`) take
a `BlockSizes` and ask `check_budget` before building a `pallas_call`, so a block that does not
fit is refused here, at trace time, with the sizes and the budget in the message, instead of
failing inside the Mosaic compiler (or silently spilling) on the device.

Two kernels, each with its own pair of sizes:
  * rows kernel (each request's own KV: prefill chunks, decode tokens, a grouped row's suffix):
    `q_tokens` query tokens per block (matmul M = q_tokens * G rows, G = q heads per KV head),
    `kv_pages` KV pages per block (matmul N = kv_pages * page_size keys);
  * prefix kernel (a shared-prefix group's members against the group's prefix pages):
    `prefix_q_tokens`, `prefix_kv_pages`, the same meaning.

VMEM per grid step, bytes (what `vmem_bytes` adds up; itemsizes: q/kv/out dtype, f32 = 4):
  KV buffers     2 slots x 2 (K, V) x kv_pages x page_size x head_dim x kv_itemsize
  q block        2 (Pallas double-buffers blocked inputs) x M x head_dim x q_itemsize
  out block      2 x M x head_dim x out_itemsize        (prefix kernel: f32 o + f32 lse x 128)
  prefix partial 2 x M x (head_dim + 128) x 4           (rows kernel with groups: o1, lse1 in)
  row limits     2 x M x 128 x 4                        (prefix kernel only: per-row lo / hi)
  accumulators   M x head_dim x 4 + 2 x M x 128 x 4     (acc; m and l, lane-replicated)
  temporaries    3 x M x kv_tokens x 4                  (scores, probabilities, mask)
The lane-replicated [M, 128] m / l / lse arrays are the usual Mosaic layout for per-row
scalars (a [M, 1] array would occupy the same vregs, padded).

TPU generations (VMEM per TensorCore; SMEM as in `jax._src.pallas.mosaic.tpu_info`):

  generation  physical VMEM  default scoped VMEM limit  SMEM
  v5e         128 MiB        16 MiB                     1 MiB
  v6e         128 MiB        32 MiB                     1 MiB

The kernels pass `vmem_limit_bytes` to Mosaic (default: the generation's default scoped limit,
so the defaults never ask for more than XLA grants any kernel); a caller may raise it up to the
physical size minus headroom for the compiler's own scratch.

Expected VMEM per grid step at the defaults (head_dim 128, G = 4, page_size 16: rows blocks of
32 tokens = 128 rows, prefix blocks of 64 tokens = 256 rows, 32 pages = 512 keys per KV block;
`python -m pallas_kernels.tpu.block_sizes` prints it from `vmem_bytes`):

  dtype  kernel            M    kv tokens  VMEM      of v5e's 16 MiB  of v6e's 32 MiB
  bf16   rows (no groups)  128  512        1.6 MiB   10 %             5 %
  bf16   rows (groups)     128  512        1.8 MiB   11 %             6 %
  bf16   prefix            256  512        3.2 MiB   20 %             10 %
  f32    rows (no groups)  128  512        2.2 MiB   14 %             7 %
  f32    rows (groups)     128  512        2.4 MiB   15 %             8 %
  f32    prefix            256  512        3.9 MiB   24 %             12 %

Per buffer, bf16 rows kernel with groups: KV buffers 512 KiB, q block 64 KiB, out block 64 KiB,
prefix partial 256 KiB, accumulators 192 KiB, temporaries 768 KiB. The scores / probabilities
(M x kv tokens x 4 bytes each) grow fastest: doubling the KV block doubles them and the KV
buffers, which is what bounds `kv_pages` first.

SMEM holds the scalar-prefetch arrays: the page table (S x P int32), the group page table
(groups x Pg int32), the work lists (10 int32 per item) and a few scalars; `smem_bytes` adds
them up and `check_budget` refuses a bucket whose tables do not fit (1 MiB: e.g. 256 rows x
1024 pages of 16 tokens = 1 MiB alone, so long contexts need bigger pages or fewer rows).

The defaults are not tuned on hardware (no TPU was available when they were chosen): rows
blocks of ~128 matmul rows match the 128-wide MXU of v5e (v6e's is 256 wide: the prefix blocks,
which are compute-bound for large groups, use 256 rows); 512-token KV blocks keep each page's
DMA small against the compute of a block while the double buffer stays ~0.5 MiB.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

MiB = 1 << 20
LANES = 128

# VMEM per TensorCore and the default scoped limit XLA gives a Mosaic kernel; SMEM capacity.
GENERATIONS = {
    "v5e": dict(vmem_physical=128 * MiB, vmem_scoped_default=16 * MiB, smem=1 * MiB),
    "v6e": dict(vmem_physical=128 * MiB, vmem_scoped_default=32 * MiB, smem=1 * MiB),
}
# Off a TPU (interpret mode) and on unknown chips the smallest budget is assumed, so sizes that
# pass the check here also fit on every generation in the table.
FALLBACK_GENERATION = "v5e"
# What the Mosaic compiler keeps for itself above the kernel's own buffers.
VMEM_HEADROOM = 8 * MiB


class VmemBudgetError(ValueError):
    """Block sizes whose buffers do not fit in the VMEM (or SMEM) budget."""


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    q_tokens: int            # rows kernel: query tokens per block
    kv_pages: int            # rows kernel: KV pages per block
    prefix_q_tokens: int     # prefix kernel: member query tokens per block
    prefix_kv_pages: int     # prefix kernel: prefix pages per block


def current_generation() -> str:
    """"v5e" / "v6e" from the first device's kind on a TPU backend, else the fallback."""
    try:
        import jax

        dev = jax.devices()[0]
        if dev.platform == "tpu":
            kind = dev.device_kind.lower().replace(" ", "")
            if "v6" in kind:
                return "v6e"
            if "v5lite" in kind or "v5e" in kind:
                return "v5e"
    except RuntimeError:  # pragma: no cover - no backend
        pass
    return FALLBACK_GENERATION


def sublane_rows(dtype) -> int:
    """Rows of one (sublane, lane) tile: 8 for 32-bit, 16 for bf16 (two rows packed per
    sublane), 32 for 8-bit. Block row counts and page sizes must be multiples of it."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_block_sizes(*, num_q_per_kv: int, page_size: int, dtype,
                        generation: Optional[str] = None) -> BlockSizes:
    """Defaults: ~128 matmul rows per rows block, 256 per prefix block, ~512 keys per KV block.

    Token counts are rounded so that tokens x G is a multiple of the dtype's sublane tile."""
    generation = generation or current_generation()
    g = num_q_per_kv
    sub = sublane_rows(dtype)
    step = sub // _gcd(sub, g)              # smallest token count with tokens * g % sub == 0
    q_tokens = _round_up(max(1, 128 // g), step)
    prefix_q_tokens = _round_up(max(1, 256 // g), step)
    kv_pages = max(1, 512 // page_size)
    return BlockSizes(q_tokens=q_tokens, kv_pages=kv_pages, prefix_q_tokens=prefix_q_tokens,
                      prefix_kv_pages=kv_pages)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def vmem_limit_for(generation: Optional[str] = None) -> int:
    return GENERATIONS[generation or current_generation()]["vmem_scoped_default"]


def vmem_bytes(*, kernel: str, rows: int, kv_tokens: int, head_dim: int, q_dtype, kv_dtype,
               out_dtype, with_prefix: bool = False) -> dict:
    """VMEM of one grid step of `kernel` ("rows" or "prefix"), by buffer (see module doc)."""
    qi = jnp.dtype(q_dtype).itemsize
    ki = jnp.dtype(kv_dtype).itemsize
    oi = jnp.dtype(out_dtype).itemsize
    m, d = rows, head_dim
    parts = {
        "kv_buffers": 2 * 2 * kv_tokens * d * ki,
        "q_block": 2 * m * d * qi,
        "accumulators": m * d * 4 + 2 * m * LANES * 4,
        "temporaries": 3 * m * kv_tokens * 4,
    }
    if kernel == "rows":
        parts["out_block"] = 2 * m * d * oi
        if with_prefix:
            parts["prefix_partial"] = 2 * m * (d + LANES) * 4
    elif kernel == "prefix":
        parts["out_block"] = 2 * m * (d + LANES) * 4
        parts["row_limits"] = 2 * m * LANES * 4
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    parts["total"] = sum(parts.values())
    return parts


def smem_bytes(*, num_seqs: int, pages_per_seq: int, num_items: int, num_groups: int = 0,
               group_pages: int = 0, num_blocks: int = 0) -> int:
    """SMEM of the scalar-prefetch arrays (int32; 1-D arrays are padded to 128 words here, a
    conservative stand-in for Mosaic's SMEM padding)."""
    words = [pages_per_seq * num_seqs, num_groups * group_pages, 10 * num_items, num_blocks + 1,
             4, 1]
    return sum(_round_up(max(w, 1), LANES) * 4 for w in words)


def check_budget(*, kernel: str, q_tokens: int, kv_pages: int, num_q_per_kv: int,
                 page_size: int, head_dim: int, q_dtype, kv_dtype, out_dtype,
                 with_prefix: bool = False, vmem_limit_bytes: Optional[int] = None,
                 smem: Optional[int] = None, generation: Optional[str] = None) -> int:
    """Validate one kernel's block sizes; return the VMEM bytes it needs.

    Raises `VmemBudgetError` naming the sizes and the budget when the buffers exceed
    `vmem_limit_bytes` (default: the generation's default scoped limit) or the limit itself
    exceeds the generation's physical VMEM less headroom, or when `smem` (bytes of the
    scalar-prefetch tables) exceeds SMEM; `ValueError` for sizes that break the tiling rules."""
    generation = generation or current_generation()
    gen = GENERATIONS[generation]
    limit = vmem_limit_bytes if vmem_limit_bytes is not None else gen["vmem_scoped_default"]
    rows = q_tokens * num_q_per_kv
    sub = sublane_rows(q_dtype)
    names = (f"{kernel} kernel: q_tokens={q_tokens} (x {num_q_per_kv} q heads = {rows} rows), "
             f"kv_pages={kv_pages} (x page_size {page_size} = {kv_pages * page_size} keys), "
             f"head_dim={head_dim}, q {jnp.dtype(q_dtype).name} / kv "
             f"{jnp.dtype(kv_dtype).name}")
    if q_tokens < 1 or kv_pages < 1:
        raise ValueError(f"block sizes must be positive ({names})")
    if rows % sub:
        raise ValueError(f"{names}: {rows} rows is not a multiple of the {sub}-row sublane "
                         f"tile of {jnp.dtype(q_dtype).name}; choose q_tokens so that "
                         f"q_tokens * {num_q_per_kv} % {sub} == 0")
    if head_dim % LANES:
        raise ValueError(f"{names}: head_dim must be padded to a multiple of {LANES} lanes")
    need = vmem_bytes(kernel=kernel, rows=rows, kv_tokens=kv_pages * page_size,
                      head_dim=head_dim, q_dtype=q_dtype, kv_dtype=kv_dtype,
                      out_dtype=out_dtype, with_prefix=with_prefix)
    cap = gen["vmem_physical"] - VMEM_HEADROOM
    if limit > cap:
        raise VmemBudgetError(
            f"vmem_limit_bytes={limit} ({limit / MiB:.1f} MiB) exceeds the {generation} "
            f"budget of {cap / MiB:.0f} MiB ({gen['vmem_physical'] / MiB:.0f} MiB physical "
            f"VMEM less {VMEM_HEADROOM / MiB:.0f} MiB headroom)")
    if need["total"] > limit:
        detail = ", ".join(f"{k} {v / MiB:.2f}" for k, v in need.items() if k != "total")
        raise VmemBudgetError(
            f"{names} need {need['total'] / MiB:.2f} MiB of VMEM per grid step ({detail} MiB), "
            f"over the budget of vmem_limit_bytes={limit} ({limit / MiB:.1f} MiB, {generation}"
            f"); use fewer q_tokens or kv_pages, or raise vmem_limit_bytes (at most "
            f"{cap / MiB:.0f} MiB on {generation})")
    if smem is not None and smem > gen["smem"]:
        raise VmemBudgetError(
            f"{kernel} kernel: scalar-prefetch tables need {smem} bytes of SMEM, over the "
            f"{generation} SMEM of {gen['smem']} bytes (page table rows x pages per row is the "
            f"usual culprit: use bigger pages or a smaller sequence bucket)")
    return need["total"]


def vmem_table(*, head_dim: int = 128, num_q_per_kv: int = 4, page_size: int = 16) -> str:
    """The module doc's table, computed from `vmem_bytes` at the defaults."""
    lines = ["dtype  kernel            M    kv tokens  VMEM      of v5e's 16 MiB  of v6e's 32 MiB"]
    for dtype in (jnp.bfloat16, jnp.float32):
        bs = default_block_sizes(num_q_per_kv=num_q_per_kv, page_size=page_size, dtype=dtype)
        for name, kernel, qt, kp, pre in (
                ("rows (no groups)", "rows", bs.q_tokens, bs.kv_pages, False),
                ("rows (groups)", "rows", bs.q_tokens, bs.kv_pages, True),
                ("prefix", "prefix", bs.prefix_q_tokens, bs.prefix_kv_pages, False)):
            m = qt * num_q_per_kv
            b = vmem_bytes(kernel=kernel, rows=m, kv_tokens=kp * page_size, head_dim=head_dim,
                           q_dtype=dtype, kv_dtype=dtype, out_dtype=dtype,
                           with_prefix=pre)["total"]
            pct = [f"{100 * b / GENERATIONS[g]['vmem_scoped_default']:.0f} %"
                   for g in ("v5e", "v6e")]
            short = {"bfloat16": "bf16", "float32": "f32"}[jnp.dtype(dtype).name]
            lines.append(f"{short:<6} {name:<17} {m:<4} {kp * page_size:<10} "
                         f"{b / MiB:.1f} MiB   {pct[0]:<16} {pct[1]}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(vmem_table())
