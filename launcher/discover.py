"""Measure the machine: CPUs, NUMA, GPUs and their links; build the run's Topology.

No GPU or no NVML library is a normal case on CPU hosts: it yields a CPU-only description
and a note, never an error.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from tierzero.launcher.modes import Launch
from tierzero.parallel.config import ParallelConfig
from tierzero.parallel.topology import (Topology, TopologyConfig, emulated_topology, flat_topology, preset_topology,
                               with_bandwidths, with_latencies)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int
    pci_bus_id: str
    numa_node: Optional[int]
    nvlink_peers: Tuple[int, ...]
    """Indices of GPUs reached over an active NVLink (empty: PCIe only)."""


@dataclass(frozen=True)
class Machine:
    host: str
    cpus: int
    numa_nodes: int
    gpus: Tuple[GpuInfo, ...] = ()
    notes: Tuple[str, ...] = ()


def _numa_node_count() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(1, len(nodes))


def _pci_numa(bus_id: str) -> Optional[int]:
    # NVML prints 00000000:1B:00.0; sysfs uses 0000:1b:00.0
    short = bus_id.lower()[-12:]
    path = Path("/sys/bus/pci/devices") / short / "numa_node"
    try:
        node = int(path.read_text().strip())
        return node if node >= 0 else None
    except (OSError, ValueError):
        return None


def probe_gpus() -> Tuple[Tuple[GpuInfo, ...], Tuple[str, ...]]:
    try:
        import pynvml
    except ImportError:
        return (), ("nvidia-ml-py not installed: no GPU discovery",)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return (), (f"no NVIDIA driver ({e.__class__.__name__}): CPU topology only",)
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        bus_ids = []
        for h in handles:
            bid = pynvml.nvmlDeviceGetPciInfo(h).busId
            bus_ids.append(bid.decode() if isinstance(bid, bytes) else bid)
        gpus = []
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            peers = set()
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link) != pynvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId
                    remote = remote.decode() if isinstance(remote, bytes) else remote
                except pynvml.NVMLError:
                    continue
                for j, bid in enumerate(bus_ids):
                    if j != i and bid.lower()[-12:] == remote.lower()[-12:]:
                        peers.add(j)
            gpus.append(GpuInfo(i, name, pynvml.nvmlDeviceGetMemoryInfo(h).total, bus_ids[i],
                                _pci_numa(bus_ids[i]), tuple(sorted(peers))))
        return tuple(gpus), ()
    except pynvml.NVMLError as e:
        return (), (f"NVML failed while listing GPUs ({e}): CPU topology only",)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def probe_machine() -> Machine:
    gpus, notes = probe_gpus()
    return Machine(
        host=socket.gethostname(),
        cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        numa_nodes=_numa_node_count(),
        gpus=gpus,
        notes=notes,
    )


class TopologyMismatch(ValueError):
    pass


def build_topology(cfg: TopologyConfig, *, world_size: int, ranks_per_node: int, num_nodes: int,
                   strict: bool = True, inter_node_gbit: Optional[float] = None) -> Topology:
    """Emulated, preset or detected, in that order; a shaped inter-node link
    (launcher.inter_node_gbit, in Gbit/s) sets the cluster level's bandwidth; then
    topology.bandwidths_gbps on top. `strict` checks it matches the world."""
    topo = _base_topology(cfg, world_size=world_size, ranks_per_node=ranks_per_node, num_nodes=num_nodes,
                          strict=strict)
    if inter_node_gbit:
        # one shaped link per emulated node, shared by its ranks when they all cross at once
        # (the replica and cross-node groups of every plan do): the per-rank share
        shaped = [None] * (len(topo.levels) - 1) + [inter_node_gbit / 8 / topo.ranks_per_node]
        topo = with_bandwidths(topo, shaped)
    for key, values, unit, apply in (("bandwidths_gbps", cfg.bandwidths_gbps, "GB/s", with_bandwidths),
                                     ("latencies_us", cfg.latencies_us, "us", with_latencies)):
        if values:
            if len(values) != len(topo.levels):
                raise TopologyMismatch(
                    f"topology.{key}={list(values)} has {len(values)} values but the topology has "
                    f"{len(topo.levels)} levels {list(topo.names)}; give one {unit} figure per level"
                )
            topo = apply(topo, values)
    return topo


def _base_topology(cfg: TopologyConfig, *, world_size: int, ranks_per_node: int, num_nodes: int,
                   strict: bool) -> Topology:
    if cfg.emulate:
        topo = emulated_topology(cfg.emulate, cfg.level_names)
    elif cfg.preset:
        topo = preset_topology(cfg.preset, cfg.nodes or num_nodes)
        if strict and topo.world_size != world_size:
            per_node = topo.ranks_per_node
            raise TopologyMismatch(
                f"topology.preset={cfg.preset} describes {topo.world_size} ranks "
                f"({topo.num_nodes} nodes x {per_node}) but this launch has {world_size}; "
                f"launch {per_node} ranks per node, or drop topology.preset for a run "
                "(it is meant for `tierzero plan` / `tierzero topo`)"
            )
        return topo
    else:
        return flat_topology(ranks_per_node, num_nodes, source="detected")
    if strict and topo.world_size != world_size:
        raise TopologyMismatch(
            f"topology.emulate={list(cfg.emulate)} describes {topo.world_size} ranks but this launch "
            f"has {world_size}; make the product of topology.emulate equal the world size"
        )
    return topo


def launch_shape(launch: Launch, nproc: int) -> Tuple[int, int, int]:
    """(world size, ranks per node, nodes) of this launch; local mode spawns nproc on one node."""
    if launch.mode == "local":
        return nproc, nproc, 1
    return launch.world_size, launch.local_world_size, launch.num_nodes


def memory_budget_bytes(cfg: ParallelConfig, topo: Topology, *, device: str, local_world_size: int) -> float:
    """parallel.memory_budget_gb, else 80% of: the preset's HBM per rank, the GPU's memory, or
    this host's RAM shared by its ranks. The cost model counts training states only; the 20%
    left over is for activations and the allocator."""
    if cfg.memory_budget_gb is not None:
        return cfg.memory_budget_gb * 1e9
    if topo.memory_per_rank_gb is not None:
        return STATES_SHARE * topo.memory_per_rank_gb * 1e9
    if device.startswith("cuda"):
        import torch

        return STATES_SHARE * float(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return STATES_SHARE * psutil.virtual_memory().total / max(1, local_world_size)


STATES_SHARE = 0.8
