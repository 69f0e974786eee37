"""Which backend and device a rank uses: a pure function of what the process can see and how it
was launched, so every case is tested on a machine without a GPU.

The cases a cluster presents:
- `srun --gpus-per-task=1` (or a wrapper that sets CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES
  per task): each task sees exactly one GPU, index 0 -- `cuda:<local_rank>` would be an
  "invalid device ordinal" on every task but the first;
- torchrun, `srun` without a per-task binding, tierzero's own local ranks: every rank sees all
  of the node's GPUs and takes `cuda:<local_rank>`;
- fewer GPUs than local ranks: with launcher.backend=auto the job runs on CPU over gloo and says
  why; with launcher.backend=nccl it is a config error before any rank is spawned.

ROCm builds of torch expose AMD GPUs through the same `cuda` device type and RCCL through the
`nccl` backend name; only the variable that hides devices differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional, Tuple

PER_TASK_BINDING_MODES = ("slurm", "mpi")
"""Launchers under which one visible GPU per task is the norm (srun --gpus-per-task=1, an
mpirun wrapper that sets the visible devices per rank). torchrun and tierzero's own local ranks
never bind: there, one visible GPU for several local ranks means they would share it."""


@dataclass(frozen=True)
class Visible:
    """The accelerators this process can see."""
    count: int
    platform: str = "cuda"
    """cuda (NVIDIA) or rocm (AMD, a HIP build of torch)."""
    hidden_by: str = ""
    """The variable that chose them (CUDA_VISIBLE_DEVICES=..., ROCR_VISIBLE_DEVICES=...), if set."""

    @classmethod
    def here(cls, env: Mapping[str, str]) -> "Visible":
        import torch

        platform = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = (("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES") if platform == "rocm"
                 else ("CUDA_VISIBLE_DEVICES",))
        hidden_by = ", ".join(f"{n}={env[n]}" for n in names if n in env)
        return cls(count, platform, hidden_by)

    def describe(self) -> str:
        kind = "AMD (ROCm)" if self.platform == "rocm" else "CUDA"
        shown = f"{self.count} {kind} GPU{'s' if self.count != 1 else ''}"
        return shown + (f" ({self.hidden_by})" if self.hidden_by else "")


def _one_each(visible: Visible, local_world_size: int, mode: str) -> bool:
    """Every local rank gets a GPU of its own."""
    if visible.count >= local_world_size:
        return True
    return visible.count == 1 and mode in PER_TASK_BINDING_MODES


def _nproc_key(mode: str, local_world_size: int) -> str:
    if mode in ("local", "supervised"):
        return f"launcher.nproc={local_world_size}"
    return f"{local_world_size} local ranks per node ({mode})"


def backend_errors(requested: str, *, local_world_size: int, visible: Visible, mode: str) -> List[str]:
    """Why `requested` cannot run `local_world_size` ranks per node on `visible` (empty: it can)."""
    if requested != "nccl":
        return []
    if visible.count == 0:
        return [f"launcher.backend=nccl needs GPUs and this process sees none{' (' + visible.hidden_by + ')' if visible.hidden_by else ''}; "
                "use launcher.backend=gloo (or auto) on CPU"]
    if not _one_each(visible, local_world_size, mode):
        fix = (f"use launcher.nproc={visible.count}" if mode in ("local", "supervised")
               else f"start {visible.count} tasks per node, or bind one GPU per task (srun --gpus-per-task=1)")
        return [f"{_nproc_key(mode, local_world_size)} with launcher.backend=nccl needs one GPU per rank and this node "
                f"shows {visible.describe()} (NCCL refuses two ranks on one GPU); {fix}, or "
                "launcher.backend=gloo to run on CPU"]
    return []


def choose(requested: str, *, local_rank: int, local_world_size: int, visible: Visible,
           mode: str) -> Tuple[str, str, Optional[str]]:
    """(backend, device, note): nccl on `cuda:<i>`, or gloo on cpu. `note` says why auto chose
    CPU on a machine with GPUs. Raises ValueError (the backend_errors) for an nccl that cannot run."""
    errors = backend_errors(requested, local_world_size=local_world_size, visible=visible, mode=mode)
    if errors:
        raise ValueError("\n".join(errors))
    note = None
    if requested == "auto":
        if visible.count and not _one_each(visible, local_world_size, mode):
            note = (f"launcher.backend=auto: {_nproc_key(mode, local_world_size)} and {visible.describe()}, "
                    "so the ranks run on CPU over gloo; give each rank a GPU for nccl")
        requested = "nccl" if visible.count and note is None else "gloo"
    if requested != "nccl":
        return requested, "cpu", note
    index = 0 if visible.count == 1 else local_rank
    return "nccl", f"cuda:{index}", note
