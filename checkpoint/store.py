"""Checkpoint files through fsspec (local paths, file://, memory://, s3://).

Every rank writes its own shard and then its `rank-<r>.json`; rank 0 waits for all of them,
merges the manifest, and writes `COMMITTED` last. Readers fetch only the pieces that overlap
the slices they need, and check each piece's crc32.
"""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fsspec
import numpy as np

from tierzero.checkpoint.manifest import (ITEMSIZE, Manifest, ManifestError, Piece, TensorEntry, crc32, merge, reads_for,
                                 retained, step_dirname)

log = logging.getLogger(__name__)
COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and tensor."""


class ResumeError(CheckpointError):
    """checkpoint.resume names a checkpoint that cannot be loaded: the user's to fix."""


@dataclass(frozen=True)
class Slice:
    """A part of a global tensor one rank owns: elements [start, start + data.size) of its flattened form."""
    name: str
    shape: Tuple[int, ...]
    dtype: str
    start: int
    data: np.ndarray


def shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.bin"


def report_name(rank: int, token: str, kind: str) -> str:
    """rank-<r>[.<token>].json / .error: a rank's report for one save attempt. The token
    (attempt and save number, the same on every rank) keeps the reports of an earlier, torn
    save of the same step from being taken for this one's."""
    return f"rank-{rank:05d}{'.' + token if token else ''}.{kind}"


def _raw(a: np.ndarray) -> memoryview:
    """The array's bytes, little-endian, without a copy when they already are (the usual case)."""
    a = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False)
    return memoryview(a).cast("B")


class CheckpointStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)

    # ---- naming --------------------------------------------------------------------------
    def step_path(self, step: int) -> str:
        return f"{self.path}/{step_dirname(step)}"

    def url(self, step: int) -> str:
        return f"{self.root}/{step_dirname(step)}"

    def steps(self) -> List[Tuple[int, bool]]:
        """(step, committed) for every step folder, oldest first."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for p in entries:
            m = _STEP_DIR.match(p.rstrip("/").rsplit("/", 1)[-1])
            if m:
                step = int(m.group(1))
                out.append((step, self.fs.exists(f"{self.step_path(step)}/{COMMITTED}")))
        return sorted(out)

    def committed(self) -> List[int]:
        return [s for s, ok in self.steps() if ok]

    # ---- writing -------------------------------------------------------------------------
    def write_rank(self, step: int, rank: int, slices: Sequence[Slice], token: str = "",
                   before_report: Optional[Callable[[], None]] = None) -> None:
        """This rank's shard, then its report json (the signal rank 0 waits for), renamed into
        place so it is never seen half-written. On failure an .error report says why (best
        effort) and the error is raised. `before_report` runs between the two (fault injection:
        a kill there leaves a torn step)."""
        base = self.step_path(step)
        try:
            self.fs.makedirs(base, exist_ok=True)
            if rank == 0:  # re-saving a step: the old commit no longer describes these files
                for name in (COMMITTED, MANIFEST):
                    if self.fs.exists(f"{base}/{name}"):
                        self.fs.rm(f"{base}/{name}")
            records, offset = [], 0
            raws = [_raw(s.data) for s in slices]
            # crc32 (zlib releases the GIL) runs beside the writes: on a core the write leaves idle
            with ThreadPoolExecutor(max_workers=1) as pool:
                crcs = pool.map(crc32, raws)
                with self.fs.open(f"{base}/{shard_name(rank)}", "wb") as f:
                    for raw in raws:
                        f.write(raw)
                for s_, raw, crc in zip(slices, raws, crcs):
                    records.append({"name": s_.name, "shape": list(s_.shape), "dtype": s_.dtype, "piece": {
                        "file": shard_name(rank), "offset": offset, "start": int(s_.start),
                        "numel": int(s_.data.size), "crc32": crc}})
                    offset += raw.nbytes
            if before_report is not None:
                before_report()
            tmp = f"{base}/.{report_name(rank, token, 'json')}.tmp"
            with self.fs.open(tmp, "w") as f:
                f.write(json.dumps({"rank": rank, "tensors": records}))
            self.fs.mv(tmp, f"{base}/{report_name(rank, token, 'json')}")
        except Exception as e:
            try:
                with self.fs.open(f"{base}/{report_name(rank, token, 'error')}", "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
            except Exception:
                pass
            raise CheckpointError(f"rank {rank} could not write checkpoint step {step} to {self.url(step)}: "
                                  f"{type(e).__name__}: {e}") from e

    def commit(self, step: int, world_size: int, state: dict, timeout_s: float = 600.0,
               poll_s: float = 0.05, token: str = "") -> Manifest:
        """Rank 0: wait for every rank's json, merge, write the manifest, then COMMITTED."""
        base = self.step_path(step)
        deadline = time.monotonic() + timeout_s
        parts: Dict[int, dict] = {}
        wait_s = poll_s
        while len(parts) < world_size:
            # one listing per poll (on S3 each exists() of a missing key costs requests)
            try:
                present = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False, refresh=True)}
            except FileNotFoundError:
                present = set()
            for r in range(world_size):
                if r in parts:
                    continue
                if report_name(r, token, "error") in present:
                    with self.fs.open(f"{base}/{report_name(r, token, 'error')}") as f:
                        why = f.read().decode(errors="replace")
                    raise CheckpointError(f"checkpoint step {step} not committed: rank {r} failed: {why}")
                if report_name(r, token, "json") in present:
                    with self.fs.open(f"{base}/{report_name(r, token, 'json')}") as f:
                        try:
                            parts[r] = json.loads(f.read())
                        except ValueError:  # not there yet (a store without atomic rename)
                            continue
            if len(parts) < world_size:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(parts))
                    raise CheckpointError(f"checkpoint step {step} not committed: no report from rank(s) {missing} "
                                          f"within {timeout_s:.0f} s")
                time.sleep(wait_s)
                wait_s = min(1.0, wait_s * 1.5)  # quick for small saves, cheap for long ones
        try:
            manifest = merge(step, [parts[r] for r in range(world_size)], state)
        except ManifestError as e:
            raise CheckpointError(f"checkpoint step {step} not committed: {e}") from e
        text = manifest.to_json()
        with self.fs.open(f"{base}/{MANIFEST}", "w") as f:
            f.write(text)
        with self.fs.open(f"{base}/{COMMITTED}", "w") as f:
            f.write(json.dumps({"step": step, "manifest_crc32": crc32(text.encode()), "save": token}))
        for name in present:  # reports of earlier, torn attempts at this step
            if name.startswith("rank-") and name not in {report_name(r, token, "json") for r in range(world_size)}:
                self.fs.rm(f"{base}/{name}")
        with self.fs.open(f"{self.path}/LATEST", "w") as f:  # a convenience; the folders are the truth
            f.write(step_dirname(step) + "\n")
        return manifest

    def prune(self, keep: int, keep_every: int) -> List[int]:
        """Delete committed checkpoints outside the retention rule, and torn saves older than
        the newest committed one. Returns the deleted steps."""
        steps = self.steps()
        done = [s for s, ok in steps if ok]
        if not done:
            return []
        keep_set = set(retained(done, keep, keep_every))
        newest = max(done)
        doomed = [s for s, ok in steps if (ok and s not in keep_set) or (not ok and s < newest)]
        for s in doomed:
            self.fs.rm(self.step_path(s), recursive=True)
        return doomed

    # ---- reading -------------------------------------------------------------------------
    def manifest(self, step_path: str) -> Manifest:
        """The manifest of a committed checkpoint folder (a path inside this store's filesystem)."""
        if not self.fs.exists(f"{step_path}/{COMMITTED}"):
            raise CheckpointError(f"{step_path} has no {COMMITTED} marker: a torn or unfinished save, never loaded")
        try:
            with self.fs.open(f"{step_path}/{MANIFEST}") as f:
                text = f.read().decode()
        except FileNotFoundError as e:
            raise CheckpointError(f"{step_path}/{MANIFEST} is missing") from e
        with self.fs.open(f"{step_path}/{COMMITTED}") as f:
            marker = json.loads(f.read())
        if marker.get("manifest_crc32") != crc32(text.encode()):
            raise CheckpointError(f"{step_path}/{MANIFEST} does not match the checksum in {COMMITTED}")
        try:
            return Manifest.from_json(text)
        except ManifestError as e:
            raise CheckpointError(f"{step_path}/{MANIFEST}: {e}") from e

    def read_piece(self, step_path: str, entry: TensorEntry, piece: Piece) -> np.ndarray:
        size = ITEMSIZE[entry.dtype]
        path = f"{step_path}/{piece.file}"
        try:
            raw = self.fs.cat_file(path, start=piece.offset, end=piece.offset + piece.numel * size)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing (tensor {entry.name})") from e
        except OSError:
            # s3fs refuses a range that starts past the end of a short object (HTTP 416) where a
            # local file reads short: the same truncation. Other errors (network, access) stay errors.
            try:
                short = self.fs.size(path) <= piece.offset
            except OSError:
                short = False
            if not short:
                raise
            raw = b""
        if len(raw) != piece.numel * size:
            raise CheckpointError(f"{path} is truncated: tensor {entry.name} elements {piece.start}..{piece.stop} "
                                  f"need bytes {piece.offset}..{piece.offset + piece.numel * size}")
        if crc32(raw) != piece.crc32:
            raise CheckpointError(f"{path}: checksum mismatch in tensor {entry.name} "
                                  f"(elements {piece.start}..{piece.stop}, bytes {piece.offset}..)")
        return np.frombuffer(raw, dtype=_np_dtype(entry.dtype))

    def reader(self, step_path: str, manifest: Manifest) -> Callable[[str, int, int], np.ndarray]:
        """read(name, start, numel): elements of a flattened global tensor, from the pieces
        that hold them only (each piece fetched once and checked)."""
        cache: Dict[Tuple[str, int], np.ndarray] = {}

        def read(name: str, start: int, numel: int) -> np.ndarray:
            entry = manifest.tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{step_path} has no tensor {name!r}; it was saved by another model "
                                      f"(its tensors: {sorted(manifest.tensors)[:5]} ...)")
            out = np.empty(numel, dtype=_np_dtype(entry.dtype))
            for piece, lo, n in reads_for(entry, start, numel):
                key = (piece.file, piece.offset)
                if key not in cache:
                    cache[key] = self.read_piece(step_path, entry, piece)
                out[lo - start: lo - start + n] = cache[key][lo - piece.start: lo - piece.start + n]
            return out

        return read

    def verify(self, step_path: str) -> Tuple[Optional[Manifest], List[str]]:
        """Every piece of every tensor read back and checked; the problems, one line each."""
        try:
            manifest = self.manifest(step_path)
        except CheckpointError as e:
            return None, [str(e)]
        problems = []
        for entry in manifest.tensors.values():
            for piece in entry.pieces:
                try:
                    self.read_piece(step_path, entry, piece)
                except CheckpointError as e:
                    problems.append(str(e))
        return manifest, problems


def open_step(url: str) -> Tuple["CheckpointStore", str]:
    """(store of the folder above, path of the step folder) for a checkpoint path or URL."""
    url = url.rstrip("/")
    _, path = fsspec.core.url_to_fs(url)
    parent = url.rsplit("/", 1)[0] if "/" in url else "."
    return CheckpointStore(parent), path


def _np_dtype(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
