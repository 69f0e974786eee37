"""The on-disk format, as pure data (no files, no torch).

A checkpoint is a folder `step-<8 digits>/` holding
- `shard-<rank>.bin`: raw little-endian bytes, one rank's slices back to back;
- `rank-<rank>.json`: the pieces that rank wrote, written after its shard (its "done");
- `manifest.json`: every global tensor by name, global shape and dtype, and the pieces that
  hold it: (file, byte offset, first element of the flattened tensor, elements, and its
  checksum under the key that names the algorithm: `xxh3_64`, or `crc32` in checkpoints
  written before it or without the xxhash package),
  plus the non-tensor state (step, data position, plan, topology, config, versions);
- `COMMITTED`: written by rank 0 last, once every rank reported success. A folder without
  it is a torn save and is never loaded.
- `.tierzero`: the stamp the store writes first into every step folder; retention deletes
  only folders that carry it (or tierzero's COMMITTED marker) and nothing but tierzero's files.

Nothing in a checkpoint is executed on load: JSON and raw bytes only. Nothing in it is
trusted either: `validate` checks a manifest whole (names, dtypes, bounded shapes, pieces
that tile every tensor exactly, plain file names, byte ranges inside the shard files, the
step, the training state) before a byte of tensor data is read.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

FORMAT = "tierzero-checkpoint/1"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64}
"""Element types a manifest may name (bfloat16 is stored as its raw 2-byte pattern)."""
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8}


MAX_NUMEL = 2**40
"""Elements one tensor may declare (4 TiB of fp32): above it a number is corrupt or hostile, not a model."""
MAX_MANIFEST_BYTES = 2**30
"""manifest.json is read whole; a bigger file is refused unread (a model with a million pieces needs ~150 MB)."""
MAX_MARKER_BYTES = 4096
"""COMMITTED is a one-line JSON object."""
MAX_JSON_DEPTH = 32
"""Nesting tierzero's JSON never comes near (a manifest is 5 deep); deeper is refused before json.loads recurses."""
MANIFEST_NAME = "manifest.json"
STAMP = ".tierzero"
"""The first file the store writes into a step folder it creates: the proof retention asks for."""
PIECE_KEYS = ("file", "offset", "start", "numel")
"""Where a piece lives; beside them a piece holds exactly one checksum, keyed by its name (CHECKSUMS)."""
CHECKSUMS = {"crc32": 32, "xxh3_64": 64}
"""Checksum name -> bits. crc32 (zlib) is what every checkpoint before xxh3 holds and the fallback
when the xxhash package is missing; xxh3_64 (what saves write) runs at memory speed: ~15 GB/s on
one core of the 2-core dev VM against zlib crc32's ~4.5, where a page-cache write moves ~4.5, so
checking no longer doubles a save's CPU time (benchmarks/checkpoint.py)."""
_ESCAPE = re.compile(rb"\\.", re.S)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'[]{}"')
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


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
    checksum: int
    """Of the piece's bytes, under `algorithm`."""
    algorithm: str = "crc32"
    """A CHECKSUMS name: the piece's key for `checksum` in the JSON."""

    @property
    def stop(self) -> int:
        return self.start + self.numel

    def to_data(self) -> dict:
        return {"file": self.file, "offset": self.offset, "start": self.start, "numel": self.numel,
                self.algorithm: self.checksum}

    @classmethod
    def from_data(cls, p: dict) -> "Piece":
        """A piece from JSON that `_piece_problems` accepts (or a rank's own report)."""
        algorithm = next((name for name in CHECKSUMS if name in p), None)
        if algorithm is None:
            raise KeyError(f"piece {_short(p)} holds no checksum (one of {list(CHECKSUMS)})")
        return cls(p["file"], p["offset"], p["start"], p["numel"], p[algorithm], algorithm)


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
            "tensors": {n: {"shape": list(t.shape), "dtype": t.dtype, "pieces": [p.to_data() for p in t.pieces]}
                        for n, t in self.tensors.items()},
        }, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text) -> "Manifest":
        """Parse and validate (structure only: no step to compare, no file sizes); raises
        ManifestError naming the first problems."""
        data = load_json(text.encode() if isinstance(text, str) else text)
        problems = validate(data)
        if problems:
            raise ManifestError(summary(problems))
        return cls.from_data(data)

    @classmethod
    def from_data(cls, data: dict) -> "Manifest":
        """A manifest from JSON data `validate` found no problem in."""
        tensors = {name: TensorEntry(name, tuple(t["shape"]), t["dtype"],
                                     sorted((Piece.from_data(p) for p in t["pieces"]), key=lambda p: p.start))
                   for name, t in data["tensors"].items()}
        return cls(step=data["step"], tensors=tensors, state=data["state"])


