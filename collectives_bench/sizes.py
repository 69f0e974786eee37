"""Message sizes: `1K:16M` (doubling), `1K:1G:4` (x4), `1M,8M,64M`; K/M/G are powers of 1024 as in nccl-tests."""

from __future__ import annotations

import re
from typing import List

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)B?\s*$", re.IGNORECASE)
MAX_SIZES = 64


class SizeError(ValueError):
    pass


def parse_size(text: str) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise SizeError(
            f"bench.sizes: {text!r} is not a size; write a number of bytes with an optional K, M or G "
            "(powers of 1024), e.g. 64K or 16M"
        )
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_sizes(text: str) -> List[int]:
    """The ascending list of message sizes in bytes that `text` names."""
    text = str(text).strip()
    if "," in text or ":" not in text:
        sizes = sorted({parse_size(t) for t in text.split(",") if t.strip()})
    else:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise SizeError(f"bench.sizes={text!r}: use MIN:MAX or MIN:MAX:FACTOR, e.g. 1K:16M or 1K:1G:4")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        factor = int(parts[2]) if len(parts) == 3 and parts[2].strip().isdigit() else (2 if len(parts) == 2 else 0)
        if factor < 2:
            raise SizeError(f"bench.sizes={text!r}: the factor must be an integer >= 2, e.g. 1K:1G:4")
        if lo > hi:
            raise SizeError(f"bench.sizes={text!r}: MIN is larger than MAX; e.g. 1K:16M")
        if lo < 1:  # 0 x factor stays 0: the range would never end
            raise SizeError(f"bench.sizes={text!r}: MIN must be at least 1 byte; e.g. 1K:16M")
        sizes, s = [], lo
        while s <= hi:
            sizes.append(s)
            s *= factor
    if not sizes or sizes[0] < 1:
        raise SizeError(f"bench.sizes={text!r} names no positive size; e.g. 1K:16M")
    if len(sizes) > MAX_SIZES:
        raise SizeError(f"bench.sizes={text!r} names {len(sizes)} sizes; at most {MAX_SIZES}, e.g. 1K:1G")
    return sizes


def default_sizes(device_memory_bytes: float | None) -> List[int]:
    """auto: 1K..16M on CPU (gloo over loopback); 1K..1G on a GPU, capped so the largest
    size's buffers (about 3 x size) stay under 1/8 of the device's memory."""
    if not device_memory_bytes:
        return parse_sizes("1K:16M")
    top = 1 << 30
    while top > 1024 and 3 * top > device_memory_bytes / 8:
        top //= 2
    return parse_sizes(f"1K:{top}")


def format_size(num_bytes: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if num_bytes >= scale and num_bytes % scale == 0:
            return f"{num_bytes // scale}{unit}"
    return str(num_bytes)
