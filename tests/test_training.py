"""Multi-process training equals a single process with the same global batch.

The multi-rank side runs the real launch paths (tierzero's own supervisor, torchrun,
mpirun with mpich) as subprocesses; the reference is the Trainer (recipes/trainer.py) in this
process with world size 1 and all accumulation local. Losses are read back from the
Parquet telemetry the ranks wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from reference import single_process_run

from tierzero.launcher.config import load_config


ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.multiprocess

# accumulation differs across layouts: 1 rank x 8 micro-batches, 4 ranks x 2, 2 ranks x 4
SMALL = ["train.steps=8", "train.global_batch_size=16", "train.micro_batch_size=2",
         "train.warmup_steps=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=32",
         "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1"]


def reference_losses(overrides):
    return single_process_run(overrides).losses


def telemetry_steps(run_dir: Path):
    table = ds.dataset(run_dir / "telemetry" / "steps", format="parquet", partitioning="hive").to_table()
    return table.to_pylist()


def losses_by_rank(rows):
    out = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        out.setdefault(row["rank"], []).append(row["loss"])
    return out


def run_cli(cmd, tmp_path, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def assert_close(got, want, rel=1e-5):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want), start=1):
        assert abs(g - w) <= rel * abs(w), f"step {step}: {g!r} vs reference {w!r}"


def test_four_local_ranks_on_emulated_2x2_match_single_process(tmp_path):
    run_dir = tmp_path / "runs" / "eq4"
    args = [*SMALL, "launcher.nproc=4", "topology.emulate=[2,2]", "run.name=eq4"]
    r = run_cli([sys.executable, "-m", "tierzero.launcher.cli", "run", *args], tmp_path)
    assert "done: 8 steps" in r.stdout and "entropy floor" in r.stdout
    by_rank = losses_by_rank(telemetry_steps(run_dir))
    assert sorted(by_rank) == [0, 1, 2, 3]
    want = reference_losses(args)
    for rank, losses in by_rank.items():
        assert_close(losses, want)
    assert (run_dir / "config.yaml").is_file()
    assert load_config([str(run_dir / "config.yaml")], []).topology.emulate == [2, 2]
    # the losses must move: a run that did not train would also "match" a broken reference
    assert want[-1] < want[0] - 0.3


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_ranks_match_single_process(tmp_path):
    args = [*SMALL, "run.name=tr", "launcher.nproc=2"]
    run_cli(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "tierzero.launcher.cli", "run", *args], tmp_path)
    by_rank = losses_by_rank(telemetry_steps(tmp_path / "runs" / "tr"))
    assert sorted(by_rank) == [0, 1]
    assert_close(by_rank[0], reference_losses(args))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (pip install mpich mpi4py)")
def test_mpirun_two_ranks_match_single_process(tmp_path):
    pytest.importorskip("mpi4py", reason="mpi4py is needed for the mpirun rendezvous")
    args = [*SMALL, "run.name=mpi", "launcher.nproc=2"]
    env_clean = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    cmd = ["mpirun", "-n", "2", sys.executable, "-m", "tierzero.launcher.cli", "run", *args]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                       env=dict(env_clean, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mpi launch: 2 ranks" in r.stderr
    by_rank = losses_by_rank(telemetry_steps(tmp_path / "runs" / "mpi"))
    assert sorted(by_rank) == [0, 1]
    assert_close(by_rank[1], reference_losses(args))


def test_a_killed_rank_stops_the_group(tmp_path):
    """SIGKILL one rank mid-run: the supervisor stops the other and exits 1 naming it."""
    import signal
    import time

    import psutil

    args = [*SMALL, "run.name=kill", "launcher.nproc=2", "train.steps=100000", "launcher.max_restarts=0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    sup = subprocess.Popen([sys.executable, "-m", "tierzero.launcher.cli", "run", *args], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        steps_dir = tmp_path / "runs" / "kill" / "telemetry" / "steps"
        deadline = time.monotonic() + 120
        while not list(steps_dir.rglob("*.parquet")):
            assert sup.poll() is None and time.monotonic() < deadline, "ranks never started training"
            time.sleep(0.2)
        children = psutil.Process(sup.pid).children()
        assert len(children) == 2
        victim = sorted(children, key=lambda p: p.environ().get("TIERZERO_RANK"))[1]
        victim.send_signal(signal.SIGKILL)
        out, err = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 1
    assert "rank 1 failed (killed by SIGKILL)" in err
    assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in children)
    events = ds.dataset(tmp_path / "runs" / "kill" / "telemetry" / "events", format="parquet",
                        partitioning="hive").to_table().to_pylist()
    assert any(e["kind"] == "error" and "rank 1" in e["detail"] and e["rank"] == -1 for e in events)
