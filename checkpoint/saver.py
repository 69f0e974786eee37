"""Saving on a schedule (synchronously or in the background) and resuming, for one rank.

The engine is duck-typed: `checkpoint_slices()` -> [(name, global shape, dtype, first
element, host array)], `load_checkpoint(read, step_count)` (local reads only) and
`after_load()` (collectives, once every rank has read). A GPU engine may also have
`checkpoint_copy` (set by checkpoint_slices: waits for its device-to-host copies and returns the
slices' data), `snapshot_guard` (what its next optimizer step waits on) and
`stage_checkpoints()` (allocate the host staging in the background; run after the first
optimizer step). Events go to a callback `event(kind, detail, step)` (the run's telemetry).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch.distributed as dist

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.checkpoint.manifest import RESUME_STATE, layout_problems, state_problems
from tierzero.checkpoint.store import CheckpointError, CheckpointStore, ReportTimeout, ResumeError, Slice, locate_step

log = logging.getLogger(__name__)

LOCAL_POLL_S = 0.005
"""Rank 0's first wait between looks for the other ranks' reports on a local filesystem (it grows
1.5x per look): with the store's default 0.05 s a 0.2 s save could wait a quarter of its time
after the last report landed. Object stores keep the default (each look is a request)."""


def _slices(views) -> List[Slice]:
    return [Slice(n, tuple(shape), dtype, start, data) for n, shape, dtype, start, data in views]


class Snapshot:
    """Set once a background save has copied the engine's state; the engine's next optimizer
    step waits on it (forward and backward do not change that state, so they overlap the copy)."""

    def __init__(self):
        self._done = threading.Event()
        self.waited_s = 0.0

    def set(self) -> None:
        self._done.set()

    def wait(self) -> None:
        if not self._done.is_set():
            t0 = time.perf_counter()
            self._done.wait()
            self.waited_s += time.perf_counter() - t0


@dataclass
class Resumed:
    step: int
    state: dict
    path: str


@dataclass(frozen=True)
class SaveOutcome:
    """How a run's saves ended, the same on every rank (rank 0 commits, so it sees every failure)."""
    failed: Dict[int, str] = field(default_factory=dict)
    """Step -> why its save failed (a later successful save of the same step removes it)."""
    last_asked: Optional[int] = None
    """The last step that asked for a save."""
    newest_step: Optional[int] = None
    """The newest committed checkpoint in checkpoint.dir that passes a reader's checks, and its URL."""
    newest_url: Optional[str] = None
    kept: Dict[int, str] = field(default_factory=dict)
    """Step -> why the folder of a failed save could not be removed (else it is gone)."""

    @property
    def lost(self) -> bool:
        """The newest usable checkpoint is older than the last step that asked for one."""
        return self.last_asked is not None and (self.newest_step is None or self.newest_step < self.last_asked)

    def words(self) -> str:
        """One line: which saves failed, why (the first), and what a rerun resumes from."""
        steps = sorted(self.failed)
        why = self.failed[steps[0]] if steps else ""
        newest = (f"the newest usable checkpoint is {self.newest_url} (step {self.newest_step})"
                  if self.newest_step is not None else "no usable checkpoint was committed")
        kept = f"; not removed: {'; '.join(self.kept.values())}" if self.kept else ""
        return (f"checkpoint save(s) at step(s) {', '.join(map(str, steps))} failed ({_cut(why)}); {newest}{kept}")


