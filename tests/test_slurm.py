"""Slurm without Slurm: sbatch scripts against golden files, every hostile config value escaped
(the rendered script is run by a real bash with stub srun/scontrol that record what they got),
the requeue flow of the script, slurm.* validation, the local cluster's slurm.conf.

The same scripts run on a real Slurm in tests/test_slurm_cluster.py.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest

from tierzero.launcher.cli import main
from tierzero.launcher.config import ConfigError, load_config
from tierzero.launcher.modes import detect_launch
from tierzero.slurm.cluster import ClusterSpec, render_slurm_conf
from tierzero.slurm.config import SlurmConfig, time_limit_s
from tierzero.slurm.sbatch import ScriptSpec, SbatchError, render_sbatch

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "slurm"
SPEC = ScriptSpec(run_name="moe-2n", run_dir="/scratch/tz/runs/moe-2n", config_path="/scratch/tz/runs/moe-2n/config.yaml")

CASES = {
    "default": SlurmConfig(),
    "two_nodes_cpu": SlurmConfig(nodes=2, ntasks_per_node=2, cpus_per_task=1, time="00:10:00", signal_margin_s=60),
    "gpu_cluster": SlurmConfig(
        nodes=4, gpus_per_node=8, cpus_per_task=7, mem="0", time="2-00:00:00", partition="batch", account="csc123",
        qos="normal", constraint="nvme", exclusive=True, job_name="olmoe 1b7b", output="logs/%x-%j.out",
        extra_sbatch=["--mail-type=END", "--reservation=hero"],
        setup=["module load PrgEnv-gnu rocm/6.0", "source /ccs/proj/csc123/venv/bin/activate",
               "export MASTER_ADDR=$(hostname -s)-hsn0"],
        program="/ccs/proj/csc123/venv/bin/python -m tierzero.launcher.cli", signal_margin_s=300, max_requeues=5),
    "no_requeue": SlurmConfig(nodes=1, ntasks_per_node=4, requeue=False, time="30"),
    "bench_sweep": SlurmConfig(command="bench", sweep_nodes=[1, 2, 4], ntasks_per_node=4, time="00:20:00",
                               exclusive=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_scripts(name):
    text = render_sbatch(CASES[name], SPEC)
    path = GOLDEN / f"{name}.sh"
    if os.environ.get("TIERZERO_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing; create it with TIERZERO_UPDATE_GOLDEN=1 python -m pytest {__file__}"
    assert text == path.read_text(), f"{name}: rendered script differs from {path} (TIERZERO_UPDATE_GOLDEN=1 rewrites)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_scripts_are_valid_bash(name, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch(CASES[name], SPEC))
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_script_asks_for_the_signal_requeue_and_output_in_the_run_dir():
    text = render_sbatch(CASES["two_nodes_cpu"], SPEC)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --signal=B:USR2@60",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --output=/scratch/tz/runs/moe-2n/slurm-%j.out"):
        assert line in text.splitlines(), line
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=2 --cpus-per-task=1 tierzero run \"$config\" &" \
        in text
    assert "--signal=B:USR1" not in text  # NCCL owns SIGUSR1


def test_requeue_signal_follows_launcher_key():
    spec = ScriptSpec(run_name="r", run_dir="/r", config_path="/r/config.yaml", requeue_signal="SIGHUP")
    text = render_sbatch(SlurmConfig(), spec)
    assert "#SBATCH --signal=B:HUP@120" in text and "trap forward HUP" in text


# ---- the script, run by bash against stub Slurm commands ---------------------------------

STUB_SRUN = """#!/bin/bash
# records its arguments (one per line); then behaves as $STUB_MODE says
printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
case "$STUB_MODE" in
  exit75) exit 75 ;;
  fail) exit 3 ;;
  wait-signal)
    trap 'echo "$(date +%s.%N)" > "$STUB_DIR/srun.got-usr2"; exit 75' USR2
    trap 'echo term > "$STUB_DIR/srun.got-term"; exit 143' TERM
    touch "$STUB_DIR/srun.started"
    for _ in $(seq 300); do sleep 0.1; done; exit 0 ;;
  *) exit 0 ;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
