"""Block-quantized collectives, the pure half: what a plan quantizes where, and the bytes
it puts on the wire (no torch; the codec itself is parallel/codec.py).

ZeRO++ (Wang et al. 2023, arXiv 2306.10209) sends two of ZeRO-3's three collectives in fewer
bits. qwZ: the forward all-gather of the parameters as int8, one scale per block of
`block_size` elements. qgZ: the gradient reduce-scatter replaced by an all-to-all of int4
values, hierarchical over the topology -- quantize, exchange inside the node, dequantize and
reduce, requantize, exchange across nodes, dequantize and reduce -- so each hop sends a
rank's share once, at a quarter of bf16's bytes, and no partial sum is requantized more than
once per level (a quantized ring would requantize it at every hop).

The quantization is symmetric and per block: scale = max|x| / qmax (qmax = 127 for int8, 7
for int4), q = round(x / scale), so |x - q * scale| <= scale / 2 for every element. int4
packs two values per byte. A block never straddles two ranks' chunks: a plan that quantizes
pads every unit to a multiple of world size x block_size (parallel.layout.padded_numel), so
each chunk at each level is whole blocks.

On the wire one chunk of n elements is its scales followed by its values:
n / block_size x scale_bytes + n x bits / 8 bytes (payload_bytes); the byte ledger counts
exactly these, and the cost model predicts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

BITS = {"none": 0, "int8": 8, "int4": 4}
"""parallel.quant_weights / parallel.quant_grads values -> bits per element (0 = full precision)."""
CHOICES = (*BITS, "auto")
"""What parallel.quant_weights / parallel.quant_grads take: a width, or auto (the planner tries each)."""
QMAX = {8: 127, 4: 7}
"""Largest quantized magnitude for each width (symmetric: -qmax..qmax)."""
SCALE_BYTES = {"float32": 4, "float16": 2}
"""parallel.quant_scale_dtype values -> bytes per block scale."""


@dataclass(frozen=True)
class Quant:
    """What one plan quantizes, on which levels (by name). A collective
    is quantized when the level its group spans is listed for its kind of traffic; a
    hierarchical gradient reduction quantizes each hop whose level is listed."""
    weight_bits: int = 0
    """Parameter all-gathers (forward and backward) on weight_levels: 8, 4 or 0 (full precision)."""
    grad_bits: int = 0
    """Gradient reduction on grad_levels: 8, 4 or 0."""
    weight_levels: Tuple[str, ...] = ()
    grad_levels: Tuple[str, ...] = ()
    block_size: int = 256
    scale_bytes: int = 4
    stochastic: bool = False
    """Gradients rounded stochastically (unbiased: E[q] = x), weights to nearest."""
    error_feedback: bool = False
    """Each rank carries what quantization dropped from the gradients it sent into the next
    micro-step's (1-bit Adam / EF-SGD style): int4's bias does not accumulate."""

    def __post_init__(self):
        object.__setattr__(self, "weight_levels", tuple(dict.fromkeys(self.weight_levels)))
        object.__setattr__(self, "grad_levels", tuple(dict.fromkeys(self.grad_levels)))

    @property
    def active(self) -> bool:
        return bool((self.weight_bits and self.weight_levels) or (self.grad_bits and self.grad_levels))

    @property
    def pad_block(self) -> int:
        """Units are padded to a multiple of world size x this (whole blocks in every chunk)."""
        return self.block_size if self.active else 1

    def weight_bits_at(self, level: str) -> int:
        return self.weight_bits if level in self.weight_levels else 0

    def grad_bits_at(self, level: str) -> int:
        return self.grad_bits if level in self.grad_levels else 0

    def hierarchical_grads(self, hop_levels: Tuple[str, ...]) -> bool:
        """The gradient reduce-scatter runs hop by hop (one per level its group spans,
        `hop_levels`) because one of those hops is quantized."""
        return bool(self.grad_bits) and any(lv in self.grad_levels for lv in hop_levels)

    def payload_bytes(self, numel: int, bits: int) -> int:
        """Bytes one chunk of `numel` elements (whole blocks) takes on the wire."""
        return numel // self.block_size * self.scale_bytes + numel * bits // 8

    def describe(self) -> str:
        """e.g. "qW=int8@cluster,qG=int4@node+cluster" ("" when nothing is quantized)."""
        parts = []
        for tag, bits, levels in (("qW", self.weight_bits, self.weight_levels), ("qG", self.grad_bits, self.grad_levels)):
            if bits and levels:
                parts.append(f"{tag}=int{bits}@{'+'.join(levels)}")
        return ",".join(parts)


NO_QUANT = Quant()

