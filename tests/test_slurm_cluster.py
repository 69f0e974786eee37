"""Real Slurm: a cluster of 2 emulated nodes x 2 CPUs on this host (slurm/cluster.py), jobs
submitted with `tierzero sbatch --submit`, the real scheduler's requeue, time limit and cancel.

Each test reads the job's own telemetry: which rank ran where (events carry SLURMD_NODENAME as
host), which steps every attempt did, where an attempt resumed. Skipped only when the Slurm
binaries are missing (CI installs them: .ci/run).
"""

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tierzero.launcher.modes import detect_launch
from tierzero.slurm.cluster import INSTALL_HINT, _pid_files, client_env, create_cluster, destroy_cluster, \
    leftover_job_processes, missing_binaries, our_pid
from tierzero.slurm.nodelist import expand_nodelist
from tierzero.slurm.submit import job_info

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(bool(missing_binaries()),
                                reason=f"Slurm binaries missing ({', '.join(missing_binaries())}): {INSTALL_HINT}")

# tests/test_supervision.py's SMALL, dense: a tiny model, ~0.2 s a step on 4 ranks over 2 cores
SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=16", "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1",
         "moe.num_experts=0", "parallel.ep=1"]
TWO_BY_TWO = ["slurm.nodes=2", "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1",
              f"slurm.program={shlex.quote(sys.executable)} -m tierzero.launcher.cli"]


def _free_port_block(n: int) -> int:
    for base in range(26817, 60000, 100):
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports for the test cluster")


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.env = dict(client_env(str(base)), PYTHONPATH=str(ROOT))

    def slurm(self, *cmd, check=True) -> str:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)
        assert not check or r.returncode == 0, f"{cmd}: {r.stderr}"
        return r.stdout

    def submit(self, run_dir: Path, *overrides, step_s: float = 0.0) -> str:
        """`step_s`: every training step sleeps that long (TIERZERO_FAULT_SLOW_STEP_S, passed on by
        sbatch's default --export=ALL), so a test that must catch the job mid-way holds on a fast machine."""
        env = dict(self.env, TIERZERO_FAULT_SLOW_STEP_S=str(step_s)) if step_s else self.env
        r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "sbatch", "dense_tiny_cpu", *SMALL, *TWO_BY_TWO,
                            f"run.dir={run_dir}", *overrides, "--submit", "--quiet"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("submitted job ")]
        assert line, r.stdout
        return line[0].split()[-1]

    def info(self, job_id: str) -> dict:
        return job_info(job_id, self.env)

    def wait(self, job_id: str, states=("COMPLETED",), timeout_s=240, run_dir=None) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.info(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") \
                    and info.get("JobState") not in states:
                break
            time.sleep(1)
        out = "".join(p.read_text()[-4000:] for p in (run_dir.glob("slurm-*.out") if run_dir else []))
        pytest.fail(f"job {job_id} is {info.get('JobState')} (wanted {states}) after {timeout_s} s:\n{out}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    create_cluster(str(base), num_nodes=2, cpus_per_node=2, port=_free_port_block(3))
    print(f"cluster up in {time.monotonic() - t0:.1f} s under {base}")
    try:
        yield Cluster(base)
    finally:
        labels = list(_pid_files(base))
        destroy_cluster(str(base))
        left = [label for label in labels if our_pid(base, label) is not None]
        assert not left, f"daemons still running after destroy_cluster: {left}"
        assert not leftover_job_processes(str(base)), "job scripts still running after destroy_cluster"


def _table(run_dir: Path, name: str) -> list:
    return ds.dataset(run_dir / "telemetry" / name, format="parquet", partitioning="hive").to_table().to_pylist()


def _steps_by_attempt(run_dir: Path) -> dict:
    out = {}
    for row in _table(run_dir, "steps"):
        out.setdefault(row["attempt"], {}).setdefault(row["rank"], set()).add(row["step"])
    return out


def _committed(run_dir: Path) -> list:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "COMMITTED").exists())


def _ckpt(run_dir: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "ckpt", *args], capture_output=True, text=True,
                          timeout=120, cwd=run_dir)


def _newest_committed(run_dir: Path) -> int:
    r = _ckpt(run_dir, "list", str(run_dir / "checkpoints"))
    assert r.returncode == 0, r.stderr
    steps = [int(line.split()[0]) for line in r.stdout.splitlines() if line.split()[1:2] == ["committed"]]
    assert steps, r.stdout
    return max(steps)


