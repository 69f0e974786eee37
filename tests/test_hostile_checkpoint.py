"""Checkpoints trusted only after validation: real checkpoints written by the real
CheckpointStore (small tensors, one process), then tampered with as a careless or hostile
user would -- gaps, overlaps, escaping piece paths, symlinked shards, hostile numbers, a
step that disagrees with its folder, bad training state, a bad COMMITTED marker, deep JSON,
a FIFO as manifest.json -- and the promises checked: a clear CheckpointError (exit 1 from
`tierzero ckpt verify`, exit 2 for a resume path the user named), `resume=auto` falling back
to the previous checkpoint, retention that deletes only what it can prove tierzero wrote,
fsync before COMMITTED, an export that never writes through a link, and init_from files
that are refused with one message."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import uuid
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tierzero.checkpoint.config import CheckpointConfig
from tierzero.checkpoint.export import ExportError, InitFromError, load_into, write_safetensors
from tierzero.checkpoint.manifest import Manifest, TensorEntry, validate
from tierzero.checkpoint.saver import Checkpointer
from tierzero.checkpoint.store import CheckpointError, CheckpointStore, ResumeError, Slice

ROOT = Path(__file__).resolve().parent.parent
CUTS = (0, 17, 42)


# ---- helpers -----------------------------------------------------------------------------------

def _save(root, step, state=None):
    """Two tensors split unevenly over two ranks, committed by the real store; the full values."""
    store = CheckpointStore(str(root))
    rng = np.random.default_rng(step)
    full = {"model/w": rng.standard_normal((6, 7)).astype(np.float32),
            "optim.exp_avg/w": rng.standard_normal(42).astype(np.float32)}
    for r in range(2):
        store.write_rank(step, r, [Slice(name, v.shape, "float32", CUTS[r], v.reshape(-1)[CUTS[r]:CUTS[r + 1]])
                                   for name, v in full.items()])
    store.commit(step, 2, {"step": step, "optimizer_steps": step, "next_sample": step * 16} if state is None else state,
                 timeout_s=5)
    return store, store.step_path(step), full


def _reseal(path):
    """COMMITTED's checksum made to match manifest.json again: only the rule under test can object."""
    text = Path(path, "manifest.json").read_bytes()
    marker = json.loads(Path(path, "COMMITTED").read_text())
    marker["manifest_crc32"] = zlib.crc32(text) & 0xFFFFFFFF
    Path(path, "COMMITTED").write_text(json.dumps(marker))


def _tamper(path, edit=None, raw=None):
    """manifest.json edited (or replaced by `raw`), and resealed."""
    if raw is None:
        data = json.loads(Path(path, "manifest.json").read_text())
        edit(data)
        raw = json.dumps(data)
    Path(path, "manifest.json").write_text(raw)
    _reseal(path)


def _piece(data, i=1, name="model/w"):
    return data["tensors"][name]["pieces"][i]