echo "$*" >> "$STUB_DIR/scontrol.calls"
case "$1 $2" in
  "show hostnames") echo n7; echo n8 ;;
  "show node") echo "NodeName=n7 Arch=x86_64 CoresPerSocket=2"; echo "   NodeAddr=10.1.2.3 NodeHostName=vm" ;;
esac
"""


def _stubbed(tmp_path: Path):
    stub = tmp_path / "stub"
    stub.mkdir(parents=True)
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    return stub


def _run_script(tmp_path, text, mode, restart_count="0", send=None):
    stub = _stubbed(tmp_path)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", STUB_DIR=str(stub), STUB_MODE=mode,
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n[7-8]", SLURM_RESTART_COUNT=restart_count)
    p = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if send is not None:
        deadline = time.monotonic() + 20
        while not (stub / "srun.started").exists():
            assert time.monotonic() < deadline and p.poll() is None, "the stub srun never started"
            time.sleep(0.05)
        if send == "group-term":  # what Slurm does: every process of the job
            os.killpg(p.pid, signal.SIGTERM)
        else:
            p.send_signal(send)
    out, _ = p.communicate(timeout=60)
    calls = (stub / "scontrol.calls").read_text().splitlines() if (stub / "scontrol.calls").exists() else []
    args = (stub / "srun.args").read_text().splitlines() if (stub / "srun.args").exists() else None
    return p.returncode, out, calls, args, stub


HOSTILE = [
    "/tmp/x/$(touch PWNED)",
    "/tmp/x/`touch PWNED`",
    "/tmp/x/it's & ; | > PWNED",
    '/tmp/x/"quoted" && touch PWNED',
    "/tmp/x/with  spaces/$HOME/${PATH}",
    "/tmp/x/100%/%j",
]


@pytest.mark.parametrize("run_dir", HOSTILE)
def test_hostile_run_dir_reaches_srun_verbatim(tmp_path, run_dir):
    spec = ScriptSpec(run_name="r", run_dir=run_dir, config_path=run_dir + "/config.yaml")
    slurm = SlurmConfig(program="'/opt/my env/bin/python' -m tierzero.launcher.cli")  # split like a shell would
    rc, out, calls, args, stub = _run_script(tmp_path, render_sbatch(slurm, spec), "ok")
    assert rc == 0, out
    assert not list(tmp_path.rglob("PWNED")), "a config value ran as shell code"
    assert args[-5:] == ["/opt/my env/bin/python", "-m", "tierzero.launcher.cli", "run", run_dir + "/config.yaml"], args
    # the stub scontrol answered NodeAddr=10.1.2.3 for the first node n7: the rendezvous goes there
    assert "rendezvous 10.1.2.3:24242" in out, out


def test_hostile_program_words_stay_words(tmp_path):
    slurm = SlurmConfig(program="tierzero'; touch PWNED; echo '")
    spec = ScriptSpec(run_name="r", run_dir="/r", config_path="/r/config.yaml")
    rc, out, _, args, _ = _run_script(tmp_path, render_sbatch(slurm, spec), "ok")
    assert not list(tmp_path.rglob("PWNED"))
    assert args[-3:] == ["tierzero; touch PWNED; echo ", "run", "/r/config.yaml"], args


@pytest.mark.parametrize("key,value", [
    ("job_name", "a\n#SBATCH --uid=0"), ("partition", "batch\ntouch PWNED"), ("account", "x\r"),
    ("output", "/tmp/a\nb"), ("program", "tierzero\nrm -rf /"), ("extra_sbatch", ["--mail-type=END\ntouch PWNED"]),
    ("setup", ["module load x\nmodule load y"]),
])
def test_newlines_are_refused_naming_the_key(key, value):
    slurm = SlurmConfig(**{key: value})
    with pytest.raises(SbatchError) as e:
        render_sbatch(slurm, SPEC)
    assert f"slurm.{key}" in str(e.value) and "newline" in str(e.value)


def test_sbatch_values_with_blanks_are_quoted_for_sbatch():
    text = render_sbatch(SlurmConfig(job_name="my 'big' run", constraint='a100 & "ib"'), SPEC)
    assert '#SBATCH --job-name="my \'big\' run"' in text
    assert "#SBATCH --constraint='a100 & \"ib\"'" in text
    with pytest.raises(SbatchError, match="slurm.job_name.*both kinds of quotes"):
        render_sbatch(SlurmConfig(job_name="it's \"x\""), SPEC)


def test_extra_sbatch_must_be_an_option():
    with pytest.raises(SbatchError, match=r"slurm.extra_sbatch\[0\]='mail-type=END' is not an sbatch option"):
        render_sbatch(SlurmConfig(extra_sbatch=["mail-type=END"]), SPEC)


# ---- what sbatch's own #SBATCH parser reads back -----------------------------------------------

_SBATCH_OPTION = re.compile(r"^sbatch: (\S+)\s*: (.*)$")


def _sbatch_reads(tmp_path: Path, text: str) -> Dict[str, str]:
    """The options a real sbatch reads from the #SBATCH lines of `text`: `sbatch -vv` lists them
    ("defined options") before it looks for a controller, of which there is none here."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=tz\nSlurmctldHost=localhost\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")
    script = tmp_path / "job.sh"
    script.write_text(text)
    p = subprocess.Popen([shutil.which("sbatch"), "-vv", "--test-only", str(script)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, SLURM_CONF=str(conf)),
                         start_new_session=True)
    options: Dict[str, str] = {}
    try:
        for line in p.stderr:
            if line.startswith("sbatch: end of defined options") or "fatal" in line:
                break
            m = _SBATCH_OPTION.match(line.rstrip("\n"))
            if m and not m.group(1).startswith("-"):
                options[m.group(1)] = m.group(2)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    return options