def _wait_for(what: str, predicate, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


# ---- the cluster itself ----------------------------------------------------------------

def test_cluster_is_two_idle_nodes_and_up_is_idempotent(cluster):
    nodes = cluster.slurm("sinfo", "-h", "-N", "-o", "%N %c %t").split("\n")
    assert [n.split()[:2] for n in nodes if n] == [["n1", "2"], ["n2", "2"]]
    pids = {label: our_pid(cluster.base, label) for label in _pid_files(cluster.base)}
    assert create_cluster(str(cluster.base), num_nodes=2, cpus_per_node=2,
                          port=int(cluster.slurm("scontrol", "show", "config").split("SlurmctldPort")[1]
                                   .split("=")[1].split()[0])) == [f"already up: 2 node(s) under {cluster.base}"]
    assert {label: our_pid(cluster.base, label) for label in _pid_files(cluster.base)} == pids


def test_nodelist_parsing_matches_scontrol(cluster):
    for text in ("n[1-3,5],gpu-[01-04]", "rack[1-2]-n[08-10]", "a,b[1-2],c"):
        assert expand_nodelist(text) == cluster.slurm("scontrol", "show", "hostnames", text).split(), text


def test_srun_task_env_gives_every_rank(cluster, tmp_path):
    """Slurm env -> rank env, from the env of real srun tasks (2 nodes x 2 tasks)."""
    cluster.slurm("srun", "-N", "2", "--ntasks-per-node=2", sys.executable, "-c",
                  "import json, os, sys; open(os.path.join(sys.argv[1], os.environ['SLURM_PROCID'] + '.json'), 'w')"
                  ".write(json.dumps(dict(os.environ)))", str(tmp_path))
    envs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    launches = sorted((detect_launch(env) for env in envs), key=lambda lc: lc.rank)
    job_id = int(envs[0]["SLURM_JOB_ID"])
    assert [(lc.mode, lc.rank, lc.local_rank, lc.node_rank, lc.world_size, lc.local_world_size, lc.num_nodes)
            for lc in launches] == [("slurm", r, r % 2, r // 2, 4, 2, 2) for r in range(4)]
    assert {lc.master_addr for lc in launches} == {"n1"} and {lc.master_port for lc in launches} == \
        {20000 + job_id % 20000}


# ---- jobs --------------------------------------------------------------------------------

def test_two_nodes_by_two_tasks_train(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.submit(run_dir, "train.steps=20")
    info = cluster.wait(job, run_dir=run_dir)
    print(f"job {job}: {info['JobState']} on {info.get('NodeList')}")
    steps = _steps_by_attempt(run_dir)
    assert set(steps) == {0} and sorted(steps[0]) == [0, 1, 2, 3]
    assert all(s == set(range(1, 21)) for s in steps[0].values()), steps
    hosts = {row["rank"]: row["host"] for row in _table(run_dir, "events") if row["kind"] == "start"}
    assert hosts == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}, hosts
    out = next(run_dir.glob("slurm-*.out")).read_text()
    assert f"job {job} attempt 0 on n[1-2], rendezvous 127.0.0.1:{20000 + int(job) % 20000}" in out


def test_scontrol_requeue_resumes_from_the_checkpoint(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.submit(run_dir, "train.steps=100", "checkpoint.every_steps=5", step_s=0.2)
    _wait_for("a committed checkpoint at step >= 10", lambda: any(s >= 10 for s in _committed(run_dir)))
    cluster.slurm("scontrol", "requeue", job)
    print(f"job {job}: scontrol requeue after checkpoint step {max(_committed(run_dir))}")
    info = cluster.wait(job, run_dir=run_dir, timeout_s=300)
    assert int(info["Restarts"]) >= 1, info
    steps = _steps_by_attempt(run_dir)
    assert len(steps) >= 2, steps
    done = set().union(*(s for by_rank in steps.values() for s in by_rank.values()))
    assert done == set(range(1, 101))  # every step present
    last = max(steps)
    resumed_at = min(min(s) for s in steps[last].values()) - 1
    # from a checkpoint, not from scratch: a periodic one, or the one the ranks commit on the SIGTERM
    # that `scontrol requeue` sends them (they finish the step they are in, then stop)
    resumes = [e for e in _table(run_dir, "events") if e["kind"] == "resume" and e["attempt"] == last]
    assert resumed_at >= 10 and resumes and {e["step"] for e in resumes} == {resumed_at}, (resumed_at, resumes)
    assert all(min(s) == resumed_at + 1 and max(s) == 100 for s in steps[last].values())
    print(f"job {job}: attempts {sorted(steps)}; attempt {last} resumed at step {resumed_at}")


def test_time_limit_signal_checkpoints_requeues_and_finishes(cluster, tmp_path):
    """slurm.time=2 (minutes), slurm.signal_margin_s=60: Slurm sends USR2 30-60 s into each attempt;
    the ranks checkpoint (checkpoint.every_steps=0: only the signal saves) and exit 75, the
    script requeues, the next attempt resumes where the signal stopped the last one."""
    run_dir = tmp_path / "run"
    steps_total = 300
    # >= 0.25 s a step: 300 steps outlast the first signal (at most 60 s into the job) however fast the machine
    job = cluster.submit(run_dir, f"train.steps={steps_total}", "checkpoint.every_steps=0", "slurm.time=2",
                         "slurm.signal_margin_s=60", step_s=0.25)
    info = cluster.wait(job, run_dir=run_dir, timeout_s=540)
    out = "".join(p.read_text() for p in run_dir.glob("slurm-*.out"))
    assert int(info["Restarts"]) >= 1 and "batch shell got SIGUSR2" in out and "requeueing job" in out, out[-3000:]
    signals = [row for row in _table(run_dir, "events") if row["kind"] == "signal"]
    assert signals and all("SIGUSR2" in row["detail"] for row in signals), signals
    steps = _steps_by_attempt(run_dir)
    done = set().union(*(s for by_rank in steps.values() for s in by_rank.values()))
    assert done == set(range(1, steps_total + 1))
    for attempt in sorted(steps)[1:]:  # each later attempt starts right after the signal step of the one before
        stopped = max(max(s) for s in steps[attempt - 1].values())
        assert all(min(s) == stopped + 1 for s in steps[attempt].values()), (attempt, stopped)
    print(f"job {job}: {len(steps)} attempts, signal steps "
          f"{[max(max(s) for s in steps[a].values()) for a in sorted(steps)[:-1]]}")


def test_scancel_leaves_the_last_checkpoint_usable(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.submit(run_dir, "train.steps=400", "checkpoint.every_steps=5", "checkpoint.async_save=true",
                         step_s=0.05)
    _wait_for("two committed checkpoints", lambda: len(_committed(run_dir)) >= 2)
    cluster.slurm("scancel", job)
    cluster.wait(job, states=("CANCELLED",), run_dir=run_dir, timeout_s=60)
    newest = _newest_committed(run_dir)
    r = _ckpt(run_dir, "verify", str(run_dir / "checkpoints" / f"step-{newest:08d}"))
    assert r.returncode == 0 and "every checksum matches" in r.stdout, r.stdout + r.stderr
    print(f"job {job}: cancelled; step {newest} verifies")

    # resubmitted on 1 node x 2 tasks (the checkpoint was saved by 4 ranks on 2 nodes): resharded resume
    again = cluster.submit(run_dir, f"train.steps={newest + 6}", "checkpoint.every_steps=5", "slurm.nodes=1")
    cluster.wait(again, run_dir=run_dir)
    events = _table(run_dir, "events")
    resumes = [e for e in events if e["kind"] == "resume" and e["rank"] >= 0]
    assert resumes and {e["step"] for e in resumes} == {newest} and {e["rank"] for e in resumes} == {0, 1}
    assert "saved by 4 ranks" in resumes[0]["detail"]
    steps = _steps_by_attempt(run_dir)
    last = max(steps)
    assert sorted(steps[last]) == [0, 1] and all(s == set(range(newest + 1, newest + 7))
                                                 for s in steps[last].values()), steps[last]
    print(f"job {again}: 1 node x 2 tasks resumed from step {newest} (saved by 4 ranks) and finished")


def test_bench_sweep_job_array_writes_one_run_dir(cluster, tmp_path):
    run_dir = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "sbatch", "slurm.command=bench", "slurm.sweep_nodes=[1,2]",
                        "slurm.ntasks_per_node=2", "slurm.cpus_per_task=1", TWO_BY_TWO[-1], "bench.ops=[all_reduce]",
                        "bench.sizes=1K:16K", "bench.iters=3", "bench.warmup=1", "run.name=sweep",
                        f"run.dir={run_dir}", "--submit", "--quiet"], capture_output=True, text=True,
                       env=cluster.env, timeout=120)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[-1]
    for task in ("0", "1"):
        cluster.wait(f"{job}_{task}", run_dir=run_dir)
    rows = _table(run_dir, "collectives")
    seen = {(row["run"], row["nranks"], row["hosts"]) for row in rows if row["scope"] == "global"}
    assert seen == {("sweep-nodes1", 2, "n1"), ("sweep-nodes2", 4, "n1,n2")}, seen
    assert all(row["wrong"] == 0 for row in rows)
    print(f"job array {job}: {len(rows)} rows from 1 and 2 nodes in {run_dir}")

    # `tierzero report` merges the array's runs: busbw at the largest size, by node count
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "report", str(run_dir)], capture_output=True, text=True,
                       env=cluster.env, timeout=120)
    assert r.returncode == 0, r.stderr
    header, line = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(("op ", "all_reduce"))]
    assert header.split()[1:] == ["1", "node", "2", "nodes"]
    for nodes, cell in zip((1, 2), line.split()[1:]):
        run = f"sweep-nodes{nodes}"
        top = max(row["size_bytes"] for row in rows if row["run"] == run and row["scope"] == "global")
        (want,) = [row["busbw_gbps"] for row in rows if row["run"] == run and row["scope"] == "global"
                   and row["size_bytes"] == top and row["placement"] == "in"]
        assert float(cell) == pytest.approx(want, abs=5e-4), (nodes, cell, want)
    assert (run_dir / "report" / "busbw_vs_nodes.png").stat().st_size > 0


