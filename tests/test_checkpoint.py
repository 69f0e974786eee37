"""Checkpoints: the format as pure data, the store against fsspec's memory filesystem, the
faults a reader must catch, and resume-with-resharding through the real CLI (save at step 10
under layout A, resume under layout B, train to 20, compare with A's own steps 11-20)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from tierzero.checkpoint.export import hf_tensors, read_safetensors, tierzero_tensors, write_safetensors
from tierzero.checkpoint.manifest import Manifest, ManifestError, Piece, TensorEntry, merge, reads_for, retained
from tierzero.checkpoint.store import CheckpointError, CheckpointStore, Slice
from tierzero.recipes.schedule import micro_batch_indices

ROOT = Path(__file__).resolve().parent.parent

# ---- the format ----------------------------------------------------------------------------


def _part(rank, name, shape, start, numel):
    return {"rank": rank, "tensors": [{"name": name, "shape": list(shape), "dtype": "float32", "piece": {
        "file": f"shard-{rank:05d}.bin", "offset": 0, "start": start, "numel": numel, "crc32": 0}}]}


def test_merge_demands_exact_coverage():
    ok = merge(3, [_part(0, "w", (2, 5), 0, 6), _part(1, "w", (2, 5), 6, 4)], {"next_sample": 9})
    assert [p.start for p in ok.tensors["w"].pieces] == [0, 6] and ok.step == 3
    assert Manifest.from_json(ok.to_json()).tensors["w"].pieces == ok.tensors["w"].pieces
    with pytest.raises(ManifestError, match="missing"):
        merge(3, [_part(0, "w", (2, 5), 0, 6), _part(1, "w", (2, 5), 7, 3)], {})
    with pytest.raises(ManifestError, match="written twice"):
        merge(3, [_part(0, "w", (2, 5), 0, 6), _part(1, "w", (2, 5), 5, 5)], {})
    with pytest.raises(ManifestError, match="disagree"):
        merge(3, [_part(0, "w", (2, 5), 0, 6), _part(1, "w", (10,), 6, 4)], {})


def test_reads_for_returns_only_overlapping_pieces():
    entry = TensorEntry("w", (10,), "float32", [Piece("a", 0, 0, 4, 0), Piece("b", 0, 4, 3, 0), Piece("c", 0, 7, 3, 0)])
    got = [(p.file, lo, n) for p, lo, n in reads_for(entry, 3, 2)]
    assert got == [("a", 3, 1), ("b", 4, 1)]
    assert [p.file for p, _, _ in reads_for(entry, 0, 10)] == ["a", "b", "c"]


def test_retention_keeps_the_newest_and_every_nth():
    assert retained([10, 20, 30, 40, 50], keep=2, keep_every=0) == [40, 50]
    assert retained([10, 20, 30, 40, 50], keep=2, keep_every=20) == [20, 40, 50]


def test_micro_batches_continue_the_global_token_stream():
    """Any (world size, micro batch) reading a step's global batch from first_sample reads
    exactly samples first_sample .. first_sample + G - 1: a resumed run, on any layout,
    continues where the checkpoint's next_sample says."""
    G = 24
    for world, micro in ((1, 24), (2, 3), (4, 6), (3, 2)):
        accum = G // (world * micro)
        got = sorted(int(i) for m in range(accum) for r in range(world)
                     for i in micro_batch_indices(7, m, dp_rank=r, dp_size=world, micro_batch=micro, global_batch=G,
                                                  first_sample=1000))
        assert got == list(range(1000, 1000 + G)), (world, micro)
    default = micro_batch_indices(7, 0, dp_rank=0, dp_size=1, micro_batch=G, global_batch=G)
    assert list(default) == list(range(7 * G, 8 * G))


# ---- the store on memory:// ------------------------------------------------------------------

@pytest.fixture
def store():
    return CheckpointStore(f"memory://tz-{uuid.uuid4().hex}/ckpt")


