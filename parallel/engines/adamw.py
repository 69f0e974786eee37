"""AdamW on flat fp32 shards, as torch.optim.AdamW computes it: torch's fused kernel where the
device has it, else its multi-tensor (foreach) path; weight decay by layout (contiguous runs of
decayed and non-decayed elements, two tensor lists), never by a mask. The native engine's step
and the probe's update timing (collectives_bench/probe.py) both run this."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    from tierzero.parallel.engines.flat import _Param


def has_fused_adamw(t: torch.Tensor) -> bool:
    """torch's fused AdamW kernel runs on this tensor: a float32 shard (the optimizer state's
    dtype) on a device torch has the kernel for (CPU and CUDA among them)."""
    if not hasattr(torch, "_fused_adamw_") or t.dtype != torch.float32:
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: where it is gone, the two devices fused AdamW has long run on
        return t.device.type in ("cuda", "cpu")
    return t.device.type in _get_fused_kernels_supported_devices()


def adamw_update_(masters: List[torch.Tensor], exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
                  grads: List[torch.Tensor], *, lr: float, betas: Tuple[float, float], eps: float,
                  weight_decay: float, step: int, step_tensor: Optional[torch.Tensor] = None,
                  grad_scale: Optional[torch.Tensor] = None) -> None:
    """AdamW as torch.optim.AdamW, in place on lists of fp32 shard pieces that all take
    `weight_decay` (the engine calls it twice: matrices, then the rest at 0).

    torch's fused kernel (torch._fused_adamw_: one pass, reading each element's four values and
    writing three, as AdamW(fused=True)) where the device has one, else the foreach path (the
    formula of torch.optim.AdamW(foreach=True)). `grad_scale`, a one-element fp32 tensor on the
    device, divides the gradients first, inside the same pass (the fused kernel writes the
    divided gradients back): the 1/world average and the clipping cost no pass of their own and
    no host read. `step_tensor` is `step` as a 0-dim fp32 tensor on the device (the fused kernel
    reads the count there: keep one across steps, so a GPU needs no host-to-device copy). The
    probe times this call (collectives_bench/probe.py: the planner's update term)."""
    if not masters:
        return
    b1, b2 = betas
    if has_fused_adamw(masters[0]):
        if step_tensor is None:
            step_tensor = torch.tensor(float(step), device=masters[0].device)
        torch._fused_adamw_(masters, grads, exp_avgs, exp_avg_sqs, [], [step_tensor] * len(masters), lr=lr,
                            beta1=b1, beta2=b2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                            grad_scale=grad_scale)
        return
    # torch.optim.adam._multi_tensor_adam, decoupled weight decay, capturable=False
    if grad_scale is not None:
        torch._foreach_div_(grads, grad_scale)
    if weight_decay:
        torch._foreach_mul_(masters, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
    torch._foreach_mul_(exp_avg_sqs, b2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - b2 ** step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(masters, exp_avgs, denom, -lr / (1 - b1 ** step))


def decay_runs(entries: List["_Param"], start: int, stop: int) -> Tuple[Tuple[int, int, bool], ...]:
    """Elements [start, stop) of a unit's flat buffer (its optimizer shard) as contiguous runs
    (first, end, decayed) relative to `start`, covering the shard: matrices take weight decay,
    norms not (parallel.engines.base.param_groups). Neighbours alike are merged; the padding
    past the last parameter joins the run before it (its master and gradient stay 0, so decay
    changes nothing there), a shard of padding only is one run without decay."""
    runs: List[List] = []
    for ent in entries:
        lo, hi = max(start, ent.offset), min(stop, ent.offset + ent.numel)
        if lo >= hi:
            continue
        decayed = len(ent.shape) >= 2
        if runs and runs[-1][2] == decayed and runs[-1][1] == lo - start:
            runs[-1][1] = hi - start
        else:
            runs.append([lo - start, hi - start, decayed])
    if not runs:
        return ((0, stop - start, False),) if stop > start else ()
    runs[-1][1] = stop - start
    return tuple(tuple(r) for r in runs)