@contextmanager
def _deadline(seconds=20):
    """A test that would hang (a FIFO opened for reading) fails instead."""
    def expired(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _cli(args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=timeout)


class FakeEngine:
    """What Checkpointer.resume needs of an engine: local reads, then the collective part."""

    def __init__(self, shape=(6, 7), dtype="float32"):
        self.loaded, self.step_count, self.after_loads = {}, None, 0
        self.shape, self.dtype = shape, dtype

    def checkpoint_layout(self):  # the global shapes the resume checks the manifest against
        return {"model/w": (self.shape, self.dtype), "optim.exp_avg/w": ((42,), "float32")}

    def load_checkpoint(self, read, step_count):
        self.loaded = {name: read(name, 0, 42) for name in ("model/w", "optim.exp_avg/w")}
        self.step_count = step_count

    def after_load(self):
        self.after_loads += 1


def _checkpointer(root, events=None, **cfg):
    events = [] if events is None else events
    return Checkpointer(CheckpointConfig(**cfg), str(root), rank=0, world_size=1,
                        event=lambda kind, detail, step: events.append((kind, detail, step)))


# ---- 1. gaps and overlaps --------------------------------------------------------------------------

def _gap(data):
    data["tensors"]["model/w"]["pieces"].pop(1)  # elements 17..42 held by nobody


def _overlap(data):
    _piece(data)["start"] -= 2  # claims 15..40 with the bytes of 17..42


def _grown(data):
    data["tensors"]["model/w"]["shape"] = [6, 8]  # 48 elements, pieces still end at 42


@pytest.mark.parametrize("edit,words", [(_gap, "elements 17..42 missing"), (_overlap, "elements 15..17 written twice"),
                                        (_grown, "elements 42..48 missing")],
                         ids=["gap", "overlap", "shape-past-pieces"])
def test_pieces_that_do_not_tile_a_tensor_are_refused_before_any_read(tmp_path, edit, words):
    store, path, _ = _save(tmp_path, 10)
    _tamper(path, edit)
    manifest, problems = store.verify(path)
    assert manifest is None and any(words in p and "tensor model/w" in p and "manifest.json" in p for p in problems), \
        problems
    with pytest.raises(CheckpointError, match=words):
        store.manifest(path)


def test_the_reader_never_returns_memory_it_did_not_read(tmp_path):
    """Even a Manifest built by hand (never validated) cannot make read() return np.empty's
    garbage: a gap, or a request past the tensor's end, is an error."""
    store, path, full = _save(tmp_path, 10)
    good = store.manifest(path)
    read = store.reader(path, good)
    with pytest.raises(CheckpointError, match="another shape"):
        read("model/w", 40, 8)
    holed = Manifest(10, {"model/w": TensorEntry("model/w", (6, 7), "float32", good.tensors["model/w"].pieces[:1])},
                     good.state)
    with pytest.raises(CheckpointError, match="17..42 missing"):
        store.reader(path, holed)("model/w", 0, 42)
    np.testing.assert_array_equal(read("model/w", 0, 42), full["model/w"].reshape(-1))


# ---- 2. piece files outside the step folder ---------------------------------------------------------

@pytest.mark.parametrize("name", ["../../stolen.bin", "ABSOLUTE", "sub/shard-00001.bin", ".hidden.bin", "..", ""])
def test_a_piece_file_outside_the_step_folder_is_never_opened(tmp_path, name):
    store, path, _ = _save(tmp_path / "ckpt", 10)
    stolen = tmp_path / "stolen.bin"  # the same bytes, crc and all: only the name can give it away
    stolen.write_bytes(Path(path, "shard-00001.bin").read_bytes())
    name = str(stolen) if name == "ABSOLUTE" else name
    _tamper(path, lambda d: _piece(d).update(file=name))
    _, problems = store.verify(path)
    assert problems and all("not a plain file name" in p or "is not a file name" in p for p in problems), problems
    assert any("tensor model/w" in p for p in problems)
    with pytest.raises(CheckpointError, match="file name"):
        store.manifest(path)


def test_a_symlinked_shard_is_refused_even_after_validation(tmp_path):
    store, path, _ = _save(tmp_path / "ckpt", 10)
    shard = Path(path, "shard-00001.bin")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(shard.read_bytes())
    manifest = store.manifest(path)  # validated while the shard was a file ...
    shard.unlink()
    shard.symlink_to(outside)  # ... then swapped for a link to a file with the right bytes
    with pytest.raises(CheckpointError, match="symbolic link"):
        store.reader(path, manifest)("model/w", 0, 42)
    _, problems = store.verify(path)
    assert len(problems) == 1 and "shard-00001.bin is a symbolic link" in problems[0] and "model/w" in problems[0]


def test_object_stores_check_the_name(tmp_path):
    """memory:// (like s3://) has no links: the plain-name rule is the whole check there."""
    store, path, _ = _save(f"memory://tz-{uuid.uuid4().hex}/ckpt", 10)
    with store.fs.open(f"{path}/manifest.json") as f:
        data = json.loads(f.read())
    _piece(data)["file"] = "../elsewhere/shard-00001.bin"
    text = json.dumps(data).encode()
    store.fs.pipe(f"{path}/manifest.json", text)
    store.fs.pipe(f"{path}/COMMITTED", json.dumps({"step": 10, "manifest_crc32": zlib.crc32(text)}).encode())
    with pytest.raises(CheckpointError, match="not a plain file name"):
        store.manifest(path)


# ---- 3. hostile numbers, step, state, marker, JSON, FIFO --------------------------------------------

HOSTILE = {
    "negative shape": lambda d: d["tensors"]["model/w"].update(shape=[-6, -7]),
    "huge shape": lambda d: d["tensors"]["model/w"].update(shape=[2**40, 2**40]),
    "float shape": lambda d: d["tensors"]["model/w"].update(shape=[6.0, 7]),
    "unknown dtype": lambda d: d["tensors"]["model/w"].update(dtype="float128"),
    "unhashable dtype": lambda d: d["tensors"]["model/w"].update(dtype=["float32"]),
    "negative offset": lambda d: _piece(d, 0).update(offset=-4),
    "huge offset": lambda d: _piece(d, 0).update(offset=2**62),
    "offset past the file": lambda d: _piece(d, 0).update(offset=10_000),
    "negative numel": lambda d: _piece(d, 0).update(numel=-5),
    "float numel": lambda d: _piece(d, 0).update(numel=17.5),
    "string start": lambda d: _piece(d, 0).update(start="0"),
    "bool crc": lambda d: _piece(d, 0).update(crc32=True),
    "extra piece key": lambda d: _piece(d, 0).update(exec="rm -rf /"),
    "pieces not a list": lambda d: d["tensors"]["model/w"].update(pieces={"0": 1}),
    "tensor not an object": lambda d: d["tensors"].update({"model/w": 3}),
}


@pytest.mark.parametrize("edit", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_numbers_are_named_errors_never_crashes(tmp_path, edit):
    store, path, _ = _save(tmp_path, 10)
    _tamper(path, edit)
    manifest, problems = store.verify(path)
    assert manifest is None and problems and all("model/w" in p for p in problems), problems
    with pytest.raises(CheckpointError, match="model/w"):
        store.manifest(path)


def test_validate_returns_every_violation_before_a_byte_is_read():
    data = {"format": "tierzero-checkpoint/1", "step": 3, "state": {"next_sample": "soon"}, "tensors": {
        "a": {"shape": [4], "dtype": "float32", "pieces": [
            {"file": "../x.bin", "offset": 0, "start": 0, "numel": 4, "crc32": 0}]},
        "b": {"shape": [4], "dtype": "float32", "pieces": [
            {"file": "shard-00000.bin", "offset": 0, "start": 1, "numel": 3, "crc32": 0}]},
        "c": {"shape": [-1], "dtype": "complex", "pieces": []}}}
    problems = validate(data, step=4)
    text = "\n".join(problems)
    for words in ("step 3 disagrees", "state.next_sample 'soon'", "tensor a: piece 0: file '../x.bin'",
                  "tensor b: elements 0..1 missing", "tensor c: shape [-1]", "tensor c: dtype 'complex'"):
        assert words in text, (words, problems)
    assert all(p.startswith("manifest.json: ") for p in problems)
    # byte ranges against the files' sizes, once the structure holds
    data = {"format": "tierzero-checkpoint/1", "step": 3, "state": {}, "tensors": {"b": {
        "shape": [4], "dtype": "float32", "pieces": [{"file": "shard-00000.bin", "offset": 8, "start": 0, "numel": 4,
                                                      "crc32": 0}]}}}
    assert validate(data, step=3, file_sizes={"shard-00000.bin": 24}) == []
    assert validate(data, step=3, file_sizes={"shard-00000.bin": 23}) == [
        "shard-00000.bin is truncated: tensor b elements 0..4 need bytes 8..24, the file has 23"]


def test_a_step_that_disagrees_with_its_folder_is_refused(tmp_path):
    store, path, _ = _save(tmp_path, 10)
    _tamper(path, lambda d: d.update(step=999999))
    with pytest.raises(CheckpointError, match="step 999999 disagrees with its folder's COMMITTED marker"):
        store.manifest(path)
    marker = json.loads(Path(path, "COMMITTED").read_text())  # the marker rewritten to agree: the folder does not
    Path(path, "COMMITTED").write_text(json.dumps({**marker, "step": 999999}))
    with pytest.raises(CheckpointError, match="says step 999999, its folder is step 10"):
        store.manifest(path)


@pytest.mark.parametrize("value", ["lots", -64, True, 1.5, None, [1]])
def test_ill_typed_training_state_is_refused(tmp_path, value):
    store, path, _ = _save(tmp_path, 10)
    _tamper(path, lambda d: d["state"].update(next_sample=value))
    with pytest.raises(CheckpointError, match="state.next_sample"):
        store.manifest(path)


def test_a_resume_needs_next_sample(tmp_path):
    _save(tmp_path, 10)
    _, path, _ = _save(tmp_path, 20, state={"step": 20})  # a committed folder without next_sample
    with pytest.raises(ResumeError, match="state has no next_sample"):
        _checkpointer(tmp_path, resume=path).resume(FakeEngine())


@pytest.mark.parametrize("engine, words", [
    (lambda: FakeEngine(shape=(7, 6)), r"model/w is \[6, 7\] in the checkpoint, \[7, 6\] in this run's model"),
    (lambda: FakeEngine(shape=(3, 7)), r"model/w is \[6, 7\] in the checkpoint, \[3, 7\]"),  # was read as a prefix
    (lambda: FakeEngine(dtype="bfloat16"), r"model/w is float32 in the checkpoint, bfloat16 in this run"),
])
def test_a_checkpoint_of_another_model_shape_is_refused_before_a_read(tmp_path, engine, words):
    _, path, _ = _save(tmp_path, 10)
    fake = engine()
    with pytest.raises(ResumeError, match=words + r".*model\.\* / moe\.\* must match"):
        _checkpointer(tmp_path, resume=path).resume(fake)
    assert fake.loaded == {} and fake.after_loads == 0
    events = []  # auto: the same problem is a warning, and the run starts fresh
    assert _checkpointer(tmp_path, events).resume(engine()) is None
    assert [kind for kind, *_ in events] == ["warning"]


def test_state_a_reader_would_refuse_is_never_committed(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.write_rank(10, 0, [Slice("model/w", (4,), "float32", 0, np.ones(4, np.float32))])
    with pytest.raises(CheckpointError, match="not committed: .*state.next_sample"):
        store.commit(10, 1, {"next_sample": -1}, timeout_s=5)
    assert not Path(store.step_path(10), "COMMITTED").exists() and store.committed() == []


@pytest.mark.parametrize("marker", [b"yes", b"[1, 2]", b'{"step": 10}', b'{"step": "10", "manifest_crc32": 1}',
                                    b"{" * 50_000, b" " * 10_000, b"\xff\xfe"],
                         ids=["not-json", "list", "no-crc", "string-step", "deep", "huge", "not-utf8"])
def test_a_commit_marker_that_is_not_ours_is_refused(tmp_path, marker):
    store, path, _ = _save(tmp_path, 10)
    Path(path, "COMMITTED").write_bytes(marker)
    with pytest.raises(CheckpointError, match="COMMITTED"):
        store.manifest(path)
    assert any("COMMITTED" in p for p in store.verify(path)[1])


def test_json_nested_100000_deep_is_refused_without_recursing(tmp_path):
    store, path, _ = _save(tmp_path, 10)
    _tamper(path, raw="[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested 100000 levels deep"):
        store.manifest(path)
    _tamper(path, raw=json.dumps({"format": "tierzero-checkpoint/1", "step": 10, "tensors": {},
                                  "state": {"x": "[" * 1000}}))  # brackets inside a string are not nesting
    assert store.manifest(path).state["x"] == "[" * 1000


@pytest.mark.parametrize("name", ["manifest.json", "COMMITTED"])
def test_a_fifo_in_place_of_a_metadata_file_is_refused_without_blocking(tmp_path, name):
    store, path, _ = _save(tmp_path, 10)
    Path(path, name).unlink()
    os.mkfifo(Path(path, name))
    with _deadline():
        with pytest.raises(CheckpointError, match="is a FIFO, not a regular file"):
            store.manifest(path)
    r = _cli(["ckpt", "verify", path], tmp_path, timeout=60)  # a hang would raise TimeoutExpired
    assert r.returncode == 1 and f"FAILED: {path}/{name} is a FIFO" in r.stdout and "Traceback" not in r.stderr


# ---- resume=auto falls back; an explicit path is the user's error ------------------------------------

def _fifo_manifest(path):
    Path(path, "manifest.json").unlink()
    os.mkfifo(Path(path, "manifest.json"))


def _outside_copy(path, shard="shard-00001.bin"):
    """The shard moved out of the folder, bytes (and so crc32) intact: only where it lives is wrong."""
    outside = Path(path).parent.parent / f"outside-{shard}"
    Path(path, shard).rename(outside)
    return outside


TAMPERED = {
    "gap": lambda p: _tamper(p, _gap),
    "escaping path": lambda p: (_outside_copy(p),
                                _tamper(p, lambda d: [_piece(d, 1, n).update(file="../../outside-shard-00001.bin")
                                                      for n in ("model/w", "optim.exp_avg/w")])),
    "huge shape": lambda p: _tamper(p, HOSTILE["huge shape"]),
    "step mismatch": lambda p: _tamper(p, lambda d: d.update(step=999999)),
    "next_sample string": lambda p: _tamper(p, lambda d: d["state"].update(next_sample="lots")),
    "next_sample missing": lambda p: _tamper(p, lambda d: d["state"].pop("next_sample")),
    "optimizer_steps float": lambda p: _tamper(p, lambda d: d["state"].update(optimizer_steps=2.5)),
    "COMMITTED not json": lambda p: Path(p, "COMMITTED").write_text("yes"),
    "deep json": lambda p: _tamper(p, raw="[" * 100_000 + "]" * 100_000),
    "fifo manifest": _fifo_manifest,
    "symlinked shard": lambda p: Path(p, "shard-00001.bin").symlink_to(_outside_copy(p)),
}


@pytest.mark.parametrize("tamper", list(TAMPERED.values()), ids=list(TAMPERED))
def test_auto_resume_falls_back_past_a_tampered_newest_checkpoint(tmp_path, tamper):
    root = tmp_path / "ckpt"
    _, _, full10 = _save(root, 10)
    _, path20, _ = _save(root, 20)
    tamper(path20)
    events = []
    engine = FakeEngine()
    with _deadline():
        resumed = _checkpointer(root, events).resume(engine)
    assert resumed is not None and resumed.step == 10 and resumed.state["next_sample"] == 160
    np.testing.assert_array_equal(engine.loaded["model/w"], full10["model/w"].reshape(-1))
    assert engine.step_count == 10 and engine.after_loads == 1
    warnings = [d for kind, d, _ in events if kind == "warning"]
    assert len(warnings) == 1 and "step-00000020 unusable" in warnings[0], events

    with _deadline(), pytest.raises(ResumeError, match=r"checkpoint.resume=.*step-00000020 cannot be loaded"):
        _checkpointer(root, resume=path20).resume(FakeEngine())


# ---- 4. retention deletes only what it can prove tierzero wrote ------------------------------------

def test_retention_spares_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "checkpoints"
    user = root / "step-00000001"
    user.mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    empty = root / "step-00000002"
    empty.mkdir()
    junk = root / "step-99999999"  # a COMMITTED that is not ours must not count as the newest checkpoint
    junk.mkdir()
    (junk / "COMMITTED").write_text("done!")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    (root / "step-00000003").symlink_to(elsewhere)
    for step in (10, 20, 30):
        store, _, _ = _save(root, step)
    spared = []
    deleted = store.prune(keep=1, keep_every=0, on_spared=lambda s, why: spared.append((s, why)))
    assert sorted(deleted) == [10, 20]
    assert (user / "thesis.tex").read_text() == "years of work" and empty.is_dir() and (junk / "COMMITTED").exists()
    assert (elsewhere / "keep.txt").read_text() == "mine" and (root / "step-00000003").is_symlink()
    assert Path(store.step_path(30), "COMMITTED").exists()
    assert sorted(s for s, _ in spared) == [1, 2, 3, 99999999]
    assert any("thesis.tex" in why and "never deletes it" in why for _, why in spared), spared
    store.prune(keep=1, keep_every=0, on_spared=lambda s, why: spared.append((s, why)))
    assert len(spared) == 4, "one warning per folder, not one per save"


def test_retention_through_the_checkpointer_is_a_warning_event(tmp_path):
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "notes.txt").write_text("mine")
    events = []
    ck = _checkpointer(tmp_path, events, async_save=False, keep=1)

    class Engine:
        def checkpoint_slices(self):
            return [("model/w", (4,), "float32", 0, np.ones(4, np.float32))]
    ck.save(2, Engine(), {"step": 2, "next_sample": 8})
    ck.save(4, Engine(), {"step": 4, "next_sample": 16})
    assert (tmp_path / "step-00000001" / "notes.txt").exists() and not (tmp_path / "step-00000002").exists()
    assert [kind for kind, _, _ in events].count("warning") == 1 and \
        any(kind == "warning" and "notes.txt" in d for kind, d, _ in events), events


def test_a_save_never_writes_into_a_folder_that_is_not_ours(tmp_path):
    user = tmp_path / "step-00000010"
    user.mkdir()
    (user / "COMMITTED").write_text("my own marker")
    (user / "results.csv").write_text("1,2,3")
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"holds files tierzero does not write \(\['results.csv'\]\)"):
        store.write_rank(10, 0, [Slice("model/w", (4,), "float32", 0, np.ones(4, np.float32))])
    assert sorted(p.name for p in user.iterdir()) == ["COMMITTED", "results.csv"]
    assert (user / "COMMITTED").read_text() == "my own marker"


def test_files_are_published_by_rename_never_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    root = tmp_path / "ckpt"
    _save(root, 10)
    (root / "LATEST").unlink()
    (root / "LATEST").symlink_to(victim)
    store = CheckpointStore(str(root))
    step_dir = Path(store.step_path(20))

    def plant():  # mid-save, in the folder the store made: links at the names it is about to write
        for name in ("rank-00000.json", "manifest.json", "COMMITTED"):
            (step_dir / name).symlink_to(victim)
    store.write_rank(20, 0, [Slice("model/w", (4,), "float32", 0, np.ones(4, np.float32))], before_report=plant)
    store.commit(20, 1, {"next_sample": 1}, timeout_s=5)
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in step_dir.iterdir()) and store.verify(str(step_dir))[1] == []
    assert (root / "LATEST").is_symlink(), "a LATEST tierzero did not write is left alone"

    (Path(store.step_path(10)) / "shard-00000.bin").unlink()  # a link already there: the folder is not ours
    (Path(store.step_path(10)) / "shard-00000.bin").symlink_to(victim)
    with pytest.raises(CheckpointError, match="holds files tierzero does not write"):
        store.write_rank(10, 0, [Slice("model/w", (4,), "float32", 0, np.ones(4, np.float32))])
    assert victim.read_text() == "precious"


