"""Config section owned by the planner and the engines: `parallel.*`.

Each field's docstring (the string literal under it) is what `tierzero config --describe`
and docs/config.md show. Torch-free: the CLI composes and checks a config without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from tierzero.parallel.quant import CHOICES, SCALE_BYTES

REDUCE_DTYPES = ("float32", "bfloat16")
"""The values parallel.reduce_dtype takes."""
COMM_TIMINGS = ("issue", "aligned")
GRAD_SYNCS = ("micro", "step", "auto")
"""The values parallel.grad_sync takes."""

MAX_QUANT_BLOCK = 1 << 16
"""Largest parallel.quant_block_size: each unit is padded to world size x block, so a huge block
would pad every unit to gigabytes."""

PLAN_NAMES = ("auto", "ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered", "zeropp")
"""The values parallel.plan takes (parallel.plans.named_plan builds each but auto)."""


@dataclass
class ParallelConfig:
    plan: str = "auto"
    """Partition plan: auto, ddp, zero1, zero2, zero3, hpz, hsdp, tiered or zeropp (hpz + int8 weights + int4 gradients, as ZeRO++)."""
    levels: Optional[List[str]] = None
    """Explicit [param, grad, optimizer] levels for plan=tiered, e.g. [package, node, cluster]; 'none' = replicated."""
    secondary_level: Optional[str] = None
    """hpz: level of the secondary parameter partition (default node)."""
    hsdp_level: Optional[str] = None
    """hsdp: level inside which everything is sharded (default node); replicated across it."""
    memory_budget_gb: Optional[float] = None
    """Memory per rank for parameters, gradients and optimizer states; default 80% of the device's (or of host RAM / ranks per node)."""
    engine: str = "native"
    """Engine executing the plan: native (every plan), deepspeed (ddp, zero1-3, hpz), fsdp2 (zero2, zero3, hsdp) or reference (ddp with torch AdamW, the tests' reference)."""
    reduce_dtype: str = "float32"
    """Dtype gradients are reduced in (reduce-scatter, all-reduce) when train.dtype=bfloat16: float32 (default: no bf16 rounding of partial sums across ranks, twice the bytes) or bfloat16 (half the bytes). The planner charges what is chosen."""
    ep: int = 1
    """Expert-parallel size (MoE): experts split over ep consecutive ranks, the fastest level that holds them."""
    quant_weights: str = "none"
    """Parameter all-gathers on parallel.quant_levels sent block-quantized (ZeRO++ qwZ): none, int8, int4, or auto (the planner tries each and keeps the fastest)."""
    quant_grads: str = "none"
    """Gradient reduction on parallel.quant_levels sent block-quantized through a hierarchical all-to-all (ZeRO++ qgZ): none, int8, int4 or auto."""
    quant_levels: Optional[List[str]] = None
    """Levels whose collectives are quantized, e.g. [cluster] or [node, cluster]; default the slowest level (cluster) only."""
    quant_block_size: int = 256
    """Elements per quantization block (one scale each); even for int4 (two values per byte)."""
    quant_scale_dtype: str = "float32"
    """Dtype of each block's scale on the wire: float32 or float16."""
    quant_stochastic: bool = False
    """Round quantized gradients stochastically (unbiased) instead of to nearest."""
    quant_error_feedback: bool = False
    """Carry each rank's gradient quantization error into its next micro-step (costs one fp32 copy of the quantized hops' inputs)."""
    grad_sync: str = "micro"
    """With gradient accumulation, reduce-scatter gradients every micro-step (micro), once per optimizer step from full-size local sums (step: fewer bytes, one unsharded gradient per rank more memory; native engine), or auto (the planner picks per plan: least predicted time that fits)."""
    comm_timing: str = "issue"
    """How the comm table times a collective: issue (issue to completion: what the step waits, including a late peer) or aligned (CPU: members meet at a barrier first, booked as wait_s, and the collective is waited at once: the transfer alone, to compare with the cost model; costs a small-message round per collective and any overlap)."""

    def errors(self) -> List[str]:
        errs = []
        if self.plan not in PLAN_NAMES:
            errs.append(f"parallel.plan={self.plan!r} is not a plan; choose one of {list(PLAN_NAMES)}.")
        if self.levels is not None:
            if self.plan not in ("tiered", "auto"):
                errs.append(
                    f"parallel.levels={list(self.levels)} is an explicit tiered assignment, but "
                    f"parallel.plan={self.plan}; set parallel.plan=tiered (or drop parallel.levels)."
                )
            if len(self.levels) != 3:
                errs.append(
                    f"parallel.levels={list(self.levels)} needs exactly three level names "
                    "[param, grad, optimizer], e.g. [package, node, cluster]."
                )
        if self.reduce_dtype not in REDUCE_DTYPES:
            errs.append(f"parallel.reduce_dtype={self.reduce_dtype!r} is not one of {list(REDUCE_DTYPES)}; "
                        "e.g. parallel.reduce_dtype=float32.")
        if self.grad_sync not in GRAD_SYNCS:
            errs.append(f"parallel.grad_sync={self.grad_sync!r} is not one of {list(GRAD_SYNCS)}; "
                        "e.g. parallel.grad_sync=step to reduce gradients once per optimizer step.")
        elif self.grad_sync == "step" and self.engine != "native":
            errs.append(f"parallel.grad_sync=step keeps unreduced gradients across micro-steps, which only "
                        f"parallel.engine=native does, not parallel.engine={self.engine}; use parallel.grad_sync=micro "
                        "(or auto) with that engine.")
        if self.comm_timing not in COMM_TIMINGS:
            errs.append(f"parallel.comm_timing={self.comm_timing!r} is not one of {list(COMM_TIMINGS)}; "
                        "e.g. parallel.comm_timing=aligned to time transfers alone.")
        if self.ep < 1:
            errs.append(f"parallel.ep={self.ep} must be >= 1 (1 = every rank holds every expert)")
        errs += self.quant_errors()
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            errs.append(f"parallel.memory_budget_gb={self.memory_budget_gb} must be > 0.")
        return errs

    def quant_errors(self) -> List[str]:
        errs = []
        for key in ("quant_weights", "quant_grads"):
            value = getattr(self, key)
            if value not in CHOICES:
                errs.append(f"parallel.{key}={value!r} is not one of {list(CHOICES)}; e.g. parallel.{key}=int8.")
        if self.quant_scale_dtype not in SCALE_BYTES:
            errs.append(f"parallel.quant_scale_dtype={self.quant_scale_dtype!r} is not one of {list(SCALE_BYTES)}; "
                        "e.g. parallel.quant_scale_dtype=float32.")
        int4 = [f"parallel.{k}=int4" for k in ("quant_weights", "quant_grads") if getattr(self, k) == "int4"]
        if not 1 <= self.quant_block_size <= MAX_QUANT_BLOCK:
            errs.append(f"parallel.quant_block_size={self.quant_block_size} must be between 1 and {MAX_QUANT_BLOCK} "
                        "(elements per block, one scale each; every unit is padded to world size x block size); "
                        "e.g. parallel.quant_block_size=256.")
        elif int4 and self.quant_block_size % 2:
            errs.append(f"parallel.quant_block_size={self.quant_block_size} is odd, but {' and '.join(int4)} packs two "
                        f"values per byte, so a block must hold an even number of elements; use e.g. "
                        f"parallel.quant_block_size={self.quant_block_size + 1}.")
        if self.quant_levels is not None and not self.quant_levels:
            errs.append("parallel.quant_levels=[] names no level; name the levels to quantize (e.g. [cluster]) or "
                        "leave it unset (null) for the slowest level only.")
        return errs
