"""Config composition: precedence, the resolved file, and errors a person can act on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tierzero.launcher.cli import main
from tierzero.launcher.config import DEFAULT_RECIPE, ConfigError, describe_keys, load_config, to_yaml
from tierzero.launcher.rundir import RunPaths, resolved, write_atomic

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_yaml_in_order_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("train:\n  steps: 11\n  lr: 0.5\nmodel:\n  d_model: 32\n")
    b.write_text("train:\n  steps: 22\n")
    cfg = load_config([str(a), str(b)], ["train.lr=0.25"])
    assert cfg.train.steps == 22          # later file wins
    assert cfg.train.lr == 0.25           # override wins over the file
    assert cfg.model.d_model == 32        # earlier file kept where not overridden
    assert cfg.train.seed == 0            # dataclass default
    assert cfg.launcher.nproc == 4


def test_default_recipe_is_used_without_files():
    cfg = load_config([], [])
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text())
    assert cfg.train.steps == recipe["train"]["steps"]
    assert RunPaths.of(cfg).run_dir == (Path("runs") / cfg.run.name).resolve()


def test_recipe_name_resolves(tmp_path):
    cfg = load_config(["dense_tiny_cpu"], ["run.dir=" + str(tmp_path / "r")])
    assert RunPaths.of(cfg).run_dir == tmp_path / "r"


def test_lists_and_nulls_from_the_command_line():
    cfg = load_config([], ["topology.emulate=[2,2]", "telemetry.peak_tflops=null"])
    assert cfg.topology.emulate == [2, 2] and cfg.telemetry.peak_tflops is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["train.steps=7", "topology.emulate=[2,2]"])
    cfg.run.dir = str(tmp_path / "run")
    path = write_atomic(RunPaths.of(cfg).config, to_yaml(resolved(cfg, RunPaths.of(cfg))))
    again = load_config([str(path)], [])
    assert again == cfg
    assert not list((tmp_path / "run").glob(".*tmp"))


def problems(files=(), overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(list(files), list(overrides))
    return info.value.problems


def test_unknown_key_suggests():
    (p,) = problems(overrides=["train.setps=3"])
    assert "train.setps" in p and "train.steps" in p


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("modle:\n  d_model: 3\n")
    (p,) = problems([str(f)])
    assert "modle.d_model" in p and str(f) in p and "model.d_model" in p


def test_wrong_type():
    (p,) = problems(overrides=["train.steps=lots"])
    assert "train.steps" in p and "lots" in p and "int" in p


def test_all_problems_reported_together():
    ps = problems(overrides=["train.steps=x", "launcher.nprc=2", "model.n_layers=y"])
    assert len(ps) == 3


def test_impossible_values():
    assert any("launcher.nproc=0" in p for p in problems(overrides=["launcher.nproc=0"]))
    (p,) = problems(overrides=["topology.emulate=[2,3]"])
    assert "topology.emulate" in p and "launcher.nproc=6" in p
    (p,) = problems(overrides=["model.n_heads=5"])
    assert "model.n_heads" in p


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", ""])
def test_run_name_cannot_escape(name):
    (p,) = problems(overrides=[f"run.name={name}"])
    assert "run.name" in p


def test_missing_and_malformed_files(tmp_path):
    (p,) = problems([str(tmp_path / "nope.yaml")])
    assert "not found" in p
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    (p,) = problems([str(bad)])
    assert "not valid YAML" in p and "line" in p
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    (p,) = problems([str(scalar)])
    assert "mapping" in p


def test_every_key_is_documented():
    undocumented = [key for key, _, _, doc in describe_keys() if not doc]
    assert not undocumented, undocumented


# ---- through the CLI: exit code, no traceback, nothing on disk ------------------------

BAD_RUNS = [
    ["train.stepz=3"],
    ["train.steps=abc"],
    ["launcher.nproc=0"],
    ["topology.emulate=[2,2]", "launcher.nproc=3"],
    ["run.name=../../etc"],
    ["missing.yaml"],
    ["train.global_batch_size=30"],
    ["--steps", "3"],
]


@pytest.mark.parametrize("argv", BAD_RUNS)
def test_cli_user_errors_exit_2_and_create_nothing(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
    assert list(tmp_path.iterdir()) == []


def test_cli_malformed_yaml_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    before = set(tmp_path.iterdir())
    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", str(bad)], cwd=tmp_path,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "bad.yaml" in r.stderr
    assert set(tmp_path.iterdir()) == before


@pytest.mark.parametrize("sub", ["run", "config", "topo", "report"])
def test_every_subcommand_help_has_an_example(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([sub, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"tierzero {sub}" in out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "train.steps=9"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["steps"] == 9


def test_topo_prints_levels(capsys):
    assert main(["topo", "topology.emulate=[2,2]"]) == 0
    out = capsys.readouterr().out
    assert "node" in out and "cluster" in out and "[0, 1]" in out and "[2, 3]" in out
    assert main(["topo", "topology.preset=frontier", "topology.nodes=48"]) == 0
    out = capsys.readouterr().out
    assert "384" in out and "package" in out


def test_report_on_missing_dir_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_docs_list_every_key():
    text = (ROOT / "docs" / "config.md").read_text()
    missing = [key for key, *_ in describe_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/config.md lacks {missing}; regenerate its key table"


def test_expert_parallel_size_must_divide_the_launch(tmp_path):
    """The default recipe (MoE, parallel.ep=2) on one rank: a config error before anything
    starts (found on a 1-GPU machine, where it used to fail inside every restarted rank)."""
    from tierzero.launcher.config import check_world

    cfg = load_config([], [])
    assert cfg.parallel.ep == 2
    (problem,) = check_world(cfg, 1)
    assert "parallel.ep=2" in problem and "pick one of [1]" in problem
    assert check_world(cfg, 4) == [] and len(check_world(cfg, 3)) == 2  # 3 ranks: the batch split too

    r = subprocess.run([sys.executable, "-m", "tierzero.launcher.cli", "run", "launcher.nproc=1", f"run.dir={tmp_path / 'r'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "parallel.ep=2" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists(), "a config error must write nothing"
