"""Piece checksums (checkpoint/manifest.py, checkpoint/store.py): new saves check each piece with
xxh3_64, computed chunk by chunk beside the write, and the manifest names it per piece; a piece
without another name is crc32, so checkpoints written before (or without the xxhash package)
still verify and load. A real store on a temp dir; the reference values come from xxhash and
zlib themselves, over the whole piece."""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tierzero.checkpoint import manifest as manifest_mod
from tierzero.checkpoint import store as store_mod
from tierzero.checkpoint.manifest import ChecksumUnavailable, validate
from tierzero.checkpoint.store import CHUNK_BYTES, CheckpointError, CheckpointStore, Slice

N = 3 * CHUNK_BYTES // 4 + 5  # float32 elements: each piece spans several chunks, the last one short


def _save(root, step=10):
    """Two tensors over two ranks, committed; the full values."""
    store = CheckpointStore(str(root), fsync=False)
    rng = np.random.default_rng(step)
    full = {"model/w": rng.standard_normal(2 * N).astype(np.float32),
            "optim.exp_avg/w": rng.standard_normal(2 * N).astype(np.float32)}
    for r in range(2):
        store.write_rank(step, r, [Slice(name, (2 * N,), "float32", r * N, v[r * N:(r + 1) * N])
                                   for name, v in full.items()])
    store.commit(step, 2, {"step": step, "optimizer_steps": step, "next_sample": 8}, timeout_s=5)
    return store, store.step_path(step), full


def _pieces(path):
    data = json.loads(Path(path, "manifest.json").read_text())
    return [(name, p) for name, t in data["tensors"].items() for p in t["pieces"]]


def _flip_a_byte(path, shard="shard-00001.bin", at=12345):
    with open(Path(path, shard), "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


def test_new_pieces_are_xxh3_64_of_their_bytes_and_say_so(tmp_path):
    store, path, full = _save(tmp_path)
    for name, piece in _pieces(path):
        assert set(piece) == {"file", "offset", "start", "numel", "xxh3_64"}, piece
        data = full[name][piece["start"]:piece["start"] + piece["numel"]]
        assert piece["xxh3_64"] == xxhash.xxh3_64_intdigest(data.tobytes())  # chunked == whole
    manifest, problems = store.verify(path)
    assert problems == [] and {p.algorithm for t in manifest.tensors.values() for p in t.pieces} == {"xxh3_64"}
    read = store.reader(path, manifest)
    np.testing.assert_array_equal(read("model/w", N - 3, 6), full["model/w"][N - 3:N + 3])
    _flip_a_byte(path)
    problems = store.verify(path)[1]
    assert any("shard-00001.bin: checksum mismatch in tensor" in p and "xxh3_64" in p for p in problems), problems


def test_a_checkpoint_of_crc32_pieces_still_verifies_and_loads(tmp_path, monkeypatch):
    """What every tierzero before xxh3 wrote (and one without the xxhash package writes)."""
    monkeypatch.setattr(store_mod, "WRITE_CHECKSUM", "crc32")
    store, path, full = _save(tmp_path)
    monkeypatch.undo()
    for name, piece in _pieces(path):
        assert set(piece) == {"file", "offset", "start", "numel", "crc32"}, piece  # the old format, exactly
        data = full[name][piece["start"]:piece["start"] + piece["numel"]]
        assert piece["crc32"] == zlib.crc32(data.tobytes()) & 0xFFFFFFFF
    manifest, problems = store.verify(path)
    assert problems == []
    np.testing.assert_array_equal(store.reader(path, manifest)("optim.exp_avg/w", 0, 2 * N), full["optim.exp_avg/w"])
    _flip_a_byte(path)
    assert any("checksum mismatch" in p and "crc32" in p for p in store.verify(path)[1])


def _manifest(piece_extra):
    return {"format": "tierzero-checkpoint/1", "step": 3, "state": {}, "tensors": {"w": {
        "shape": [4], "dtype": "float32",
        "pieces": [{"file": "shard-00000.bin", "offset": 0, "start": 0, "numel": 4, **piece_extra}]}}}


@pytest.mark.parametrize("extra, words", [
    ({}, "one checksum"),
    ({"md5": 1}, "one checksum"),
    ({"crc32": 1, "xxh3_64": 1}, "one checksum"),
    ({"crc32": 2**32}, "crc32 4294967296 is not a crc32 checksum"),
    ({"xxh3_64": -1}, "xxh3_64 -1 is not a xxh3_64 checksum"),
    ({"xxh3_64": "ab"}, "is not a xxh3_64 checksum"),
])
def test_a_piece_must_name_exactly_one_known_checksum(extra, words):
    problems = validate(_manifest(extra), step=3)
    assert problems and all("tensor w: piece 0" in p for p in problems) and any(words in p for p in problems), problems
    assert validate(_manifest({"xxh3_64": 2**64 - 1}), step=3) == []
    assert validate(_manifest({"crc32": 0}), step=3) == []


def test_without_xxhash_saves_write_crc32_and_xxh3_pieces_are_refused_by_name(tmp_path, monkeypatch):
    store, path, _ = _save(tmp_path)
    monkeypatch.setitem(sys.modules, "xxhash", None)  # `import xxhash` now raises ImportError
    assert manifest_mod._writing_checksum() == "crc32"
    with pytest.raises(ChecksumUnavailable, match="pip install xxhash"):
        manifest_mod.hasher("xxh3_64")
    with pytest.raises(CheckpointError, match="cannot be checked: xxh3_64 needs the xxhash package"):
        manifest = store.manifest(path)
        store.reader(path, manifest)("model/w", 0, 4)
