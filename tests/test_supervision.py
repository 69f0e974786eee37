"""Supervision: a killed rank restarts the group from the newest committed checkpoint and the
run's lineage has every step with the uninterrupted run's losses; the non-finite guard skips,
rolls back or stops. Real processes through the CLI; faults injected with SIGKILL and with
TIERZERO_FAULT_NAN_STEPS (launcher/faults.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess

SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1",
         "launcher.nproc=2"]


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _run(args, cwd, expect=0, **env):
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, *args], cwd=cwd, capture_output=True,
                       text=True, env=_env(**env), timeout=300)
    assert r.returncode == expect, f"{args} -> {r.returncode}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r


def _table(run_dir: Path, name: str) -> list:
    return ds.dataset(run_dir / "telemetry" / name, format="parquet", partitioning="hive").to_table().to_pylist()


def _lineage(run_dir: Path) -> dict:
    """step -> loss of rank 0, the latest attempt and the latest row winning (a replay after a
    restart or rollback is what the final model saw)."""
    rows = sorted((r for r in _table(run_dir, "steps") if r["rank"] == 0), key=lambda r: (r["attempt"], r["time"]))
    return {r["step"]: r["loss"] for r in rows}


def _events(run_dir: Path, kind: str) -> list:
    return sorted((r for r in _table(run_dir, "events") if r["kind"] == kind), key=lambda r: r["time"])


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The uninterrupted 30-step run the faulty ones must reproduce."""
    base = tmp_path_factory.mktemp("clean")
    _run(["train.steps=30", f"run.dir={base / 'run'}"], base)
    return _lineage(base / "run")


def test_a_killed_rank_restarts_from_the_newest_checkpoint(tmp_path, clean):
    run_dir = tmp_path / "run"
    sup = _start(["train.steps=30", "checkpoint.every_steps=5", "checkpoint.async_save=true", f"run.dir={run_dir}"],
                 tmp_path)
    out, err = _kill_rank_at(sup, run_dir, 1, 12)  # past the step-10 checkpoint, before the end
    assert sup.returncode == 0, err[-3000:]
    (error,) = [e for e in _events(run_dir, "error") if "rank 1 failed (killed by SIGKILL)" in e["detail"]]
    assert error["step"] >= 12
    (restart,) = _events(run_dir, "restart")
    assert "restart 1 of 3" in restart["detail"] and restart["attempt"] == 1
    resume = _events(run_dir, "resume")[0]
    assert resume["attempt"] == 1 and resume["step"] in (10, 15) and resume["step"] < error["step"]
    lineage = _lineage(run_dir)
    assert sorted(lineage) == list(range(1, 31)), "every step 1..30 must be in the final lineage"
    for step in range(1, 31):  # same layout, same reductions: bit for bit
        assert lineage[step] == clean[step], (step, lineage[step], clean[step])

    # the report: the restart, its cause, and what it cost
    from tierzero.telemetry.report import write_report

    text = write_report(run_dir)
    logged = max([r["step"] for r in _table(run_dir, "steps") if r["attempt"] == 0] + [error["step"]])
    assert "restarts: 1" in text and "killed by SIGKILL" in text
    assert f"resumed from step {resume['step']}; {logged - resume['step']} step(s) recomputed" in text
    assert " s lost" in text.split("restarts: 1", 1)[1]


def test_restarts_stop_at_max_restarts(tmp_path):
    run_dir = tmp_path / "run"
    r = _run(["train.steps=6", "train.on_nonfinite=stop", "launcher.max_restarts=2", f"run.dir={run_dir}"],
             tmp_path, expect=1, TIERZERO_FAULT_NAN_STEPS="3")
    assert "giving up: 2 restart(s)" in r.stderr
    assert len(_events(run_dir, "restart")) == 2
    assert {e["attempt"] for e in _events(run_dir, "nonfinite")} == {0, 1, 2}


