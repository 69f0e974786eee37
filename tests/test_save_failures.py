"""Saves that fail (disk full) under checkpoint.on_error=continue: the run's last line names the
failed saves and the newest usable checkpoint, it exits 4 (Exit.CHECKPOINT_LOST) when that one is
older than the last step that asked for a save, and no half-written step folder stays behind.
A real full filesystem (a small tmpfs, where root may mount one) and an injected ENOSPC
(TIERZERO_FAULT_SAVE_ENOSPC, launcher/faults.py) both go through the real CLI and 2 gloo ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tierzero.checkpoint.saver import SaveOutcome
from tierzero.checkpoint.store import CheckpointStore
from tierzero.launcher.config import load_config
from tierzero.launcher.exitcodes import VERDICTS, Exit
from tierzero.recipes.model import count_params

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "launcher.nproc=2",
         "launcher.max_restarts=0", "train.steps=9", "checkpoint.every_steps=3"]


def _run(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, *args], cwd=cwd,
                          capture_output=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=300)


def _last_line(r) -> str:
    return [line for line in r.stdout.splitlines() if line.strip()][-1]


def _step_folders(ckpt: Path) -> dict:
    """step -> committed, for every step folder on disk."""
    return {int(p.name[5:]): (p / "COMMITTED").exists() for p in ckpt.glob("step-*")}


def _events(run_dir: Path, kind: str) -> list:
    rows = ds.dataset(run_dir / "telemetry" / "events", format="parquet", partitioning="hive").to_table().to_pylist()
    return sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["time"])


def test_the_verdict_is_never_a_reason_to_restart():
    assert Exit.CHECKPOINT_LOST in VERDICTS and int(Exit.CHECKPOINT_LOST) not in (0, 1, 2, 3, 75)


def test_lost_means_the_newest_usable_is_older_than_the_last_save_asked_for():
    failed = {6: "rank 0 could not write checkpoint step 6: OSError: [Errno 28] No space left on device"}
    assert SaveOutcome(failed, last_asked=9, newest_step=3, newest_url="ck/step-00000003").lost
    assert not SaveOutcome(failed, last_asked=9, newest_step=9, newest_url="ck/step-00000009").lost
    assert SaveOutcome(failed, last_asked=6, newest_step=None).lost
    assert not SaveOutcome().lost  # a run that saves nothing lost nothing
    words = SaveOutcome({6: failed[6], 9: "x"}, last_asked=9, newest_step=3, newest_url="ck/step-00000003").words()
    assert "6, 9" in words and "ck/step-00000003 (step 3)" in words and "No space left" in words
    assert "no usable checkpoint" in SaveOutcome(failed, last_asked=6).words()


def _tmpfs(path: Path, size_bytes: int) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_run_on_a_full_disk_exits_4_naming_the_lost_saves_and_leaves_no_torn_folder(tmp_path):
    """Room for one checkpoint and a half: the save at step 3 commits, 6 and 9 hit ENOSPC."""
    cfg = load_config(overrides=SMALL)
    ckpt_bytes = 12 * count_params(cfg.model, cfg.data.vocab_size, cfg.moe)  # fp32 master + two moments
    disk = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mounted = _tmpfs(disk, (int(1.5 * ckpt_bytes) // 4096 + 4) * 4096)
    env = {} if mounted else {"TIERZERO_FAULT_SAVE_ENOSPC": "0:6,1:6,0:9,1:9"}  # no mount allowed: the same story
    try:
        ckpt = (disk if mounted else tmp_path) / "ck"
        r = _run([f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt}"], tmp_path, **env)
        assert r.returncode == Exit.CHECKPOINT_LOST, r.stdout[-3000:]
        last = _last_line(r)
        assert "step(s) 6, 9 failed" in last and "No space left on device" in last, last
        assert f"{ckpt}/step-00000003 (step 3)" in last and "resume from step 3" in last, last
        assert "done:" not in r.stdout and "trained: 9 steps" in r.stdout
        assert _step_folders(ckpt) == {3: True}  # the failed saves' folders are gone, files and all
        assert CheckpointStore(str(ckpt)).verify(str(ckpt / "step-00000003"))[1] == []
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)


def test_failed_saves_are_removed_named_and_a_rerun_resumes_where_the_message_says(tmp_path):
    """Injected: rank 1 fails step 6 (rank 0 learns it at the commit), rank 0 fails step 9 itself.
    Then the rerun the message asks for resumes from step 3; its own step-6 save fails again, its
    last one commits: exit 0, the failed save still named, its folder gone."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    r = _run([f"run.dir={run_dir}"], tmp_path, TIERZERO_FAULT_SAVE_ENOSPC="1:6,0:9")
    assert r.returncode == Exit.CHECKPOINT_LOST, r.stdout[-3000:]
    last = _last_line(r)
    assert "step(s) 6, 9 failed" in last and f"{ckpt}/step-00000003 (step 3)" in last, last
    assert "rank 1 failed" in last, last  # the first failure, as rank 0's commit saw it
    assert _step_folders(ckpt) == {3: True}
    assert len([e for e in _events(run_dir, "error") if "checkpoint step" in e["detail"]]) >= 2

    r = _run([f"run.dir={run_dir}"], tmp_path, TIERZERO_FAULT_SAVE_ENOSPC="1:6")
    assert r.returncode == 0, r.stdout[-3000:]
    assert any("step 3" in e["detail"] for e in _events(run_dir, "resume")), _events(run_dir, "resume")
    warning = next(line for line in r.stdout.splitlines() if "failed (" in line)  # above the supervisor's last word
    assert "step(s) 6 failed" in warning and f"{ckpt}/step-00000009 (step 9)" in warning, warning
    assert "exit" not in warning and "done: 6 steps" in r.stdout
    assert _step_folders(ckpt) == {3: True, 9: True}
