"""Checkpoints on a real S3 server: moto in server mode on loopback, reached through s3fs.

The ranks are spawned processes: they find the server through the environment they inherit
(AWS_ENDPOINT_URL, read by botocore for boto3 and for s3fs alike, plus the test credentials).
One 2-rank run saves to S3 and is the uninterrupted reference; other runs resume from it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tierzero.checkpoint.store import CheckpointStore

s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]' or '.[s3]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (it comes with moto)")

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "tierzero-ckpt"
pytestmark = pytest.mark.multiprocess

SMALL = ["model.d_model=32", "model.n_heads=2", "data.seq_len=16", "train.global_batch_size=16",
         "train.micro_batch_size=2", "telemetry.peak_tflops=1.0", "train.steps=12"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _start_moto(log: Path):
    """(process, url) of a moto server answering on a free loopback port; tries 3 ports."""
    for _ in range(3):
        port = _free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                return proc, url
            except OSError:
                time.sleep(0.1)
        _stop(proc)  # exited (the port was taken meanwhile?) or never answered
    pytest.fail(f"moto server did not start on 127.0.0.1:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points boto3, s3fs and
    every process started from here at it (and at nothing else). Yields a boto3 client."""
    saved = dict(os.environ)
    proc, url = _start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        for k in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_S3"))]:
            del os.environ[k]  # a developer's profile, token or endpoint must not redirect the test
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        # s3fs takes the endpoint from botocore, which reads AWS_ENDPOINT_URL (botocore >= 1.31)
        s3fs.S3FileSystem.clear_instance_cache()
        endpoint = s3fs.S3FileSystem().s3.meta.endpoint_url
        assert endpoint == url, f"s3fs ignores AWS_ENDPOINT_URL ({endpoint} is not {url}); botocore is too old"
        yield client
    finally:
        _stop(proc)
        s3fs.S3FileSystem.clear_instance_cache()  # instances cached in this process know this server only
        os.environ.clear()
        os.environ.update(saved)


def run_cli(args, cwd, expect=0, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == expect, \
        f"{args} exited {r.returncode}, not {expect}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def table(run_dir: Path, name: str):
    return ds.dataset(run_dir / "telemetry" / name, format="parquet", partitioning="hive").to_table().to_pylist()


def losses(run_dir: Path):
    """{rank: {step: loss}}"""
    out = {}
    for row in table(run_dir, "steps"):
        out.setdefault(row["rank"], {})[row["step"]] = row["loss"]
    return out


def resume_events(run_dir: Path):
    return [e for e in table(run_dir, "events") if e["kind"] == "resume"]


def assert_same_losses(got: dict, want: dict, steps):
    for step in steps:
        g, w = got[step], want[step]
        assert abs(g - w) <= 1e-6 * abs(w), f"step {step}: {g!r} after resuming vs {w!r} uninterrupted"


@pytest.fixture(scope="module")
def run_a(s3, tmp_path_factory):
    """12 steps on 2 ranks, checkpoints at steps 6 and 12 in s3://BUCKET/runA/ckpt."""
    tmp = tmp_path_factory.mktemp("runA")
    run_cli(["run", *SMALL, "launcher.nproc=2", "checkpoint.every_steps=6",
             f"checkpoint.dir=s3://{BUCKET}/runA/ckpt", f"run.dir={tmp / 'a'}"], tmp)
    by_rank = losses(tmp / "a")
    assert sorted(by_rank) == [0, 1] and sorted(by_rank[0]) == list(range(1, 13))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="runA/ckpt/")["Contents"]}
    for step in ("step-00000006", "step-00000012"):
        assert {f"runA/ckpt/{step}/{f}" for f in ("COMMITTED", "manifest.json", "shard-00000.bin",
                                                  "shard-00001.bin")} <= keys
    return by_rank[0]


def test_save_to_s3_and_resume_on_more_ranks(run_a, tmp_path):
    run_cli(["run", *SMALL, "launcher.nproc=4", "checkpoint.every_steps=0",
             f"checkpoint.resume=s3://{BUCKET}/runA/ckpt/step-00000006", f"run.dir={tmp_path / 'b'}"], tmp_path)
    by_rank = losses(tmp_path / "b")
    assert sorted(by_rank) == [0, 1, 2, 3]
    for rank_losses in by_rank.values():
        assert sorted(rank_losses) == list(range(7, 13))
        assert_same_losses(rank_losses, run_a, range(7, 13))
    events = resume_events(tmp_path / "b")
    assert events and all("step-00000006" in e["detail"] and "saved by 2 ranks" in e["detail"] for e in events)