def test_nonfinite_skip_keeps_training(tmp_path):
    run_dir = tmp_path / "run"
    _run(["train.steps=8", f"run.dir={run_dir}"], tmp_path, TIERZERO_FAULT_NAN_STEPS="5")
    (event,) = [e for e in _events(run_dir, "nonfinite") if e["rank"] == 0]
    assert event["step"] == 5 and "skip" in event["detail"]
    rows = {r["step"]: r for r in _table(run_dir, "steps") if r["rank"] == 0}
    assert rows[5]["grad_norm"] != rows[5]["grad_norm"]  # NaN recorded for the skipped step
    assert all(rows[s]["loss"] == rows[s]["loss"] and rows[s]["grad_norm"] == rows[s]["grad_norm"]
               for s in (6, 7, 8)), "the skipped NaN must not reach the weights"


def test_nonfinite_rollback_replays_from_the_checkpoint(tmp_path, clean):
    run_dir = tmp_path / "run"
    _run(["train.steps=30", "checkpoint.every_steps=3", "train.on_nonfinite=rollback", f"run.dir={run_dir}"],
         tmp_path, TIERZERO_FAULT_NAN_STEPS="5")
    (rollback,) = [e for e in _events(run_dir, "rollback") if e["rank"] == 0]
    assert "step-00000003" in rollback["detail"]
    lineage = _lineage(run_dir)
    for step in range(1, 31):  # the replay is the clean run's, bit for bit
        assert lineage[step] == clean[step], (step, lineage[step], clean[step])


def test_nonfinite_stop_and_too_many_in_a_row(tmp_path):
    r = _run(["train.steps=8", "train.on_nonfinite=stop", "launcher.max_restarts=0", f"run.dir={tmp_path / 'a'}"],
             tmp_path, expect=1, TIERZERO_FAULT_NAN_STEPS="4")
    assert "non-finite gradient norm (nan) at step 4" in r.stderr and "train.on_nonfinite=stop" in r.stderr
    r = _run(["train.steps=8", "train.max_nonfinite=1", "launcher.max_restarts=0", f"run.dir={tmp_path / 'b'}"],
             tmp_path, expect=1, TIERZERO_FAULT_NAN_STEPS="3,4")
    assert "at step 4, 2 step(s) in a row" in r.stderr


def test_find_hang_names_the_rank_furthest_behind():
    from tierzero.launcher.rundir import Beat, find_hang

    def beats(**by_rank):
        return {int(r[1:]): Beat(int(r[1:]), step, phase, t) for r, (step, phase, t) in by_rank.items()}

    now = 1000.0
    moving = beats(r0=(7, "micro 1", now - 1), r1=(7, "step", now - 50))
    assert find_hang(moving, 30, now) is None  # rank 0 beat a second ago: no hang yet
    stuck = beats(r0=(7, "micro 1", now - 40), r1=(7, "step", now - 50), r2=(7, "micro 0", now - 41))
    hang = find_hang(stuck, 30, now)
    assert [b.rank for b in hang.stalled] == [1] and [b.rank for b in hang.waiting] == [0, 2]
    assert hang.names(1) and not hang.names(0)
    text = hang.describe()
    assert "stalled: rank 1 at step 7 (step), silent for 50 s" in text and "waiting for them: rank 0" in text
    same = beats(r0=(3, "optimizer", now - 40), r1=(3, "optimizer", now - 45))
    assert "stalled: rank 1 at step 3 (optimizer)" in find_hang(same, 30, now).describe()