def _save(store, step, world=2):
    """Two tensors split unevenly over `world` ranks, like engine shards."""
    rng = np.random.default_rng(step)
    full = {"model/w": rng.standard_normal((6, 7)).astype(np.float32), "optim.exp_avg/w": rng.standard_normal(42).astype(np.float32)}
    cuts = [0, 17, 42] if world == 2 else [0, 42]
    for r in range(world):
        slices = [Slice(name, (6, 7) if name == "model/w" else (42,), "float32", cuts[r], v.reshape(-1)[cuts[r]:cuts[r + 1]])
                  for name, v in full.items()]
        store.write_rank(step, r, slices)
    store.commit(step, world, {"next_sample": step * 16}, timeout_s=5)
    return full


def test_store_round_trip_reads_any_slice(store):
    full = _save(store, 10)
    path = store.step_path(10)
    manifest = store.manifest(path)
    read = store.reader(path, manifest)
    assert manifest.state["next_sample"] == 160
    for start, n in ((0, 42), (3, 20), (16, 2), (41, 1)):
        np.testing.assert_array_equal(read("model/w", start, n), full["model/w"].reshape(-1)[start:start + n])
    assert store.verify(path)[1] == []
    with pytest.raises(CheckpointError, match="no tensor 'model/v'"):
        read("model/v", 0, 1)


def _flip(store, path, offset=5):
    with store.fs.open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0x40
    with store.fs.open(path, "wb") as f:
        f.write(bytes(data))


def test_faults_are_named(store):
    _save(store, 10)
    path = store.step_path(10)
    _flip(store, f"{path}/shard-00001.bin")
    problems = store.verify(path)[1]
    assert problems and all("shard-00001.bin" in p for p in problems)
    assert any("checksum mismatch in tensor model/w" in p for p in problems)

    _save(store, 20)
    path = store.step_path(20)
    with store.fs.open(f"{path}/shard-00000.bin", "rb") as f:
        data = f.read()
    with store.fs.open(f"{path}/shard-00000.bin", "wb") as f:
        f.write(data[:30])
    assert any("shard-00000.bin is truncated" in p for p in store.verify(path)[1])

    _save(store, 30)
    store.fs.rm(f"{store.step_path(30)}/shard-00001.bin")
    assert any("shard-00001.bin is missing" in p for p in store.verify(store.step_path(30))[1])

    _save(store, 40)
    store.fs.rm(f"{store.step_path(40)}/manifest.json")
    assert any("manifest.json is missing" in p for p in store.verify(store.step_path(40))[1])

    _save(store, 50)
    store.fs.rm(f"{store.step_path(50)}/COMMITTED")
    assert any("torn" in p for p in store.verify(store.step_path(50))[1])
    assert 50 not in store.committed() and (50, False) in store.steps()


def test_a_failed_rank_is_never_committed(store):
    store.write_rank(10, 0, [Slice("model/w", (4,), "float32", 0, np.zeros(2, np.float32))])
    with store.fs.open(f"{store.step_path(10)}/rank-00001.error", "w") as f:
        f.write("OSError: [Errno 28] No space left on device")
    with pytest.raises(CheckpointError, match="rank 1 failed: OSError"):
        store.commit(10, 2, {}, timeout_s=5)
    assert store.committed() == []
    store.write_rank(11, 0, [Slice("model/w", (4,), "float32", 0, np.zeros(4, np.float32))])
    with pytest.raises(CheckpointError, match=r"no report from rank\(s\) \[1, 2\]"):
        store.commit(11, 3, {}, timeout_s=0.2)


def test_prune_keeps_retained_and_drops_old_torn(store):
    for step in (10, 20, 30, 40):
        _save(store, step)
    store.write_rank(15, 0, [Slice("model/w", (1,), "float32", 0, np.zeros(1, np.float32))])  # torn
    assert sorted(store.prune(keep=2, keep_every=20)) == [10, 15]
    assert store.committed() == [20, 30, 40]


