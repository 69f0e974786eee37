"""Saving on a schedule (synchronously or in the background) and resuming, for one rank.

The engine is duck-typed: `checkpoint_slices()` -> [(name, global shape, dtype, first
element, host array)], `load_checkpoint(read, step_count)` (local reads only) and
`after_load()` (collectives, once every rank has read). Events go to a callback
`event(kind, detail, step)` (the run's telemetry).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from checkpoint.config import CheckpointConfig
from checkpoint.store import CheckpointError, CheckpointStore, ResumeError, Slice, open_step

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    step: int
    state: dict
    path: str


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, root: str, *, rank: int, world_size: int,
                 event: Callable[..., None], commit_timeout_s: float = 600.0):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.store = CheckpointStore(root)
        self.event = event
        self.commit_timeout_s = commit_timeout_s
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_save_s = 0.0
        """Seconds the training loop spent in the last save() call (its stall)."""

    # ---- saving --------------------------------------------------------------------------
    def due(self, step: int, last_step: int) -> bool:
        every = self.cfg.every_steps
        return bool(every) and (step % every == 0 or step == last_step)

    def save(self, step: int, engine, state: dict) -> None:
        """Copy this rank's shards to host memory now; write (and on rank 0 commit) them in
        the background with checkpoint.async_save, else before returning."""
        t0 = time.perf_counter()
        self.wait()  # the previous save first: one in flight at a time
        slices = [Slice(n, tuple(shape), dtype, start, data) for n, shape, dtype, start, data in engine.checkpoint_slices()]
        if self.cfg.async_save:
            self._thread = threading.Thread(target=self._write, args=(step, slices, state), daemon=True,
                                            name=f"checkpoint-{step}")
            self._thread.start()
        else:
            self._write(step, slices, state)
            self._raise_if_stopping()
        self.last_save_s = time.perf_counter() - t0

    def _write(self, step: int, slices: List[Slice], state: dict) -> None:
        try:
            self.store.write_rank(step, self.rank, slices)
            if self.rank == 0:
                self.store.commit(step, self.world_size, state, timeout_s=self.commit_timeout_s)
                deleted = self.store.prune(self.cfg.keep, self.cfg.keep_every)
                detail = f"committed {self.store.url(step)}" + (f"; deleted steps {deleted}" if deleted else "")
                self.event("checkpoint", detail, step)
        except Exception as e:  # an event, never a commit; the loop decides by checkpoint.on_error
            self._error = e
            self.event("error", f"checkpoint step {step} failed: {e}", step)
            log.error("checkpoint step %d failed: %s", step, e)

    def wait(self) -> None:
        """Block until the background save (if any) is done; raise if it failed and
        checkpoint.on_error=stop."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_if_stopping()

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
        if mode == "none":
            return None
        if mode == "auto":
            candidates = [(self.store, self.store.step_path(s), self.store.url(s))
                          for s in reversed(self.store.committed())]
        else:
            candidates = [(*open_step(mode), mode)]
        for store, path, url in candidates:
            problem = None
            try:
                manifest = store.manifest(path)
                engine.load_checkpoint(store.reader(path, manifest), int(manifest.state.get("optimizer_steps",
                                                                                          manifest.step)))
            except CheckpointError as e:
                problem = str(e)
            if not self._all_ok(problem is None):
                problem = problem or "another rank could not read it"
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

    def _all_ok(self, ok: bool) -> bool:
        if self.world_size == 1 or not dist.is_initialized():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