def test_ckpt_list_and_verify_on_s3_find_a_flipped_byte(run_a, s3, tmp_path):
    root = f"s3://{BUCKET}/runA/ckpt"
    out = run_cli(["ckpt", "list", root], tmp_path).stdout
    state = {int(line.split()[0]): line.split()[1] for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert state == {6: "committed", 12: "committed"}, out
    out = run_cli(["ckpt", "verify", f"{root}/step-00000012"], tmp_path).stdout
    assert out.startswith("OK: ") and "every checksum matches" in out

    key = "runA/ckpt/step-00000012/shard-00000.bin"
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key="runA/ckpt/step-00000012/manifest.json")["Body"].read())
    tensor = next(name for name, t in manifest["tensors"].items()
                  if any(p["file"] == "shard-00000.bin" and p["offset"] == 0 for p in t["pieces"]))
    original = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    try:
        s3.put_object(Bucket=BUCKET, Key=key, Body=bytes([original[0] ^ 0x01]) + original[1:])
        r = run_cli(["ckpt", "verify", f"{root}/step-00000012"], tmp_path, expect=1)
        failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED:")]
        assert len(failed) == 1, r.stdout
        assert "shard-00000.bin" in failed[0] and "checksum mismatch" in failed[0] and f"tensor {tensor} " in failed[0]
        assert "Traceback" not in r.stderr

        # a truncated object: S3 refuses a byte range that starts past its end (HTTP 416) where
        # a local file reads short; both are problems verify reports, never a crash
        s3.put_object(Bucket=BUCKET, Key=key, Body=original[:8])
        store = CheckpointStore(root)
        _, problems = store.verify(store.step_path(12))
        assert len(problems) == sum(p["file"] == "shard-00000.bin" for t in manifest["tensors"].values()
                                    for p in t["pieces"]), problems
        assert all("shard-00000.bin is truncated: tensor " in p for p in problems), problems
    finally:
        s3.put_object(Bucket=BUCKET, Key=key, Body=original)


def test_resume_auto_on_s3_skips_a_torn_save(run_a, s3, tmp_path):
    # runC/ckpt: a copy of runA's checkpoints whose newest lost its COMMITTED marker
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="runA/ckpt/")["Contents"]:
        s3.copy_object(Bucket=BUCKET, Key="runC/" + obj["Key"].removeprefix("runA/"),
                       CopySource={"Bucket": BUCKET, "Key": obj["Key"]})
    s3.delete_object(Bucket=BUCKET, Key="runC/ckpt/step-00000012/COMMITTED")
    root = f"s3://{BUCKET}/runC/ckpt"
    assert CheckpointStore(root).steps() == [(6, True), (12, False)]

    run_cli(["run", *SMALL, "launcher.nproc=2", "checkpoint.every_steps=0", "checkpoint.resume=auto",
             f"checkpoint.dir={root}", f"run.dir={tmp_path / 'c'}"], tmp_path)
    events = resume_events(tmp_path / "c")
    assert events and all("step-00000006" in e["detail"] for e in events), events
    by_rank = losses(tmp_path / "c")
    assert sorted(by_rank[0]) == list(range(7, 13))
    assert_same_losses(by_rank[0], run_a, range(7, 13))


def test_store_retention_and_torn_saves_on_s3(s3):
    """The store alone (no ranks): listing an empty prefix, commit, prune, read back."""
    import numpy as np

    from tierzero.checkpoint.store import Slice

    assert CheckpointStore(f"s3://{BUCKET}/nothing/here").steps() == []
    store = CheckpointStore(f"s3://{BUCKET}/store/ckpt")
    for step in (1, 2, 3, 5):
        data = np.arange(6, dtype=np.float32) * step
        store.write_rank(step, 0, [Slice("w", (6,), "float32", 0, data)])
        if step != 3:  # step 3 is a torn save: shard and rank json, no COMMITTED
            store.commit(step, 1, {"step": step}, timeout_s=30)
    assert store.steps() == [(1, True), (2, True), (3, False), (5, True)]
    assert store.prune(keep=2, keep_every=0) == [1, 3]
    assert store.steps() == [(2, True), (5, True)]
    assert not any(o["Key"].startswith(("store/ckpt/step-00000001/", "store/ckpt/step-00000003/"))
                   for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="store/ckpt/")["Contents"])
    path = store.step_path(5)
    read = store.reader(path, store.manifest(path))
    assert read("w", 2, 3).tolist() == [10.0, 15.0, 20.0]
    assert s3.get_object(Bucket=BUCKET, Key="store/ckpt/LATEST")["Body"].read() == b"step-00000005\n"


def test_a_bucket_that_cannot_be_reached_is_a_config_error_before_anything_runs(s3, tmp_path):
    """checkpoint.dir / telemetry.dir on a bucket these credentials cannot use: exit 2 naming
    the key and the bucket, no run folder, no rank started (it used to be a traceback from every
    rank at its first save, after the run folder and telemetry were written)."""
    for key in ("checkpoint.dir", "telemetry.dir"):
        r = run_cli(["run", "dense_tiny_cpu", "launcher.nproc=2", f"{key}=s3://tierzero-no-such-bucket/x"], tmp_path,
                    expect=2)
        assert f"{key}=s3://tierzero-no-such-bucket/x: the bucket 'tierzero-no-such-bucket' is not usable" in r.stderr
        assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []
