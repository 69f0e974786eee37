"""launcher/devices.py: which backend and device each rank takes, for every way a cluster shows
its GPUs (tested without one: the function is pure), and the pre-spawn error when there are too
few for launcher.nproc."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tierzero.launcher.cli import main
from tierzero.launcher.devices import Visible, backend_errors, choose

# (launcher.backend, mode, local rank, local ranks, visible GPUs) -> (backend, device)
CASES = [
    # srun --gpus-per-task=1 / a per-task CUDA_VISIBLE_DEVICES: every task sees its one GPU as index 0
    ("auto", "slurm", 5, 8, 1, ("nccl", "cuda:0")),
    ("nccl", "slurm", 7, 8, 1, ("nccl", "cuda:0")),
    ("nccl", "mpi", 3, 4, 1, ("nccl", "cuda:0")),
    # every rank sees the node's GPUs: its own by local rank
    ("auto", "slurm", 5, 8, 8, ("nccl", "cuda:5")),
    ("auto", "torchrun", 3, 4, 8, ("nccl", "cuda:3")),
    ("nccl", "supervised", 1, 2, 2, ("nccl", "cuda:1")),
    ("auto", "local", 0, 1, 1, ("nccl", "cuda:0")),
    # no GPU, or gloo asked for: CPU
    ("auto", "supervised", 2, 4, 0, ("gloo", "cpu")),
    ("gloo", "slurm", 0, 8, 8, ("gloo", "cpu")),
    # auto with fewer GPUs than ranks that would have to share: CPU, and a note says why
    ("auto", "supervised", 1, 4, 1, ("gloo", "cpu")),
    ("auto", "torchrun", 1, 4, 2, ("gloo", "cpu")),
]


@pytest.mark.parametrize("requested,mode,local_rank,local_world,count,expected", CASES)
def test_each_rank_gets_a_device_it_can_open(requested, mode, local_rank, local_world, count, expected):
    backend, device, note = choose(requested, local_rank=local_rank, local_world_size=local_world,
                                   visible=Visible(count), mode=mode)
    assert (backend, device) == expected
    if device.startswith("cuda"):
        assert int(device.split(":")[1]) < count  # never an invalid device ordinal
    assert (note is not None) == (requested == "auto" and count > 0 and backend == "gloo")


@pytest.mark.parametrize("mode,local_world,count,words", [
    ("supervised", 4, 1, ["launcher.nproc=4", "1 CUDA GPU", "launcher.nproc=1", "launcher.backend=gloo"]),
    ("torchrun", 8, 4, ["8 local ranks per node (torchrun)", "4 CUDA GPUs", "launcher.backend=gloo"]),
    ("slurm", 8, 0, ["launcher.backend=nccl", "sees none", "launcher.backend=gloo"]),
])
def test_nccl_that_cannot_run_names_the_count_and_the_fix(mode, local_world, count, words):
    with pytest.raises(ValueError) as e:
        choose("nccl", local_rank=0, local_world_size=local_world, visible=Visible(count), mode=mode)
    for w in words:
        assert w in str(e.value)


def test_rocm_devices_are_described_with_the_variable_that_hid_them(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    visible = Visible.here({"ROCR_VISIBLE_DEVICES": "3", "SLURM_JOB_ID": "1"})
    assert visible == Visible(1, "rocm", "ROCR_VISIBLE_DEVICES=3")
    errors = backend_errors("nccl", local_world_size=2, visible=visible, mode="supervised")
    assert "1 AMD (ROCm) GPU (ROCR_VISIBLE_DEVICES=3)" in errors[0]
    assert choose("auto", local_rank=0, local_world_size=8, visible=visible, mode="slurm")[:2] == ("nccl", "cuda:0")


def test_too_few_gpus_for_launcher_nproc_is_a_config_error_before_any_rank(tmp_path, monkeypatch, capsys):
    import tierzero.launcher.devices as devices
    import tierzero.launcher.supervisor as supervisor

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(devices.Visible, "here", classmethod(lambda cls, env: cls(1)))

    def spawn(*args, **kwargs):
        raise AssertionError("a rank was spawned")

    monkeypatch.setattr(supervisor, "subprocess", SimpleNamespace(Popen=spawn, TimeoutExpired=TimeoutError))
    code = main(["run", "dense_tiny_cpu", "launcher.nproc=2", "train.global_batch_size=8", "launcher.backend=nccl"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "launcher.nproc=2" in err and "1 CUDA GPU" in err and "launcher.nproc=1" in err
    assert not any(tmp_path.iterdir())  # nothing written
