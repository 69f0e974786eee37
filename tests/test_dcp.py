"""tierzero <-> torch.distributed.checkpoint (DCP): one tiny real run (1 rank, 4 steps,
checkpoints at 2 and 4), converted both ways and checked against DCP itself (plain
`dcp.load` into freshly allocated tensors is the reference reader), bit-exact back; a run
resumed from the converted-back checkpoint reproduces the original run's own steps; resume
given a checkpoints folder takes its newest committed step, given a DCP or Hugging Face
folder exits 2 naming the command that works; hostile DCP folders are refused unread."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from tierzero.checkpoint.dcp import DcpError, classify, dcp_key, read_dcp, write_dcp, write_tierzero
from tierzero.checkpoint.store import CheckpointError, CheckpointStore, ResumeError, locate_step
from tierzero.launcher.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["dense_tiny_cpu", "launcher.nproc=1", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.warmup_steps=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0",
        "telemetry.flush_every_s=1"]


def _cli(args, cwd, expect=0):
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", *args], cwd=cwd, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert r.returncode == expect, f"{args} -> {r.returncode}:\n{r.stdout[-2500:]}\n{r.stderr[-2500:]}"
    return r


def _losses(run_dir: Path) -> dict:
    rows = ds.dataset(run_dir / "telemetry" / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    return {r["step"]: r["loss"] for r in rows if r["rank"] == 0}


def _everything(step_dir: Path):
    """(state, name -> raw bytes of the global tensor) of a committed tierzero step folder."""
    store = CheckpointStore(str(step_dir.parent))
    m = store.manifest(str(step_dir))
    read = store.reader(str(step_dir), m)
    return m.state, {n: (e.shape, e.dtype, read(n, 0, e.numel).tobytes()) for n, e in m.tensors.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run checkpointing at 2 and 4: its own steps 3-4 are what a resume from 2 must reproduce."""
    base = tmp_path_factory.mktemp("dcp")
    _cli(["run", *TINY, "train.steps=4", "checkpoint.every_steps=2", "checkpoint.async_save=false",
          f"run.dir={base / 'run'}"], base)
    return base / "run"


@pytest.fixture(scope="module")
def converted(run, tmp_path_factory):
    """step 2 -> DCP -> a tierzero checkpoints folder, through the CLI (in process)."""
    base = tmp_path_factory.mktemp("converted")
    src = run / "checkpoints" / "step-00000002"
    assert main(["ckpt", "convert", str(src), str(base / "dcp"), "--to", "dcp"]) == 0
    assert main(["ckpt", "convert", str(base / "dcp"), str(base / "back"), "--to", "tierzero"]) == 0
    return base


def test_round_trip_is_bit_exact(run, converted):
    want_state, want = _everything(run / "checkpoints" / "step-00000002")
    got_state, got = _everything(converted / "back" / "step-00000002")
    assert got_state == want_state and want_state["step"] == 2 and want_state["next_sample"] == 8
    assert sorted(got) == sorted(want) and any(n.startswith("optim.exp_avg_sq/") for n in got)
    for name, (shape, dtype, raw) in want.items():
        assert got[name] == (shape, dtype, raw), name
    # a second trip writes the same DCP keys and bytes again (nothing drifts)
    again = converted / "again"
    write_dcp(str(converted / "back"), str(again))  # the checkpoints folder: its newest committed step
    assert sorted(os.listdir(again)) == sorted(os.listdir(converted / "dcp"))


def test_plain_dcp_load_reads_the_same_tensors(run, converted):
    """DCP is the reference reader: its own load, into freshly allocated tensors of the
    manifest's shapes, in the documented layout."""
    import torch.distributed.checkpoint as dcp

    _, want = _everything(run / "checkpoints" / "step-00000002")
    dtypes = {"float32": torch.float32}
    model, optim = {}, {}
    for name, (shape, dtype, _) in want.items():
        kind, _, fqn = name.partition("/")
        if kind in ("model", "buffer"):
            model[fqn] = torch.empty(shape, dtype=dtypes[dtype])
        else:
            optim[f"state.{fqn}.{kind.removeprefix('optim.')}"] = torch.empty(shape, dtype=dtypes[dtype])
            optim[f"state.{fqn}.step"] = torch.empty(())
    sd = {"model": model, "optimizer": optim, "train_state": {"step": 0, "next_sample": 0, "tierzero_state": ""}}
    with pytest.warns(UserWarning, match="single process"):
        dcp.load(sd, checkpoint_id=str(converted / "dcp"), no_dist=True)
    for name, (shape, _, raw) in want.items():
        assert dcp_key(name).startswith(("model.", "optimizer.state."))
        kind, _, fqn = name.partition("/")
        t = model[fqn] if kind in ("model", "buffer") else optim[f"state.{fqn}.{kind.removeprefix('optim.')}"]
        assert t.numpy().tobytes() == raw, name
    assert {float(v) for k, v in optim.items() if k.endswith(".step")} == {2.0}
    assert sd["train_state"]["step"] == 2 and sd["train_state"]["next_sample"] == 8
    assert json.loads(sd["train_state"]["tierzero_state"])["optimizer_steps"] == 2