def test_a_rank_that_sleeps_forever_is_detected_in_time(tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = _run(["train.steps=10", "launcher.hang_timeout_s=5", "launcher.max_restarts=0", f"run.dir={run_dir}"],
             tmp_path, expect=1, TIERZERO_FAULT_HANG="1:4")
    elapsed = time.monotonic() - t0
    assert "stalled: rank 1 at step 4 (step)" in r.stderr and "waiting for them: rank 0 at step 4" in r.stderr
    (hang,) = _events(run_dir, "hang")
    beat = json.loads((run_dir / ".heartbeat" / "rank-1.json").read_text())
    # detected within hang_timeout_s + 10 s of the rank's last heartbeat
    assert hang["time"].timestamp() - beat["time"] <= 5 + 10
    assert elapsed < 120


# ---- signals ------------------------------------------------------------------------------

def _start(args, cwd, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))


def _beat(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads((run_dir / ".heartbeat" / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return {}


def _wait_for_step(proc, run_dir: Path, rank: int, step: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"ended before rank {rank} reached step {step}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"rank {rank} never reached step {step}"
        beat = _beat(run_dir, rank)
        if beat.get("step", 0) >= step:
            return beat
        time.sleep(0.05)


def _kill_rank_at(sup: subprocess.Popen, run_dir: Path, rank: int, step: int):
    """kill -9 one rank once its heartbeat reaches `step`, then let the supervisor finish
    (restart and all); the supervisor is killed if the test fails on the way. -> (stdout, stderr)"""
    try:
        beat = _wait_for_step(sup, run_dir, rank, step)
        os.kill(beat["pid"], signal.SIGKILL)
        return sup.communicate(timeout=240)
    finally:
        if sup.poll() is None:
            sup.kill()


def _committed(run_dir: Path) -> list:
    from tierzero.checkpoint.store import CheckpointStore

    return [s for s, ok in CheckpointStore(str(run_dir / "checkpoints")).steps() if ok]


def test_sigterm_finishes_the_step_checkpoints_and_exits_75_then_resumes(tmp_path, clean):
    from tierzero.launcher.exitcodes import Exit

    run_dir = tmp_path / "run"
    # every_steps=0: the only checkpoint there can be is the one the signal asks for
    args = ["train.steps=30", "checkpoint.every_steps=0", f"run.dir={run_dir}"]
    sup = _start(args, tmp_path)
    try:
        _wait_for_step(sup, run_dir, 1, 8)
        sup.send_signal(signal.SIGTERM)
        out, err = sup.communicate(timeout=120)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == Exit.REQUEUE, err[-3000:]
    (stopped,) = _committed(run_dir)
    assert 8 <= stopped < 30
    assert f"all 2 ranks stopped after step {stopped} with a committed checkpoint; exit 75" in err
    ranks_said = [e for e in _events(run_dir, "signal") if e["rank"] >= 0]
    assert sorted(e["rank"] for e in ranks_said) == [0, 1] and {e["step"] for e in ranks_said} == {stopped}
    assert max(r["step"] for r in _table(run_dir, "steps")) == stopped, "no step past the checkpoint"

    _run(args, tmp_path)  # the requeued run: resumes where the signal stopped it
    (resume, *_) = _events(run_dir, "resume")
    assert resume["step"] == stopped and resume["attempt"] == 1
    lineage = _lineage(run_dir)
    assert sorted(lineage) == list(range(1, 31))
    for step in range(1, 31):
        assert lineage[step] == clean[step], (step, lineage[step], clean[step])
    from tierzero.telemetry.report import write_report

    text = write_report(run_dir)
    assert "stopped by a signal: 1" in text
    assert f"attempt 0: SIGTERM: stopped after step {stopped}; checkpoint of step {stopped} committed" in text
    assert f"attempt 1 resumed from step {stopped}" in text


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_committed_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # rank 1 sleeps at step 7, so rank 0 waits in a collective: the first Ctrl-C cannot finish the step
    sup = _start(["train.steps=30", "checkpoint.every_steps=5", "launcher.hang_timeout_s=0", f"run.dir={run_dir}"],
                 tmp_path, TIERZERO_FAULT_HANG="1:7")
    try:
        _wait_for_step(sup, run_dir, 1, 7)
        time.sleep(1.0)
        sup.send_signal(signal.SIGINT)
        time.sleep(3.0)
        assert sup.poll() is None, "one Ctrl-C must wait for the step to finish"
        t0 = time.monotonic()
        sup.send_signal(signal.SIGINT)
        out, err = sup.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 128 + signal.SIGINT, err[-3000:]
    assert elapsed < 5, f"the second Ctrl-C took {elapsed:.1f} s"
    assert "second stop signal (SIGINT): exiting at once" in err
    assert _committed(run_dir) == [5]
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "ckpt", "verify", str(run_dir / "checkpoints" / "step-00000005")],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_supervisor_killed_with_sigkill_leaves_no_rank_behind(tmp_path):
    import psutil

    run_dir = tmp_path / "run"
    sup = _start(["train.steps=2000", "checkpoint.every_steps=0", f"run.dir={run_dir}"], tmp_path)
    try:
        _wait_for_step(sup, run_dir, 1, 6)
        pids = [_beat(run_dir, r)["pid"] for r in (0, 1)]
        sup.kill()  # SIGKILL: no handler runs in the supervisor
        sup.communicate(timeout=30)
        deadline = time.monotonic() + 90
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            assert time.monotonic() < deadline, "ranks still running after their supervisor died"
            time.sleep(0.2)
    finally:
        for p in [_beat(run_dir, r).get("pid") for r in (0, 1)]:
            if p and psutil.pid_exists(p):
                psutil.Process(p).kill()
    # each rank took its parent's death as a stop request: finished the step, committed it, stopped
    (stopped,) = _committed(run_dir)
    signals = [e for e in _events(run_dir, "signal") if e["rank"] >= 0]
    assert {e["step"] for e in signals} == {stopped} and "the local supervisor died" in signals[0]["detail"]


def _scheduled_ranks(args, cwd, nproc=2, **env):
    """Start the ranks the way torchrun or srun would (no local supervisor)."""
    from tierzero.launcher.world import free_port

    port = free_port()
    procs = []
    for rank in range(nproc):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, *args], cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env=_env(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)))
    return procs