# ---- validation: nothing in a checkpoint is trusted until every rule below holds ----------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v, n: int = 60) -> str:
    """A value from a hostile file, quoted and cut to a readable length."""
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


def summary(problems: Sequence[str], n: int = 3) -> str:
    """The first few problems on one line, and how many more there are."""
    more = f" (and {len(problems) - n} more)" if len(problems) > n else ""
    return "; ".join(problems[:n]) + more


def json_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside strings, without recursion (json.loads recurses
    once per level and ends in RecursionError on hostile input). Vectorised: escapes dropped,
    then only brackets and quotes kept; a bracket after an odd number of quotes is in a string."""
    kept = np.frombuffer((_ESCAPE.sub(b"", raw) if b"\\" in raw else raw).translate(None, _NOT_STRUCTURE), np.uint8)
    if not kept.size:
        return 0
    step = _BRACKET_STEP[kept]
    step[np.cumsum(kept == ord('"'), dtype=np.int32) % 2 == 1] = 0
    return max(0, int(np.cumsum(step, dtype=np.int32).max()))


def load_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH):
    """JSON from a file tierzero did not necessarily write: depth bounded before parsing,
    every failure a ManifestError (never RecursionError or UnicodeDecodeError)."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise ManifestError(f"JSON nested {depth} levels deep (tierzero writes at most {max_depth}): not tierzero's")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ManifestError(f"not valid JSON: {type(e).__name__}: {_short(str(e), 120)}") from e


def file_name_problem(name) -> Optional[str]:
    """Why `name` is not a plain file name inside the step folder (None when it is). A piece
    names a file of its own folder: no separator, no `..`, not absolute, not hidden."""
    if not isinstance(name, str) or not name:
        return f"file {_short(name)} is not a file name"
    if "/" in name or "\\" in name or name.startswith(".") or any(ord(c) < 32 for c in name) or len(name) > 255:
        return (f"file {_short(name)} is not a plain file name inside the step folder "
                "(no '/', '..', hidden or absolute names)")
    return None


def marker_problems(data) -> List[str]:
    """The COMMITTED marker: {"step": int, "manifest_crc32": int, "save": str}."""
    if not isinstance(data, dict):
        return [f"is a JSON {type(data).__name__}, not an object with step and manifest_crc32"]
    problems = []
    if not _is_int(data.get("step")) or data["step"] < 0:
        problems.append(f"step {_short(data.get('step'))} is not a non-negative integer")
    crc = data.get("manifest_crc32")
    if not _is_int(crc) or not 0 <= crc < 2**32:
        problems.append(f"manifest_crc32 {_short(crc)} is not a crc32")
    return problems


RESUME_STATE = ("next_sample",)
"""State a resume cannot do without (recipes/trainer.py continues the data stream there)."""
MASTER = "model"
MOMENTS = ("optim.exp_avg", "optim.exp_avg_sq")
"""Tensor name prefixes (<prefix>/<parameter name>): every engine saves each parameter's fp32
master weight and AdamW's two moments, all of the parameter's shape."""


def state_problems(state, *, step: Optional[int] = None, required: Sequence[str] = ()) -> List[str]:
    """The training state a resume reads (recipes/trainer.py, checkpoint/saver.py, ckpt inspect):
    typed where present, and the `required` keys present."""
    if not isinstance(state, dict):
        return ["state is missing" if state is None else f"state is a JSON {type(state).__name__}, not an object"]
    problems = [f"state has no {key} (the resume needs it)" for key in required if key not in state]
    for key, low in (("next_sample", 0), ("optimizer_steps", 0), ("step", 0), ("world_size", 1),
                     ("global_batch_size", 1)):
        if key in state and (not _is_int(state[key]) or state[key] < low):
            problems.append(f"state.{key} {_short(state[key])} is not an integer >= {low}")
    if _is_int(state.get("step")) and step is not None and state["step"] != step:
        problems.append(f"state.step {state['step']} disagrees with the manifest's step {step}")
    if "versions" in state and not isinstance(state["versions"], dict):
        problems.append(f"state.versions {_short(state['versions'])} is not an object")
    return problems


