"""Emulated nodes with real network isolation: one Linux network namespace per node.

    node0 ns             switch ns                node1 ns
    [<tag>n0 10.77.0.1]--[<tag>s0]--<tag>br--[<tag>s1]--[<tag>n1 10.77.0.2]
       tbf egress          tbf egress    tbf egress        tbf egress

Every node namespace holds `lo` and one veth end with a private address (10.77.0.<i+1>/24,
reachable only inside these namespaces); the other end is a port of a bridge in an extra
"switch" namespace. One layout for any number of nodes (2 included), so there is a single
code path to test. With a rate, a tbf qdisc sits on both ends of every node's veth: the
node side shapes what the node sends, the switch side what it receives, so each node's
link to the rest is limited to the rate in both directions. Ranks of one node talk over
their own namespace's local routes and are never shaped.

`plan_network` is pure (names, addresses and `ip`/`tc` argv lists); `EmulatedNetwork`
runs a plan. Needs root (CAP_NET_ADMIN for links and qdiscs, CAP_SYS_ADMIN for the
/run/netns bind mounts `ip netns add` makes).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

SUBNET = "10.77.0"
PREFIX_LEN = 24
MAX_NODES = 254  # host addresses .1 to .254 of the /24
IFNAMSIZ = 15  # longest Linux interface name
TBF_LATENCY_MS = 50
_TAG_RE = re.compile(r"^[a-z][a-z0-9]*$")
_CAP_NET_ADMIN, _CAP_SYS_ADMIN = 12, 21  # linux/capability.h


class NetworkError(RuntimeError):
    """An `ip`/`tc` command failed; the message holds the command and its stderr."""


class NetworkSetupError(NetworkError):
    """setup() failed; what it had created is already removed."""


@dataclass(frozen=True)
class NetworkPlan:
    tag: str
    num_nodes: int
    inter_node_gbit: Optional[float]
    namespaces: Tuple[str, ...]
    """Node namespaces, node i first at index i."""
    switch_namespace: str
    bridge: str
    ifnames: Tuple[str, ...]
    """The veth end inside node i's namespace (what GLOO_SOCKET_IFNAME names)."""
    switch_ports: Tuple[str, ...]
    """The veth end of node i on the bridge, in the switch namespace."""
    addrs: Tuple[str, ...]
    setup_commands: Tuple[Tuple[str, ...], ...]
    teardown_commands: Tuple[Tuple[str, ...], ...]

    @property
    def all_namespaces(self) -> Tuple[str, ...]:
        return (*self.namespaces, self.switch_namespace)


def tbf_burst_bytes(gbit: float) -> int:
    """Bucket size: at least 4 ms of traffic at the rate (rate / HZ for HZ=250, which tbf
    needs to reach its rate on a kernel without high-resolution timers), at least 32 KiB
    so a TSO/GSO segment never has to be split into too many pieces."""
    return max(32 * 1024, int(gbit * 1e9 / 8 / 250))


def plan_network(num_nodes: int, tag: str, inter_node_gbit: Optional[float] = None) -> NetworkPlan:
    """Names, addresses and the ordered `ip`/`tc` commands for `num_nodes` emulated nodes.

    `tag` makes every name unique to one run (the supervisor uses tz<pid>); it goes into
    interface names too, so it is short: lowercase letters and digits, at most 11 chars.
    """
    if not 2 <= num_nodes <= MAX_NODES:
        raise ValueError(f"num_nodes={num_nodes}: an emulated network has 2 to {MAX_NODES} nodes")
    longest = len(f"{tag}n{num_nodes - 1}")
    if not _TAG_RE.match(tag) or longest > IFNAMSIZ:
        raise ValueError(
            f"tag={tag!r} must be lowercase letters and digits starting with a letter, short enough "
            f"that '<tag>n{num_nodes - 1}' fits the {IFNAMSIZ}-character interface name limit; e.g. tz{os.getpid()}"
        )
    if inter_node_gbit is not None and not inter_node_gbit > 0:
        raise ValueError(f"inter_node_gbit={inter_node_gbit} must be > 0 (or None for no limit)")
    namespaces = tuple(f"{tag}-node{i}" for i in range(num_nodes))
    switch, bridge = f"{tag}-switch", f"{tag}br"
    ifnames = tuple(f"{tag}n{i}" for i in range(num_nodes))
    ports = tuple(f"{tag}s{i}" for i in range(num_nodes))
    addrs = tuple(f"{SUBNET}.{i + 1}" for i in range(num_nodes))

    cmds: List[Tuple[str, ...]] = [("ip", "netns", "add", ns) for ns in (switch, *namespaces)]
    cmds += [("ip", "-n", ns, "link", "set", "lo", "up") for ns in (switch, *namespaces)]
    cmds.append(("ip", "-n", switch, "link", "add", bridge, "type", "bridge"))
    cmds.append(("ip", "-n", switch, "link", "set", bridge, "up"))
    for ns, ifname, port, addr in zip(namespaces, ifnames, ports, addrs):
        # both ends are born inside their namespaces: nothing ever appears in the host's
        cmds.append(("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", switch))
        cmds.append(("ip", "-n", switch, "link", "set", port, "master", bridge))
        cmds.append(("ip", "-n", switch, "link", "set", port, "up"))
        cmds.append(("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", ifname))
        cmds.append(("ip", "-n", ns, "link", "set", ifname, "up"))
        if inter_node_gbit is not None:
            shape = ("root", "tbf", "rate", f"{round(inter_node_gbit * 1e6)}kbit",
                     "burst", str(tbf_burst_bytes(inter_node_gbit)), "latency", f"{TBF_LATENCY_MS}ms")
            cmds.append(("tc", "-n", ns, "qdisc", "add", "dev", ifname, *shape))
            cmds.append(("tc", "-n", switch, "qdisc", "add", "dev", port, *shape))

    # Deleting a veth end removes its peer and both qdiscs; deleting the links first means
    # they go even if some process still holds a namespace open.
    down = [("ip", "-n", ns, "link", "delete", ifname) for ns, ifname in zip(namespaces, ifnames)]
    down.append(("ip", "-n", switch, "link", "delete", bridge))
    down += [("ip", "netns", "delete", ns) for ns in (*namespaces, switch)]
    return NetworkPlan(tag=tag, num_nodes=num_nodes, inter_node_gbit=inter_node_gbit, namespaces=namespaces,
                       switch_namespace=switch, bridge=bridge, ifnames=ifnames, switch_ports=ports, addrs=addrs,
                       setup_commands=tuple(cmds), teardown_commands=tuple(down))


