"""Launcher pieces that need no rank processes: attempts, discovery, topology choice."""

import pytest

from tierzero.launcher.cli import main
from tierzero.launcher.discover import TopologyMismatch, build_topology, probe_machine
from tierzero.launcher.rundir import next_attempt
from tierzero.launcher.supervisor import describe_exit
from tierzero.parallel.topology import PRESETS, TopologyConfig
from tierzero.telemetry.config import TelemetryConfig
from tierzero.telemetry.sink import Telemetry


def test_each_launch_into_a_run_dir_is_a_new_attempt(tmp_path):
    root = str(tmp_path / "telemetry")
    assert next_attempt(root, "r") == 0
    for attempt in (0, 1):
        t = Telemetry(TelemetryConfig(), root=root, run="r", attempt=attempt, rank=-1, host="h")
        t.event("start")
        t.close()
    assert next_attempt(root, "r") == 2
    assert next_attempt(root, "other-run") == 0


def test_exit_descriptions():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exit code 3"


def test_probe_machine_without_gpu_never_fails():
    m = probe_machine()
    assert m.cpus >= 1 and m.numa_nodes >= 1 and m.host
    if not m.gpus:
        assert m.notes  # says why there is no GPU view


def test_topology_choice_order_and_checks():
    emu = build_topology(TopologyConfig(emulate=[2, 2]), world_size=4, ranks_per_node=4, num_nodes=1)
    assert emu.source == "emulated" and emu.num_nodes == 2
    det = build_topology(TopologyConfig(), world_size=8, ranks_per_node=4, num_nodes=2)
    assert det.source == "detected" and det.ranks_per_node == 4 and det.num_nodes == 2
    pre = build_topology(TopologyConfig(preset="dgx-h100"), world_size=16, ranks_per_node=8, num_nodes=2)
    assert pre.source == "preset:dgx-h100" and pre.levels[0].bandwidth_gbps == PRESETS["dgx-h100"][0][2]
    with pytest.raises(TopologyMismatch, match="topology.preset"):
        build_topology(TopologyConfig(preset="dgx-h100"), world_size=4, ranks_per_node=4, num_nodes=1)
    with pytest.raises(TopologyMismatch, match="topology.emulate"):
        build_topology(TopologyConfig(emulate=[2, 2]), world_size=8, ranks_per_node=8, num_nodes=1)


def test_topo_under_torchrun_env(monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["topo"]) == 0
    out = capsys.readouterr().out
    assert "mode      torchrun" in out and "2 node(s) x 4 ranks" in out


def test_run_rejects_preset_that_does_not_match_the_launch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "topology.preset=frontier", "topology.nodes=2"]) == 2
    assert "topology.preset=frontier" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