def resume_problems(manifest: "Manifest") -> List[str]:
    """What a resume would refuse that the manifest alone can tell (`tierzero ckpt verify`): the
    training state it reads, and for every parameter its master weight and both moments, of one
    shape. The model a resume builds can only need more (its config), never less."""
    problems = state_problems(manifest.state, step=manifest.step, required=RESUME_STATE)
    kinds: Dict[str, Dict[str, Tuple[int, ...]]] = {}  # parameter -> {prefix: shape}
    for name, entry in manifest.tensors.items():
        prefix, sep, param = name.partition("/")
        if sep and prefix in (MASTER, *MOMENTS):
            kinds.setdefault(param, {})[prefix] = tuple(entry.shape)
    if not any(MASTER in k for k in kinds.values()):
        problems.append(f"no {MASTER}/<parameter> tensor: there are no weights to resume")
    for param, have in sorted(kinds.items()):
        for prefix in (MASTER, *MOMENTS):
            if prefix not in have:
                problems.append(f"tensor {prefix}/{param} is not in the checkpoint: a resume needs every "
                                "parameter's master weight and both AdamW moments")
        if len(set(have.values())) > 1:
            problems.append(f"parameter {param}: " + ", ".join(f"{p}/ is {list(shape)}" for p, shape in have.items())
                            + ": a master and its moments have one shape")
    return problems


def layout_problems(tensors: Dict[str, "TensorEntry"], expected: Dict[str, Tuple[Tuple[int, ...], str]]) -> List[str]:
    """What a manifest's tensors lack against what a model needs ({name: (global shape, dtype)}):
    a missing tensor, another shape, another element type. A larger saved tensor would otherwise
    be read as a prefix, and a bfloat16 one as raw bit patterns."""
    problems = []
    for name, (shape, dtype) in sorted(expected.items()):
        entry = tensors.get(name)
        if entry is None:
            problems.append(f"tensor {name} is not in the checkpoint")
        elif tuple(entry.shape) != tuple(shape):
            problems.append(f"tensor {name} is {list(entry.shape)} in the checkpoint, {list(shape)} in this run's model")
        elif entry.dtype != dtype:
            problems.append(f"tensor {name} is {entry.dtype} in the checkpoint, {dtype} in this run")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        return ["; ".join(problems[:4]) + more + ": the run's model.* / moe.* must match the run that saved it "
                "(`tierzero ckpt inspect` shows the saved config)"]
    return []


def _shape_problems(name: str, shape) -> List[str]:
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= MAX_NUMEL for d in shape):
        return [f"tensor {name}: shape {_short(shape)} is not a list of integers 0..{MAX_NUMEL}"]
    numel = 1
    for d in shape:
        numel *= d
        if numel > MAX_NUMEL:
            return [f"tensor {name}: shape {_short(shape)} has more than {MAX_NUMEL} elements"]
    return []


def _piece_problems(name: str, i: int, p) -> List[str]:
    where = f"tensor {name}: piece {i}"
    named = [k for k in CHECKSUMS if isinstance(p, dict) and k in p]
    if not isinstance(p, dict) or len(named) != 1 or set(p) != {*PIECE_KEYS, *named}:
        return [f"{where} is {_short(p)}, not an object with exactly {list(PIECE_KEYS)} and one checksum "
                f"(one of {list(CHECKSUMS)})"]
    problems = []
    for key in ("offset", "start", "numel"):
        bound = MAX_NUMEL * 8 if key == "offset" else MAX_NUMEL
        if not _is_int(p[key]) or not 0 <= p[key] <= bound:
            problems.append(f"{where}: {key} {_short(p[key])} is not an integer 0..{bound}")
    algorithm = named[0]
    if not _is_int(p[algorithm]) or not 0 <= p[algorithm] < 2**CHECKSUMS[algorithm]:
        problems.append(f"{where}: {algorithm} {_short(p[algorithm])} is not a {algorithm} checksum")
    bad_name = file_name_problem(p["file"])
    if bad_name:
        problems.append(f"{where}: {bad_name}")
    return problems


def _tensor_problems(name: str, t) -> List[str]:
    if not name or len(name) > 1000 or any(ord(c) < 32 for c in name):
        return [f"tensor name {_short(name)} is not a readable name"]
    if not isinstance(t, dict) or not {"shape", "dtype", "pieces"} <= set(t):
        return [f"tensor {name} is {_short(t)}, not an object with shape, dtype and pieces"]
    problems = _shape_problems(name, t["shape"])
    if not isinstance(t["dtype"], str) or t["dtype"] not in ITEMSIZE:
        problems.append(f"tensor {name}: dtype {_short(t['dtype'])} is not one of {sorted(ITEMSIZE)}")
    if not isinstance(t["pieces"], list):
        return problems + [f"tensor {name}: pieces {_short(t['pieces'])} is not a list"]
    for i, p in enumerate(t["pieces"]):
        problems += _piece_problems(name, i, p)
    if not problems:  # every number is sane: the pieces must tile the tensor exactly
        entry = TensorEntry(name, tuple(t["shape"]), t["dtype"], [Piece.from_data(p) for p in t["pieces"]])
        problems += [f"tensor {p}" for p in coverage_problems(entry)]
    return problems


