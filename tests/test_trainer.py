"""The training loop's control flow with a fake engine and a fake checkpointer, in one process:
skip, roll back, stop on a signal, give up -- no ranks, no files, a second each.

The fake engine's gradient norm is NaN on the optimizer-step calls a test names (counted from 1:
the loop's steps until a rollback replays some); it records which samples
each micro-step read, so a rollback can be checked to replay exactly the steps after the
checkpoint, on the same samples."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from reference import Recorder

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.checkpoint.saver import Resumed, SaveOutcome
from tierzero.parallel.context import DistContext
from tierzero.parallel.engines.base import StepStats
from tierzero.parallel.topology import emulated_topology
from tierzero.recipes.config import DataConfig, ModelConfig, TrainConfig
from tierzero.recipes.trainer import Hooks, NonFiniteError, Recipe, StopRequested, Trainer


class FakeEngine:
    name = "fake"

    def __init__(self, nan_steps=()):
        self.nan_steps = set(nan_steps)
        self.step_count = self.attempts = 0
        self.calls = []  # (optimizer step about to be taken, first token of the micro-batch)
        self.loaded = []

    def micro_step(self, inputs, targets, *, scale: float) -> float:
        self.calls.append((self.step_count + 1, tuple(inputs[:, 0].tolist())))
        return 1.0 / (self.step_count + 1)

    def step(self, lr: float) -> StepStats:
        self.attempts += 1  # the loop's step number until a rollback replays some
        if self.attempts in self.nan_steps:
            return StepStats(grad_norm=float("nan"), skipped=True)  # a skipped step changes no state
        self.step_count += 1
        return StepStats(grad_norm=1.0)

    def take_comm(self):
        return []


@dataclass
class FakeStore:
    def step_path(self, step: int) -> str:
        return f"ckpt/step-{step:08d}"


class FakeCheckpointer:
    """Saves in memory; resume(auto) returns the newest save and puts the engine back there."""

    def __init__(self, every_steps: int):
        self.every_steps, self.saves, self.store = every_steps, {}, FakeStore()

    def due(self, step: int, last: int) -> bool:
        return step % self.every_steps == 0 or step == last

    def save(self, step: int, engine, state: dict) -> None:
        self.saves[step] = dict(state, optimizer_steps=engine.step_count)

    def wait(self) -> None:
        return None  # saves are synchronous here

    def outcome(self) -> SaveOutcome:
        """Every save here succeeds."""
        newest = max(self.saves, default=None)
        return SaveOutcome({}, newest, newest, None if newest is None else self.store.step_path(newest))

    def resume(self, engine, mode=None):
        if not self.saves:
            return None
        step = max(self.saves)
        engine.step_count = self.saves[step]["optimizer_steps"]
        engine.loaded.append(step)
        return Resumed(step, self.saves[step], self.store.step_path(step))


class FakeTrainer(Trainer):
    def __init__(self, *args, nan_steps=(), every_steps=0, **kwargs):
        self._nan_steps, self._every = nan_steps, every_steps
        super().__init__(*args, **kwargs)

    def build_engine(self, model, memory_budget_bytes):
        return FakeEngine(self._nan_steps), "fake plan"

    def build_checkpointer(self, root):
        return FakeCheckpointer(self._every) if self._every else None


class StopAt(Hooks):
    def __init__(self, step: int):
        self.at, self.step = step, 0

    def heartbeat(self, step: int, phase: str) -> None:
        self.step = step

    def stop_requested(self):
        return "SIGTERM" if self.step >= self.at else None


def make(steps=8, on_nonfinite="skip", max_nonfinite=3, hooks=None, **kwargs):
    train = TrainConfig(steps=steps, global_batch_size=4, micro_batch_size=2, warmup_steps=1,
                        on_nonfinite=on_nonfinite, max_nonfinite=max_nonfinite)
    recipe = Recipe(train=train, model=ModelConfig(d_model=16, n_layers=1, n_heads=2), data=DataConfig(seq_len=8),
                    checkpoint=CheckpointConfig(every_steps=kwargs.get("every_steps", 0)))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device="cpu", backend="none",
                      topology=emulated_topology([1]), host="test")
    rec = Recorder()
    trainer = FakeTrainer(recipe, ctx, rec, hooks=hooks, peak_tflops=1.0, show_progress=False, **kwargs)
    return trainer, rec


def kinds(rec):
    return [e["kind"] for e in rec.rows.get("events", [])]


def test_a_clean_run_records_every_step_and_reads_the_stream_in_order():
    trainer, rec = make(steps=6)
    result = trainer.fit()
    assert len(result.losses) == 6 and result.first_step == 1
    assert [r["step"] for r in rec.rows["steps"]] == [1, 2, 3, 4, 5, 6]
    # 2 micro-steps per step (global 4 / micro 2), each reading the next samples of the stream
    assert [s for s, _ in trainer.engine.calls] == [s for s in range(1, 7) for _ in range(2)]
    assert len({batch for _, batch in trainer.engine.calls}) == 12
    assert kinds(rec) == ["start", "end"]


def test_skip_keeps_training_and_says_so():
    trainer, rec = make(steps=6, nan_steps={3})
    result = trainer.fit()
    assert len(result.losses) == 6 and math.isnan(result.grad_norms[2])
    assert kinds(rec).count("nonfinite") == 1


def test_rollback_replays_the_steps_after_the_checkpoint_on_the_same_samples():
    trainer, rec = make(steps=8, on_nonfinite="rollback", every_steps=2, nan_steps={5})
    result = trainer.fit()
    assert trainer.engine.loaded == [4]  # the newest save before step 5
    (rollback,) = [e for e in rec.rows["events"] if e["kind"] == "rollback"]
    assert rollback["step"] == 5 and "step 4" in rollback["detail"]
    # the result holds each step once: the abandoned try of step 5 was dropped
    assert len(result.losses) == len(result.grad_norms) == 8 and all(g == 1.0 for g in result.grad_norms)
    calls = trainer.engine.calls
    first_try = [b for s, b in calls[:10] if s == 5]
    replay = [b for s, b in calls[10:] if s == 5]
    assert first_try and first_try == replay, "the replay must read step 5's samples again"
    assert sorted(trainer.ckpt.saves) == [2, 4, 6, 8]
    assert trainer.ckpt.saves[6]["next_sample"] == 6 * 4  # where step 7 starts in the token stream


def test_rollback_before_any_checkpoint_stops_with_a_message():
    trainer, _ = make(steps=8, on_nonfinite="rollback", every_steps=4, nan_steps={2})
    with pytest.raises(NonFiniteError, match="no committed checkpoint"):
        trainer.fit()


def test_too_many_nonfinite_steps_in_a_row_stop():
    trainer, rec = make(steps=8, max_nonfinite=2, nan_steps={3, 4, 5})
    with pytest.raises(NonFiniteError, match="3 step\\(s\\) in a row"):
        trainer.fit()
    assert kinds(rec).count("nonfinite") == 3


def test_a_stop_request_saves_that_step_and_stops():
    trainer, rec = make(steps=8, every_steps=5, hooks=StopAt(3))
    with pytest.raises(StopRequested) as info:
        trainer.fit()
    assert (info.value.step, info.value.signame, info.value.checkpoint) == (3, "SIGTERM", "ckpt/step-00000003")
    assert sorted(trainer.ckpt.saves) == [3] and trainer.ckpt.saves[3]["next_sample"] == 12
    assert [r["step"] for r in rec.rows["steps"]] == [1, 2, 3]


def test_a_stop_request_without_checkpoints_stops_and_says_nothing_was_saved():
    trainer, _ = make(steps=8, hooks=StopAt(2))
    with pytest.raises(StopRequested, match="no checkpoint") as info:
        trainer.fit()
    assert info.value.step == 2 and info.value.checkpoint is None


def test_a_stop_request_at_the_last_step_is_just_the_end():
    trainer, rec = make(steps=4, hooks=StopAt(4))
    result = trainer.fit()
    assert len(result.losses) == 4 and kinds(rec)[-1] == "end"


def test_rollback_needs_a_checkpointer():
    with pytest.raises(ValueError, match="rollback needs checkpoints"):
        make(steps=4, on_nonfinite="rollback")