# ---- 5. checkpoint.fsync -------------------------------------------------------------------------

@pytest.fixture
def fsynced(monkeypatch):
    """The path of every descriptor os.fsync is called on, in order (the real fsync still runs)."""
    seen, real = [], os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names descriptors through /proc")
def test_fsync_makes_every_file_and_folder_durable_before_commit_returns(tmp_path, fsynced):
    root = tmp_path / "ckpt"
    store, path, _ = _save(root, 10)
    names = [os.path.basename(p) if os.path.basename(p).startswith(".tz-") else p for p in fsynced]
    # the files are fsynced under their temp names, before the rename that publishes them
    for prefix in (".tz-shard-00000.bin.", ".tz-shard-00001.bin.", ".tz-rank-00000.json.", ".tz-rank-00001.json.",
                   ".tz-manifest.json.", ".tz-COMMITTED.", ".tz-.tierzero."):
        assert any(n.startswith(prefix) for n in names), (prefix, names)
    assert path in names and str(root) in names, "the step folder and the folder holding it"
    committed = max(i for i, n in enumerate(names) if n.startswith(".tz-COMMITTED."))
    assert names[committed + 1] == path, "COMMITTED, then the folder that names it"
    assert all(n.startswith(".tz-LATEST.") for n in names[committed + 2:]), names[committed:]
    before = names[:committed]
    assert before.count(path) >= 3 and str(root) in before, "each rank's and the manifest's names, the step folder's"
    assert all(any(n.startswith(f".tz-{f}.") for n in before)
               for f in ("shard-00000.bin", "shard-00001.bin", "rank-00000.json", "rank-00001.json", "manifest.json"))


