"""Config -> sbatch script text (pure: plain values in, a string out; nothing is written or run).

The script starts one rank per Slurm task (`srun <program> run CONFIG`), rendezvous at the
first node of the allocation, and turns "the job is about to end" into "checkpoint and come
back": Slurm sends the requeue signal to the batch shell (`--signal=B:USR2@margin`), the
shell forwards it to the step, every rank finishes its step, commits a checkpoint and exits
with the requeue code (75), and the shell requeues the job (`scontrol requeue`). The requeued
job (SLURM_RESTART_COUNT one higher; a new attempt in the telemetry) resumes from that checkpoint. SIGUSR2 rather than USR1:
NCCL installs its own SIGUSR1 handler.

Every config value that reaches the shell body is quoted with shlex.quote; values that reach
an `#SBATCH` line (which sbatch, not bash, parses) must be one line and are double-quoted when
they hold blanks. sbatch's own parser (src/sbatch/opt.c, _get_argument) ends an option at an
unquoted `#` and drops every backslash (taking the next character as is), so a value with
either is refused, naming its key, rather than cut. A value the user did not set but that
derives from one they did is refused naming that key: the log path inside run.dir (slurm.output
unset or relative) names run.dir, the job name while slurm.job_name is unset names run.name.
`slurm.setup` lines are shell code by design and are used verbatim (`tierzero sbatch` checks the
script with bash -n before writing it: slurm/submit.py, script_syntax_problems).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from tierzero.slurm.config import SlurmConfig


class SbatchError(ValueError):
    """Config values that cannot go into a script; `problems` names each key, value and fix."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ScriptSpec:
    """What the renderer needs besides slurm.*: where the run lives and how ranks exit."""

    run_name: str
    run_dir: str
    """Absolute: every attempt of the job must find the same run folder (and its checkpoints)."""
    config_path: str
    """The resolved config each rank reads (absolute)."""
    exit_requeue: int = 75
    """The exit code with which every rank says "checkpoint committed, requeue me"."""
    requeue_signal: str = "SIGUSR2"
    """The signal Slurm sends before the time limit and the shell forwards to the ranks."""


_BAD_CHARS = re.compile(r"[\n\r\x00]")
_SIGNAL = re.compile(r"^(?:SIG)?([A-Z][A-Z0-9]*)\Z")
_CUT = "'#', where sbatch's #SBATCH parser ends the option (the rest of the line is a comment)"
_MANGLED = "a backslash, which sbatch's #SBATCH parser drops (taking the next character as it is)"
_LOG_IN_RUN_DIR = "Slurm's log file goes inside it (#SBATCH --output; or give an absolute slurm.output elsewhere)"


def signal_name(sig: str) -> str:
    """'SIGUSR2' / 'USR2' / 'usr2' -> 'USR2' (the form sbatch --signal and bash trap take)."""
    m = _SIGNAL.match(str(sig).strip().upper())
    if not m:
        raise SbatchError([f"launcher.requeue_signal={sig!r} is not a signal name; write e.g. SIGUSR2"])
    return m.group(1)


def _one_line(key: str, value: str, problems: List[str]) -> bool:
    if _BAD_CHARS.search(value):
        problems.append(
            f"{key}={value!r} holds a newline or NUL; it goes on one #SBATCH line of the script, where a line "
            f"break would start a new (shell) line. Give {key} as a single line."
        )
        return False
    return True


def _sbatch_chars(key: str, value: str, problems: List[str], where: str = "") -> bool:
    """False (and a problem naming `key`) when sbatch's parser would cut or change `value` on an
    #SBATCH line: a '#' (it is never quoted there) or a backslash."""
    for char, what in (("\\", _MANGLED), ("#", f"a {_CUT}")):
        if char in value:
            problems.append(f"{key}={value!r} holds {what}; {where or 'it goes on an #SBATCH line'}, so sbatch "
                            f"would not get it as written. Give {key} without {char!r}.")
            return False
    return True


