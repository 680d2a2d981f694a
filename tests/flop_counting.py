"""FlopCounterMode with formulas for the CPU flash-attention ops it does not count (torch 2.13).

``torch.utils.flop_counter`` registers formulas for the CUDA SDPA kernels but returns 0 for
``aten._scaled_dot_product_flash_attention_for_cpu``; we register the convention of
``flopmatch.flops`` rather than loosening the comparison:

* forward: scores ``q @ k^T`` and values ``p @ v``, 2 FLOPs per multiply-accumulate each:
  ``4 * B * H * Lq * Lk * hd`` (full rectangle, causal not halved);
* backward: 2x forward (grads of q, k and v from the four required matmuls; the kernel's
  recomputation of the scores is not counted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward FLOPs of CPU flash SDPA from the shapes of q (B, H, Lq, hd) and k (B, H, Lk, hd)."""
    b, h, lq, hd = q_shape
    lk = k_shape[2]
    return 4 * b * h * lq * lk * hd


def sdpa_cpu_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward FLOPs of CPU flash SDPA: twice the forward."""
    return 2 * sdpa_cpu_flops(q_shape, k_shape, v_shape)


CUSTOM_MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_cpu_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU flash attention."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_MAPPING)


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs counted while running ``fn()`` (forward and any backward it runs)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


def rel_err(counted: float, analytic: float) -> float:
    """|counted - analytic| / analytic (analytic must be > 0)."""
    return abs(counted - analytic) / analytic