def range_problems(tensors: Mapping[str, TensorEntry], file_sizes: Mapping[str, int]) -> List[str]:
    """Every piece's bytes inside its file. Files not in `file_sizes` are skipped: the caller
    found them missing or not regular files and says so itself."""
    problems = []
    for entry in tensors.values():
        size = ITEMSIZE[entry.dtype]
        for p in entry.pieces:
            have = file_sizes.get(p.file)
            if have is not None and p.offset + p.numel * size > have:
                problems.append(f"{p.file} is truncated: tensor {entry.name} elements {p.start}..{p.stop} need bytes "
                                f"{p.offset}..{p.offset + p.numel * size}, the file has {have}")
    return problems


def validate(data, *, step: Optional[int] = None, file_sizes: Optional[Mapping[str, int]] = None) -> List[str]:
    """Every way decoded manifest.json `data` breaks the format, one line each naming the file
    and tensor ([] when it holds): format, step (== `step` when given: the COMMITTED marker's),
    the training state's types, each tensor's name, dtype and bounded shape, pieces with sane
    numbers and plain file names that tile the tensor exactly, and (given `file_sizes`, the
    shard files' sizes) every piece's bytes inside its file. Pure: no file is touched."""
    if not isinstance(data, dict):
        return [f"{MANIFEST_NAME}: is a JSON {type(data).__name__}, not a tierzero manifest (an object)"]
    problems = []
    if data.get("format") != FORMAT:
        problems.append(f"format {_short(data.get('format'))} is not {FORMAT!r}")
    s = data.get("step")
    if not _is_int(s) or s < 0:
        problems.append(f"step {_short(s)} is not a non-negative integer")
        s = None
    elif step is not None and s != step:
        problems.append(f"step {s} disagrees with its folder's COMMITTED marker (step {step})")
    problems += state_problems(data.get("state"), step=s)
    tensors = data.get("tensors")
    if not isinstance(tensors, dict):
        problems.append(f"tensors {_short(tensors)} is not an object")
        tensors = {}
    for name, t in tensors.items():
        problems += _tensor_problems(name, t)
    problems = [f"{MANIFEST_NAME}: {p}" for p in problems]
    if not problems and file_sizes is not None:
        problems += range_problems(Manifest.from_data(data).tensors, file_sizes)
    return problems


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class _Crc32:
    """zlib's crc32 fed in chunks (the hashlib shape xxhash's objects have)."""

    def __init__(self):
        self._value = 0

    def update(self, data) -> None:
        self._value = zlib.crc32(data, self._value)

    def intdigest(self) -> int:
        return self._value & 0xFFFFFFFF


def _xxh3_64():
    try:
        import xxhash
    except ImportError as e:
        raise ChecksumUnavailable("xxh3_64 needs the xxhash package (a tierzero dependency): pip install xxhash") from e
    return xxhash.xxh3_64()


class ChecksumUnavailable(RuntimeError):
    """A piece names a checksum this installation cannot compute (its package is missing)."""


_HASHERS = {"crc32": _Crc32, "xxh3_64": _xxh3_64}


def hasher(algorithm: str):
    """A fresh streaming checksum: .update(bytes-like) any number of times, then .intdigest()."""
    return _HASHERS[algorithm]()


def checksum(data, algorithm: str = "crc32") -> int:
    h = hasher(algorithm)
    h.update(data)
    return h.intdigest()


def _writing_checksum() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


WRITE_CHECKSUM = _writing_checksum()
"""What new pieces are checked with: xxh3_64, or crc32 where the xxhash package is missing (then
the checkpoint is the old format, which every tierzero reads)."""


def coverage_problems(entry: TensorEntry) -> List[str]:
    """Pieces must cover every element of the tensor exactly once."""
    pos, problems = 0, []
    for p in sorted(entry.pieces, key=lambda p: p.start):
        if p.start != pos:
            problems.append(f"{entry.name}: elements {min(pos, p.start)}..{max(pos, p.start)} "
                            f"{'missing' if p.start > pos else 'written twice'}")
        pos = max(pos, p.stop)
    if pos < entry.numel:
        problems.append(f"{entry.name}: elements {pos}..{entry.numel} missing (its pieces end at element {pos})")
    elif pos > entry.numel:
        problems.append(f"{entry.name}: pieces run to element {pos}, past the tensor's {entry.numel}")
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
            entry.pieces.append(Piece.from_data(t["piece"]))
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