def _finish(procs, timeout_s=120):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout_s))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outs


def test_under_a_scheduler_the_requeue_signal_to_one_rank_stops_every_rank_after_a_checkpoint(tmp_path):
    from tierzero.launcher.exitcodes import Exit

    run_dir = tmp_path / "run"
    procs = _scheduled_ranks(["train.steps=200", f"run.dir={run_dir}"], tmp_path)
    _wait_for_step(procs[0], run_dir, 0, 6)
    procs[0].send_signal(signal.SIGUSR2)  # rank 1 never sees a signal: it learns from the step's all-reduce
    codes, outs = _finish(procs)
    assert codes == [Exit.REQUEUE, Exit.REQUEUE], outs
    (stopped,) = _committed(run_dir)
    assert f"SIGUSR2: stopped after step {stopped}; checkpoint of step {stopped} committed" in outs[0][1]
    assert {r["step"] for r in _table(run_dir, "steps") if r["step"] == stopped} == {stopped}
    assert max(r["step"] for r in _table(run_dir, "steps")) == stopped


def test_under_a_scheduler_a_sleeping_rank_is_caught_by_the_ranks_watchdog(tmp_path):
    run_dir = tmp_path / "run"
    procs = _scheduled_ranks(["train.steps=30", "launcher.hang_timeout_s=5", f"run.dir={run_dir}"], tmp_path,
                             TIERZERO_FAULT_HANG="1:4")
    codes, outs = _finish(procs)
    assert codes == [1, 1], outs
    said = outs[0][1] + outs[1][1]  # whichever watchdog fires first names rank 1; the other rank may see the
    assert "stalled: rank 1 at step 4 (step)" in said, said[-3000:]  # connection close first
    beat = _beat(run_dir, 1)
    hangs = _events(run_dir, "hang")
    assert hangs and all(h["time"].timestamp() - beat["time"] <= 5 + 10 for h in hangs)


