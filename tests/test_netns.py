"""Emulated nodes in network namespaces: the pure plan, a real rate-limited network, and
isolated runs through the CLI (normal end, a killed rank, SIGINT), each leaving nothing behind.

The real tests need root and a kernel that allows `ip netns add`; elsewhere they skip.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tierzero.launcher import netns
from tierzero.launcher.cli import main
from tierzero.launcher.config import load_config
from tierzero.launcher.netns import EmulatedNetwork, NetworkSetupError, cleanup_stale, plan_network

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.global_batch_size=16", "train.micro_batch_size=2", "train.warmup_steps=2", "model.d_model=32",
         "model.n_heads=2", "data.seq_len=32", "telemetry.peak_tflops=1.0", "telemetry.flush_every_s=1"]


# ---- pure ------------------------------------------------------------------------------

def test_plan_names_and_addresses_are_unique_and_tagged():
    p = plan_network(3, "tz4194304", inter_node_gbit=1.0)
    assert p.namespaces == ("tz4194304-node0", "tz4194304-node1", "tz4194304-node2")
    assert p.switch_namespace == "tz4194304-switch"
    names = [*p.all_namespaces, *p.ifnames, *p.switch_ports, p.bridge]
    assert len(set(names)) == len(names) and all("tz4194304" in n for n in names)
    assert all(len(n) <= 15 for n in (*p.ifnames, *p.switch_ports, p.bridge))  # IFNAMSIZ
    assert p.addrs == ("10.77.0.1", "10.77.0.2", "10.77.0.3")
    # another run (another pid) shares no name
    q = plan_network(3, "tz77")
    assert not set(q.all_namespaces) & set(p.all_namespaces)


def test_plan_commands_are_well_formed():
    p = plan_network(2, "tz12", inter_node_gbit=0.5)
    for cmd in (*p.setup_commands, *p.teardown_commands):
        assert isinstance(cmd, tuple) and cmd[0] in ("ip", "tc") and all(isinstance(a, str) and a for a in cmd)
    adds = [c[3] for c in p.setup_commands if c[:3] == ("ip", "netns", "add")]
    assert sorted(adds) == sorted(p.all_namespaces)
    assert p.setup_commands.index(("ip", "netns", "add", "tz12-switch")) == 0  # namespaces before links
    shaped = [(c[2], c[6]) for c in p.setup_commands if c[0] == "tc"]
    # both ends of every node's veth: the node's egress and the switch port's egress
    assert sorted(shaped) == sorted([*zip(p.namespaces, p.ifnames), *((p.switch_namespace, s) for s in p.switch_ports)])
    tbf = next(c for c in p.setup_commands if c[0] == "tc")
    assert tbf[7:12] == ("root", "tbf", "rate", "500000kbit", "burst") and tbf[-2:] == ("latency", "50ms")
    assert int(tbf[12]) >= 32 * 1024
    assert [c[3] for c in p.teardown_commands if c[:3] == ("ip", "netns", "delete")] == list(p.all_namespaces)
    assert not [c for c in plan_network(2, "tz12").setup_commands if c[0] == "tc"]  # no rate: no qdisc


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="num_nodes=1"):
        plan_network(1, "tz1")
    with pytest.raises(ValueError, match="tag="):
        plan_network(2, "Bad-Tag")
    with pytest.raises(ValueError, match="tag="):
        plan_network(2, "tz12345678901234")  # interface names would pass 15 chars


def test_wrap_and_accessors_need_no_root():
    net = EmulatedNetwork(2, None, tag="tz5")
    assert net.namespaces == ("tz5-node0", "tz5-node1")
    assert net.node_addr(1) == "10.77.0.2" and net.ifname(1) == "tz5n1"
    assert net.wrap(1, ["python", "-c", "1"]) == ["ip", "netns", "exec", "tz5-node1", "python", "-c", "1"]
    net.teardown()  # never set up: nothing to do, no error


def test_config_checks_for_the_network_keys():
    def problems(*overrides):
        try:
            load_config([], list(overrides))
        except ValueError as e:
            return str(e)
        return ""

    assert problems("launcher.isolate_network=true", "launcher.inter_node_gbit=2") == ""
    msg = problems("launcher.isolate_network=true", "launcher.inter_node_gbit=0")
    assert "launcher.inter_node_gbit=0" in msg and "must be > 0" in msg
    msg = problems("launcher.inter_node_gbit=1")
    assert "launcher.inter_node_gbit=1" in msg and "launcher.isolate_network=true" in msg


@pytest.fixture
def cli_logging():
    """main() points the root logger at the (captured, later closed) stderr; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_isolation_without_emulated_nodes_is_a_config_error(tmp_path, monkeypatch, capsys, cli_logging):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "launcher.isolate_network=true", "launcher.nproc=2", "run.name=x"]) == 2
    err = capsys.readouterr().err
    assert "launcher.isolate_network=true" in err and "topology.emulate=None" in err
    assert main(["run", "launcher.isolate_network=true", "launcher.nproc=2", "topology.emulate=[2,1]",
                 "run.name=x"]) == 2
    assert "describes 1 emulated node(s)" in capsys.readouterr().err