SBATCH_VALUES = ["plain", "with blank", "it's", 'say "hi"', "a%j", "$HOME;`id`", "ünï", "gpu#2", "a\\b", "proj\\",
                 "#lead", "a # b"]


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's sbatch (apt: slurm-client)")
@pytest.mark.parametrize("value", SBATCH_VALUES)
def test_sbatch_reads_every_value_as_written_or_the_key_is_refused(value, tmp_path):
    keys = ("partition", "account", "qos", "constraint", "job_name")
    slurm = SlurmConfig(**{key: value for key in keys})
    try:
        text = render_sbatch(slurm, SPEC)
    except SbatchError as e:
        assert all(f"slurm.{key}=" in str(e) for key in keys), str(e)
        return
    reads = _sbatch_reads(tmp_path, text)
    assert {key: reads.get(key.replace("_", "-")) for key in keys} == {key: value for key in keys}, text


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs Slurm's sbatch (apt: slurm-client)")
@pytest.mark.parametrize("run_dir", ["/scratch/tz/run", "/scratch/with blank/run", "/scratch/x#y/run",
                                     "/scratch/a\\b/run", "/scratch/100%/run"])
def test_sbatch_reads_the_log_path_in_the_run_dir_or_run_dir_is_refused(run_dir, tmp_path):
    spec = ScriptSpec(run_name="r", run_dir=run_dir, config_path=run_dir + "/config.yaml")
    try:
        text = render_sbatch(SlurmConfig(), spec)
    except SbatchError as e:
        assert "run.dir=" in str(e) and "Slurm's log file" in str(e), str(e)
        return
    assert _sbatch_reads(tmp_path, text)["output"] == run_dir.replace("%", "%%") + "/slurm-%j.out"


@pytest.mark.parametrize("item,ok", [("--comment=\"run #3\"", True), ("--comment='a # b'", True),
                                     ("--comment=run#3", False), ("--comment=a\\b", False),
                                     ("--comment=\"open", False), ("--mail-type=END", True)])
def test_extra_sbatch_items_sbatch_would_cut_are_refused(item, ok):
    if ok:
        assert f"#SBATCH {item}" in render_sbatch(SlurmConfig(extra_sbatch=[item]), SPEC)
    else:
        with pytest.raises(SbatchError, match=r"slurm.extra_sbatch\[0\]="):
            render_sbatch(SlurmConfig(extra_sbatch=[item]), SPEC)