@pytest.mark.multiprocess
def test_resume_from_converted_dcp_continues_the_run(run, converted, tmp_path):
    """checkpoint.resume=<the converted-back checkpoints folder>: its newest committed step (2),
    then steps 3-4 exactly as the original run computed them."""
    run_dir = tmp_path / "resumed"
    _cli(["run", *TINY, "train.steps=4", f"checkpoint.resume={converted / 'back'}", f"run.dir={run_dir}"], tmp_path)
    want, got = _losses(run), _losses(run_dir)
    assert sorted(got) == [3, 4] and got == {s: want[s] for s in (3, 4)}, (got, want)
    rows = ds.dataset(run_dir / "telemetry" / "events", format="parquet", partitioning="hive").to_table().to_pylist()
    (resume,) = [r for r in rows if r["kind"] == "resume"]
    assert resume["step"] == 2 and "sample 8" in resume["detail"] and "step-00000002" in resume["detail"]


def test_resume_of_a_checkpoints_folder_takes_its_newest_committed_step(run, converted, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(run / "checkpoints", ckpts)
    torn = ckpts / "step-00000006"
    shutil.copytree(ckpts / "step-00000004", torn)
    (torn / "COMMITTED").unlink()
    _, path, url = locate_step(str(ckpts), key="checkpoint.resume")
    assert path.endswith("step-00000004") and url == f"{ckpts}/step-00000004"
    _, path, _ = locate_step(str(ckpts / "step-00000002"))  # a step folder is itself
    assert path.endswith("step-00000002")
    for name in ("step-00000002", "step-00000004"):
        (ckpts / name / "COMMITTED").unlink()
    with pytest.raises(ResumeError, match="without a committed checkpoint"):
        locate_step(str(ckpts), key="checkpoint.resume")
    with pytest.raises(ResumeError, match=r"DCP.*tierzero ckpt convert .* --to tierzero"):
        locate_step(str(converted / "dcp"), key="checkpoint.resume")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(ResumeError, match=f"model.from_hf={hf} .*checkpoint.init_from={hf}"):
        locate_step(str(hf), key="checkpoint.resume")


@pytest.mark.parametrize("kind", ["dcp", "hf"])
def test_resume_of_another_format_exits_2_writing_nothing(converted, tmp_path, capsys, kind):
    folder = converted / "dcp"
    if kind == "hf":
        folder = tmp_path / "hf"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors.index.json").write_text("{}")
    run_dir = tmp_path / "never"
    assert main(["run", *TINY, "train.steps=4", f"checkpoint.resume={folder}", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    if kind == "dcp":
        assert f"tierzero ckpt convert {folder} DST --to tierzero" in err and "torch.distributed.checkpoint" in err
    else:
        assert "Hugging Face" in err and f"model.from_hf={folder}" in err
    assert "torn" not in err and not run_dir.exists()


def test_a_dcp_written_by_plain_torch_converts(tmp_path):
    """What a DCP user holds: model.state_dict() and AdamW's state flattened by get_state_dict
    (param_groups are not read: tierzero takes lr, betas, eps from its config)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("bias_table", torch.arange(3.0))
    opt = torch.optim.AdamW(model.parameters())
    for _ in range(3):
        model(torch.randn(2, 4)).square().sum().backward()
        opt.step()
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    assert "state.0.weight.exp_avg" in osd and "param_groups.0.weight.lr" in osd
    src = tmp_path / "theirs"
    with pytest.warns(UserWarning):
        dcp.save({"model": msd, "optimizer": osd, "train_state": {"step": 3, "next_sample": 6}},
                 checkpoint_id=str(src), no_dist=True)
    loaded = read_dcp(str(src))
    assert loaded.state == {"step": 3, "next_sample": 6, "optimizer_steps": 3}
    assert torch.equal(loaded.tensors["model/0.weight"], model[0].weight.detach())
    assert torch.equal(loaded.tensors["optim.exp_avg_sq/1.bias"], opt.state[model[1].bias]["exp_avg_sq"])
    assert torch.equal(loaded.tensors["buffer/bias_table"], torch.arange(3.0))
    assert any(k.startswith("optimizer.param_groups.") for k in loaded.ignored)
    _, step, written = write_tierzero(str(src), str(tmp_path / "out" / "step-00000003"))
    assert step == 3 and (Path(written) / "COMMITTED").is_file()
    with pytest.raises(DcpError, match="named for step 7"):
        write_tierzero(str(src), str(tmp_path / "out2" / "step-00000007"))


# ---- hostile sources, guarded destinations -------------------------------------------------------

def _tampered(converted, tmp_path, change) -> Path:
    """A copy of the converted DCP folder whose .metadata `change(md)` edited."""
    bad = tmp_path / "bad"
    shutil.copytree(converted / "dcp", bad)
    md = pickle.loads((bad / ".metadata").read_bytes())  # tierzero's own file: the test trusts it
    change(md)
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    return bad


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_dcp_folders_are_refused_unread(converted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "pickle"
    shutil.copytree(converted / "dcp", bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(DcpError, match="posix.system|os.system"):
        read_dcp(str(bad))
    assert not (tmp_path / "pickle" / "pwned").exists() and not (tmp_path / "pwned").exists()

    from torch.distributed.checkpoint.filesystem import _StorageInfo

    def escape(md):
        k = next(iter(md.storage_data))
        i = md.storage_data[k]
        md.storage_data[k] = _StorageInfo("../../etc/passwd", i.offset, i.length)

    def mismatch(md):
        k = "optimizer.state.norm.weight.exp_avg"  # [32]: one chunk, offsets [0]
        md.state_dict_metadata[k].size = torch.Size([7])
        md.state_dict_metadata[k].chunks[0].sizes = torch.Size([7])

    def weird_name(md):
        k = next(k for k in md.state_dict_metadata if k.startswith("model."))
        md.state_dict_metadata["model.a/../b"] = md.state_dict_metadata.pop(k)

    def huge(md):
        k = next(k for k in md.state_dict_metadata if k.startswith("model."))
        md.state_dict_metadata[k].size = torch.Size([2**40, 2**20])

    def past_the_end(md):
        k = next(k for k in md.storage_data if k.fqn.startswith("model."))
        i = md.storage_data[k]
        md.storage_data[k] = _StorageInfo(i.relative_path, i.offset + 10**9, i.length)

    def no_train_state(md):
        for k in [k for k in md.state_dict_metadata if k.startswith("train_state.")]:
            del md.state_dict_metadata[k]

    def not_dcp_fields(md):
        k = next(k for k in md.state_dict_metadata if k.startswith("model."))
        del md.state_dict_metadata[k].chunks

    for change, message in ((not_dcp_fields, "does not describe a DCP checkpoint"), (escape, "not a plain file name"), (mismatch, "is not the parameter's"),
                            (weird_name, "not a plain module path"), (huge, "elements"),
                            (past_the_end, "is truncated"), (no_train_state, "has no train_state.step")):
        bad = _tampered(converted, tmp_path / change.__name__, change)
        with pytest.raises(DcpError, match=message):
            read_dcp(str(bad))
        assert main(["ckpt", "convert", str(bad), str(tmp_path / change.__name__ / "out"), "--to", "tierzero"]) == 2
        assert not (tmp_path / change.__name__ / "out").exists()
    with pytest.raises(DcpError, match="is not AdamW's"):
        classify("optimizer.state.w.momentum_buffer")


def test_destinations_are_never_overwritten_and_a_failed_convert_leaves_nothing(run, converted, tmp_path,
                                                                                 monkeypatch):
    src = str(run / "checkpoints")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("the user's")
    with pytest.raises(DcpError, match="exists and is not empty"):
        write_dcp(src, str(full))
    with pytest.raises(DcpError, match="exists and is not empty"):
        write_tierzero(str(converted / "dcp"), str(full))
    assert os.listdir(full) == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dcp(src, str(empty))  # an empty folder is taken
    assert (empty / ".metadata").is_file()

    import tierzero.checkpoint.store as store_mod

    def killed(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.CheckpointStore, "commit", killed)
    with pytest.raises(OSError):
        write_tierzero(str(converted / "dcp"), str(tmp_path / "half"))
    assert main(["ckpt", "convert", str(converted / "dcp"), str(tmp_path / "half"), "--to", "tierzero"]) == 1
    assert not (tmp_path / "half").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".tz-")]
    with pytest.raises(CheckpointError, match="DCP"):
        write_dcp(str(converted / "dcp"), str(tmp_path / "x"))