def _extra_sbatch_problem(item: str) -> Optional[str]:
    """What sbatch's #SBATCH parser would cut or mangle in one slurm.extra_sbatch item, and the fix
    (the item is written as on the command line: its quotes are sbatch's to read), or None."""
    quote = None
    for char in item:
        if char == "\\":
            return f"{_MANGLED}; drop the backslash"
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            return f"an unquoted {_CUT}; quote a '#' that belongs in a value, e.g. --comment=\"run #3\""
    return f"an unmatched {quote}, on which sbatch stops ('Unmatched {quote}'); balance the quotes" if quote else None


def _sbatch_ok(key: str, value: str, problems: List[str], where: str = "") -> bool:
    """False (and a problem naming `key`) when `value` cannot go on an #SBATCH line as written."""
    if not _one_line(key, value, problems) or not _sbatch_chars(key, value, problems, where):
        return False
    if '"' in value and "'" in value:
        problems.append(f"{key}={value!r} holds both kinds of quotes; {where + ', and ' if where else ''}sbatch "
                        f"cannot read that on an #SBATCH line. Drop one kind of quote from {key}.")
        return False
    return True


def _sbatch_value(key: str, value: str, problems: List[str]) -> str:
    """A value as sbatch's own #SBATCH parser reads it: one line, quoted when it has blanks."""
    if not _sbatch_ok(key, value, problems):
        return ""
    if not re.search(r"[\s\"']", value):
        return value
    return f'"{value}"' if '"' not in value else f"'{value}'"


def _slurm_filename(path: str) -> str:
    """A literal path for --output: '%' starts a Slurm filename pattern, '%%' is a literal '%'."""
    return path.replace("%", "%%")


def sbatch_options(slurm: SlurmConfig, spec: ScriptSpec, problems: List[str]) -> List[Tuple[str, Optional[str]]]:
    """(option, value) pairs of the #SBATCH header, in a fixed order."""
    sweep = bool(slurm.sweep_nodes)
    opts: List[Tuple[str, Optional[str]]] = [("job-name", slurm.job_name or spec.run_name)]
    opts.append(("nodes", str(max(slurm.sweep_nodes) if sweep else slurm.nodes)))
    opts.append(("ntasks-per-node", str(slurm.ranks_per_node())))
    if slurm.gpus_per_node:
        opts.append(("gpus-per-node", str(slurm.gpus_per_node)))
    if slurm.cpus_per_task:
        opts.append(("cpus-per-task", str(slurm.cpus_per_task)))
    if slurm.mem is not None:
        opts.append(("mem", str(slurm.mem)))
    opts.append(("time", str(slurm.time)))
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(slurm, key)
        if value is not None:
            opts.append((key, str(value)))
    if slurm.exclusive:
        opts.append(("exclusive", None))
    if sweep:
        opts.append(("array", f"0-{len(slurm.sweep_nodes) - 1}"))
    default_out = "slurm-%A_%a.out" if sweep else "slurm-%j.out"
    out_dir = _slurm_filename(spec.run_dir.rstrip("/"))
    output = slurm.output or default_out
    opts.append(("output", output if output.startswith("/") else f"{out_dir}/{output}"))
    opts.append(("open-mode", "append"))
    opts.append(("requeue" if slurm.requeue else "no-requeue", None))
    opts.append(("signal", f"B:{signal_name(spec.requeue_signal)}@{slurm.signal_margin_s}"))
    return opts


