"""Every TIERZERO_* environment variable, read (and, for the supervisor's ranks, written) here only.

Two protocols travel through the environment:
- a supervised rank: the local supervisor (launcher/supervisor.py) tells each rank it spawns who it
  is, where to meet the others and which attempt this is;
- fault injection for tests and drills (docs/fault-tolerance.md, docs/bench.md): launcher/faults.py
  turns the FaultSpec read here into hooks, so no library module reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Mapping, Optional, Tuple

SUPERVISED = "TIERZERO_SUPERVISED"
_RANK_VARS = dict(rank="TIERZERO_RANK", world_size="TIERZERO_WORLD_SIZE", local_rank="TIERZERO_LOCAL_RANK",
                  local_world_size="TIERZERO_LOCAL_WORLD_SIZE", node_rank="TIERZERO_NODE_RANK",
                  attempt="TIERZERO_ATTEMPT", supervisor_pid="TIERZERO_SUPERVISOR_PID")
STORE = "TIERZERO_STORE"
"""The rendezvous file (a torch FileStore in the run folder): local ranks meet without a network
listener another user of the machine could reach."""

FAULT_NAN_STEPS = "TIERZERO_FAULT_NAN_STEPS"
"""`5,9`: rank 0's first micro-step of steps 5 and 9 produces NaN gradients, once each."""
FAULT_HANG = "TIERZERO_FAULT_HANG"
"""`<rank>:<step>`: that rank sleeps forever at that step."""
FAULT_SLOW_STEP_S = "TIERZERO_FAULT_SLOW_STEP_S"
"""Every step sleeps this long (seconds), so a drill that must catch a run mid-way (a requeue,
a time limit) does not depend on how fast the machine trains."""
FAULT_SLOW_SAVE = "TIERZERO_FAULT_SLOW_SAVE"
"""`<step>:<seconds>`: every rank pauses that long after writing its checkpoint data of that step
and before reporting it, so a kill -9 in the pause leaves a torn checkpoint."""
FAULT_SAVE_ENOSPC = "TIERZERO_FAULT_SAVE_ENOSPC"
"""`<rank>:<step>[,<rank>:<step> ...]`: that rank's save of that step fails with ENOSPC (disk full)
after writing its data and before reporting it, as a full disk would (where no small tmpfs can be
mounted)."""
FAULT_BENCH = "TIERZERO_BENCH_FAULT"
"""`<op>`: `tierzero bench` adds 1 to one output element of that collective on the first rank of
every group after the checked call (the checker must count it)."""


@dataclass(frozen=True)
class SupervisedRank:
    """What the local supervisor tells one rank it spawns."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    store: str
    attempt: int
    supervisor_pid: int

    def to_env(self) -> dict:
        env = {var: str(getattr(self, key)) for key, var in _RANK_VARS.items()}
        env.update({SUPERVISED: "1", STORE: self.store})
        return env


@dataclass(frozen=True)
class FaultSpec:
    nan_steps: FrozenSet[int] = frozenset()
    hang: Optional[Tuple[int, int]] = None
    """(rank, step)"""
    slow_step_s: float = 0.0
    slow_save: Optional[Tuple[int, float]] = None
    """(step, seconds)"""
    bench_corrupt_op: Optional[str] = None
    save_enospc: FrozenSet[Tuple[int, int]] = frozenset()
    """(rank, step) pairs"""

    @property
    def any(self) -> bool:
        return self != FaultSpec()


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ValueError(f"environment variable {name} is missing (set by tierzero's local supervisor)") from None
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def read_supervised(env: Mapping[str, str]) -> Optional[SupervisedRank]:
    """The supervisor's word to this rank, or None when no tierzero supervisor spawned it."""
    if env.get(SUPERVISED) != "1":
        return None
    values = {key: _int(env, var) for key, var in _RANK_VARS.items()}
    if not env.get(STORE):
        raise ValueError(f"environment variable {STORE} is missing (set by tierzero's local supervisor)")
    return SupervisedRank(store=env[STORE], **values)


def _pair(env: Mapping[str, str], name: str, form: str, second=int):
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        first, rest = text.split(":", 1)
        return int(first), second(rest)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not {form}") from None


def read_faults(env: Mapping[str, str]) -> FaultSpec:
    """The fault injection asked for (tests and drills only); FaultSpec() when none."""
    try:
        nan = frozenset(int(s) for s in env.get(FAULT_NAN_STEPS, "").split(",") if s.strip())
    except ValueError:
        raise ValueError(f"environment variable {FAULT_NAN_STEPS}={env[FAULT_NAN_STEPS]!r} is not a list of "
                         "steps such as 5,9") from None
    try:
        slow = float(env.get(FAULT_SLOW_STEP_S, "") or 0)
    except ValueError:
        raise ValueError(f"environment variable {FAULT_SLOW_STEP_S}={env[FAULT_SLOW_STEP_S]!r} is not a number "
                         "of seconds") from None
    enospc = frozenset(_pair({FAULT_SAVE_ENOSPC: part}, FAULT_SAVE_ENOSPC, "a list of <rank>:<step> such as 1:6,0:9")
                       for part in env.get(FAULT_SAVE_ENOSPC, "").split(",") if part.strip())
    return FaultSpec(nan_steps=nan, hang=_pair(env, FAULT_HANG, "<rank>:<step>"), slow_step_s=slow,
                     slow_save=_pair(env, FAULT_SLOW_SAVE, "<step>:<seconds>", float),
                     bench_corrupt_op=env.get(FAULT_BENCH) or None, save_enospc=enospc)
