"""GPU checkpoints (checkpoint/saver.py, parallel/engines/native.py): a GPU engine hands the saver
its own pinned host buffers, filled by device-to-host copies it has only issued on a side stream,
and a `checkpoint_copy` that waits for them. The contract, on CPU with an engine whose "copies"
land only when the test lets them: an async save returns before they land (the loop is blocked
for the issue only), the saver's thread waits for them before writing, and a synchronous save
waits for them too; either way the checkpoint holds the copied values, never the unfilled ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.checkpoint.saver import Checkpointer
from tierzero.parallel.engines.base import CheckpointSlice


class CopyingEngine:
    """Slices over buffers that a "device copy" fills later (when `release` is set)."""

    def __init__(self):
        self.release, self.waited = threading.Event(), threading.Event()
        self.buffers = {"model/w": np.zeros(6, dtype=np.float32), "optim.exp_avg/w": np.zeros(6, dtype=np.float32),
                        "optim.exp_avg_sq/w": np.zeros(6, dtype=np.float32)}
        self.checkpoint_copy = None
        self.step_count = 3

    def checkpoint_slices(self):
        def land():
            self.waited.set()
            assert self.release.wait(20), "the test never released the copies"
            for i, buf in enumerate(self.buffers.values()):
                buf[:] = np.arange(6, dtype=np.float32) + 10 * (i + 1)
        self.checkpoint_copy = land
        return [CheckpointSlice(name, (2, 3), "float32", 0, buf) for name, buf in self.buffers.items()]


class Reader:
    def __init__(self):
        self.loaded, self.step_count = {}, None

    def load_checkpoint(self, read, step_count):
        self.loaded = {name: read(name, 0, 6) for name in ("model/w", "optim.exp_avg/w", "optim.exp_avg_sq/w")}
        self.step_count = step_count

    def after_load(self):
        """Nothing to rebuild: this reader only keeps what it read."""


@pytest.mark.parametrize("async_save", [True, False])
def test_the_saver_writes_the_copies_once_they_have_landed(tmp_path, async_save):
    ckpt = Checkpointer(CheckpointConfig(every_steps=1, async_save=async_save), str(tmp_path), rank=0, world_size=1,
                        event=lambda *a: None)
    engine = CopyingEngine()
    if async_save:
        ckpt.save(3, engine, {"next_sample": 12})  # returns with the copies still in flight
        assert not engine.release.is_set()
        assert engine.waited.wait(20)  # the background thread is waiting for them, not writing zeros
        engine.release.set()
    else:
        timer = threading.Timer(0.2, engine.release.set)
        timer.start()
        ckpt.save(3, engine, {"next_sample": 12})
        assert engine.waited.is_set()
    ckpt.wait()
    reader = Reader()
    resumed = ckpt.resume(reader)
    assert resumed.step == 3 and reader.step_count is not None
    for i, name in enumerate(("model/w", "optim.exp_avg/w", "optim.exp_avg_sq/w")):
        np.testing.assert_array_equal(reader.loaded[name], np.arange(6, dtype=np.float32) + 10 * (i + 1))
