"""`tierzero ckpt verify` passes exactly what a resume can load, as far as the manifest can tell:
a checkpoint without one optimizer tensor, or without the data position, has a valid checksum
chain but a resume refuses it (exit 2), so verify must fail it too (exit 1, naming what is
missing). A real 2-rank checkpoint, tampered with and re-sealed (manifest_crc32 fixed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tierzero.checkpoint.manifest import Manifest, TensorEntry, crc32, resume_problems

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "launcher.nproc=2"]
MOMENT = "optim.exp_avg_sq/blocks.0.attn.wqkv.weight"


def _cli(args, cwd, expect):
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == expect, f"{args} -> {r.returncode}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r


def test_resume_problems_name_the_missing_moment_state_and_shape():
    def entry(name, shape):
        return TensorEntry(name, shape, "float32")

    full = {n: entry(n, (4, 2)) for n in ("model/w", "optim.exp_avg/w", "optim.exp_avg_sq/w")}
    assert resume_problems(Manifest(3, dict(full), {"next_sample": 48})) == []
    assert resume_problems(Manifest(3, {**full, "buffer/b": entry("buffer/b", (2,))}, {"next_sample": 48})) == []
    less = {n: t for n, t in full.items() if n != "optim.exp_avg_sq/w"}
    assert any("optim.exp_avg_sq/w is not in the checkpoint" in p for p in resume_problems(Manifest(3, less, {"next_sample": 1})))
    assert any("next_sample" in p for p in resume_problems(Manifest(3, dict(full), {})))
    other = {**full, "optim.exp_avg/w": entry("optim.exp_avg/w", (8,))}
    assert any("one shape" in p for p in resume_problems(Manifest(3, other, {"next_sample": 1})))
    moments_only = {n: t for n, t in full.items() if not n.startswith("model/")}
    assert any("no weights" in p for p in resume_problems(Manifest(3, moments_only, {"next_sample": 1})))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    _cli(["run", *SMALL, "train.steps=2", "checkpoint.every_steps=2", f"run.dir={base / 'run'}"], base, expect=0)
    return base / "run" / "checkpoints" / "step-00000002"


def _tampered(saved: Path, tmp_path: Path, edit) -> Path:
    """A copy of the checkpoint with its manifest edited and COMMITTED re-sealed to match."""
    step = tmp_path / "ck" / saved.name
    shutil.copytree(saved, step)
    data = json.loads((step / "manifest.json").read_text())
    edit(data)
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    (step / "manifest.json").write_bytes(text)
    marker = json.loads((step / "COMMITTED").read_text())
    (step / "COMMITTED").write_text(json.dumps({**marker, "manifest_crc32": crc32(text)}))
    return step


@pytest.mark.multiprocess
@pytest.mark.parametrize("edit, named", [
    (lambda d: d["tensors"].pop(MOMENT), MOMENT),
    (lambda d: d["state"].pop("next_sample"), "next_sample"),
], ids=["an optimizer tensor", "state.next_sample"])
def test_verify_fails_what_a_resume_refuses(saved, tmp_path, edit, named):
    assert "OK:" in _cli(["ckpt", "verify", str(saved)], tmp_path, expect=0).stdout  # the untouched one
    step = _tampered(saved, tmp_path, edit)
    r = _cli(["ckpt", "verify", str(step)], tmp_path, expect=1)
    assert named in r.stdout and "FAILED" in r.stdout and "OK:" not in r.stdout, r.stdout
    r = _cli(["run", *SMALL, "train.steps=3", f"checkpoint.resume={step}", f"run.dir={tmp_path / 'resume'}"],
             tmp_path, expect=2)  # what verify now says, the resume has always said
    assert named in r.stderr