def test_ranks_exit_75_requeues_the_job(tmp_path):
    rc, out, calls, _, _ = _run_script(tmp_path, render_sbatch(SlurmConfig(), SPEC), "exit75")
    assert "requeue 4242" in calls and rc == 0, out


def test_no_requeue_past_max_requeues_or_when_off(tmp_path):
    rc, out, calls, _, _ = _run_script(tmp_path / "a", render_sbatch(SlurmConfig(max_requeues=3), SPEC), "exit75",
                                       restart_count="3")
    assert not any(c.startswith("requeue") for c in calls) and rc == 75 and "max_requeues=3 reached" in out
    rc, out, calls, _, _ = _run_script(tmp_path / "b", render_sbatch(SlurmConfig(requeue=False), SPEC), "exit75")
    assert not any(c.startswith("requeue") for c in calls) and rc == 75


def test_a_failing_step_is_not_requeued(tmp_path):
    rc, out, calls, _, _ = _run_script(tmp_path, render_sbatch(SlurmConfig(), SPEC), "fail")
    assert rc == 3 and not any(c.startswith("requeue") for c in calls), out


def test_usr2_to_the_batch_shell_reaches_the_ranks_then_requeue(tmp_path):
    """Slurm's pre-timeout USR2 to the batch shell: the trap runs while srun runs, srun gets USR2,
    the (stub) ranks exit 75, the job is requeued."""
    rc, out, calls, _, stub = _run_script(tmp_path, render_sbatch(SlurmConfig(), SPEC), "wait-signal",
                                          send=signal.SIGUSR2)
    assert (stub / "srun.got-usr2").exists() and not (stub / "srun.got-term").exists(), out
    assert "batch shell got SIGUSR2" in out
    assert "requeue 4242" in calls and rc == 0, out


def test_term_to_the_whole_job_is_never_requeued(tmp_path):
    """scancel / the time limit / preemption: Slurm sends TERM to every process of the job; the
    shell must not turn a cancel into a requeue, nor send srun a second stop signal."""
    rc, out, calls, _, stub = _run_script(tmp_path, render_sbatch(SlurmConfig(), SPEC), "wait-signal",
                                          send="group-term")
    assert (stub / "srun.got-term").exists() and not (stub / "srun.got-usr2").exists(), out
    # 143 from the stub's TERM trap; bash 5.2's wait may report 255 when the child was reaped
    # while its trap ran (why the script also requeues on "USR2 forwarded and rc != 0")
    assert not any(c.startswith("requeue") for c in calls) and rc in (143, 255), out


# ---- the sweep ---------------------------------------------------------------------------

def test_sweep_renders_a_job_array_sized_for_the_largest_count():
    text = render_sbatch(CASES["bench_sweep"], SPEC)
    assert "#SBATCH --array=0-2" in text and "#SBATCH --nodes=4" in text
    assert "#SBATCH --output=/scratch/tz/runs/moe-2n/slurm-%A_%a.out" in text
    assert "sweep_nodes=(1 2 4)" in text
    assert "tierzero bench \"$config\" run.name=moe-2n-nodes\"$num_nodes\"" in text


def test_sweep_array_task_runs_its_node_count(tmp_path):
    text = render_sbatch(CASES["bench_sweep"], SPEC)
    stub = _stubbed(tmp_path)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = dict(os.environ, PATH=f"{stub}:{os.environ['PATH']}", STUB_DIR=str(stub), STUB_MODE="ok",
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="n[1-4]", SLURM_ARRAY_TASK_ID="1")
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    args = (stub / "srun.args").read_text().splitlines()
    assert "--nodes=2" in args and "--ntasks=8" in args and args[-1] == "run.name=moe-2n-nodes2", args


# ---- config ------------------------------------------------------------------------------

