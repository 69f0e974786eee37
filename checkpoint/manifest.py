"""The on-disk format, as pure data (no files, no torch).

A checkpoint is a folder `step-<8 digits>/` holding
- `shard-<rank>.bin`: raw little-endian bytes, one rank's slices back to back;
- `rank-<rank>.json`: the pieces that rank wrote, written after its shard (its "done");
- `manifest.json`: every global tensor by name, global shape and dtype, and the pieces that
  hold it: (file, byte offset, first element of the flattened tensor, elements, crc32),
  plus the non-tensor state (step, data position, plan, topology, config, versions);
- `COMMITTED`: written by rank 0 last, once every rank reported success. A folder without
  it is a torn save and is never loaded.

Nothing in a checkpoint is executed on load: JSON and raw bytes only.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np

FORMAT = "tierzero-checkpoint/1"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64}
"""Element types a manifest may name (bfloat16 is stored as its raw 2-byte pattern)."""
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class Piece:
    file: str
    offset: int
    """Byte offset inside `file`."""
    start: int
    """First element of the flattened global tensor this piece holds."""
    numel: int
    crc32: int

    @property
    def stop(self) -> int:
        return self.start + self.numel


@dataclass
class TensorEntry:
    name: str
    shape: Tuple[int, ...]
    dtype: str
    pieces: List[Piece] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class Manifest:
    step: int
    tensors: Dict[str, TensorEntry]
    state: dict
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps({
            "format": self.format, "step": self.step, "state": self.state,
            "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype, "pieces": [asdict(p) for p in t.pieces]}
                        for n, t in self.tensors.items()},
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ManifestError(f"format {data.get('format')!r} is not {FORMAT!r}")
            tensors = {}
            for name, t in data["tensors"].items():
                if t["dtype"] not in ITEMSIZE:
                    raise ManifestError(f"tensor {name} has unknown dtype {t['dtype']!r}")
                tensors[name] = TensorEntry(name, tuple(int(s) for s in t["shape"]), t["dtype"],
                                            [Piece(**p) for p in t["pieces"]])
            return cls(step=int(data["step"]), tensors=tensors, state=data["state"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"not a tierzero manifest: {type(e).__name__}: {e}") from e


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def coverage_problems(entry: TensorEntry) -> List[str]:
    """Pieces must cover every element of the tensor exactly once."""
    pos, problems = 0, []
    for p in sorted(entry.pieces, key=lambda p: p.start):
        if p.start != pos:
            problems.append(f"{entry.name}: elements {min(pos, p.start)}..{max(pos, p.start)} "
                            f"{'missing' if p.start > pos else 'written twice'}")
        pos = max(pos, p.stop)
    if pos != entry.numel:
        problems.append(f"{entry.name}: pieces end at element {pos}, the tensor has {entry.numel}")
    return problems


def merge(step: int, rank_pieces: Sequence[dict], state: dict) -> Manifest:
    """rank-<r>.json contents -> the manifest; raises ManifestError when coverage is wrong."""
    tensors: Dict[str, TensorEntry] = {}
    for part in rank_pieces:
        for t in part["tensors"]:
            entry = tensors.setdefault(t["name"], TensorEntry(t["name"], tuple(t["shape"]), t["dtype"]))
            if entry.shape != tuple(t["shape"]) or entry.dtype != t["dtype"]:
                raise ManifestError(f"{t['name']}: ranks disagree on shape/dtype "
                                    f"({entry.shape} {entry.dtype} vs {tuple(t['shape'])} {t['dtype']})")
            entry.pieces.append(Piece(**t["piece"]))
    problems = [p for e in tensors.values() for p in coverage_problems(e)]
    if problems:
        raise ManifestError("; ".join(problems[:5]))
    for e in tensors.values():
        e.pieces.sort(key=lambda p: p.start)
    return Manifest(step=step, tensors=tensors, state=state)


def reads_for(entry: TensorEntry, start: int, numel: int) -> List[Tuple[Piece, int, int]]:
    """The pieces a reader of elements [start, start+numel) needs, each with the part of the
    request it fills: (piece, first element of the request it holds, how many)."""
    stop, out = start + numel, []
    for p in entry.pieces:
        lo, hi = max(start, p.start), min(stop, p.stop)
        if lo < hi:
            out.append((p, lo, hi - lo))
    return out


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def retained(steps: Sequence[int], keep: int, keep_every: int) -> List[int]:
    """Committed steps to keep: the newest `keep`, plus every multiple of keep_every."""
    newest = sorted(steps)[-keep:] if keep > 0 else []
    return sorted({s for s in steps if s in newest or (keep_every and s % keep_every == 0)})
