"""GPU checkpoint staging on CPU (parallel/engines/staging.py, checkpoint/saver.py): one host buffer
of exactly the bytes a rank saves, every slice a view into it, allocated and pinned on a
background thread (the pin step injected: here it blocks until the test lets it, and records
where it ran); a save that comes while the buffer is not ready returns at once, its copies are
issued by the saver's thread once it is, and only the next optimizer step waits for that (its
wait counted in the save's stall). The "device copies" are CPU copies issued by the same
`stage_copies` the native engine uses; NativeEngine's CUDA calls around it need a GPU."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.checkpoint.saver import Checkpointer
from tierzero.parallel.engines.base import CheckpointSlice
from tierzero.parallel.engines.staging import HostStaging, StagingError, stage_copies, staging_layout

NAMES = ("model/w", "optim.exp_avg/w", "optim.exp_avg_sq/w", "model/b", "optim.exp_avg/b", "optim.exp_avg_sq/b")
SIZES = (6, 6, 6, 3, 3, 3)
SHAPES = {"w": (2, 3), "b": (3,)}


class Pin:
    """The injected pin step: blocks until `release` is set; records the thread and the buffer."""

    def __init__(self, fail: bool = False):
        self.release, self.entered, self.unpinned = threading.Event(), threading.Event(), []
        self.calls, self.fail = [], fail

    def __call__(self, buffer):
        self.calls.append((threading.current_thread(), buffer.data_ptr(), buffer.numel()))
        self.entered.set()
        assert self.release.wait(20), "the test never released the pin"
        if self.fail:
            raise RuntimeError("cudaHostRegister failed with cudaError 2")
        return lambda: self.unpinned.append(buffer.data_ptr())


def test_the_layout_is_the_slices_back_to_back_at_their_exact_size():
    layout = staging_layout([6, 0, 3, 5])
    assert layout.offsets == (0, 6, 6, 9) and layout.total == 14  # no rounding, no padding
    assert staging_layout([]).total == 0
    with pytest.raises(ValueError):
        staging_layout([4, -1])


def test_one_buffer_off_the_calling_thread_every_slice_a_view():
    pin = Pin()
    staging = HostStaging(SIZES, pin=pin).start()
    assert pin.entered.wait(20) and not staging.ready  # allocating and pinning, elsewhere
    pin.release.set()
    views = staging.wait()
    assert staging.ready and staging.pinned
    (thread, ptr, numel), = pin.calls  # pinned once, the whole buffer
    assert thread is not threading.main_thread() and numel == sum(SIZES) == staging.buffer.numel()
    assert ptr == staging.buffer.data_ptr()
    for view, offset, n in zip(views, staging_layout(SIZES).offsets, SIZES):
        assert view.numel() == n and view.data_ptr() == ptr + 4 * offset  # views, not copies
        assert view.untyped_storage().data_ptr() == staging.buffer.untyped_storage().data_ptr()
    assert staging.fits(SIZES) and not staging.fits(SIZES[:-1])
    assert staging.start() is staging and len(pin.calls) == 1  # once
    del views, staging
    gc.collect()
    assert pin.unpinned == [ptr]  # unregistered with the staging, not before


def test_a_failed_pin_keeps_a_pageable_buffer_and_a_failed_allocation_fails_the_wait():
    pin = Pin(fail=True)
    pin.release.set()
    staging = HostStaging(SIZES, pin=pin)
    assert len(staging.wait()) == len(SIZES) and staging.ready and not staging.pinned

    def no_memory(n):
        raise MemoryError(f"{4 * n} bytes")
    broken = HostStaging(SIZES, allocate=no_memory).start()
    with pytest.raises(StagingError, match="could not be allocated: MemoryError"):
        broken.wait()
    assert not broken.ready


class StagedEngine:
    """The native engine's save protocol with CPU tensors: the optimizer state, one staging for
    it, copies issued through stage_copies (a copy into the views stands in for the side
    stream's), and an optimizer step that first waits on snapshot_guard."""

    supports_snapshot_guard = True

    def __init__(self, pin=None, allocate=None):
        self.state = [torch.arange(n, dtype=torch.float32) + 10 * i for i, n in enumerate(SIZES)]
        kwargs = {} if allocate is None else {"allocate": allocate}
        self.staging = HostStaging(SIZES, pin=pin, **kwargs)
        self.snapshot_guard = self.checkpoint_copy = None
        self.issued_on, self.step_count, self.stage_calls = [], 3, 0

    def stage_checkpoints(self):
        self.stage_calls += 1
        self.staging.start()

    def checkpoint_slices(self):
        def issue(views):
            self.issued_on.append(threading.current_thread())
            for view, src in zip(views, self.state):
                view.copy_(src)
            return lambda: None  # the copies have landed

        handoff, land = stage_copies(self.staging, issue)
        if handoff is not None:
            self.snapshot_guard = handoff
        self.checkpoint_copy = lambda: [v.numpy() for v in land()]
        return [CheckpointSlice(name, SHAPES[name.rsplit("/", 1)[1]], "float32", 0, None) for name in NAMES]

    def step(self):
        guard, self.snapshot_guard = self.snapshot_guard, None
        if guard is not None:
            guard.wait()
        for t in self.state:
            t.add_(1000.0)
        self.step_count += 1


class Reader:
    def __init__(self):
        self.loaded = {}

    def load_checkpoint(self, read, step_count):
        self.loaded = {name: read(name, 0, n) for name, n in zip(NAMES, SIZES)}

    def after_load(self):
        """Nothing to rebuild: this reader only keeps what it read."""


def _checkpointer(tmp_path, events, **cfg):
    return Checkpointer(CheckpointConfig(every_steps=5, fsync=False, **cfg), str(tmp_path), rank=0, world_size=1,
                        event=lambda kind, detail, step: events.append((kind, detail, step)))


def _expected(bump=0.0):
    return {name: np.arange(n, dtype=np.float32) + 10 * i + bump for i, (name, n) in enumerate(zip(NAMES, SIZES))}


def test_staging_starts_after_the_first_optimizer_step_and_a_ready_save_only_issues_copies(tmp_path):
    engine, events = StagedEngine(), []
    ckpt = _checkpointer(tmp_path, events)
    assert ckpt.resume(engine) is None and engine.stage_calls == 0  # nothing before the first step
    assert not ckpt.due(1, 20) and engine.stage_calls == 1 and not ckpt.due(2, 20) and engine.stage_calls == 1
    engine.staging.wait()
    ckpt.save(5, engine, {"next_sample": 40})
    assert engine.issued_on == [threading.main_thread()] and ckpt.snapshot is None  # issued here, nothing to wait on
    engine.step()  # the copies were taken before the update
    ckpt.wait()
    reader = Reader()
    ckpt.resume(reader)
    for name, want in _expected().items():
        np.testing.assert_array_equal(reader.loaded[name], want)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_before_the_staging_is_ready_waits_in_the_background_not_on_the_loop(tmp_path, async_save):
    pin, events = Pin(), []
    engine = StagedEngine(pin=pin)
    ckpt = _checkpointer(tmp_path, events, async_save=async_save)
    engine.stage_checkpoints()
    assert pin.entered.wait(20)  # the background thread is pinning
    if not async_save:  # a synchronous save writes before it returns: it waits for the staging itself
        threading.Timer(0.2, pin.release.set).start()
        ckpt.save(5, engine, {"next_sample": 40})
        assert engine.issued_on == [threading.main_thread()]
    else:
        ckpt.save(5, engine, {"next_sample": 40})  # returns with the staging still blocked
        assert not pin.release.is_set() and engine.issued_on == [] and ckpt.snapshot is engine.snapshot_guard
        stepped = threading.Thread(target=engine.step)  # forward/backward ran; the update waits here
        stepped.start()
        stepped.join(0.3)
        assert stepped.is_alive() and engine.state[0][0] == 0.0  # not before the copies are issued
        pin.release.set()
        stepped.join(20)
        assert not stepped.is_alive()
        issuer, = engine.issued_on
        assert issuer is not threading.main_thread() and issuer.name == "checkpoint-5"  # the saver's thread
        assert ckpt.last_stall_s >= ckpt.last_save_s + 0.25  # the update's wait counts in the save's stall
    ckpt.wait()
    assert [e for e in events if e[0] == "error"] == []
    reader = Reader()
    ckpt.resume(reader)
    for name, want in _expected().items():  # the state as of the save, not after the update
        np.testing.assert_array_equal(reader.loaded[name], want)


def test_a_staging_that_cannot_be_allocated_fails_that_save_and_never_hangs_the_step(tmp_path):
    def no_memory(n):
        raise MemoryError("cannot allocate memory")
    engine, events = StagedEngine(allocate=no_memory), []
    ckpt = _checkpointer(tmp_path, events)
    ckpt.save(5, engine, {"next_sample": 40})
    stepped = threading.Thread(target=engine.step)
    stepped.start()
    stepped.join(20)
    assert not stepped.is_alive()  # the handoff was released though nothing was issued
    ckpt.wait()  # checkpoint.on_error=continue: recorded, not raised
    errors = [detail for kind, detail, _ in events if kind == "error"]
    assert len(errors) == 1 and "staging buffer" in errors[0] and "MemoryError" in errors[0], errors
    assert 5 in ckpt.failed and ckpt.store.committed() == []
    assert not (tmp_path / "step-00000005").exists()  # rank 0 removed the failed save's folder