def test_not_root_is_a_config_error_and_creates_nothing(tmp_path, monkeypatch, capsys, cli_logging):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    problems = netns.isolation_problems(inter_node_gbit=1.0)
    assert any("needs root with CAP_NET_ADMIN" in p and "uid 1000" in p for p in problems)
    assert any("`ip` command" in p for p in problems) and any("`tc` command" in p for p in problems)

    def never(*a, **k):
        raise AssertionError("nothing may be created when the checks fail")

    monkeypatch.setattr(netns.EmulatedNetwork, "setup", never)
    monkeypatch.setattr(netns, "cleanup_stale", never)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "topology.emulate=[1,2]", "launcher.nproc=2", "launcher.isolate_network=true",
                 "run.name=noroot"])
    err = capsys.readouterr().err
    assert code == 2 and "needs root with CAP_NET_ADMIN" in err and "drop launcher.isolate_network" in err
    assert not (tmp_path / "runs" / "noroot" / ".netns.json").exists()


# ---- real namespaces (root) ------------------------------------------------------------

def _netns_works() -> str:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"tzprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=True)
    return ""


_SKIP = _netns_works()
real = pytest.mark.skipif(bool(_SKIP), reason=_SKIP)


def leftovers(tag: str):
    """Namespaces and host links whose name carries `tag` (a deleted namespace takes its
    veths, bridge and qdiscs with it; links are checked in any namespace still listed)."""
    spaces = [ns for ns in netns.list_namespaces() if tag in ns]
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return spaces + [line for line in host_links.splitlines() if tag in line]


RECEIVER = """
import socket, sys
addr, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.bind((addr, 0)); s.listen(1); s.settimeout(20)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(20)
got = 0
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    got += len(b)
c.sendall(b"k"); c.close()
"""
SENDER = """
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((addr, port), timeout=20); c.settimeout(20)
t0 = time.perf_counter(); c.sendall(b"\\0" * n)
assert c.recv(1) == b"k"
print(time.perf_counter() - t0)
"""


