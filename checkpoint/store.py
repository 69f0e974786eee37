"""Checkpoint files through fsspec (local paths, file://, memory://, s3://).

Every rank writes its own shard and then its `rank-<r>.json`; rank 0 waits for all of them,
merges the manifest, and writes `COMMITTED` last. Readers validate the whole manifest
before reading a byte of tensor data (`manifest.validate`: nothing in a folder is trusted,
whoever wrote it), fetch only the pieces that overlap the slices they need, and check each
piece's checksum (the one it names: xxh3_64, or crc32 in older checkpoints).

On a local (or POSIX-mounted shared) filesystem every file is published by rename from a
mkstemp name in its own folder, so a link planted at the final name is replaced, never
written through, and nothing is ever seen half-written; with checkpoint.fsync each file and
the folders holding them are fsynced before COMMITTED counts as written. Files are read with
O_NOFOLLOW | O_NONBLOCK and only when they are regular files (a shard that is a symbolic
link, a FIFO as manifest.json: refused, never followed or waited on). Object stores
(s3://, memory://) have no links or FIFOs and an object is durable once uploaded: there a
piece's plain file name is the whole check.

Retention deletes a step folder only when it can prove tierzero wrote it: tierzero's stamp
(or COMMITTED marker) inside, and nothing but the files tierzero writes.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from tierzero.checkpoint.manifest import (FORMAT, ITEMSIZE, MAX_MANIFEST_BYTES, MAX_MARKER_BYTES, STAMP,
                                          WRITE_CHECKSUM, ChecksumUnavailable, Manifest, ManifestError, Piece,
                                          TensorEntry, checksum, coverage_problems, crc32, file_name_problem, hasher,
                                          load_json, marker_problems, merge, reads_for, resume_problems, retained,
                                          step_dirname, summary, validate)

log = logging.getLogger(__name__)
COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_OURS = re.compile(r"^(shard-\d{5,}\.bin|rank-\d{5,}(\.[A-Za-z0-9]+)?\.(json|error)|manifest\.json|COMMITTED|"
                   r"\.tierzero|\.tz-.+\.tmp|\.rank-.+\.tmp)$")
"""Every name tierzero writes into a step folder (temp names included)."""
FAILED_GRACE_S = 60.0
"""Once a rank reported that a save failed, how long rank 0 still waits for the other reports (a
rank on a full disk may not manage to write even its error report)."""
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
DCP_METADATA = ".metadata"
"""The file torch.distributed.checkpoint (DCP) writes last into a checkpoint folder."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and tensor."""


class ResumeError(CheckpointError):
    """checkpoint.resume names a checkpoint that cannot be loaded: the user's to fix."""


class ReportTimeout(CheckpointError):
    """Some rank did not report on a save in time: it may still be writing into the step folder."""


class NotOurs(CheckpointError):
    """A step folder tierzero cannot prove it wrote: never written into, never deleted."""


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


CHUNK_BYTES = 1 << 20
"""A shard is written, and each piece checksummed, in chunks of this many bytes: a chunk is
checksummed just before it is written, so the checksum reads it from memory and the write
copies it from the core's cache (1 MiB sits in a server core's L2; one pass over memory instead
of two). On the 2-core dev VM, 4 ranks saving 153 MB each, a plain write took 0.77x the CPU time
of a save with 1 MiB chunks and 0.73x with 256 KiB (medians of 21 alternating repeats)."""


def _checksummed(raws: Sequence[memoryview], sums: Sequence) -> Iterable[memoryview]:
    """Every raw's bytes in chunks, each fed to its piece's checksum before it is handed on."""
    for raw, h in zip(raws, sums):
        for i in range(0, raw.nbytes, CHUNK_BYTES):
            chunk = raw[i:i + CHUNK_BYTES]
            h.update(chunk)
            yield chunk


# ---- local files: never through a link, never blocking, never half-written ----------------------

def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a regular file"