def test_slurm_keys_compose_and_validate():
    cfg = load_config(["dense_tiny_cpu"], ["slurm.nodes=2", "slurm.ntasks_per_node=2", "slurm.time=10:00"])
    assert cfg.slurm.nodes == 2 and cfg.slurm.time == "10:00"  # not YAML's sexagesimal 600
    with pytest.raises(ConfigError) as e:
        load_config([], ["slurm.nodes=0", "slurm.time=ten", "slurm.mem=64GB", "slurm.signal_margin_s=600",
                         "slurm.time=5", "slurm.command=train", "slurm.sweep_nodes=[1,0]"])
    text = str(e.value)
    for key in ("slurm.nodes=0", "slurm.mem='64GB'", "slurm.signal_margin_s=600 is not shorter than slurm.time=5",
                "slurm.command='train'", "slurm.sweep_nodes=[1, 0]"):
        assert key in text, (key, text)


@pytest.mark.parametrize("text,seconds", [("30", 1800), ("5:30", 330), ("01:00:00", 3600), ("2-00", 172800),
                                          ("1-02:03", 93780), ("1-02:03:04", 93784), ("bad", None), ("1:2:3:4", None)])
def test_time_limit(text, seconds):
    assert time_limit_s(text) == seconds


def test_cli_sbatch_writes_resolved_config_and_script(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sbatch", "dense_tiny_cpu", "run.dir=rel/run", "slurm.nodes=2", "slurm.ntasks_per_node=2",
                 "train.global_batch_size=16", "train.micro_batch_size=2"])
    assert code == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "rel" / "run"
    assert (run_dir / "sbatch.sh").read_text() == out
    assert f"config={run_dir}/config.yaml" in out  # absolute: every requeue finds the same run dir
    assert f"dir: {run_dir}" in (run_dir / "config.yaml").read_text()


def test_cli_sbatch_user_errors_write_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sbatch", "dense_tiny_cpu", "run.dir=r", "slurm.nodes=2", "slurm.ntasks_per_node=3",
                 "slurm.partition='a\nb'", "train.global_batch_size=16", "train.micro_batch_size=2"])
    err = capsys.readouterr().err
    assert code == 2 and "train.global_batch_size=16" in err and "slurm.nodes=2 x 3 ranks" in err
    code = main(["sbatch", "run.dir=r", "slurm.partition=a\nb"])
    err = capsys.readouterr().err
    assert code == 2 and "slurm.partition" in err and "newline" in err
    assert not (tmp_path / "r").exists()


# ---- hostile input, issue 24: refused at `tierzero sbatch` (exit 2, nothing written), not after queueing ----

# --submit writes the same script before it submits it: the same check, before anything is written
@pytest.mark.parametrize("flags", [[], ["--submit"]], ids=["write", "submit"])
def test_cli_sbatch_refuses_a_setup_line_bash_cannot_parse(flags, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["sbatch", *flags, "slurm.ntasks_per_node=4", "run.dir=X", """slurm.setup=["a'b\\"c"]"""])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "slurm.setup[0]=" + repr("a'b\"c") + " is not valid shell (bash -n: " in err, err
    assert not (tmp_path / "X").exists()


def test_setup_lines_bash_rejects_are_named_one_by_one_and_cut():
    from tierzero.slurm.submit import script_syntax_problems

    setup = ["module load x", "echo " + "x" * 200 + " 'open", "if true; then", "  source venv/bin/activate", "fi"]
    problems = script_syntax_problems(render_sbatch(SlurmConfig(setup=setup), SPEC), setup)
    assert len(problems) == 1 and problems[0].startswith("slurm.setup[1]='echo xxx"), problems
    assert "x" * 100 not in problems[0] and "...'" in problems[0]
    good = render_sbatch(SlurmConfig(setup=setup[:1] + setup[2:]), SPEC)  # a split if/fi parses as a whole
    assert script_syntax_problems(good, setup[:1] + setup[2:]) == []


def test_setup_check_is_skipped_without_bash(monkeypatch, caplog):
    from tierzero.slurm import submit

    monkeypatch.setattr(submit.shutil, "which", lambda name: None)
    with caplog.at_level("DEBUG", logger=submit.__name__):
        assert submit.script_syntax_problems("if (\n", ["if ("]) == []
    assert "bash is not on PATH" in caplog.text


