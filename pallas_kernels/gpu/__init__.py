"""GPU Pallas attention (Triton lowering): the kernel (`kernel`), its work lists built on the host
with shared-prefix groups (`cascade`) or on the device without (`work_items`), and the one owner
of their block sizes (`block_sizes`)."""
from pallas_kernels.gpu.cascade import build_cascade_work
from pallas_kernels.gpu.kernel import ragged_paged_attention
from pallas_kernels.gpu.work_items import advance_work_items, device_work_items

__all__ = ["ragged_paged_attention", "build_cascade_work", "device_work_items",
           "advance_work_items"]