def _open_regular(path: str) -> int:
    """A read descriptor on `path` if it is a regular file (FileNotFoundError if absent); a
    symbolic link is refused, not followed, and a FIFO is refused without waiting for a writer."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link: tierzero writes files, never links, and does not "
                                  "follow one; it is not read") from e
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointError(f"{path} is {_kind(mode)}, not a regular file: tierzero never wrote it; it is not read")
    return fd


def _read_local(path: str, cap: int) -> bytes:
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise CheckpointError(f"{path} is {size} bytes, more than tierzero ever writes there ({cap}): not read")
        chunks, got = [], 0
        while got <= cap:
            chunk = os.read(fd, min(1 << 24, cap + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > cap:
            raise CheckpointError(f"{path} grew past {cap} bytes while read: not read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _pread_local(path: str, start: int, nbytes: int) -> bytes:
    fd = _open_regular(path)
    try:
        chunks, got = [], 0
        while got < nbytes:
            chunk = os.pread(fd, min(1 << 26, nbytes - got), start + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _libc_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


def _allocate(fd: int, nbytes: int) -> None:
    """The file's blocks reserved before a byte is written (Linux fallocate(2), mode 0): a full
    disk fails at once instead of gigabytes later, and the page-cache write skips ext4's block
    reservation page by page (~5 % of a synchronous save here). A filesystem or platform without
    it: nothing (glibc's posix_fallocate would instead write the whole file once more)."""
    if _FALLOCATE is None or nbytes <= 0:
        return
    if _FALLOCATE(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))
        # EOPNOTSUPP, ENOSYS, EINVAL, ...: the write allocates as it goes


