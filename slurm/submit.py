"""The thin subprocess layer over Slurm's client commands (submit, requeue, cancel, ask), and the
`bash -n` check of a rendered script before it is written."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)


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


def _bash_n(bash: str, text: str) -> Optional[str]:
    """None when bash parses `text` (read from stdin: nothing is written, nothing runs), else bash's
    first complaint without its `bash: line N:` prefix."""
    r = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True)
    if r.returncode == 0:
        return None
    first = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]
    return re.sub(r"^(?:\S*bash: )?(?:line \d+: )?", "", first)


def _cut(line: str, width: int = 80) -> str:
    return line if len(line) <= width else line[:width - 3] + "..."


# A construct split over slurm.setup items (if / ... / fi) rarely spans more lines than this; the
# cap keeps naming the bad line linear in the number of items.
_MAX_CONSTRUCT_LINES = 50


def _setup_faults(bash: str, lines: Sequence[str]) -> List[Tuple[int, str]]:
    """(index, bash's complaint) of each slurm.setup line that fails bash -n alone and is not the
    start or part of a construct that the lines after it complete (`if ...; then`, ..., `fi`)."""
    faults: List[Tuple[int, str]] = []
    closed_to = -1
    for i, line in enumerate(lines):
        why = None if i <= closed_to else _bash_n(bash, line + "\n")
        if why is None:
            continue
        ends = range(i + 1, min(len(lines), i + _MAX_CONSTRUCT_LINES))
        closed_to = next((j for j in ends if _bash_n(bash, "\n".join(lines[i:j + 1]) + "\n") is None), -1)
        if closed_to < 0:
            faults.append((i, why))
    return faults


def script_syntax_problems(text: str, setup: Sequence[str]) -> List[str]:
    """`bash -n` over a rendered script, so that one bash cannot parse is refused before it is
    written or queued (it would fail only once the job starts). The template is valid shell and
    every config value in it is quoted except the slurm.setup lines (shell code, used verbatim),
    so those are checked on their own to name the one at fault. [] when the script parses, or
    when bash is not on PATH (then nothing is checked)."""
    bash = shutil.which("bash")
    if bash is None:
        log.debug("bash is not on PATH: the rendered sbatch script is not checked with bash -n")
        return []
    script_why = _bash_n(bash, text)
    if script_why is None:
        return []
    lines = [str(line) for line in setup]
    problems = [f"slurm.setup[{i}]={_cut(lines[i])!r} is not valid shell (bash -n: {why}); the job would fail "
                "only after it queued. Each item is one shell line, used verbatim: fix it (e.g. balance its "
                "quotes, close what it opens), or drop it." for i, why in _setup_faults(bash, lines)]
    if not problems and lines:  # each line parses in its place: it is how they meet the rest of the script
        problems.append(f"slurm.setup={[_cut(line) for line in lines]} does not parse as part of the script "
                        f"(bash -n: {script_why}); the job would fail only after it queued. Fix or drop the "
                        "lines.")
    assert problems, f"the rendered sbatch script does not parse (bash -n: {script_why}) and has no slurm.setup"
    return problems


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
