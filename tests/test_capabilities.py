"""What an engine cannot do is a config error before any rank starts: exit 2, one message naming
the keys and the fix, nothing on disk, no rank spawned, never restarted (parallel/engines)."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace
import sys
import time

import pytest

from tierzero.launcher.cli import main
from tierzero.parallel.engines import ENGINES, engine_errors, plan_errors
from tierzero.parallel.plans import named_plan
from tierzero.parallel.topology import emulated_topology

DENSE = ["dense_tiny_cpu", "launcher.nproc=2", "train.global_batch_size=8", "train.micro_batch_size=2"]

# (what is asked, the overrides, words the one message must hold)
CASES = [
    ("checkpoints on an engine that cannot save them",
     [*DENSE, "parallel.engine=fsdp2", "checkpoint.every_steps=5"],
     ["parallel.engine=fsdp2", "checkpoint.every_steps=5", "parallel.engine=native"]),
    ("resuming on an engine that cannot load checkpoints",
     [*DENSE, "parallel.engine=reference", "checkpoint.resume=/some/step-00000010"],
     ["parallel.engine=reference", "checkpoint.resume=", "parallel.engine=native"]),
    ("MoE on an engine without it",
     ["moe_tiny_cpu", "parallel.engine=deepspeed", "parallel.ep=1"],
     ["parallel.engine=deepspeed", "moe.num_experts=8", "parallel.engine=native"]),
    ("rollback without checkpoints",
     [*DENSE, "train.on_nonfinite=rollback"],
     ["train.on_nonfinite=rollback", "checkpoint.every_steps=0", "train.on_nonfinite=skip"]),
    ("a plan the engine refuses",
     [*DENSE, "launcher.nproc=4", "topology.emulate=[2,2]", "parallel.engine=fsdp2", "parallel.plan=tiered"],
     ["parallel.engine=fsdp2", "tiered(", "parallel.engine=native"]),
    ("a plan the reference refuses",
     [*DENSE, "launcher.nproc=4", "topology.emulate=[2,2]", "parallel.engine=reference", "parallel.plan=zero3"],
     ["parallel.engine=reference", "zero3(", "parallel.plan=ddp"]),
]


@pytest.fixture
def no_ranks(monkeypatch):
    """Spawning a rank fails the test: a capability error must come before."""
    import tierzero.launcher.supervisor as supervisor

    def spawn(*args, **kwargs):
        raise AssertionError(f"a rank was spawned: {args[0] if args else kwargs}")

    # the supervisor's view of subprocess only: the test itself may still start processes
    monkeypatch.setattr(supervisor, "subprocess", SimpleNamespace(Popen=spawn, TimeoutExpired=TimeoutError))


@pytest.mark.parametrize("what,args,words", CASES, ids=[c[0] for c in CASES])
def test_capability_error_before_any_rank(what, args, words, tmp_path, monkeypatch, capsys, no_ranks):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("  - ")]
    assert any(all(w in line for w in words) for line in problems), f"{what}: no one message names {words}:\n{err}"
    assert list(tmp_path.iterdir()) == [], f"{what}: something was written"


def test_the_cli_exits_2_at_once(tmp_path):
    """The issue's example, as a user runs it: a separate process, exit 2, one message, nothing
    on disk. (The time is printed, not asserted: machine speed never fails CI.)"""
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", *DENSE, "parallel.engine=fsdp2",
                        "checkpoint.every_steps=5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    print(f"capability error after {elapsed:.2f} s")
    assert r.returncode == 2, r.stderr
    assert "parallel.engine=fsdp2 cannot save or load tierzero checkpoints, but checkpoint.every_steps=5" in r.stderr
    assert "Traceback" not in r.stderr and "restarting" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_engine_states_what_it_runs():
    """The registry's capability table against the engines' real refusals (pure)."""
    topo = emulated_topology([2, 2])
    can = {name: [p for p in ("ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered")
                  if spec.can_run(named_plan(p, topo), topo)] for name, spec in ENGINES.items()}
    assert can == {"native": ["ddp", "zero1", "zero2", "zero3", "hpz", "hsdp", "tiered"],
                   "deepspeed": ["ddp", "zero1", "zero2", "zero3", "hpz"],
                   "fsdp2": ["zero2", "zero3", "hsdp"],
                   "reference": ["ddp"]}
    assert {n for n, s in ENGINES.items() if s.moe} == {"native", "reference"}
    assert {n for n, s in ENGINES.items() if s.checkpoints} == {"native", "deepspeed"}
    for name, spec in ENGINES.items():  # one name per engine: config value, module and class agree
        cls = spec.load()
        assert cls.__name__ == spec.cls and cls.__module__ == f"tierzero.parallel.engines.{name}" and cls.name == name


def test_capability_checks_pass_what_the_engine_can_do():
    from tierzero.launcher.config import load_config

    for overrides in ([*DENSE, "parallel.engine=deepspeed", "checkpoint.every_steps=5"],
                      ["moe_tiny_cpu", "parallel.engine=reference", "parallel.ep=1"],
                      [*DENSE, "train.on_nonfinite=rollback", "checkpoint.every_steps=5"]):
        cfg = load_config(overrides[:1], overrides[1:])  # raises ConfigError otherwise
        assert engine_errors(parallel=cfg.parallel, moe=cfg.moe, checkpoint=cfg.checkpoint, train=cfg.train) == []
    cfg = load_config(DENSE[:1], [*DENSE[1:], "parallel.engine=fsdp2", "parallel.plan=hsdp"])
    assert plan_errors(cfg.parallel, emulated_topology([2, 2])) == []
    cfg = load_config(DENSE[:1], [*DENSE[1:], "parallel.engine=fsdp2"])  # auto: narrowed to what FSDP2 runs later
    assert plan_errors(cfg.parallel, emulated_topology([2, 2])) == []
