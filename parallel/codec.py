"""Block quantization on tensors: encode a chunk into its wire payload, decode it back.

The format and the error bound are parallel/quant.py's: per block of `block_size` elements
one scale (max|x| / qmax, stored as float32 or float16, rounded up so no value clips), then
the values, int8 or int4 packed two per byte (low nibble first). A payload is one uint8
tensor, so a quantized all-gather or all-to-all moves plain bytes on any backend.

Non-finite values stay non-finite: a block holding nan or inf gets a nan or inf scale, and
decodes to nan, so the engine's global-norm check still skips that step.

Below the codec, the two collectives that send payloads: quantized_all_gather (qwZ) and one
hop of quantized_reduce_scatter (qgZ), both through the byte ledger, which counts the
payload bytes exactly as parallel/cost.py predicts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from tierzero.parallel.quant import QMAX


@dataclass(frozen=True)
class Codec:
    bits: int
    block_size: int
    scale_bytes: int = 4

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.scale_bytes == 4 else torch.float16

    def payload_bytes(self, numel: int) -> int:
        return numel // self.block_size * self.scale_bytes + numel * self.bits // 8

    def encode(self, x: torch.Tensor, out: Optional[torch.Tensor] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (numel a multiple of block_size) -> its uint8 payload, written into `out` when given.
        `noise` (uniform [0, 1), x's shape): stochastic rounding, floor(x / scale + noise)."""
        qmax = QMAX[self.bits]
        blocks = x.detach().reshape(-1, self.block_size).float()  # [num_blocks, block_size]; no copy if fp32
        # max |x| per block from two reductions, no |x| temporary (nan propagates through both)
        amax = torch.maximum(blocks.amax(dim=1, keepdim=True), blocks.amin(dim=1, keepdim=True).neg_())
        scale = (amax / qmax).to(self.scale_dtype)
        # rounded up where storing it rounded down, so scale x qmax covers the block's largest value
        low = scale.float() * qmax < amax
        scale = torch.where(low, torch.nextafter(scale, scale.new_full((), float("inf"))), scale)
        s = scale.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # an all-zero block: scale 0, values 0
        inv = torch.where(torch.isfinite(s), inv, s)  # a nan/inf block: its scale decodes it to non-finite
        q = blocks * inv
        if noise is not None:
            q.add_(noise.reshape_as(q)).floor_()
        else:
            q.round_()
        q.clamp_(-qmax, qmax)  # a non-finite block's values are garbage here; its scale makes it nan
        if self.bits == 8:
            values = q.to(torch.int8).view(torch.uint8).reshape(-1)
        else:
            nibbles = q.add_(8).to(torch.uint8).reshape(-1, 2) & 15  # [numel / 2, 2]: 1..15 (& 15: nan's garbage)
            values = nibbles[:, 0] | (nibbles[:, 1] << 4)
        nscale = scale.numel() * self.scale_bytes
        if out is None:
            out = torch.empty(nscale + values.numel(), dtype=torch.uint8, device=x.device)
        out[:nscale].copy_(scale.reshape(-1).view(torch.uint8))
        out[nscale:].copy_(values)
        return out

    def decode(self, payload: torch.Tensor, numel: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A payload of `numel` elements -> float32 values (into `out`, any float dtype, when given)."""
        nblocks = numel // self.block_size
        nscale = nblocks * self.scale_bytes
        # the scales' bytes may sit at any offset of a gathered buffer: copy them out aligned
        scales = payload[:nscale].clone().view(self.scale_dtype).float().reshape(nblocks, 1)
        raw = payload[nscale:]
        if self.bits == 8:
            q = raw.view(torch.int8).float()
        else:
            q = torch.stack(((raw & 15), (raw >> 4)), dim=1).float().sub_(8)  # [numel / 2, 2]: low nibble first
        values = q.reshape(nblocks, self.block_size).mul_(scales).reshape(-1)
        if out is None:
            return values
        out.copy_(values.reshape(out.shape))
        return out


# ---- the collectives that send payloads (through the byte ledger, which counts their bytes) ---

class _Decoded:
    """A quantized gather in flight: wait() completes it, then decodes every chunk."""

    def __init__(self, pending, decode):
        self.pending, self.decode = pending, decode

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self.decode()


def quantized_all_gather(ledger, outputs: Sequence[torch.Tensor], shard: torch.Tensor, group, phase: str,
                         codec: Codec, async_op: bool = False):
    """qwZ: every member's shard encoded, the payloads all-gathered, each decoded into its
    output (this rank's own chunk too, so every rank computes with the same weights)."""
    n, c = group.size, shard.numel()
    size = codec.payload_bytes(c)
    send = codec.encode(shard)
    staged = torch.empty(n * size, dtype=torch.uint8, device=shard.device)
    parts = list(staged.view(n, size))

    def decode() -> None:
        for part, out in zip(parts, outputs):
            codec.decode(part, c, out=out)

    work = _Decoded(ledger.all_gather(parts, send, group, phase, async_op=True), decode)
    if not async_op:
        work.wait()
    return work


def quantized_reduce_scatter(ledger, output: torch.Tensor, inputs: Sequence[torch.Tensor], group, phase: str,
                             codec: Codec, *, residual: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None, stochastic: bool = False) -> None:
    """qgZ's hop: input piece j (plus its carried error, with `residual`) encoded and sent to
    member j in one all-to-all; this rank's piece is the sum of its own, exact, and the
    others' decoded, in member order (the same order on every rank). `residual` (float32,
    the inputs' total size) is updated with what this encoding dropped."""
    n, me = group.size, group.index(dist.get_rank())
    c = output.numel()
    size = codec.payload_bytes(c)
    send = torch.zeros(n, size, dtype=torch.uint8, device=output.device)
    for j, x in enumerate(inputs):
        if j == me:
            continue
        x = x.float()
        carried = None
        if residual is not None:
            carried = residual[j * c:(j + 1) * c]
            x = x + carried
        noise = torch.rand(x.shape, generator=generator, device=x.device) if stochastic else None
        codec.encode(x, out=send[j], noise=noise)
        if carried is not None:
            carried.copy_(x - codec.decode(send[j], c))
    recv = torch.empty_like(send)
    ledger.all_to_all(recv, send, [1] * n, [1] * n, group, phase, op="reduce_scatter")
    total = inputs[me].float().clone()
    for j in range(n):
        if j != me:
            total += codec.decode(recv[j], c)
    output.copy_(total)