def test_safetensors_export_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    ours = {"tok_embeddings.weight": rng.standard_normal((5, 4)).astype(np.float32),
            "blocks.0.attn.wqkv.weight": rng.standard_normal((12, 4)).astype(np.float32),
            "blocks.0.mlp.experts.w_down": rng.standard_normal((3, 6, 4)).astype(np.float32),
            "blocks.0.mlp.router.weight": rng.standard_normal((3, 4)).astype(np.float32)}
    hf = dict(kv for n, v in ours.items() for kv in hf_tensors(n, v))
    assert "model.layers.0.self_attn.k_proj.weight" in hf
    np.testing.assert_array_equal(hf["model.layers.0.mlp.experts.2.down_proj.weight"], ours["blocks.0.mlp.experts.w_down"][2].T)
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, hf, {"format": "pt"})
    back = tierzero_tensors(read_safetensors(path))
    assert set(back) == set(ours) and all(np.array_equal(back[k], ours[k]) for k in ours)
    st = pytest.importorskip("safetensors.numpy", reason="the reference reader (pip install safetensors)")
    theirs = st.load_file(path)
    assert set(theirs) == set(hf) and all(np.array_equal(theirs[k], hf[k]) for k in hf)


# ---- resume with resharding through the CLI ------------------------------------------------

SMALL = ["train.steps=20", "train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2",
         "model.d_model=32", "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0",
         "telemetry.flush_every_s=1"]
LAYOUTS = {
    "4 ranks": ["launcher.nproc=4"],
    "2 ranks": ["launcher.nproc=2"],
    "zero3": ["launcher.nproc=4", "topology.emulate=[2,2]", "parallel.plan=zero3"],
    "tiered": ["launcher.nproc=4", "topology.emulate=[2,2]", "parallel.plan=tiered"],
    "ddp": ["launcher.nproc=4", "topology.emulate=[2,2]", "parallel.plan=ddp"],
    "ep 1": ["launcher.nproc=4", "parallel.ep=1"],
    "ep 4": ["launcher.nproc=4", "parallel.ep=4"],
    "dense zero2": ["dense_tiny_cpu", "launcher.nproc=2", "parallel.plan=zero2"],
    "deepspeed": ["dense_tiny_cpu", "launcher.nproc=2", "parallel.plan=zero2", "parallel.engine=deepspeed"],
}
PAIRS = [("4 ranks", "4 ranks"), ("4 ranks", "2 ranks"), ("2 ranks", "4 ranks"), ("zero3", "tiered"),
         ("tiered", "ddp"), ("4 ranks", "ep 1"), ("ep 1", "ep 4"), ("dense zero2", "deepspeed")]
"""The default recipe is an MoE with parallel.ep=2, so '4 ranks' -> 'ep 1' is ep 2 -> 1."""


def _cli(args, cwd, expect=0, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=timeout)
    assert r.returncode == expect, f"{args} -> {r.returncode}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r


