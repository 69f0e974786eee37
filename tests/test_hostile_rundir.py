"""The run folder is tierzero's to write only when it can prove the folder is this run's: a
careless or hostile user never loses saved work to another run, another model, a folder that
was there before, or a second run started at once; and local ranks meet without a network
listener another user of the machine could reach (issue 15)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from types import SimpleNamespace
import sys
import time
from pathlib import Path

import pytest

from tierzero.launcher.cli import main
from tierzero.launcher.config import load_config
from tierzero.launcher.rundir import IDENTITY, RunDirError, RunPaths, claim_run_dir, write_atomic

ROOT = Path(__file__).resolve().parent.parent
DENSE = ["dense_tiny_cpu", "launcher.nproc=2", "train.global_batch_size=8", "train.micro_batch_size=2",
         "train.steps=4", "telemetry.peak_tflops=1.0", "model.d_model=32", "model.n_heads=2", "data.seq_len=16"]


@pytest.fixture
def no_ranks(monkeypatch):
    import tierzero.launcher.supervisor as supervisor

    def spawn(*args, **kwargs):
        raise AssertionError(f"a rank was spawned: {args[0] if args else kwargs}")

    # the supervisor's view of subprocess only: the test itself may still start processes
    monkeypatch.setattr(supervisor, "subprocess", SimpleNamespace(Popen=spawn, TimeoutExpired=TimeoutError))


def _run(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["run", *args])
    return code, capsys.readouterr().err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_the_default_recipes_no_longer_share_a_run_folder():
    """`tierzero run` then `tierzero run dense_tiny_cpu` (the README's suggestion) wrote the
    second run's checkpoints over the first's: both were run.name=default."""
    moe, dense = load_config([], []), load_config(["dense_tiny_cpu"], [])
    assert RunPaths.of(moe).run_dir != RunPaths.of(dense).run_dir


def test_another_model_in_a_run_folder_is_refused(tmp_path, monkeypatch, capsys, no_ranks):
    run_dir = tmp_path / "runs" / "shared"
    first = load_config(["moe_tiny_cpu"], [f"run.dir={run_dir}", "run.name=shared"])
    claim_run_dir(first, RunPaths.of(first), program="run").release()  # what the first run left
    before = _snapshot(run_dir)
    code, err = _run([*DENSE, f"run.dir={run_dir}", "run.name=shared"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert f"run.dir={run_dir} holds run 'shared' of another model" in err
    assert "model.d_model 64 there, 32 here" in err and "data.seq_len 64 there, 16 here" in err  # what differs
    assert "run.name=shared-2" in err  # the fix: its own name
    assert _snapshot(run_dir) == before


def test_a_folder_tierzero_did_not_create_is_left_alone(tmp_path, monkeypatch, capsys, no_ranks):
    mine = tmp_path / "my-results"
    (mine / "checkpoints" / "step-00000001").mkdir(parents=True)
    (mine / "checkpoints" / "step-00000001" / "weights.bin").write_bytes(b"precious")
    (mine / "config.yaml").write_text("learning_rate: 0.1\n")
    before = _snapshot(mine)
    code, err = _run([*DENSE, f"run.dir={mine}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"run.dir={mine} is an existing folder that is not a tierzero run folder" in err, err
    assert _snapshot(mine) == before


@pytest.mark.parametrize("what", ["a file", "another user's", "a name too long"])
def test_a_run_dir_that_cannot_be_ours_is_exit_2(what, tmp_path, monkeypatch, capsys, no_ranks):
    target = tmp_path / "r"
    if what == "a file":
        target.write_text("not a folder")
        words = "is not a folder"
    elif what == "another user's":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        target.mkdir()
        os.chown(target, 54321, 54321)
        words = "belongs to another user"
    else:
        target = tmp_path / ("x" * 300)
        words = "File name too long"
    before = _snapshot(tmp_path)
    code, err = _run([*DENSE, f"run.dir={target}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"run.dir={target}" in err and words in err, err
    assert "Traceback" not in err and _snapshot(tmp_path) == before


def test_a_run_name_too_long_for_a_folder_is_refused_before_runs_is_made(tmp_path, monkeypatch, capsys, no_ranks):
    """Issue 24, item 6b: exit 2 with "File name too long", but an empty runs/ was left behind."""
    code, err = _run([*DENSE, "run.name=" + "a" * 300], tmp_path, monkeypatch, capsys)
    assert code == 2 and "run.name='aaaa" in err and "File name too long" in err and "shorter name" in err, err
    assert "a" * 100 not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["here", "in a new folder"])
def test_a_run_dir_name_too_long_is_refused_before_any_folder_is_made(where, tmp_path, monkeypatch, capsys,
                                                                        no_ranks):
    target = (tmp_path if where == "here" else tmp_path / "new" / "deeper") / ("x" * 300)
    code, err = _run([*DENSE, f"run.dir={target}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"run.dir={target}" in err and "File name too long" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_claim_that_fails_removes_the_folders_it_made_and_only_those(tmp_path):
    """claim_run_dir on its own (the config rule above catches long names first): a folder it
    cannot create leaves none of the parents it made; a parent that was there stays, with its files."""
    cfg = load_config(["dense_tiny_cpu"], [])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    run_dir = mine / "new" / "deeper" / ("x" * 300)
    paths = RunPaths(run_dir=run_dir, telemetry=str(run_dir / "telemetry"), checkpoints=str(run_dir / "checkpoints"))
    with pytest.raises(RunDirError, match="File name too long"):
        claim_run_dir(cfg, paths, program="run")
    assert _snapshot(tmp_path) == {"mine": None, "mine/notes.txt": b"kept"}


def test_a_second_run_into_a_folder_in_use_exits_2_naming_the_holder(tmp_path, monkeypatch, capsys, no_ranks):
    run_dir = tmp_path / "runs" / "busy"
    code = ("import sys, time\n"
            "from tierzero.launcher.config import load_config\n"
            "from tierzero.launcher.rundir import RunPaths, claim_run_dir\n"
            f"cfg = load_config(['dense_tiny_cpu'], {[*DENSE[1:], f'run.dir={run_dir}', 'run.name=busy']!r})\n"
            "claim = claim_run_dir(cfg, RunPaths.of(cfg), program='run')\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        code, err = _run([*DENSE, f"run.dir={run_dir}", "run.name=busy"], tmp_path, monkeypatch, capsys)
        assert code == 2 and time.monotonic() - t0 < 30, err
        assert f"run.dir={run_dir} is in use by another tierzero process (tierzero run, pid {holder.pid} on host " \
               f"{socket.gethostname()}" in err, err
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the lock with the holder: the folder is usable again
    cfg = load_config(["dense_tiny_cpu"], [*DENSE[1:], f"run.dir={run_dir}", "run.name=busy"])
    claim_run_dir(cfg, RunPaths.of(cfg), program="run").release()


def test_a_missing_resume_path_is_found_before_anything_is_written(tmp_path, monkeypatch, capsys, no_ranks):
    code, err = _run([*DENSE, f"checkpoint.resume={tmp_path / 'nowhere' / 'step-00000010'}"], tmp_path, monkeypatch,
                     capsys)
    assert code == 2 and "checkpoint.resume=" in err and "is not a folder" in err, err
    assert list(tmp_path.iterdir()) == []


def test_temp_files_do_not_follow_a_planted_symlink(tmp_path):
    """The old temp name was predictable (.<name>.<pid>.tmp): a symlink planted there redirected the write."""
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "run" / "config.yaml"
    target.parent.mkdir()
    (target.parent / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    write_atomic(target, "run: {}\n")
    assert victim.read_text() == "untouched" and target.read_text() == "run: {}\n"


@pytest.mark.multiprocess
def test_a_local_run_listens_on_loopback_only_and_keeps_secrets_out_of_checkpoints(tmp_path):
    """One real run: its ranks meet in a file of the run folder (no TCP store on every
    interface) and open sockets on loopback only; slurm.setup (shell lines that may export
    tokens) stays out of the checkpoint manifests."""
    import psutil

    run_dir = tmp_path / "run"
    env = dict(os.environ, TIERZERO_FAULT_SLOW_STEP_S="0.5")
    sup = subprocess.Popen([sys.executable, "-m", "tierzero.launcher.cli", "run", *DENSE, "train.steps=12",
                            "checkpoint.every_steps=4", f"run.dir={run_dir}",
                            "slurm.setup=[export HF_TOKEN=hunter2]"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening = []
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "telemetry").rglob("steps/**/*.parquet")):
            assert sup.poll() is None and time.monotonic() < deadline, sup.communicate()[1][-3000:]
            for child in psutil.Process(sup.pid).children(recursive=True):
                try:
                    listening += [c.laddr for c in child.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
                except psutil.NoSuchProcess:  # a rank that ended between the listing and the look
                    continue
            time.sleep(0.2)
        out, err = sup.communicate(timeout=180)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 0, err[-3000:]
    assert listening, "the ranks' sockets were not seen"
    assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    identity = json.loads((run_dir / IDENTITY).read_text())
    assert identity["run_name"] == "dense-tiny-cpu" and identity["fingerprint"]["model"]["d_model"] == 32
    manifests = list((run_dir / "checkpoints").rglob("manifest.json"))
    assert manifests and not any("hunter2" in m.read_text() for m in manifests)
    assert "hunter2" in (run_dir / "config.yaml").read_text()  # the user's own run folder keeps it
    assert not list(run_dir.glob(".rendezvous-*")), "the rendezvous file of the attempt is removed"


@pytest.mark.multiprocess
def test_a_user_error_the_ranks_find_leaves_no_run_folder(tmp_path):
    """checkpoint.init_from of another model is found only when the ranks load it: they exit 2,
    and the run folder this launch created is gone again (it had nothing else in it)."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    bad = tmp_path / "other-model.safetensors"
    safetensors_numpy.save_file({"embed.weight": np.zeros((3, 3), dtype=np.float32)}, str(bad))
    run_dir = tmp_path / "runs" / "r"
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", *DENSE, f"run.dir={run_dir}",
                        f"checkpoint.init_from={bad}"], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "checkpoint.init_from" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-model.safetensors"]
