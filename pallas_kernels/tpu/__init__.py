"""TPU (Mosaic) Pallas attention over the paged KV cache: `ragged_paged_attention`.

See `kernel.py` for the design, `block_sizes.py` for the block sizes and the VMEM budget, and
README.md for the page-size, KV-layout and head-dim choices.
"""
from pallas_kernels.tpu.block_sizes import BlockSizes, VmemBudgetError, default_block_sizes
from pallas_kernels.tpu.kernel import ragged_paged_attention

__all__ = ["ragged_paged_attention", "BlockSizes", "VmemBudgetError", "default_block_sizes"]