def test_fsync_false_skips_it_and_is_a_config_key(tmp_path, fsynced):
    from tierzero.launcher.config import load_config

    assert CheckpointConfig().fsync is True
    assert load_config([], ["checkpoint.fsync=false"]).checkpoint.fsync is False
    store = CheckpointStore(str(tmp_path), fsync=False)
    store.write_rank(10, 0, [Slice("model/w", (4,), "float32", 0, np.ones(4, np.float32))])
    store.commit(10, 1, {"next_sample": 1}, timeout_s=5)
    assert fsynced == [] and store.verify(store.step_path(10))[1] == []


# ---- 6. ckpt export's output file ----------------------------------------------------------------

def test_export_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "model.safetensors"
    Path(f"{out}.tmp.{os.getpid()}").symlink_to(victim)  # the temp name tierzero used to write through
    write_safetensors(str(out), {"a": np.zeros(3, np.float32)})
    assert victim.read_text() == "precious" and out.is_file() and not out.is_symlink()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # what a plain open() would have made
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_export_refuses_an_output_that_is_not_a_regular_file(tmp_path, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "model.safetensors"
    {"symlink": lambda: out.symlink_to(victim), "fifo": lambda: os.mkfifo(out), "folder": out.mkdir}[kind]()
    with _deadline(), pytest.raises(ExportError, match="not a regular file: tierzero ckpt export never replaces it"):
        write_safetensors(str(out), {"a": np.zeros(3, np.float32)})
    assert victim.read_text() == "precious" and (out.is_symlink() if kind == "symlink" else out.exists())


def test_ckpt_export_cli_refuses_a_symlinked_output(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.write_rank(10, 0, [Slice("model/norm.weight", (4,), "float32", 0, np.ones(4, np.float32))])
    store.commit(10, 1, {"next_sample": 1}, timeout_s=5)
    path = store.step_path(10)
    r = _cli(["ckpt", "export", path, str(tmp_path / "fine.safetensors")], tmp_path)
    assert r.returncode == 0, r.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "model.safetensors"
    out.symlink_to(victim)
    r = _cli(["ckpt", "export", path, str(out)], tmp_path)
    assert r.returncode != 0 and "is a symbolic link, not a regular file" in r.stderr and "Traceback" not in r.stderr
    assert victim.read_text() == "precious" and out.is_symlink()


# ---- 7. malformed checkpoint.init_from files -----------------------------------------------------

def _model():
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = torch.nn.Embedding(5, 4)
            self.norm = torch.nn.LayerNorm(4, bias=False)
    return Tiny()


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [5, 4], "data_offsets": [0, 80]},
        "model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [80, 96]}}


def _with(name, **entry):
    return _safetensors({**GOOD, name: {**GOOD.get(name, GOOD["model.norm.weight"]), **entry}}, bytes(96))


MALFORMED = {
    "empty": b"",
    "not safetensors": b"hello world, not a model at all",
    "truncated header": _safetensors(GOOD, bytes(96))[:30],
    "huge header length": struct.pack("<Q", 2**63) + bytes(200),
    "header not json": struct.pack("<Q", 8) + b"{{{{{{{{" + bytes(8),
    "header a list": _safetensors([1, 2], b""),  # type: ignore[arg-type]
    "deep header": struct.pack("<Q", 100_000) + b"[" * 100_000,
    "entry not an object": _safetensors({**GOOD, "model.norm.weight": "nope"}, bytes(96)),
    "unknown dtype": _with("model.norm.weight", dtype="F8_E4M3"),
    "bf16 of the wrong size": _with("model.norm.weight", dtype="BF16"),  # 16 bytes for 4 bf16 values
    "unhashable dtype": _with("model.norm.weight", dtype={"F32": 1}),
    "integer dtype": _with("model.norm.weight", dtype="I64", shape=[2]),
    "negative shape": _with("model.norm.weight", shape=[-4]),
    "shape not matching bytes": _with("model.norm.weight", shape=[5]),
    "offsets past the end": _with("model.norm.weight", data_offsets=[80, 2**40]),
    "reversed offsets": _with("model.norm.weight", data_offsets=[96, 80]),
    "wrong model shape": _safetensors({**GOOD, "model.norm.weight": {"dtype": "F32", "shape": [2, 2],
                                                                      "data_offsets": [80, 96]}}, bytes(96)),
    "q without k and v": _with("model.layers.0.self_attn.q_proj.weight"),
    "experts 0 and 2": _safetensors({**GOOD, **{f"model.layers.0.mlp.experts.{e}.up_proj.weight": {
        "dtype": "F32", "shape": [2], "data_offsets": [96 + 8 * i, 104 + 8 * i]} for i, e in enumerate((0, 2))}},
        bytes(112)),
}


@pytest.mark.parametrize("blob", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_init_from_files_are_one_init_from_error(tmp_path, blob):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(InitFromError, match=r"^checkpoint\.init_from=.*bad\.safetensors"):
        load_into(_model(), str(path))


def test_an_integer_init_from_tensor_is_not_cast_into_float_weights(tmp_path):
    path = tmp_path / "ints.safetensors"
    write_safetensors(str(path), {"model.embed_tokens.weight": np.ones((5, 4), np.float32),
                                  "model.norm.weight": np.array([1, 2, 3, 2**40], np.int64)})
    with pytest.raises(InitFromError, match="norm.weight has dtype int64, the model's is float32"):
        load_into(_model(), str(path))


def test_a_fifo_as_init_from_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo.safetensors"
    os.mkfifo(path)
    with _deadline(), pytest.raises(InitFromError, match="is a FIFO"):
        load_into(_model(), str(path))


def test_init_from_a_malformed_file_exits_2_through_the_launcher(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(MALFORMED["header a list"])
    r = _cli(["run", "dense_tiny_cpu", "launcher.nproc=1", "train.steps=1", "train.global_batch_size=4",
              "train.micro_batch_size=2", "model.d_model=32", "model.n_heads=2", "data.seq_len=16",
              f"checkpoint.init_from={bad}", f"run.dir={tmp_path / 'run'}"], tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "checkpoint.init_from=" in r.stderr and "the header is a JSON list, not an object" in r.stderr
    assert "Traceback" not in r.stderr


# ---- the CLI end to end: ckpt verify lists every violation -----------------------------------------

@pytest.mark.parametrize("edit,words", [
    (_gap, ["tensor model/w: elements 17..42 missing"]),
    (lambda d: [_piece(d, 1, n).update(file="../../x.bin") for n in ("model/w", "optim.exp_avg/w")],
     ["tensor model/w: piece 1: file '../../x.bin'", "tensor optim.exp_avg/w: piece 1: file '../../x.bin'"]),
], ids=["gap", "escaping-path"])
def test_ckpt_verify_prints_one_failed_line_per_violation(tmp_path, edit, words):
    _, path, _ = _save(tmp_path / "ckpt", 10)
    _tamper(path, edit)
    r = _cli(["ckpt", "verify", path], tmp_path)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED: ")]
    assert r.returncode == 1 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert len(failed) == len(words) and all(any(w in line for line in failed) for w in words), r.stdout
    assert f"{len(words)} problem(s) in {path}" in r.stderr


# ---- 8. path arguments that are not checkpoint folders (issue 24, finding 5) -------------------------

SUPPORTED = "give a local path, or a file://, memory:// (one process only) or s3:// URL"


@pytest.fixture
def offline(monkeypatch, no_lookups):
    """Every name lookup and every fsspec filesystem recorded and refused: a test that reaches
    for the network fails here instead of leaving loopback. Returns the calls."""
    import fsspec

    from conftest import refuse

    refuse(monkeypatch, no_lookups, fsspec.core, "url_to_fs", "fsspec.core.url_to_fs")
    refuse(monkeypatch, no_lookups, fsspec, "filesystem", "fsspec.filesystem")
    return no_lookups


@pytest.mark.parametrize("argv", [
    ["list", "ftp://x/ck"],
    ["inspect", "ftp://x/ck/step-00000010"],
    ["verify", "ftp://x/ck/step-00000010"],
    ["export", "ftp://x/ck/step-00000010", "OUT"],
    ["convert", "ftp://x/ck/step-00000010", "OUT", "--to", "dcp"],
    ["convert", "ftp://x/dcp-10", "OUT", "--to", "tierzero"],
    ["list", "ftp://x/ck::memory://y"],
], ids=["list", "inspect", "verify", "export", "convert-to-dcp", "convert-to-tierzero", "chained"])
def test_an_unsupported_url_exits_2_before_any_lookup(tmp_path, capsys, offline, argv):
    from tierzero.launcher.cli import main

    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    code = main(["ckpt", *argv])
    err = capsys.readouterr().err
    assert offline == [] and code == 2, (offline, err)
    assert f"tierzero ckpt {argv[0]}: {argv[1]!r} " in err and SUPPORTED in err and "Traceback" not in err, err
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("to", ["dcp", "tierzero"])
def test_convert_to_a_url_exits_2_before_reading_the_source(tmp_path, capsys, offline, to):
    from tierzero.launcher.cli import main

    (tmp_path / "src").mkdir()  # never read: the destination is refused first
    assert main(["ckpt", "convert", str(tmp_path / "src"), "ftp://x/out", "--to", to]) == 2
    err = capsys.readouterr().err
    assert offline == [] and "ftp://x/out: convert writes to a local path only" in err, (offline, err)


ACTIONS = {  # action -> (argv after `ckpt`, what the path should have been)
    "list": (["list", "PATH"], "not a checkpoints folder; give a folder such as runs/NAME/checkpoints"),
    "inspect": (["inspect", "PATH"], "not a checkpoint step folder; give a folder such as runs/NAME/checkpoints/step-"),
    "verify": (["verify", "PATH"], "not a checkpoint step folder; give a folder such as runs/NAME/checkpoints/step-"),
    "export": (["export", "PATH", "OUT"], "not a checkpoint step folder; give a folder such as runs/NAME/checkpoints/"),
    "convert-to-dcp": (["convert", "PATH", "OUT", "--to", "dcp"], "not a checkpoint folder; give a folder such as "),
    "convert-to-tierzero": (["convert", "PATH", "OUT", "--to", "tierzero"], "not a DCP checkpoint folder; give a "),
}


def _ckpt_main(argv, path, out):
    from tierzero.launcher.cli import main

    return main(["ckpt", *[{"PATH": str(path), "OUT": str(out)}.get(a, a) for a in argv]])


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_file_where_a_checkpoint_folder_is_expected_exits_2_and_says_so(tmp_path, capsys, action):
    argv, words = ACTIONS[action]
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert _ckpt_main(argv, file, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert f"{file} is a file, {words}" in captured.err and "Traceback" not in captured.err, captured.err
    assert "no checkpoints under" not in captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("action", list(ACTIONS))
def test_a_path_that_does_not_exist_exits_2_and_says_so(tmp_path, capsys, action):
    argv, _ = ACTIONS[action]
    missing = tmp_path / "no-such-folder"
    assert _ckpt_main(argv, missing, tmp_path / "out") == 2
    captured = capsys.readouterr()
    assert f"{missing} does not exist; give a " in captured.err and "Traceback" not in captured.err, captured.err
    assert "no checkpoints under" not in captured.out and sorted(os.listdir(tmp_path)) == []


def test_folders_and_memory_urls_are_still_read(tmp_path, capsys):
    from tierzero.launcher.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["ckpt", "list", str(tmp_path / "empty")]) == 0  # a folder with no checkpoints yet is no error
    assert f"no checkpoints under {tmp_path / 'empty'}" in capsys.readouterr().out
    root = f"memory://hostile-{uuid.uuid4().hex}/ckpt"
    try:
        store = CheckpointStore(root)  # a resumable one: a master and both moments, the data position
        store.write_rank(10, 0, [Slice(f"{prefix}/w", (6, 7), "float32", 0, np.ones(42, np.float32))
                                 for prefix in ("model", "optim.exp_avg", "optim.exp_avg_sq")])
        store.commit(10, 1, {"step": 10, "next_sample": 160}, timeout_s=5)
        assert main(["ckpt", "list", root]) == 0 and "committed" in capsys.readouterr().out
        assert main(["ckpt", "verify", f"{root}/step-00000010"]) == 0
        assert "every checksum matches" in capsys.readouterr().out
    finally:
        import fsspec

        fsspec.filesystem("memory").rm(root.split("://", 1)[1].split("/", 1)[0], recursive=True)