@pytest.mark.parametrize("run_dir", ["/tmp/a'b\"c", "a'b\"c"])  # the review's input; the same inside tmp_path
def test_cli_sbatch_blames_run_dir_not_the_log_path_derived_from_it(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existed = os.path.lexists(run_dir)
    code = main(["sbatch", "slurm.ntasks_per_node=4", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"run.dir={str(Path(run_dir).resolve())!r} holds both kinds of quotes" in err, err
    assert "Drop one kind of quote from run.dir" in err and "slurm.output=" not in err, err
    assert os.path.lexists(run_dir) == existed and not (tmp_path / "a'b\"c").exists()


@pytest.mark.parametrize("slurm,run_dir,run_name,blamed,not_blamed", [
    (SlurmConfig(), "/tmp/a'b\"c", "r", ["run.dir="], ["slurm.output="]),
    (SlurmConfig(output="logs/%j.out"), "/tmp/a'b\"c", "r", ["run.dir="], ["slurm.output="]),
    (SlurmConfig(), "/tmp/a\nb", "r", ["run.dir="], ["slurm.output="]),
    (SlurmConfig(output="say\"hi\".out"), "/tmp/it's", "r", ["slurm.output=", "run.dir="], []),
    (SlurmConfig(output="/logs/a'b\"c.out"), "/tmp/r", "r", ["slurm.output="], ["run.dir="]),
    (SlurmConfig(), "/tmp/r", "it's \"x\"", ["run.name="], ["slurm.job_name="]),
], ids=["log-in-run-dir", "relative-output", "run-dir-newline", "quotes-split-over-both", "absolute-output",
        "job-name-from-run-name"])
def test_a_derived_sbatch_value_is_refused_naming_the_key_it_came_from(slurm, run_dir, run_name, blamed,
                                                                       not_blamed):
    with pytest.raises(SbatchError) as e:
        render_sbatch(slurm, ScriptSpec(run_name=run_name, run_dir=run_dir, config_path=run_dir + "/config.yaml"))
    assert all(key in str(e.value) for key in blamed) and not any(key in str(e.value) for key in not_blamed), e.value


def test_cli_help_has_examples(capsys):
    for cmd in ("sbatch", "slurm"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


# ---- Slurm env -> rank env ---------------------------------------------------------------

def test_slurm_task_env_to_rank():
    env = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
           "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_ID": "20017", "SLURM_RESTART_COUNT": "2",
           "MASTER_ADDR": "127.0.0.1"}
    launch = detect_launch(env)
    assert (launch.mode, launch.rank, launch.world_size, launch.local_rank, launch.local_world_size,
            launch.node_rank, launch.num_nodes, launch.master_addr, launch.master_port, launch.restart_count) == \
        ("slurm", 3, 4, 1, 2, 1, 2, "127.0.0.1", 20017, 2)
    batch_shell = {k: v for k, v in env.items() if k != "SLURM_STEP_ID"}
    assert detect_launch(batch_shell).mode == "local"


# ---- the local cluster's config ----------------------------------------------------------

def test_slurm_conf_for_emulated_nodes():
    text = render_slurm_conf(ClusterSpec(base="/tmp/c", num_nodes=3, cpus_per_node=2, hostname="vm"))
    nodes = [ln for ln in text.splitlines() if ln.startswith("NodeName=")]
    assert [ln.split()[0] for ln in nodes] == ["NodeName=n1", "NodeName=n2", "NodeName=n3"]
    assert all("NodeAddr=127.0.0.1" in ln and "NodeHostname=vm" in ln and "CPUs=2" in ln for ln in nodes)
    assert len({ln.split("Port=")[1].split()[0] for ln in nodes}) == 3  # one slurmd port each
    for line in ("SlurmctldHost=vm(127.0.0.1)", "AuthInfo=socket=/tmp/c/munge/munge.socket.2,cred_expire=10",
                 "SlurmdSpoolDir=/tmp/c/spool/%n", "SlurmdPidFile=/tmp/c/run/slurmd-%n.pid", "MailProg=/bin/true"):
        assert line in text.splitlines(), line


def test_cluster_refuses_zero_nodes(capsys):
    assert main(["slurm", "up", "--nodes", "0", "--dir", "/nonexistent/tz"]) == 1
    assert "at least one node" in capsys.readouterr().err