def fsync_dir(path) -> None:
    """Make the names in a folder durable (a renamed file is only durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder: their rename is durable by itself
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    try:  # Linux >= 4.7 shows it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
"""Read once at import (os.umask can only be read by setting it): mkstemp's 0600 widened to
what an ordinary open() would have given."""


# ---- the store ---------------------------------------------------------------------------------

class CheckpointStore:
    def __init__(self, root: str, *, fsync: bool = True):
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fsync = fsync and self.local
        """checkpoint.fsync; object stores are durable on upload and have nothing to fsync."""
        self._proven: Set[int] = set()
        self._warned: Set[int] = set()

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

    # ---- files ---------------------------------------------------------------------------
    def _put(self, path: str, chunks: Iterable, nbytes: int = 0) -> None:
        """Publish a whole file: locally from a mkstemp name in its folder, its `nbytes` (when
        known) allocated first, fsynced (checkpoint.fsync), renamed over `path` (a link there is
        replaced, never followed); on an object store, one upload."""
        if not self.local:
            with self.fs.open(path, "wb") as f:
                for c in chunks:
                    f.write(c)
            return
        folder, name = os.path.split(path)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tz-{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
                _allocate(f.fileno(), nbytes)
                for c in chunks:
                    f.write(c)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _remove(self, path: str) -> None:
        """Delete one file if it is there (locally a link itself, never what it points to)."""
        if self.local:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        elif self.fs.exists(path):
            self.fs.rm(path)

    def _read_small(self, path: str, cap: int) -> bytes:
        """A whole metadata file (FileNotFoundError when absent), refused unread above `cap`
        bytes or when it is not a regular file."""
        if self.local:
            return _read_local(path, cap)
        info = self.fs.info(path)
        if info.get("type") != "file":
            raise CheckpointError(f"{path} is not a file: tierzero never wrote it; it is not read")
        if (info.get("size") or 0) > cap:
            raise CheckpointError(f"{path} is {info['size']} bytes, more than tierzero ever writes there ({cap})")
        return self.fs.cat_file(path)

    def _listing(self, folder: str) -> Dict[str, str]:
        """name -> 'file' or what else it is, for every entry of a folder ({} when absent)."""
        if self.local:
            out = {}
            try:
                names = os.listdir(folder)
            except (FileNotFoundError, NotADirectoryError):
                return {}
            for name in names:
                try:
                    mode = os.lstat(f"{folder}/{name}").st_mode
                except FileNotFoundError:
                    continue
                out[name] = "file" if stat.S_ISREG(mode) else _kind(mode)
            return out
        try:
            entries = self.fs.ls(folder, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: ("file" if e.get("type") == "file" else "a folder")
                for e in entries}

    def _claim(self, step: int) -> None:
        """The step folder, created with tierzero's stamp inside, or an existing one that holds
        nothing but tierzero's files; anything else raises NotOurs (nothing is written there)."""
        base = self.step_path(step)
        if self.local:
            os.makedirs(self.path, exist_ok=True)
            try:
                os.mkdir(base)
            except FileExistsError:
                mode = os.lstat(base).st_mode
                if not stat.S_ISDIR(mode):
                    raise NotOurs(f"{base} is {_kind(mode)}, not a folder tierzero made: nothing is written there; "
                                  "move it away or choose another checkpoint.dir") from None
        listing = self._listing(base)
        foreign = sorted(n for n, kind in listing.items() if kind != "file" or not _OURS.match(n))
        if foreign:
            raise NotOurs(f"{base} already exists and holds files tierzero does not write ({foreign[:3]}): nothing is "
                          "written there; move it away or choose another checkpoint.dir")
        if STAMP not in listing:  # every rank may race to write it: the same bytes, published whole
            self._put(f"{base}/{STAMP}", [json.dumps({"format": FORMAT, "step": step}).encode()])

    # ---- writing -------------------------------------------------------------------------
    def write_rank(self, step: int, rank: int, slices: Union[Sequence[Slice], Callable[[], Sequence[Slice]]],
                   token: str = "", before_report: Optional[Callable[[], None]] = None) -> None:
        """This rank's shard, then its report json (the signal rank 0 waits for), renamed into
        place so it is never seen half-written. On failure an .error report says why (best
        effort) and the error is raised. `slices` may be a function that returns them (a save
        whose data is still being copied): it runs first, and its failure is the save's, reported
        like a write's. `before_report` runs between the shard and the report (fault injection:
        a kill there leaves a torn step)."""
        base = self.step_path(step)
        try:
            if callable(slices):  # the data first: the training loop may be waiting for the copy
                try:
                    slices = slices()
                except Exception:
                    self._claim(step)  # the folder the .error report goes to
                    raise
            self._claim(step)
            if rank == 0:  # re-saving a step: the old commit no longer describes these files
                for name in (COMMITTED, MANIFEST):
                    self._remove(f"{base}/{name}")
            records, offset = [], 0
            raws = [_raw(s.data) for s in slices]
            # one pass over the bytes: the checksum (xxh3 at memory speed; it and the write
            # release the GIL) and the write share each chunk while it is in the cache
            sums = [hasher(WRITE_CHECKSUM) for _ in raws]
            self._put(f"{base}/{shard_name(rank)}", _checksummed(raws, sums), nbytes=sum(r.nbytes for r in raws))
            for s_, raw, h in zip(slices, raws, sums):
                records.append({"name": s_.name, "shape": list(s_.shape), "dtype": s_.dtype, "piece": {
                    "file": shard_name(rank), "offset": offset, "start": int(s_.start),
                    "numel": int(s_.data.size), WRITE_CHECKSUM: h.intdigest()}})
                offset += raw.nbytes
            if before_report is not None:
                before_report()
            report = json.dumps({"rank": rank, "tensors": records}).encode()
            if self.local:
                self._put(f"{base}/{report_name(rank, token, 'json')}", [report])
                if self.fsync:
                    fsync_dir(base)  # the shard's and the report's names
            else:
                tmp = f"{base}/.{report_name(rank, token, 'json')}.tmp"
                with self.fs.open(tmp, "wb") as f:
                    f.write(report)
                self.fs.mv(tmp, f"{base}/{report_name(rank, token, 'json')}")
        except Exception as e:
            if not isinstance(e, NotOurs):  # a folder that is not ours gets nothing, not even an error report
                try:
                    self._put(f"{base}/{report_name(rank, token, 'error')}", [f"{type(e).__name__}: {e}".encode()])
                except Exception:
                    pass
            raise CheckpointError(f"rank {rank} could not write checkpoint step {step} to {self.url(step)}: "
                                  f"{type(e).__name__}: {e}") from e

    def _reports(self, step: int, world_size: int, token: str, timeout_s: float, poll_s: float,
                 skip: Iterable[int] = ()) -> Tuple[Dict[int, dict], Dict[int, str], Set[str]]:
        """Rank 0: every rank's report of this save attempt, once each has written its part or
        its error: ({rank: part}, {rank: why it failed}, the names in the folder). Waiting for
        all of them, not only the first error, means no rank still writes into the folder
        afterwards (so a failed save can be removed whole). ReportTimeout when some rank has
        not reported within `timeout_s`. Ranks in `skip` need no report (rank 0 knows its own)."""
        base, skip = self.step_path(step), tuple(skip)
        deadline = time.monotonic() + timeout_s
        parts: Dict[int, dict] = {}
        failed: Dict[int, str] = {r: "" for r in skip}
        wait_s = poll_s
        while True:
            # one listing per poll (on S3 each exists() of a missing key costs requests)
            present = set(self._listing(base))
            for r in range(world_size):
                if r in parts or r in failed:
                    continue
                if report_name(r, token, "error") in present:
                    why = self._read_small(f"{base}/{report_name(r, token, 'error')}", 1 << 16)
                    failed[r] = why.decode(errors="replace")
                elif report_name(r, token, "json") in present:
                    try:
                        parts[r] = load_json(self._read_small(f"{base}/{report_name(r, token, 'json')}",
                                                              MAX_MANIFEST_BYTES))
                    except ManifestError:  # not there yet (a store without atomic rename)
                        continue
            if len(parts) + len(failed) == world_size:
                return parts, failed, present
            if len(failed) > len(skip):  # the save failed: the others get a grace, not the whole timeout
                deadline = min(deadline, time.monotonic() + FAILED_GRACE_S)
            if time.monotonic() > deadline:
                missing = sorted(set(range(world_size)) - set(parts) - set(failed))
                also = "".join(f"; rank {r} failed: {why}" for r, why in sorted(failed.items()))
                raise ReportTimeout(f"checkpoint step {step} not committed: no report from rank(s) {missing} "
                                    f"within {timeout_s:.0f} s{also}")
            time.sleep(wait_s)
            wait_s = min(1.0, wait_s * 1.5)  # quick for small saves, cheap for long ones

    def commit(self, step: int, world_size: int, state: dict, timeout_s: float = 600.0,
               poll_s: float = 0.05, token: str = "") -> Manifest:
        """Rank 0: wait for every rank's json, merge, check the manifest as a reader would,
        write it, then COMMITTED (with checkpoint.fsync, each durable before the next)."""
        base = self.step_path(step)
        parts, failed, present = self._reports(step, world_size, token, timeout_s, poll_s)
        if failed:
            raise CheckpointError(f"checkpoint step {step} not committed: " + "; ".join(
                f"rank {r} failed: {why}" for r, why in sorted(failed.items())))
        try:
            manifest = merge(step, [parts[r] for r in range(world_size)], state)
            text = manifest.to_json()
        except (ManifestError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint step {step} not committed: {type(e).__name__}: {e}") from e
        problems = self._problems(base, json.loads(text), step)  # never commit what a reader would refuse
        if problems:
            raise CheckpointError(f"checkpoint step {step} not committed: {summary(problems)}")
        self._put(f"{base}/{MANIFEST}", [text.encode()])
        if self.fsync:
            fsync_dir(base)  # manifest.json's name
            fsync_dir(self.path)  # the step folder's own name
        self._put(f"{base}/{COMMITTED}",
                  [json.dumps({"step": step, "manifest_crc32": crc32(text.encode()), "save": token}).encode()])
        if self.fsync:
            fsync_dir(base)
        self._proven.add(step)
        for name in present:  # reports of earlier, torn attempts at this step
            if name.startswith("rank-") and name not in {report_name(r, token, "json") for r in range(world_size)}:
                self._remove(f"{base}/{name}")
        self._write_latest(step)
        return manifest

    def _write_latest(self, step: int) -> None:
        """LATEST names the newest committed folder: a convenience (the folders are the truth),
        so a LATEST that tierzero did not write is left alone."""
        path = f"{self.path}/{LATEST}"
        try:
            old = self._read_small(path, 64)
            if not re.fullmatch(rb"step-\d{8}\n?", old):
                raise CheckpointError(f"{path} does not hold a step folder's name")
        except FileNotFoundError:
            pass
        except CheckpointError as e:
            log.warning("%s; not replaced (tierzero did not write it)", e)
            return
        self._put(path, [(step_dirname(step) + "\n").encode()])

    # ---- retention -----------------------------------------------------------------------
    def _examine(self, step: int) -> Tuple[Optional[str], List[str]]:
        """(why this step folder is not provably tierzero's, or None; the names in it). The
        proof: a real folder (not a link) holding only files tierzero writes, one of them its
        stamp, or (a folder saved before stamps) its COMMITTED marker, naming this step."""
        base = self.step_path(step)
        if self.local:
            try:
                mode = os.lstat(base).st_mode
            except FileNotFoundError:
                return "is gone", []
            if not stat.S_ISDIR(mode):
                return f"is {_kind(mode)}", []
        listing = self._listing(base)
        foreign = sorted(n for n, kind in listing.items() if kind != "file" or not _OURS.match(n))
        if foreign:
            return f"holds files tierzero does not write ({foreign[:3]})", []
        for name, key in ((STAMP, "format"), (COMMITTED, "manifest_crc32")):
            if name not in listing:
                continue
            try:
                data = load_json(self._read_small(f"{base}/{name}", MAX_MARKER_BYTES))
            except (OSError, ManifestError, CheckpointError):
                continue
            if isinstance(data, dict) and data.get("step") == step and key in data and \
                    (name != STAMP or data.get("format") == FORMAT):
                return None, sorted(listing)
        return f"has neither tierzero's stamp ({STAMP}) nor its {COMMITTED} marker", []

    def _is_ours(self, step: int, on_spared: Optional[Callable[[int, str], None]]) -> bool:
        if step in self._proven:
            return True
        why, _ = self._examine(step)
        if why is None:
            self._proven.add(step)
            return True
        if step not in self._warned:
            self._warned.add(step)
            message = (f"{self.step_path(step)} {why}: tierzero cannot prove it wrote it, so retention never "
                       "deletes it nor counts it as a checkpoint")
            log.warning("%s", message)
            if on_spared is not None:
                on_spared(step, message)
        return False

    def _delete(self, step: int, on_spared: Optional[Callable[[int, str], None]]) -> bool:
        """Delete the files of a step folder proven ours just now, then the folder (if nothing
        else appeared in it meanwhile)."""
        self._proven.discard(step)
        why, names = self._examine(step)
        if why is not None:  # something changed since it was proven: leave it
            self._is_ours(step, on_spared)
            return False
        base = self.step_path(step)
        if not self.local:
            if names:
                self.fs.rm([f"{base}/{n}" for n in names])
            try:
                self.fs.rmdir(base)  # a pseudo-folder some stores keep (memory://); S3 has none
            except OSError:
                pass
            return True
        for name in names:
            try:
                os.unlink(f"{base}/{name}")
            except FileNotFoundError:
                pass
        try:
            os.rmdir(base)
        except OSError as e:
            log.warning("%s not removed: %s (something other than tierzero wrote into it)", base, e.strerror)
        return True

    def discard(self, step: int, world_size: int, token: str, timeout_s: float, poll_s: float = 0.05, *,
                settled: bool = False) -> Optional[str]:
        """Rank 0, after its save of `step` failed: once every other rank has reported on this
        attempt (its part or its error, so none still writes there; `settled`: every rank is known
        to be done with it), remove the step folder if tierzero can prove it wrote it and no commit
        marker is in it. None when it is gone (or was never made); else why it stays."""
        base = self.step_path(step)
        if self.local and not os.path.isdir(base):
            return None  # never made (or not a folder): nothing to remove, nobody writes there
        try:
            if not settled:
                self._reports(step, world_size, token, min(timeout_s, FAILED_GRACE_S), poll_s, skip=(0,))
        except CheckpointError as e:  # a rank that never reported may still be writing there
            return f"{base} left in place ({e})"
        listing = self._listing(base)
        if COMMITTED in listing:
            return f"{base} left in place: it holds a {COMMITTED} marker"
        if self.local and not listing:
            try:  # only an empty folder goes, whoever made it: nothing in it can be lost
                os.rmdir(base)
            except FileNotFoundError:
                pass
            except OSError as e:
                return f"{base} left in place: {e.strerror}"
            return None
        if not listing:  # an object store: nothing under the prefix (memory:// may keep a pseudo-folder)
            try:
                self.fs.rmdir(base)
            except OSError:
                pass
            return None
        why, _ = self._examine(step)
        if why is not None:
            return f"{base} left in place: it {why}"
        self._delete(step, None)
        return None

    def prune(self, keep: int, keep_every: int,
              on_spared: Optional[Callable[[int, str], None]] = None) -> List[int]:
        """Delete committed checkpoints outside the retention rule, and torn saves older than
        the newest committed one, among the step folders provably tierzero's; a folder without
        the proof is never deleted nor counted (`on_spared(step, why)`, once per folder).
        Returns the deleted steps."""
        steps = [(s, ok) for s, ok in self.steps() if self._is_ours(s, on_spared)]
        done = [s for s, ok in steps if ok]
        if not done:
            return []
        keep_set = set(retained(done, keep, keep_every))
        newest = max(done)
        doomed = [s for s, ok in steps if (ok and s not in keep_set) or (not ok and s < newest)]
        return [s for s in doomed if self._delete(s, on_spared)]

    # ---- reading -------------------------------------------------------------------------
    def _piece_files(self, step_path: str, tensors: dict) -> Tuple[Dict[str, int], List[str]]:
        """(size of every piece file that is a regular file, one problem per file that is not),
        from one stat per file (local) or one listing (object stores)."""
        users: Dict[str, List[str]] = {}
        for name, t in tensors.items():
            for p in t["pieces"]:
                users.setdefault(p["file"], []).append(name)
        sizes, problems = {}, []
        listing = None if self.local else self._listing_sizes(step_path)
        for file, names in sorted(users.items()):
            path = f"{step_path}/{file}"
            named = f"(tensor {', '.join(sorted(set(names))[:3])}{' ...' if len(set(names)) > 3 else ''})"
            if self.local:
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    problems.append(f"{path} is missing {named}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    problems.append(f"{path} is {_kind(st.st_mode)}, not a regular file: not read {named}")
                    continue
                sizes[file] = st.st_size
            elif file not in listing:
                problems.append(f"{path} is missing {named}")
            elif listing[file] is None:
                problems.append(f"{path} is not a file: not read {named}")
            else:
                sizes[file] = listing[file]
        return sizes, problems

    def _listing_sizes(self, folder: str) -> Dict[str, Optional[int]]:
        try:
            entries = self.fs.ls(folder, detail=True, refresh=True)  # s3fs caches listings
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (e.get("size") or 0) if e.get("type") == "file" else None
                for e in entries}

    def _problems(self, step_path: str, data, step: int) -> List[str]:
        """Every problem of decoded manifest `data` of folder `step_path` (its marker says
        `step`): structure first, then (all plain names) the piece files and byte ranges."""
        problems = [f"{step_path}/{p}" for p in validate(data, step=step)]
        if problems:
            return problems
        sizes, problems = self._piece_files(step_path, data["tensors"])
        return problems + [f"{step_path}/{p}" for p in validate(data, step=step, file_sizes=sizes)]

    def checked(self, step_path: str) -> Tuple[Optional[Manifest], List[str]]:
        """(the manifest, []) of a committed folder that passes every check, else (None, every
        problem, one line each naming the file and tensor). Reads only metadata."""
        try:
            raw = self._read_small(f"{step_path}/{COMMITTED}", MAX_MARKER_BYTES)
        except FileNotFoundError:
            return None, [f"{step_path} has no {COMMITTED} marker: a torn or unfinished save, never loaded"]
        except CheckpointError as e:
            return None, [str(e)]
        try:
            marker = load_json(raw)
        except ManifestError as e:
            marker = e
        bad = [str(marker)] if isinstance(marker, ManifestError) else marker_problems(marker)
        if bad:
            return None, [f"{step_path}/{COMMITTED} is not tierzero's commit marker: {p}" for p in bad]
        m = _STEP_DIR.match(step_path.rstrip("/").rsplit("/", 1)[-1])
        if m and int(m.group(1)) != marker["step"]:
            return None, [f"{step_path}/{COMMITTED} says step {marker['step']}, its folder is step {int(m.group(1))}"]
        try:
            text = self._read_small(f"{step_path}/{MANIFEST}", MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return None, [f"{step_path}/{MANIFEST} is missing"]
        except CheckpointError as e:
            return None, [str(e)]
        if marker["manifest_crc32"] != crc32(text):
            return None, [f"{step_path}/{MANIFEST} does not match the checksum in {COMMITTED}"]
        try:
            data = load_json(text)
        except ManifestError as e:
            return None, [f"{step_path}/{MANIFEST}: {e}"]
        problems = self._problems(step_path, data, marker["step"])
        return (None, problems) if problems else (Manifest.from_data(data), [])

    def manifest(self, step_path: str) -> Manifest:
        """The manifest of a committed checkpoint folder (a path inside this store's filesystem),
        validated whole; CheckpointError naming the first problems otherwise."""
        manifest, problems = self.checked(step_path)
        if problems:
            more = f" (`tierzero ckpt verify {step_path}` lists all {len(problems)})" if len(problems) > 3 else ""
            raise CheckpointError(summary(problems) + more)
        return manifest

    def read_piece(self, step_path: str, entry: TensorEntry, piece: Piece) -> np.ndarray:
        size = ITEMSIZE[entry.dtype]
        bad_name = file_name_problem(piece.file)
        if bad_name:
            raise CheckpointError(f"{step_path}/{MANIFEST}: tensor {entry.name}: {bad_name}")
        path = f"{step_path}/{piece.file}"
        try:
            if self.local:
                raw = _pread_local(path, piece.offset, piece.numel * size)
            else:
                raw = self.fs.cat_file(path, start=piece.offset, end=piece.offset + piece.numel * size)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing (tensor {entry.name})") from e
        except CheckpointError as e:
            raise CheckpointError(f"{e} (tensor {entry.name})") from e
        except OSError as e:
            if self.local:  # a disk error, permissions: this checkpoint cannot be read
                raise CheckpointError(f"{path} cannot be read (tensor {entry.name}): {e.strerror or e}") from e
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
        try:
            good = checksum(raw, piece.algorithm) == piece.checksum
        except ChecksumUnavailable as e:
            raise CheckpointError(f"{path}: tensor {entry.name} cannot be checked: {e}") from e
        if not good:
            raise CheckpointError(f"{path}: checksum mismatch in tensor {entry.name} "
                                  f"(elements {piece.start}..{piece.stop}, bytes {piece.offset}.., {piece.algorithm})")
        return np.frombuffer(raw, dtype=_np_dtype(entry.dtype))

    def reader(self, step_path: str, manifest: Manifest) -> Callable[[str, int, int], np.ndarray]:
        """read(name, start, numel): elements of a flattened global tensor, from the pieces
        that hold them only (each piece fetched once and checked). A request outside the
        tensor, or a tensor its pieces do not tile exactly, is an error: nothing is returned
        that was not read from the checkpoint."""
        cache: Dict[Tuple[str, int], np.ndarray] = {}
        tiled: Set[str] = set()

        def read(name: str, start: int, numel: int) -> np.ndarray:
            entry = manifest.tensors.get(name)
            if entry is None:
                raise CheckpointError(f"{step_path} has no tensor {name!r}; it was saved by another model "
                                      f"(its tensors: {sorted(manifest.tensors)[:5]} ...)")
            start, numel = int(start), int(numel)
            if start < 0 or numel < 0 or start + numel > entry.numel:
                raise CheckpointError(f"{step_path}: tensor {name} has {entry.numel} elements (shape "
                                      f"{list(entry.shape)}), elements {start}..{start + numel} were asked for: it "
                                      "was saved by a model of another shape")
            if name not in tiled:
                gaps = coverage_problems(entry)
                if gaps:
                    raise CheckpointError(f"{step_path}/{MANIFEST}: tensor {summary(gaps)}")
                tiled.add(name)
            out = np.empty(numel, dtype=_np_dtype(entry.dtype))  # every element is written: the pieces tile it
            for piece, lo, n in reads_for(entry, start, numel):
                key = (piece.file, piece.offset)
                if key not in cache:
                    cache[key] = self.read_piece(step_path, entry, piece)
                out[lo - start: lo - start + n] = cache[key][lo - piece.start: lo - piece.start + n]
            return out

        return read

    def verify(self, step_path: str, *, resumable: bool = False) -> Tuple[Optional[Manifest], List[str]]:
        """Every check of the manifest (with `resumable`, also what a resume needs that it alone can
        tell: manifest.resume_problems), then every piece of every tensor read back and checked;
        the problems, one line each."""
        manifest, problems = self.checked(step_path)
        if problems:
            return None, problems
        if resumable:
            problems = [f"{step_path}/{MANIFEST}: {p}" for p in resume_problems(manifest)]
        for entry in manifest.tensors.values():
            for piece in entry.pieces:
                try:
                    self.read_piece(step_path, entry, piece)
                except CheckpointError as e:
                    problems.append(str(e))
        return manifest, problems


def folder_kind(listing: Dict[str, str]) -> str:
    """What a folder holds, from its listing (name -> 'file' or what else it is; pure):
    'step' (a tierzero step folder: its stamp, manifest or marker), 'steps' (a checkpoints
    folder: step-<8 digits> folders inside), 'dcp' (torch.distributed.checkpoint: .metadata),
    'hf' (a Hugging Face model folder: config.json and safetensors), 'empty' or 'other'."""
    if not listing:
        return "empty"
    if listing.keys() & {STAMP, MANIFEST, COMMITTED}:
        return "step"
    if listing.get(DCP_METADATA) == "file":
        return "dcp"
    if listing.get("config.json") == "file" and any(n.endswith((".safetensors", ".safetensors.index.json"))
                                                    for n in listing):
        return "hf"
    if any(_STEP_DIR.match(n) and kind == "a folder" for n, kind in listing.items()):
        return "steps"
    return "other"


def locate_step(url: str, *, key: Optional[str] = None) -> Tuple["CheckpointStore", str, str]:
    """(store, step folder path, its URL) for a checkpoint path or URL: a step folder is itself;
    a checkpoints folder means its newest committed step. A folder in another format (DCP, a
    Hugging Face model) raises ResumeError (`key`: the config key that named it, e.g.
    checkpoint.resume) or CheckpointError, naming the format and the command that reads it."""
    store, path = open_step(url)
    kind = folder_kind(store._listing(path))
    named = f"{key}={url}" if key else url
    error = ResumeError if key else CheckpointError
    if kind == "steps":
        inner = CheckpointStore(url.rstrip("/"), fsync=store.fsync)
        done = inner.committed()
        if not done:
            raise error(f"{named} is a checkpoints folder without a committed checkpoint (`tierzero ckpt list "
                        f"{url}` shows its step folders, torn ones included)")
        return inner, inner.step_path(done[-1]), inner.url(done[-1])
    if kind == "dcp":
        raise error(f"{named} is a torch.distributed.checkpoint (DCP) folder (it holds {DCP_METADATA}), not a "
                    f"tierzero checkpoint: convert it with `tierzero ckpt convert {url} DST --to tierzero`, then "
                    f"use checkpoint.resume=DST")
    if kind == "hf":
        raise error(f"{named} is a Hugging Face model folder (config.json + safetensors): weights only, no optimizer "
                    f"state or data position, so there is nothing to resume; start a run from it with "
                    f"model.from_hf={url} (its shape and weights, a fresh optimizer), or checkpoint.init_from={url} "
                    "for a model.* config that already has its shape")
    return store, path, url


def open_step(url: str) -> Tuple["CheckpointStore", str]:
    """(store of the folder above, path of the step folder) for a checkpoint path or URL."""
    url = url.rstrip("/")
    _, path = fsspec.core.url_to_fs(url)
    parent = url.rsplit("/", 1)[0] if "/" in url else "."
    return CheckpointStore(parent), path


def _np_dtype(dtype: str):
    return np.uint16 if dtype == "bfloat16" else np.dtype(dtype)