# ---- side effects ------------------------------------------------------------------

def isolation_problems(inter_node_gbit: Optional[float] = None) -> List[str]:
    """Why this process cannot build an emulated network (empty: it can), one paragraph each."""
    how = ("Run it as root (e.g. `sudo -E tierzero run ...`, or a container started with "
           "--cap-add NET_ADMIN --cap-add SYS_ADMIN), or drop launcher.isolate_network "
           "(and launcher.inter_node_gbit) to run every rank on loopback without isolation.")
    problems = []
    if os.geteuid() != 0:
        problems.append(
            f"launcher.isolate_network=true needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN (it creates "
            f"network namespaces, veth pairs and tc qdiscs), but this process runs as uid {os.geteuid()}. {how}"
        )
    else:
        missing = [name for bit, name in ((_CAP_NET_ADMIN, "CAP_NET_ADMIN"), (_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
                   if not _effective_caps() >> bit & 1]
        if missing:
            problems.append(
                f"launcher.isolate_network=true needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN; this root "
                f"process lacks {' and '.join(missing)} (an unprivileged container?). {how}"
            )
    tools = ["ip"] + (["tc"] if inter_node_gbit is not None else [])
    for tool in tools:
        if shutil.which(tool) is None:
            why = "the rate limit of launcher.inter_node_gbit" if tool == "tc" else "launcher.isolate_network=true"
            problems.append(
                f"{why} needs the `{tool}` command (iproute2) and it is not on PATH; install iproute2 "
                f"(apt-get install iproute2), or drop "
                f"{'launcher.inter_node_gbit' if tool == 'tc' else 'launcher.isolate_network'}."
            )
    return problems


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return ~0  # no /proc: let `ip` be the judge


def _run(cmd: Sequence[str]) -> None:
    try:
        subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=30)
    except subprocess.CalledProcessError as e:
        raise NetworkError(f"`{' '.join(cmd)}` failed (exit {e.returncode}): {e.stderr.strip()}") from e
    except subprocess.TimeoutExpired as e:
        raise NetworkError(f"`{' '.join(cmd)}` did not finish in 30 s") from e
    except FileNotFoundError as e:
        raise NetworkError(f"`{' '.join(cmd)}`: {cmd[0]} is not installed (iproute2)") from e


def list_namespaces() -> List[str]:
    """Names in `ip netns list` (empty when `ip` is missing)."""
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_exists(ns: str, name: str) -> bool:
    r = subprocess.run(["ip", "-n", ns, "link", "show", "dev", name], capture_output=True, timeout=30)
    return r.returncode == 0


def _kill_inside(ns: str, grace_s: float = 2.0) -> None:
    """End processes still inside one of *our* namespaces (leftover ranks), so the
    namespace really goes away when it is deleted."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    pids = [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    if not pids:
        return
    log.warning("network namespace %s still holds processes %s; ending them", ns, pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_ticks(pid: int) -> Optional[int]:
    """Process start time (clock ticks since boot): tells a live pid from a reused one."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def destroy_namespaces(names: Sequence[str], links: Sequence[Tuple[str, str]] = ()) -> List[str]:
    """Delete the given links ((namespace, name)) and namespaces where they still exist, ending
    processes left inside; keeps going past failures and returns their messages."""
    present = set(list_namespaces())
    failures = []
    for ns in names:
        if ns in present:
            _kill_inside(ns)
    for ns, link in links:
        if ns in present and _link_exists(ns, link):
            try:
                _run(("ip", "-n", ns, "link", "delete", link))
            except NetworkError as e:
                failures.append(str(e))
    for ns in names:
        if ns in present:
            try:
                _run(("ip", "netns", "delete", ns))
            except NetworkError as e:
                failures.append(str(e))
    return failures


def cleanup_stale(state_path) -> bool:
    """Remove what a supervisor recorded in `state_path` and could not remove itself
    (it was SIGKILLed). Leaves a live supervisor's network alone. True if it removed something."""
    state_path = Path(state_path)
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable network state file %s (%s)", state_path, e)
        return False
    pid, ticks = state.get("pid"), state.get("start_ticks")
    if pid and pid != os.getpid() and _alive(pid) and _start_ticks(pid) == ticks:
        log.warning("network state %s belongs to running process %d; leaving it", state_path, pid)
        return False
    namespaces = list(state.get("namespaces", []))
    existing = set(list_namespaces())
    present = [ns for ns in namespaces if ns in existing]
    failures = destroy_namespaces(namespaces, [tuple(x) for x in state.get("links", [])])
    if failures:
        raise NetworkError("could not remove a stale emulated network:\n" + "\n".join(failures))
    state_path.unlink(missing_ok=True)
    if present:
        log.warning("removed stale network namespaces %s left by process %s", present, pid)
    return bool(present)


class EmulatedNetwork:
    """`with EmulatedNetwork(2, 1.0, tag="tz123") as net:` builds the plan's namespaces,
    veths, bridge and qdiscs; leaving the block removes them, whatever happened inside.

    teardown() is idempotent and safe after a partial setup. With `state_path`, what is
    about to be created is written there first, so `cleanup_stale(state_path)` can remove
    it if this process dies without tearing down (SIGKILL).
    """

    def __init__(self, num_nodes: int, inter_node_gbit: Optional[float], tag: str,
                 state_path: Optional[os.PathLike] = None):
        self.plan = plan_network(num_nodes, tag, inter_node_gbit)
        self.state_path = Path(state_path) if state_path is not None else None
        self._up = False

    @property
    def namespaces(self) -> Tuple[str, ...]:
        """Node namespaces; namespace i holds node i."""
        return self.plan.namespaces

    def node_addr(self, i: int) -> str:
        return self.plan.addrs[i]

    def ifname(self, i: int) -> str:
        return self.plan.ifnames[i]

    def wrap(self, i: int, argv: Sequence[str]) -> List[str]:
        """argv run inside node i's namespace (`ip netns exec` keeps the environment, and
        execs argv, so the pid Popen returns is argv's own)."""
        return ["ip", "netns", "exec", self.plan.namespaces[i], *argv]

    def describe(self) -> str:
        p = self.plan
        rate = f"{p.inter_node_gbit:g} Gbit/s per node link" if p.inter_node_gbit else "no rate limit"
        nodes = ", ".join(f"{ns} ({a} on {n})" for ns, a, n in zip(p.namespaces, p.addrs, p.ifnames))
        return f"{p.num_nodes} network namespaces {nodes}, bridge {p.bridge} in {p.switch_namespace}, {rate}"

    def setup(self) -> "EmulatedNetwork":
        if self._up:
            return self
        self._write_state()
        self._up = True  # from here on teardown has something to do
        try:
            for cmd in self.plan.setup_commands:
                _run(cmd)
        except NetworkError as e:
            self.teardown()
            raise NetworkSetupError(str(e)) from e
        except BaseException:
            self.teardown()
            raise
        log.info("emulated network up: %s", self.describe())
        return self

    def teardown(self) -> None:
        if not self._up:
            return
        p = self.plan
        links = [*zip(p.namespaces, p.ifnames), (p.switch_namespace, p.bridge)]
        failures = destroy_namespaces(p.all_namespaces, links)
        if failures:
            raise NetworkError("could not remove the emulated network; remove what is left with "
                               f"`ip netns delete <name>` ({', '.join(p.all_namespaces)}):\n" + "\n".join(failures))
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        self._up = False

    def __enter__(self) -> "EmulatedNetwork":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        p = self.plan
        state = {"tag": p.tag, "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                 "namespaces": list(p.all_namespaces),
                 "links": [[ns, n] for ns, n in (*zip(p.namespaces, p.ifnames), (p.switch_namespace, p.bridge))]}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)