# ---- chaos ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_chaos_kill_9_a_random_rank_at_a_random_step(tmp_path, clean, seed):
    import random

    rng = random.Random(seed)
    victim_rank, at_step = rng.randrange(2), rng.randint(2, 28)
    run_dir = tmp_path / "run"
    sup = _start(["train.steps=30", "checkpoint.every_steps=4", "checkpoint.async_save=true",
                  f"run.dir={run_dir}"], tmp_path)
    out, err = _kill_rank_at(sup, run_dir, victim_rank, at_step)
    assert sup.returncode == 0, err[-3000:]
    assert [e for e in _events(run_dir, "error") if f"rank {victim_rank} failed (killed by SIGKILL)" in e["detail"]]
    lineage = _lineage(run_dir)
    assert sorted(lineage) == list(range(1, 31)), f"seed {seed}: steps missing from the final lineage"
    for step in range(1, 31):
        assert lineage[step] == clean[step], (seed, step, lineage[step], clean[step])


def test_kill_9_during_an_async_checkpoint_write_never_uses_the_torn_checkpoint(tmp_path, clean):
    from tierzero.checkpoint.manifest import step_dirname
    from tierzero.checkpoint.store import shard_name

    run_dir = tmp_path / "run"
    sup = _start(["train.steps=30", "checkpoint.every_steps=4", "checkpoint.async_save=true",
                  f"run.dir={run_dir}"], tmp_path, TIERZERO_FAULT_SLOW_SAVE="8:4")
    try:
        shard = run_dir / "checkpoints" / step_dirname(8) / shard_name(1)
        deadline = time.monotonic() + 120
        while not shard.exists():  # rank 1 wrote its data of step 8 and pauses before reporting it
            assert sup.poll() is None and time.monotonic() < deadline, "step 8 was never written"
            time.sleep(0.02)
        os.kill(_beat(run_dir, 1)["pid"], signal.SIGKILL)
        out, err = sup.communicate(timeout=240)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 0, err[-3000:]
    resume = [e for e in _events(run_dir, "resume") if e["rank"] == 0]
    assert resume[0]["step"] == 4, "the restart must take step 4, the newest committed, not the torn step 8"
    lineage = _lineage(run_dir)
    assert sorted(lineage) == list(range(1, 31))
    for step in range(1, 31):
        assert lineage[step] == clean[step], (step, lineage[step], clean[step])


def test_a_stop_signal_after_the_last_step_does_not_fail_the_rank():
    """A scheduler's signal racing the end of a run (Slurm's pre-timeout USR2 as the ranks shut
    down) must not end a finished rank with 140: the sbatch script would requeue a finished job.
    After ignore_from_now a barrage of the signal through interpreter shutdown leaves exit 0;
    without it the second signal is 'exit at once' (and at shutdown Python restores SIG_DFL)."""
    code = ("import signal, subprocess, sys, time\n"
            "from tierzero.launcher.signals import StopSignals\n"
            "stops = StopSignals([signal.SIGUSR2], quiet=True).install()\n"
            "if sys.argv[1] == 'ignore':\n"
            "    stops.ignore_from_now()\n"
            # bounded: once this process is a zombie, kill still succeeds
            "subprocess.Popen(['sh', '-c', 'i=0; while [ $i -lt 20000 ] && kill -USR2 $0 2>/dev/null; do i=$((i+1)); done',\n"
            "                  str(__import__('os').getpid())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "time.sleep(0.3)\n")
    done = subprocess.run([sys.executable, "-c", code, "ignore"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = subprocess.run([sys.executable, "-c", code, "handle"], capture_output=True, text=True, timeout=60)
    assert raw.returncode == 128 + signal.SIGUSR2, (raw.returncode, raw.stderr[-500:])  # the test can fail
