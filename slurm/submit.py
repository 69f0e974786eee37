"""The thin subprocess layer over Slurm's client commands: submit, requeue, cancel, ask."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Dict, Mapping, Optional


class SubmitError(RuntimeError):
    """sbatch / scontrol / scancel failed; the message carries Slurm's own words."""


def _client(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SubmitError(f"`{name}` is not on PATH: run this on a Slurm login node, or start a local cluster "
                          "(`tierzero slurm up --nodes 2`, then the `export SLURM_CONF=...` it prints)")
    return path


def _call(cmd, env: Optional[Mapping[str, str]], cwd: Optional[str] = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, env=None if env is None else dict(env), cwd=cwd)
    if r.returncode != 0:
        raise SubmitError(f"`{' '.join(map(str, cmd))}` exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def submit(script: Path, env: Optional[Mapping[str, str]] = None) -> str:
    """sbatch the script from its own folder; the job id (`123`, or `123` of `123;cluster`)."""
    out = _call([_client("sbatch"), "--parsable", str(script)], env, cwd=str(script.parent))
    return out.strip().split(";")[0]


def requeue(job_id: str, env: Optional[Mapping[str, str]] = None) -> None:
    _call([_client("scontrol"), "requeue", str(job_id)], env)


def cancel(job_id: str, env: Optional[Mapping[str, str]] = None, *, signal: Optional[str] = None,
           batch: bool = False) -> None:
    cmd = [_client("scancel")]
    if signal:
        cmd.append(f"--signal={signal}")
    if batch:
        cmd.append("--batch")
    _call(cmd + [str(job_id)], env)


def job_info(job_id: str, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """`scontrol show job -o ID` as a dict (JobState, RestartCnt, NodeList, ExitCode, ...)."""
    out = _call([_client("scontrol"), "show", "job", "-o", str(job_id)], env)
    info: Dict[str, str] = {}
    for word in out.split():
        if "=" in word:
            key, value = word.split("=", 1)
            info.setdefault(key, value)
    return info
