"""Telemetry under hostile storage: a full disk, a read-only or unwritable folder, a folder
that is a file, an unreachable URL, and someone else's files planted where telemetry writes.

Telemetry must never stop training: flush() and close() do not raise for storage errors,
the failure is one warning per process (and a `warning` event while events can still be
written), unwritten rows are kept up to a bound and then counted as dropped. Temporary
files are created with O_EXCL under random names, so a planted symlink is never followed
and a planted part file is never replaced.

Real filesystems throughout: a tiny tmpfs (root only, skipped otherwise), a read-only
mount or a chmod'ed folder, a regular file where a folder should be, a closed TCP port.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.report import load_table
from tierzero.telemetry.schema import TABLES, table_path
from tierzero.telemetry.sink import TableWriter, Telemetry

PARTITION = {"run": "r1", "attempt": 0, "rank": 0}
FAILED = "cannot write table"


def fast_cfg(**overrides) -> TelemetryConfig:
    # a flush period far beyond the test: every write happens when the test flushes
    return TelemetryConfig(**{"flush_every_s": 300.0, "peak_tflops": 1.0, **overrides})


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("tierzero.telemetry") and text in r.getMessage()]


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A tmpfs mounted at `path` for the block (root only: skips otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the filesystem is full; returns the filler."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def unwritable(folder: Path):
    """`folder` made unwritable for this process: a read-only tmpfs as root, else chmod 0555."""
    if os.geteuid() == 0:
        with tmpfs(folder, "ro"):
            yield folder
    else:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


# ---- finding 1: a storage failure never stops training --------------------------------

def test_full_disk_flush_never_raises_keeps_rows_and_warns_once(tmp_path, caplog):
    with tmpfs(tmp_path / "disk") as disk:
        tel = Telemetry(fast_cfg(), str(disk / "tel"), "r1", 0, 0, "node-a")
        tel.event("start")
        for step in (1, 2, 3):
            tel.record("steps", step=step, loss=1.0, tokens=64, step_time_s=0.1)
        filler = fill(disk)
        tel.flush()  # what the training loop does before every checkpoint: must not raise
        tel.record("steps", step=4, loss=1.0, tokens=64, step_time_s=0.1)
        tel.event("error", "boom", step=4)  # an urgent event: flushed at once, fails again, does not raise
        tel.flush()
        (warning,) = _warnings(caplog, FAILED)  # once, although steps and events failed, three times
        assert "No space left on device" in warning and str(disk / "tel") in warning
        assert not [p for p in disk.rglob("*") if p.is_file() and p != filler]  # no torn or temp file left

        filler.unlink()  # the disk has room again: every kept row is written, in order
        tel.flush()
        tel.close()
        steps = load_table(str(disk / "tel"), "steps").to_pylist()
        assert [row["step"] for row in steps] == [1, 2, 3, 4]
        events = load_table(str(disk / "tel"), "events").to_pylist()
        assert [row["kind"] for row in events] == ["start", "warning", "error"]
        assert events[1]["detail"].startswith(f"telemetry: cannot write table steps to {disk / 'tel'}/steps/")
        assert "No space left on device" in events[1]["detail"]
        assert not _warnings(caplog, "never written")  # nothing was lost


def test_unwritable_table_folder_is_a_warning_event_and_a_count_at_close(tmp_path, caplog):
    root = tmp_path / "tel"
    with unwritable(root / "steps"):
        tel = Telemetry(fast_cfg(), str(root), "r1", 0, 0, "node-a")
        tel.event("start")
        tel.record("steps", step=1, loss=1.0, tokens=64, step_time_s=0.1)
        tel.record("steps", step=2, loss=1.0, tokens=64, step_time_s=0.1)
        tel.flush()
        tel.flush()
        tel.close()
        (warning,) = _warnings(caplog, FAILED)
        assert f"{FAILED} steps to {root}/steps/run=r1/attempt=0/rank=0" in warning
        (lost,) = _warnings(caplog, "never written")
        assert lost.startswith(f"telemetry: rows never written to {root}: 2 steps (")
    events = load_table(str(root), "events").to_pylist()  # events could still be written: they say why
    assert [row["kind"] for row in events] == ["start", "warning"]
    assert events[1]["detail"].startswith(f"telemetry: cannot write table steps to {root}/steps/run=r1/")
    assert events[1]["host"] == "node-a"


def test_rows_kept_while_storage_fails_are_bounded_and_the_drop_is_counted(tmp_path, caplog):
    blocker = tmp_path / "tel"
    blocker.write_text("a file where the telemetry folder should be")
    writer = TableWriter(str(blocker), "steps", TABLES["steps"], PARTITION, flush_every_s=300, max_pending_rows=5)
    for step in range(12):
        writer.append({"step": step, "loss": 1.0, "tokens": 64, "step_time_s": 0.1})
        if step % 4 == 3:
            assert writer.flush() is None  # fails, keeps at most 5 rows: the newest
    (warning,) = _warnings(caplog, FAILED)
    assert f"{FAILED} steps to {blocker}/steps/run=r1/attempt=0/rank=0" in warning and "at most 5" in warning
    assert writer.num_dropped == 7

    blocker.unlink()  # storage is back
    path = writer.flush()
    assert [row["step"] for row in pq.read_table(path).to_pylist()] == [7, 8, 9, 10, 11]
    writer.close()
    (lost,) = _warnings(caplog, "never written")
    assert lost.startswith(f"telemetry: 7 steps row(s) were never written to {blocker}/steps/")


def test_unreachable_url_never_raises(tmp_path, caplog):
    url = f"ftp://127.0.0.1:{_closed_port()}/telemetry"
    tel = Telemetry(fast_cfg(), url, "r1", 0, 0, "node-a")
    tel.event("start")
    tel.record("steps", step=1, loss=1.0, tokens=64, step_time_s=0.1)
    tel.event("signal", "SIGUSR2", step=1)  # urgent: tries at once
    tel.flush()
    tel.close()
    (warning,) = _warnings(caplog, FAILED)
    assert "ConnectionRefusedError" in warning and "ftp://127.0.0.1:" in warning
    (lost,) = _warnings(caplog, "never written")
    assert "1 steps" in lost and "ConnectionRefusedError" in lost


SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1",
         "launcher.nproc=2"]


@pytest.mark.multiprocess
def test_training_survives_a_full_telemetry_disk(tmp_path):
    """`tierzero run` (2 ranks, a checkpoint every 2 steps) with telemetry.dir on a full tmpfs:
    exit 0, every checkpoint committed, one warning per process, no traceback."""
    run_dir = tmp_path / "run"
    with tmpfs(tmp_path / "disk") as disk:
        fill(disk)
        r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", "dense_tiny_cpu", *SMALL,
                            "train.steps=6", "checkpoint.every_steps=2", f"run.dir={run_dir}",
                            f"telemetry.dir={disk / 'tel'}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*") if (p / "COMMITTED").exists())
    assert committed == ["step-00000002", "step-00000004", "step-00000006"]
    warnings = [line for line in r.stderr.splitlines() if FAILED in line]
    ranks = sorted(line.split("/rank=")[1].split()[0] for line in warnings)
    assert ranks == ["-1", "0", "1"], warnings  # once per process: the supervisor and each rank
    assert all("No space left on device" in line for line in warnings)


# ---- finding 2: temporary files nobody else can plant ----------------------------------

def test_a_planted_temp_symlink_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = Path(table_path(str(tmp_path / "tel"), "events", "r1", 0, 0))
    folder.mkdir(parents=True)
    (folder / ".part-00000.parquet.tmp").symlink_to(victim)  # HEAD's predictable temp name
    writer = TableWriter(str(tmp_path / "tel"), "events", TABLES["events"], PARTITION, flush_every_s=300)
    writer.append({"kind": "start", "detail": "", "host": "h"})
    path = Path(writer.flush())
    writer.close()
    assert victim.read_text() == "precious\n"
    assert path.name == "part-00000.parquet" and not path.is_symlink()
    assert pq.read_table(path).to_pylist()[0]["kind"] == "start"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # as readable as a plainly opened file
    assert sorted(p.name for p in folder.iterdir()) == [".part-00000.parquet.tmp", "part-00000.parquet"]


def test_a_part_file_planted_after_the_scan_is_not_replaced(tmp_path):
    writer = TableWriter(str(tmp_path / "tel"), "events", TABLES["events"], PARTITION, flush_every_s=300)
    writer.append({"kind": "start", "detail": "", "host": "h"})
    first = Path(writer.flush())
    planted = first.parent / "part-00001.parquet"  # another writer of this partition got there first
    planted.write_bytes(b"not ours")
    writer.append({"kind": "end", "detail": "", "host": "h"})
    second = Path(writer.flush())
    writer.close()
    assert planted.read_bytes() == b"not ours"
    assert second.name == "part-00002.parquet" and pq.read_table(second).to_pylist()[0]["kind"] == "end"
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp file left


# ---- a URL whose protocol nobody knows: a config error, before anything is written -------

def test_an_unknown_protocol_in_telemetry_dir_is_a_config_error(tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", "dense_tiny_cpu", *SMALL,
                        "train.steps=2", f"run.dir={run_dir}", "telemetry.dir=s4://bucket/telemetry"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "telemetry.dir='s4://bucket/telemetry' uses the protocol 's4', which tierzero does not support" in r.stderr
    assert "Traceback" not in r.stderr and not run_dir.exists()


# ---- `tierzero report` given what is not a run folder (issue 24, finding 5) ----------------------


def test_report_of_an_unsupported_url_exits_2_before_any_lookup(capsys, monkeypatch, no_lookups):
    import fsspec

    from tierzero.launcher.cli import main

    def no_filesystem(*args, **kwargs):
        raise AssertionError(f"fsspec.core.url_to_fs{args} called: the URL was not refused before any I/O")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_filesystem)
    assert main(["report", "ftp://x/run"]) == 2
    err = capsys.readouterr().err
    assert no_lookups == [] and "tierzero report: 'ftp://x/run' uses the protocol 'ftp', which tierzero does not " \
        "support; give a local path, or a file://, memory:// (one process only) or s3:// URL" in err, err


@pytest.mark.parametrize("configured, words", [
    ("ftp://x/telemetry", "'ftp://x/telemetry' uses the protocol 'ftp', which tierzero does not support; give a "
                          "local path, or a file://"),
    ("[1, 2]", "is '[1, 2]', not a path"),
], ids=["ftp", "a-list"])
def test_report_refuses_a_telemetry_dir_in_config_yaml_it_cannot_use(tmp_path, capsys, no_lookups, configured, words):
    """config.yaml is a file anyone can edit: its telemetry.dir meets the rule the run's own did."""
    from tierzero.launcher.cli import main

    run_dir = tmp_path / "run"
    (run_dir / "telemetry").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"telemetry:\n  dir: {configured}\n")
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert no_lookups == [] and f"tierzero report: telemetry.dir in {run_dir}/config.yaml" in err and words in err, err
    assert "Traceback" not in err and sorted(os.listdir(run_dir)) == ["config.yaml", "telemetry"]


def test_report_of_a_file_says_it_is_a_file(tmp_path, capsys):
    from tierzero.launcher.cli import main

    file = tmp_path / "passwd"
    file.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert main(["report", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"tierzero report: run dir {file} is a file, not a run folder; pass the folder a run wrote" in err, err
    assert "does not exist" not in err and os.listdir(tmp_path) == ["passwd"]


def test_report_reads_a_run_under_a_url_as_typed(capsys):
    """The argument reaches fsspec as typed: Path() would fold memory://x/run into a local memory:/x/run."""
    import uuid

    import fsspec

    from tierzero.launcher.cli import main

    bucket = f"report-{uuid.uuid4().hex}"
    run_dir = f"memory://{bucket}/run"
    try:
        with Telemetry(fast_cfg(), f"{run_dir}/telemetry", "r1", 0, 0, "h") as tel:
            tel.record("steps", step=3, loss=1.5)
        assert main(["report", run_dir]) == 0, capsys.readouterr().err
        assert "last step 3" in capsys.readouterr().out
        assert fsspec.filesystem("memory").isfile(f"/{bucket}/run/report/loss.png")
    finally:
        fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)