def _losses(run_dir: Path) -> dict:
    rows = ds.dataset(run_dir / "telemetry" / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    return {r["step"]: r["loss"] for r in rows if r["rank"] == 0}


def _events(run_dir: Path, kind: str) -> list:
    rows = ds.dataset(run_dir / "telemetry" / "events", format="parquet", partitioning="hive").to_table().to_pylist()
    return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each layout A of the matrix trained for 20 steps, checkpointing at 10 and 20: its own
    steps 11-20 are the uninterrupted run a resume must reproduce."""
    base = tmp_path_factory.mktemp("saved")
    out = {}
    for name in sorted({a for a, _ in PAIRS}):
        run_dir = base / name.replace(" ", "_")
        _cli(["run", *SMALL, *LAYOUTS[name], "checkpoint.every_steps=10", "checkpoint.async_save=true",
              f"run.dir={run_dir}"], base)
        out[name] = run_dir
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_resume_under_another_layout_continues_the_run(saved, tmp_path, a, b):
    src = saved[a] / "checkpoints" / "step-00000010"
    run_dir = tmp_path / "b"
    _cli(["run", *SMALL, *LAYOUTS[b], f"checkpoint.resume={src}", f"run.dir={run_dir}"], tmp_path)
    want, got = _losses(saved[a]), _losses(run_dir)
    assert sorted(got) == list(range(11, 21)), "the resumed run must start at step 11"
    assert want[20] < want[1] - 0.3, "the run did not train; the comparison would prove nothing"
    for step in range(11, 21):
        if a == b:  # same layout, same reduction order: bit for bit
            assert got[step] == want[step], (step, got[step], want[step])
        else:
            assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])
    (resume,) = _events(run_dir, "resume")[:1]
    # the token stream continues where the checkpoint left it: 10 steps x 16 sequences
    assert "sample 160" in resume["detail"] and resume["step"] == 10


@pytest.mark.multiprocess
def test_auto_resume_falls_back_past_a_corrupted_checkpoint(saved, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved["4 ranks"] / "checkpoints", ckpt)
    shard = ckpt / "step-00000020" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = _cli(["ckpt", "verify", str(ckpt / "step-00000020")], tmp_path, expect=1)
    assert "shard-00001.bin: checksum mismatch in tensor" in r.stdout
    _cli(["ckpt", "verify", str(ckpt / "step-00000010")], tmp_path)

    run_dir = tmp_path / "auto"
    _cli(["run", *SMALL, "launcher.nproc=4", f"checkpoint.dir={ckpt}", f"run.dir={run_dir}"], tmp_path)
    warnings = _events(run_dir, "warning")
    assert any("step-00000020" in w["detail"] and "checksum mismatch" in w["detail"] for w in warnings), warnings
    assert _events(run_dir, "resume")[0]["step"] == 10
    assert sorted(_losses(run_dir)) == list(range(11, 21))

    # an explicit path to the corrupted one is the user's error: exit 2, naming the file
    r = _cli(["run", *SMALL, "launcher.nproc=4", f"checkpoint.resume={ckpt / 'step-00000020'}",
              f"run.dir={tmp_path / 'explicit'}"], tmp_path, expect=2)
    assert "shard-00001.bin: checksum mismatch" in r.stderr and "checkpoint.resume=" in r.stderr

    # a checkpoint of another model shape is refused before a byte is read (a narrower model
    # would otherwise read the prefix of each wider tensor): exit 2, naming a tensor and both shapes
    r = _cli(["run", *SMALL, "launcher.nproc=4", "model.d_model=48", f"checkpoint.resume={ckpt / 'step-00000010'}",
              f"run.dir={tmp_path / 'narrower'}"], tmp_path, expect=2)
    assert re.search(r"tensor \S+ is \[[0-9, ]+\] in the checkpoint, \[[0-9, ]+\] in this run's model", r.stderr), \
        r.stderr[-1500:]
    assert "model.* / moe.* must match the run that saved it" in r.stderr


@pytest.mark.multiprocess
def test_a_save_that_cannot_be_written_is_an_event_not_a_commit(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint folder should be")
    common = [*SMALL, "train.steps=4", "launcher.nproc=2", "checkpoint.every_steps=2",
              f"checkpoint.dir={blocker}/ckpt"]
    run_dir = tmp_path / "continue"
    # on_error=continue: training finishes, but no save of it is usable: exit 4 (Exit.CHECKPOINT_LOST)
    r = _cli(["run", *common, f"run.dir={run_dir}"], tmp_path, expect=4)
    assert "step(s) 2, 4 failed" in r.stderr and "no usable checkpoint" in r.stderr
    errors = [e for e in _events(run_dir, "error") if "checkpoint step" in e["detail"]]
    assert errors and sorted(_losses(run_dir)) == [1, 2, 3, 4]
    r = _cli(["run", *common, "checkpoint.on_error=stop", f"run.dir={tmp_path / 'stop'}"], tmp_path, expect=1)
    assert "checkpoint.on_error=stop" in r.stderr
    assert not (blocker.parent / "ckpt").exists()


@pytest.mark.multiprocess
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs to fill the disk needs root")
def test_disk_full_during_a_save_commits_nothing(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip(reason="this kernel/container does not allow mounting tmpfs")
    try:
        run_dir = tmp_path / "full"
        _cli(["run", *SMALL, "train.steps=4", "launcher.nproc=2", "checkpoint.every_steps=2",
              f"checkpoint.dir={mnt}/ckpt", f"run.dir={run_dir}"], tmp_path, expect=4)  # Exit.CHECKPOINT_LOST
        errors = [e for e in _events(run_dir, "error") if "checkpoint step" in e["detail"]]
        assert errors and any("No space left" in e["detail"] for e in errors), errors
        assert not list(mnt.glob("ckpt/*/COMMITTED"))
        assert not list(mnt.glob("ckpt/step-*"))  # nor a half-written step folder
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.multiprocess
def test_ckpt_cli_and_init_from(saved, tmp_path):
    ckpt_dir = saved["4 ranks"] / "checkpoints"
    listing = _cli(["ckpt", "list", str(ckpt_dir)], tmp_path).stdout
    assert "10  committed" in listing and "20  committed" in listing and "<- latest" in listing
    text = _cli(["ckpt", "inspect", str(ckpt_dir / "step-00000020")], tmp_path).stdout
    assert "step 20 | next sample 320 | saved by 4 ranks" in text
    assert "model/blocks.0.mlp.experts.w_gate" in text and "[8, 32," in text  # all 8 experts, global shape
    out = tmp_path / "model.safetensors"  # the one-file form (tests/test_hf.py checks the folder form)
    _cli(["ckpt", "export", str(ckpt_dir / "step-00000020"), str(out)], tmp_path)
    hf = read_safetensors(str(out))  # the default recipe routes like Mixtral: Mixtral's names, no unused bias
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in hf and "model.embed_tokens.weight" in hf
    assert not [n for n in hf if "e_score_correction_bias" in n]
    manifest = json.loads((ckpt_dir / "step-00000020" / "manifest.json").read_text())
    assert manifest["state"]["next_sample"] == 320

    # init_from: step 1 of the new run starts from the exported weights, so its loss is
    # far below a fresh model's (ln 64 = 4.16 nats on this data)
    run_dir = tmp_path / "init"
    _cli(["run", *SMALL, "train.steps=2", "launcher.nproc=2", f"checkpoint.init_from={out}", f"run.dir={run_dir}"],
         tmp_path)
    assert _losses(run_dir)[1] < _losses(saved["4 ranks"])[1] - 0.5
    r = _cli(["run", *SMALL, "model.d_model=64", "train.steps=2", "launcher.nproc=2", f"checkpoint.init_from={out}",
              f"run.dir={tmp_path / 'bad'}"], tmp_path, expect=2)
    assert "checkpoint.init_from" in r.stderr and "the model's is" in r.stderr


def test_reports_of_an_earlier_torn_save_are_not_trusted(store):
    """A restart or rollback can save a step again: only this attempt's reports count."""
    def slices(r):
        return [Slice("model/w", (4,), "float32", 2 * r, np.full(2, float(r), np.float32))]

    store.write_rank(10, 1, slices(1), token="a0s1")  # attempt 0 died before rank 0 wrote
    store.fs.pipe(f"{store.step_path(10)}/rank-00000.a0s1.error", b"OSError: killed")
    store.write_rank(10, 0, slices(0), token="a1s1")
    with pytest.raises(CheckpointError, match=r"no report from rank\(s\) \[1\]"):
        store.commit(10, 2, {}, timeout_s=0.3, token="a1s1")  # neither the stale json nor .error
    store.write_rank(10, 1, slices(1), token="a1s1")
    store.commit(10, 2, {}, timeout_s=5, token="a1s1")
    names = {p.rsplit("/", 1)[-1] for p in store.fs.ls(store.step_path(10), detail=False)}
    assert not any(".a0s1." in n for n in names), names  # the torn attempt's reports are gone
    assert store.verify(store.step_path(10))[1] == []