def script_problems(slurm: SlurmConfig, spec: ScriptSpec) -> List[str]:
    """Everything that stops a script from being rendered, each naming its key and the fix."""
    problems: List[str] = []
    if not spec.run_dir.startswith("/"):
        problems.append(f"run.dir={spec.run_dir!r} must be absolute in a job script (every requeue must find the "
                        "same folder); resolve it before rendering")
    _one_line("run.dir", spec.run_dir, problems)
    _one_line("run.name", spec.run_name, problems)
    for key in ("program",):
        _one_line(f"slurm.{key}", getattr(slurm, key), problems)
    for i, line in enumerate(slurm.setup):
        _one_line(f"slurm.setup[{i}]", str(line), problems)
    for i, item in enumerate(slurm.extra_sbatch):
        item = str(item)
        if not _one_line(f"slurm.extra_sbatch[{i}]", item, problems):
            continue
        if not item.startswith("-"):
            problems.append(f"slurm.extra_sbatch[{i}]={item!r} is not an sbatch option; write it as on the sbatch "
                            "command line, e.g. --mail-type=END")
        elif _extra_sbatch_problem(item):
            problems.append(f"slurm.extra_sbatch[{i}]={item!r} holds {_extra_sbatch_problem(item)}.")
    try:
        shlex.split(slurm.program)
    except ValueError as e:
        problems.append(f"slurm.program={slurm.program!r} cannot be split into words ({e}); balance its quotes")
    try:
        signal_name(spec.requeue_signal)
    except SbatchError as e:
        problems += e.problems
    for key, value in sbatch_options(slurm, spec, []):
        if value is None:
            continue
        if key == "output" and not (slurm.output or "").startswith("/"):
            _log_path_problems(slurm, spec, value, problems)
        elif key == "job-name" and not slurm.job_name:
            _sbatch_ok("run.name", spec.run_name, problems,
                       where="it is the job's name (#SBATCH --job-name) while slurm.job_name is unset")
        else:
            _sbatch_value(f"slurm.{key.replace('-', '_')}", value, problems)
    return list(dict.fromkeys(problems))


def _log_path_problems(slurm: SlurmConfig, spec: ScriptSpec, log_path: str, problems: List[str]) -> None:
    """#SBATCH --output inside run.dir is run.dir + slurm.output (or its default): what is wrong in
    the run.dir part is run.dir's, the key the user set, not slurm.output's (issue 24, item 6a)."""
    run_dir_ok = _sbatch_ok("run.dir", spec.run_dir, problems, where=_LOG_IN_RUN_DIR)
    output_ok = not slurm.output or _sbatch_ok("slurm.output", slurm.output, problems)
    if run_dir_ok and output_ok and not _sbatch_ok("slurm.output", log_path, []):  # one quote kind in each
        problems.append(f"slurm.output={slurm.output!r} goes inside run.dir={spec.run_dir!r}, and the path they "
                        "make holds both kinds of quotes, which sbatch cannot read on an #SBATCH line. Drop one "
                        "kind of quote from slurm.output or run.dir, or give an absolute slurm.output elsewhere.")