def _cut(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, root: str, *, rank: int, world_size: int,
                 event: Callable[..., None], commit_timeout_s: float = 600.0, attempt: int = 0,
                 before_report: Callable[[int], None] = lambda step: None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.before_report = before_report
        """Called with the step between writing this rank's data and reporting it (fault drills)."""
        self.attempt = attempt
        self._saves = 0
        self._buffers: List = []
        """Host buffers of the last async save, reused by the next one (no fresh pages to fault in)."""
        self.store = CheckpointStore(root, fsync=cfg.fsync)
        self.event = event
        self.commit_timeout_s = commit_timeout_s
        self._thread: Optional[threading.Thread] = None
        self.snapshot: Optional[Snapshot] = None
        self._error: Optional[BaseException] = None
        self.last_save_s = 0.0
        """Seconds the training loop spent in the last save() call (its stall)."""
        self.failed: Dict[int, str] = {}
        """Step -> why this rank's save of it failed (rank 0: any rank's, through the commit)."""
        self.kept: Dict[int, str] = {}
        """Rank 0: step -> why a failed save's folder could not be removed."""
        self.last_asked: Optional[int] = None
        self._stage: Optional[Callable[[], None]] = None
        """The engine's stage_checkpoints (learnt at resume), run once, after the first optimizer step."""

    # ---- saving --------------------------------------------------------------------------
    def due(self, step: int, last_step: int) -> bool:
        """Whether `step` saves. Asked after every optimizer step: after the first, it also has
        a GPU engine start staging its host buffer in the background, so no save allocates it."""
        if self._stage is not None:
            stage, self._stage = self._stage, None
            stage()
        every = self.cfg.every_steps
        return bool(every) and (step % every == 0 or step == last_step)

    def save(self, step: int, engine, state: dict) -> None:
        """Copy this rank's shards to host memory now; write (and on rank 0 commit) them in
        the background with checkpoint.async_save, else before returning."""
        t0 = time.perf_counter()
        self.wait()  # the previous save first: one in flight at a time
        self.last_asked = step
        views = engine.checkpoint_slices()
        # a GPU engine's slices live in its own pinned host staging, filled by device-to-host
        # copies on a side stream it has only issued: this waits for them and returns the
        # slices' data (None: the data is there)
        copied = getattr(engine, "checkpoint_copy", None)
        self._saves += 1  # every rank saves at the same steps: the same token everywhere
        token = f"a{self.attempt}s{self._saves}"
        self.snapshot = None
        if self.cfg.async_save and copied is not None:
            # the staging is the snapshot (the engine orders its next update after the copies on
            # the device): the loop was blocked only for issuing them. Staging not ready yet: the
            # engine's next update waits on its handoff (snapshot_guard) until this thread has
            # issued them, and that wait counts in this save's stall
            self.snapshot = getattr(engine, "snapshot_guard", None)
            snapshot = Snapshot()
            snapshot.set()
            self._thread = threading.Thread(target=self._write_async, args=(step, views, state, token, snapshot, copied),
                                            daemon=True, name=f"checkpoint-{step}")
            self._thread.start()
        elif self.cfg.async_save:
            # training goes on and its optimizer step changes these tensors: copy them first,
            # in the background when the engine can wait for the copy before its next step
            snapshot = Snapshot()
            if getattr(engine, "supports_snapshot_guard", False):
                engine.snapshot_guard = self.snapshot = snapshot
            else:
                views = self._copy_all(views)
                snapshot.set()
            self._thread = threading.Thread(target=self._write_async, args=(step, views, state, token, snapshot),
                                            daemon=True, name=f"checkpoint-{step}")
            self._thread.start()
        else:
            self._write(step, lambda: _slices(self._landed(views, copied)), state, token)
            self._raise_if_stopping()
        self.last_save_s = time.perf_counter() - t0

    @property
    def last_stall_s(self) -> float:
        """What the last save cost the training loop: save() itself plus the optimizer step's
        wait for the background copy."""
        return self.last_save_s + (self.snapshot.waited_s if self.snapshot is not None else 0.0)

    def _copy_all(self, views):
        return [(n, shape, dtype, start, self._copy(i, data)) for i, (n, shape, dtype, start, data) in enumerate(views)]

    def _write_async(self, step: int, views, state: dict, token: str, snapshot: Snapshot,
                     copied: Optional[Callable[[], Optional[list]]] = None) -> None:
        def landed() -> List[Slice]:
            try:
                out = self._landed(views, copied)
                return _slices(out if snapshot._done.is_set() else self._copy_all(out))
            finally:
                snapshot.set()  # copied or failed: the optimizer step must not wait forever
        # a failure to copy is this save's failure like a write's (an .error report, the event)
        self._write(step, landed, state, token)

    @staticmethod
    def _landed(views, copied: Optional[Callable[[], Optional[list]]]):
        """The slices once a GPU engine's device-to-host copies have landed, with the data
        `copied()` hands back (None: the slices' own data)."""
        if copied is None:
            return views
        data = copied()
        if data is None:
            return views
        if len(data) != len(views):
            raise CheckpointError(f"the engine's checkpoint_copy returned {len(data)} arrays for {len(views)} slices")
        return [(n, shape, dtype, start, a) for (n, shape, dtype, start, _), a in zip(views, data)]

    def _copy(self, i: int, data):
        import numpy as np

        while len(self._buffers) <= i:
            self._buffers.append(None)
        buf = self._buffers[i]
        if buf is None or buf.shape != data.shape or buf.dtype != data.dtype:
            buf = self._buffers[i] = np.empty_like(data)
        np.copyto(buf, data)
        return buf

    def _write(self, step: int, slices: Union[List[Slice], Callable[[], List[Slice]]], state: dict,
               token: str) -> None:
        try:
            self.store.write_rank(step, self.rank, slices, token=token, before_report=lambda: self.before_report(step))
            if self.rank == 0:
                # locally a poll costs a listing: quick polls keep the commit close behind the last report
                poll = {"poll_s": LOCAL_POLL_S} if self.store.local else {}
                self.store.commit(step, self.world_size, state, timeout_s=self.commit_timeout_s, token=token, **poll)
                deleted = self.store.prune(self.cfg.keep, self.cfg.keep_every,
                                           on_spared=lambda s, why: self.event("warning", why, step))
                detail = f"committed {self.store.url(step)}" + (f"; deleted steps {deleted}" if deleted else "")
                self.event("checkpoint", detail, step)
            self.failed.pop(step, None)
        except Exception as e:  # an event, never a commit; the loop decides by checkpoint.on_error
            self._error = e
            self.failed[step] = str(e)
            self.event("error", f"checkpoint step {step} failed: {e}", step)
            log.error("checkpoint step %d failed: %s", step, e)
            if self.rank == 0:
                self._discard(step, token, waited=isinstance(e, ReportTimeout))

    def _discard(self, step: int, token: str, *, waited: bool) -> None:
        """Rank 0: remove the folder of a failed save (half-written files help nobody and fill the
        disk further); `waited`: the commit already waited its timeout for the other ranks."""
        try:
            kept = self.store.discard(step, self.world_size, token, 0.0 if waited else self.commit_timeout_s)
        except Exception as e:  # best effort: the failure itself is already recorded
            kept = f"{self.store.url(step)} left in place ({type(e).__name__}: {e})"
        if kept is None:
            self.kept.pop(step, None)
        else:
            self.kept[step] = kept
            log.warning("%s", kept)

    def wait(self) -> None:
        """Block until the background save (if any) is done; raise if it failed and
        checkpoint.on_error=stop."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_if_stopping()

    def outcome(self) -> SaveOutcome:
        """How this run's saves ended, after wait(): rank 0's view (it commits, so it sees every
        rank's failure) with the newest committed checkpoint a reader accepts, on every rank.
        A collective when several ranks run and any save was asked for (every rank saves at the
        same steps, so every rank knows whether one was)."""
        if self.last_asked is None:
            return SaveOutcome()
        together = self.world_size > 1 and dist.is_initialized()
        if together:  # every rank's writes are over once all are here (wait() joined each one's thread)
            dist.barrier()
        out = None
        if self.rank == 0:
            for step in list(self.kept):  # e.g. a rank on a full disk could not even write its error report
                if self.store.discard(step, self.world_size, "", 0.0, settled=True) is None:
                    del self.kept[step]
            newest_step = newest_url = None
            for step in reversed(self.store.committed()):
                _, problems = self.store.checked(self.store.step_path(step))  # metadata only
                if not problems:
                    newest_step, newest_url = step, self.store.url(step)
                    break
            out = SaveOutcome(dict(sorted(self.failed.items())), self.last_asked, newest_step, newest_url,
                              dict(sorted(self.kept.items())))
        if together:
            box = [out]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        return out

    def _raise_if_stopping(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            if self.cfg.on_error == "stop":
                raise CheckpointError(f"{error} (checkpoint.on_error=stop; set checkpoint.on_error=continue to "
                                      "keep training without this checkpoint)") from error

    # ---- resuming ------------------------------------------------------------------------
    def resume(self, engine, mode: Optional[str] = None) -> Optional[Resumed]:
        """checkpoint.resume=auto: the newest committed checkpoint every rank can read, falling
        back to older ones with a warning event; a path: that one or an error; none: fresh.
        `mode` overrides checkpoint.resume (a rollback always uses auto)."""
        mode = mode or self.cfg.resume
        self._stage = getattr(engine, "stage_checkpoints", None) if self.cfg.every_steps else None
        if mode == "none":
            return None
        if mode == "auto":
            candidates = [(self.store, self.store.step_path(s), self.store.url(s))
                          for s in reversed(self.store.committed())]
        else:
            candidates = [locate_step(mode, key="checkpoint.resume")]  # a checkpoints folder: its newest
        # what this rank's model needs (engines that can say so without copying their state)
        layout = getattr(engine, "checkpoint_layout", None)
        expected = layout() if layout is not None and candidates else {}
        for store, path, url in candidates:
            problem = None
            try:
                manifest = store.manifest(path)  # validated whole: a problem of any kind is a CheckpointError
                missing = state_problems(manifest.state, step=manifest.step, required=RESUME_STATE)
                missing += layout_problems(manifest.tensors, expected)
                if missing:
                    raise CheckpointError(f"{path}/manifest.json: {'; '.join(missing)}")
                engine.load_checkpoint(store.reader(path, manifest), int(manifest.state.get("optimizer_steps",
                                                                                          manifest.step)))
            except CheckpointError as e:
                problem = str(e)
            problem = self._agree(problem)
            if problem is not None:
                if mode != "auto":
                    raise ResumeError(f"checkpoint.resume={mode} cannot be loaded: {problem}. Point it at a committed "
                                      "checkpoint folder (`tierzero ckpt list DIR`), or use checkpoint.resume=auto")
                self.event("warning", f"checkpoint {url} unusable ({problem}); trying an older one", None)
                log.warning("checkpoint %s unusable (%s); trying an older one", url, problem)
                continue
            engine.after_load()  # collective: only once every rank has read its slices
            return Resumed(manifest.step, manifest.state, url)
        if mode != "auto":
            raise ResumeError(f"checkpoint.resume={mode}: no checkpoint there")
        return None

    def _agree(self, problem: Optional[str]) -> Optional[str]:
        """Every rank's reading problem, so all ranks make the same choice and every message
        names what actually failed (whichever rank read the bad piece); None when all read."""
        if self.world_size == 1 or not dist.is_initialized():
            return problem
        problems: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        found = sorted({p for p in problems if p is not None})
        return "; ".join(found) if found else None