# ---- the base folder: whose it is decides whether `up` trusts it and `down --purge` deletes it ----
# No cluster needed: each refusal comes before any daemon starts.

def _cli_slurm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "slurm", *args], capture_output=True,
                          text=True, timeout=120)


def _stop_ours(base: Path) -> None:
    """Stop daemons started under `base` (the code before the base-folder checks started them)."""
    for label in _pid_files(base):
        pid = our_pid(base, label)
        if pid is not None:
            os.kill(pid, 15)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_size)
            for p in sorted(folder.rglob("*"))}


def test_up_status_down_refuse_a_base_folder_of_another_user(tmp_path):
    """Another user's /tmp/tierzero-slurm with its own munge key and a slurm.conf that is a symlink:
    `up` (as root) used to start the daemons on that key and write its config through the symlink."""
    if os.geteuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    victim = tmp_path / "victim"
    victim.write_text("not a slurm.conf\n")
    base = tmp_path / "theirs"
    (base / "munge").mkdir(parents=True)
    (base / "slurm.conf").symlink_to(victim)
    (base / "munge" / "munge.key").write_bytes(os.urandom(1024))
    for path in (base, base / "munge", base / "munge" / "munge.key", base / "slurm.conf"):
        os.lchown(path, 65534, 65534)
    base.chmod(0o777)
    before = _tree(base)
    port = _free_port_block(2)
    try:
        for args in (["up", "--nodes", "1", "--port", str(port)], ["status"], ["down", "--purge"]):
            r = _cli_slurm(*args, "--dir", str(base))
            assert r.returncode == 2, (args, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr and r.stdout == ""
            assert f"refusing the base folder {base}: {base} is owned by user nobody (uid 65534)" in r.stderr
            assert "--dir" in r.stderr and f"remove {base}" in r.stderr
        assert victim.read_text() == "not a slurm.conf\n" and _tree(base) == before
        assert not any(our_pid(base, label) for label in _pid_files(base))
    finally:
        _stop_ours(base)


@pytest.mark.parametrize("case", ["folder world-writable", "key readable by others", "conf a symlink"])
def test_up_refuses_a_base_folder_others_can_change(tmp_path, case):
    base = tmp_path / "base"
    (base / "munge").mkdir(parents=True)
    base.chmod(0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    if case == "folder world-writable":
        base.chmod(0o777)
        want = f"{base} is writable by group or others (mode 777)"
    elif case == "key readable by others":
        key.chmod(0o644)
        want = f"{key} is readable by group or others (mode 644)"
    else:
        (base / "slurm.conf").symlink_to(tmp_path / "elsewhere.conf")
        want = f"{base / 'slurm.conf'} is a symbolic link"
    before = _tree(base)
    try:
        r = _cli_slurm("up", "--nodes", "1", "--port", str(_free_port_block(2)), "--dir", str(base))
    finally:
        _stop_ours(base)
    assert r.returncode == 2 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _tree(base) == before and not (tmp_path / "elsewhere.conf").exists()


def test_a_new_base_is_private_and_only_a_base_up_created_is_purged(tmp_path):
    from tierzero.slurm.cluster import MARKER, create_base

    base = create_base(str(tmp_path / "new" / "base"))  # what `up` does first
    assert stat.S_IMODE(base.stat().st_mode) == 0o700 and (base / MARKER).is_file()
    r = _cli_slurm("down", "--purge", "--dir", str(base))
    assert r.returncode == 0 and f"removed {base}" in r.stdout and not base.exists(), r.stderr

    mine = tmp_path / "thesis"  # a folder of the user's own, named by mistake
    mine.mkdir()
    (mine / "chapter1.tex").write_text("\\chapter{One}\n")
    r = _cli_slurm("down", "--purge", "--dir", str(mine))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"not removing {mine}: it holds no {MARKER} file" in r.stderr
    assert (mine / "chapter1.tex").read_text() == "\\chapter{One}\n"