def render_sbatch(slurm: SlurmConfig, spec: ScriptSpec) -> str:  # long: the script template, top to bottom
    """The whole script. Raises SbatchError listing every value that cannot be rendered safely."""
    problems = script_problems(slurm, spec)
    if problems:
        raise SbatchError(problems)
    q = shlex.quote
    sig = signal_name(spec.requeue_signal)
    command = slurm.command
    sweep = bool(slurm.sweep_nodes)
    lines = [
        "#!/bin/bash",
        f"# tierzero sbatch: `tierzero {command}` of run {spec.run_name} in {spec.run_dir}",
        f"# Rendered from {spec.config_path}; change the config and render again rather than editing this file.",
    ]
    for key, value in sbatch_options(slurm, spec, []):
        lines.append(f"#SBATCH --{key}" + ("" if value is None else "=" + _sbatch_value(key, value, [])))
    lines += [f"#SBATCH {item}" for item in slurm.extra_sbatch]
    program = " ".join(q(word) for word in shlex.split(slurm.program))
    lines += [
        "",
        "set -u",
        f"run_dir={q(spec.run_dir)}",
        f"config={q(spec.config_path)}",
        f"exit_requeue={spec.exit_requeue}",
        f"max_requeues={slurm.max_requeues}",
        "",
        "# Rendezvous at the first node of the allocation, by the address slurmctld reaches it at",
        "# (NodeAddr): node names need not resolve (emulated nodes sharing one host); the port",
        "# comes from the job id, so every task and every attempt of the job agree on it.",
        'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'node_addr=$(scontrol show node "$first_node" 2>/dev/null | grep -o "NodeAddr=[^ ]*" | head -n 1 | cut -d= -f2)',
        'export MASTER_ADDR="${node_addr:-$first_node}"',
        'export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))',
    ]
    if slurm.setup:
        lines += ["", "# slurm.setup (may override MASTER_ADDR, e.g. with a high-speed interface's address)"]
        lines += [str(line) for line in slurm.setup]
    srun = ["srun", "--kill-on-bad-exit=1"]
    if sweep:
        counts = " ".join(str(n) for n in slurm.sweep_nodes)
        lines += [
            "",
            "# One job-array task per node count; each writes its rows as run <name>-nodes<N> into one run dir.",
            f"sweep_nodes=({counts})",
            'num_nodes=${sweep_nodes[$SLURM_ARRAY_TASK_ID]}',
        ]
        srun += ['--nodes="$num_nodes"', f'--ntasks=$((num_nodes * {slurm.ranks_per_node()}))']
    else:
        srun += [f"--nodes={slurm.nodes}"]
    srun += [f"--ntasks-per-node={slurm.ranks_per_node()}"]
    if slurm.cpus_per_task:
        # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05)
        srun += [f"--cpus-per-task={slurm.cpus_per_task}"]
    srun += [program, command, '"$config"']
    if sweep:
        srun += [q(f"run.name={spec.run_name}-nodes") + '"$num_nodes"']
    lines += [
        "",
        'echo "tierzero: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT"',
        "",
        f"# {sig}, sent before the time limit: srun passes it on to the ranks, which finish their step,",
        "# commit a checkpoint and exit $exit_requeue; then the job requeues itself. `srun ... &` + wait",
        "# lets bash run the trap while the step runs. TERM (scancel, the time limit itself, preemption)",
        "# reaches the ranks from Slurm directly; the shell only notes it and never requeues after it,",
        "# so scancel stays a cancel (preemption requeues through Slurm's own PreemptMode=REQUEUE).",
        "step_pid=",
        "signalled=",
        "terminated=",
        "forward() {",
        f'  echo "tierzero: batch shell got SIG{sig}; passing it to the ranks"',
        f"  signalled={sig}",
        f'  [ -n "$step_pid" ] && kill -s {sig} "$step_pid" 2>/dev/null',
        "}",
        f"trap forward {sig}",
        "trap 'echo \"tierzero: batch shell got SIGTERM; the job is ending (no requeue)\"; terminated=1' TERM",
        "",
        " ".join(srun) + " &",
        "step_pid=$!",
        '# a trap interrupts wait (status > 128) while the step runs on: wait until it is gone',
        'while kill -0 "$step_pid" 2>/dev/null; do wait "$step_pid"; done',
        'wait "$step_pid"; rc=$?',
        "",
        "# requeue when the ranks say so (exit $exit_requeue), or when they were told to checkpoint and",
        "# srun ended the step some other way (--kill-on-bad-exit stops the slower ranks): the next",
        "# attempt resumes from the newest committed checkpoint either way.",
        'if [ -z "$terminated" ] && { [ "$rc" -eq "$exit_requeue" ] || { [ -n "$signalled" ] && [ "$rc" -ne 0 ]; }; }; then',
    ]
    if slurm.requeue:
        lines += [
            '  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$max_requeues" ]; then',
            '    echo "tierzero: ranks stopped to checkpoint (exit $rc); requeueing job $SLURM_JOB_ID"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "    exit 0",
            "  fi",
            '  echo "tierzero: slurm.max_requeues=$max_requeues reached; not requeueing (resubmit to go on)"',
        ]
    else:
        lines += ['  echo "tierzero: ranks stopped to checkpoint (exit $rc); slurm.requeue=false, resubmit to go on"']
    lines += ["fi", 'exit "$rc"', ""]
    return "\n".join(lines)