def transfer_gbit(net: EmulatedNetwork, src: int, dst: int, num_bytes: int) -> float:
    """Gbit/s of one TCP transfer from node src to node dst's address (src == dst: inside one node)."""
    recv = subprocess.Popen(net.wrap(dst, [sys.executable, "-c", RECEIVER, net.node_addr(dst), str(num_bytes)]),
                            stdout=subprocess.PIPE, text=True)
    try:
        port = recv.stdout.readline().strip()
        out = subprocess.run(net.wrap(src, [sys.executable, "-c", SENDER, net.node_addr(dst), port, str(num_bytes)]),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert recv.wait(timeout=30) == 0
    finally:
        if recv.poll() is None:
            recv.kill()
    return num_bytes * 8 / float(out) / 1e9


@real
def test_cross_node_traffic_is_rate_limited_and_intra_node_is_not(tmp_path):
    rate_gbit, num_bytes = 0.1, 4 * 2**20  # 4 MiB at 100 Mbit/s: >= 0.33 s
    tag = f"tzt{os.getpid()}"
    state = tmp_path / ".netns.json"
    with EmulatedNetwork(2, rate_gbit, tag=tag, state_path=state) as net:
        assert set(net.plan.all_namespaces) <= set(netns.list_namespaces())
        assert json.loads(state.read_text())["namespaces"] == list(net.plan.all_namespaces)
        qdiscs = subprocess.run(["tc", "-n", net.namespaces[0], "qdisc", "show", "dev", net.ifname(0)],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdiscs and "100Mbit" in qdiscs
        cross = transfer_gbit(net, 0, 1, num_bytes)
        back = transfer_gbit(net, 1, 0, num_bytes)
        intra = transfer_gbit(net, 0, 0, num_bytes)
        print(f"\n# cross-node {cross * 1e3:.0f} Mbit/s, back {back * 1e3:.0f} Mbit/s, "
              f"intra-node {intra * 1e3:.0f} Mbit/s (tbf rate {rate_gbit * 1e3:.0f} Mbit/s)")
        for got in (cross, back):
            assert 0.25 * rate_gbit < got < 1.5 * rate_gbit
        assert intra > 5 * rate_gbit
    assert leftovers(tag) == [] and not state.exists()
    net.teardown()  # idempotent


@real
@pytest.mark.multiprocess
def test_the_probe_reads_every_op_at_or_below_the_shaped_link(tmp_path):
    """`tierzero bench --probe` on 2 emulated nodes whose link tbf holds to 0.2 Gbit/s: each
    op's per-rank figure for the cluster level (what the planner divides by) must not beat
    the link's per-rank share (0.2 / 8 / 2 ranks GB/s; a wrong bus factor or link model would
    read 2x), must reach a fair part of it, and the unshaped in-node level must read faster."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "bench", "--probe", "topology.emulate=[2,2]",
                        "launcher.nproc=4", "launcher.isolate_network=true", "launcher.inter_node_gbit=0.2",
                        f"run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    levels = {lv["name"]: lv for lv in json.loads((run_dir / "bench" / "topology.json").read_text())["levels"]}
    share = 0.2 / 8 / 2
    cluster = dict(levels["cluster"]["op_bandwidths_gbps"])
    node = dict(levels["node"]["op_bandwidths_gbps"])
    print(f"per-rank GB/s, shaped share {share}: cluster {cluster}, node {node}")
    assert set(cluster) == set(node) == {"all_gather", "reduce_scatter", "all_reduce"}
    assert levels["cluster"]["bandwidth_gbps"] == cluster["all_gather"]
    for op, gbps in cluster.items():
        assert 0.3 * share < gbps < 1.3 * share, (op, gbps)
        assert node[op] > 3 * share, (op, node[op])


@real
def test_a_failed_setup_removes_what_it_made(tmp_path):
    tag = f"tzf{os.getpid()}"
    net = EmulatedNetwork(2, 1.0, tag=tag, state_path=tmp_path / ".netns.json")
    bad = ("ip", "-n", net.namespaces[0], "link", "set", "nosuchdev", "up")
    cmds = list(net.plan.setup_commands)
    net.plan = dataclasses.replace(net.plan, setup_commands=tuple(cmds[:8] + [bad] + cmds[8:]))
    with pytest.raises(NetworkSetupError, match="ip -n .* nosuchdev up` failed"):
        net.setup()
    assert leftovers(tag) == []


@real
def test_cleanup_stale_removes_the_network_of_a_killed_process(tmp_path):
    state = tmp_path / ".netns.json"
    code = ("import sys, time; from tierzero.launcher.netns import EmulatedNetwork; "
            f"EmulatedNetwork(3, 1.0, tag=sys.argv[1], state_path={str(state)!r}).setup(); "
            "print('up', flush=True); time.sleep(60)")
    tag = f"tzk{os.getpid()}"
    owner = subprocess.Popen([sys.executable, "-c", code, tag], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "up"
        assert not cleanup_stale(state)  # its owner is alive: left alone
        assert len(leftovers(tag)) == 4
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert cleanup_stale(state)
    finally:
        if owner.poll() is None:
            owner.kill()
        netns.destroy_namespaces([ns for ns in netns.list_namespaces() if ns.startswith(tag + "-")])
    assert leftovers(tag) == [] and not state.exists()
    assert not cleanup_stale(state)  # nothing recorded: nothing to do


def _spawn(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "tierzero.launcher.cli", "run", *SMALL, "launcher.isolate_network=true",
                             *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@real
@pytest.mark.multiprocess
def test_isolated_run_of_two_emulated_nodes(tmp_path):
    sup = _spawn(tmp_path, "topology.emulate=[2,2]", "launcher.nproc=4", "launcher.inter_node_gbit=1",
                 "train.steps=5", "run.name=iso")
    out, err = sup.communicate(timeout=180)
    assert sup.returncode == 0, out[-3000:] + err[-3000:]
    assert "done: 5 steps" in out
    tel = tmp_path / "runs" / "iso" / "telemetry"
    steps = ds.dataset(tel / "steps", format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted({r["rank"] for r in steps}) == [0, 1, 2, 3]
    events = ds.dataset(tel / "events", format="parquet", partitioning="hive").to_table().to_pylist()
    start = next(e["detail"] for e in events if e["kind"] == "start" and e["rank"] == -1)
    assert f"tz{sup.pid}-node0" in start and f"tz{sup.pid}-node1" in start and "1 Gbit/s" in start
    assert leftovers(f"tz{sup.pid}") == []
    assert not (tmp_path / "runs" / "iso" / ".netns.json").exists()


def _ranks_inside(sup, num_ranks: int, wait_for, timeout_s: float = 120):
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        assert sup.poll() is None, sup.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "ranks never started"
        children = psutil.Process(sup.pid).children()
        if len(children) == num_ranks and wait_for():
            return children
        time.sleep(0.2)


@real
@pytest.mark.multiprocess
def test_a_killed_rank_of_an_isolated_run_leaves_nothing(tmp_path):
    import psutil

    sup = _spawn(tmp_path, "topology.emulate=[1,2]", "launcher.nproc=2", "train.steps=100000", "run.name=kill",
                 "launcher.max_restarts=0")
    try:
        steps_dir = tmp_path / "runs" / "kill" / "telemetry" / "steps"
        children = _ranks_inside(sup, 2, lambda: bool(list(steps_dir.rglob("*.parquet"))))
        # `ip netns exec` execs the rank itself: the supervisor's child is the rank, in node 1's namespace
        victim = sorted(children, key=lambda p: p.environ().get("TIERZERO_RANK"))[1]
        assert victim.environ()["GLOO_SOCKET_IFNAME"] == f"tz{sup.pid}n1"
        # the ranks meet in a file of the run folder, not at a TCP store
        assert victim.environ()["TIERZERO_STORE"].startswith(str(tmp_path / "runs" / "kill" / ".rendezvous-"))
        victim.send_signal(signal.SIGKILL)
        out, err = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 1, err[-3000:]
    assert "rank 1 failed (killed by SIGKILL)" in err
    assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in children)
    assert leftovers(f"tz{sup.pid}") == []


@real
@pytest.mark.multiprocess
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_isolated_run_leaves_nothing(tmp_path, signum):
    sup = _spawn(tmp_path, "topology.emulate=[1,2]", "launcher.nproc=2", "train.steps=100000", "run.name=int")
    try:
        tag = f"tz{sup.pid}"
        # both ranks exist inside their namespaces; no need to wait for training
        _ranks_inside(sup, 2, lambda: len(leftovers(tag)) == 3, timeout_s=60)
        sup.send_signal(signum)
        out, err = sup.communicate(timeout=60)
    finally:
        if sup.poll() is None:
            sup.kill()
    assert sup.returncode == 128 + signum, err[-3000:]
    assert "all ranks stopped" in err
    assert leftovers(tag) == []
