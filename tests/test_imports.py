"""The layout is the architecture: imports point one way, and everything installs as `tierzero.*`."""

import ast
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["launcher", "parallel", "collectives_bench", "checkpoint", "recipes", "slurm", "telemetry"]
# package -> in-house packages it must never import
FORBIDDEN = {
    "parallel": {"launcher", "recipes", "collectives_bench", "slurm"},
    "checkpoint": {"launcher", "recipes", "collectives_bench", "slurm"},
    "telemetry": {"launcher", "recipes", "collectives_bench", "slurm", "parallel", "checkpoint"},
    "slurm": {"launcher", "recipes", "collectives_bench", "parallel", "checkpoint", "telemetry"},
    "recipes": {"launcher", "collectives_bench", "slurm"},
    "collectives_bench": {"launcher", "recipes", "slurm"},
}
# launcher module -> launcher modules it must never import: the programs (a training rank, a
# benchmark rank) and the supervisor that spawns either meet only in the shared modules below them
LAUNCHER_FORBIDDEN = {
    "rank": {"bench", "supervisor", "cli", "program"},
    "bench": {"rank", "supervisor", "cli", "program"},
    "supervisor": {"rank", "bench", "cli", "program"},
}


def imported_modules(path: Path):
    """(line, dotted module) for every absolute import; `tierzero.` is dropped, so an in-house
    module reads `launcher.rank` and a third-party one `torch.distributed`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module in ("tierzero", *(f"tierzero.{p}" for p in PACKAGES)):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            yield node.lineno, name.removeprefix("tierzero.")


def imported_packages(path: Path):
    for lineno, module in imported_modules(path):
        yield lineno, module.split(".")[0]


def test_every_package_exists():
    for pkg in PACKAGES:
        assert (ROOT / pkg / "__init__.py").is_file(), pkg


def test_no_back_edges():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for lineno, target in imported_packages(path):
                if target == "launcher" and pkg != "launcher":
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports launcher")
                elif target in FORBIDDEN.get(pkg, ()):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {target}")
    assert not bad, "imports against the dependency direction:\n" + "\n".join(bad)


def test_launcher_programs_do_not_import_each_other():
    """rank (training), bench (collectives) and supervisor (spawns either) share world, rundir,
    exitcodes and modes, never each other: no circle to break with lazy imports."""
    bad = []
    for name, forbidden in LAUNCHER_FORBIDDEN.items():
        path = ROOT / "launcher" / f"{name}.py"
        for lineno, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "launcher" and len(parts) > 1 and parts[1] in forbidden:
                bad.append(f"launcher/{name}.py:{lineno} imports {module}")
    assert not bad, "\n".join(bad)


def test_only_tierzero_is_imported_top_level():
    """In-house code imports its own packages as tierzero.<package>, never as a top-level name."""
    bad = []
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                        if n.split(".")[0] in PACKAGES]
    assert not bad, "\n".join(bad)


def test_slurm_never_imports_torch():
    for path in (ROOT / "slurm").rglob("*.py"):
        assert "torch" not in {t for _, t in imported_packages(path)}, path


def test_checker_sees_a_back_edge(tmp_path):
    # the tests above must be able to fail: feed them a file with forbidden imports
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom tierzero.launcher.cli import main\nfrom tierzero.launcher import supervisor\n")
    assert "launcher" in {t for _, t in imported_packages(f)}
    assert "launcher.supervisor" in {m for _, m in imported_modules(f)}


def test_the_cli_and_config_do_not_import_torch():
    """Composing and checking a config (tierzero config, ckpt list, the local launcher before
    it spawns) stays fast: torch is imported only where a command needs it."""
    code = ("import sys, tierzero.launcher.cli, tierzero.launcher.config, tierzero.checkpoint.store; "
            "tierzero.launcher.config.load_config([], []); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_wheel_installs_one_top_level_name(tmp_path):
    """Built and installed into a fresh venv, the wheel brings `tierzero` and nothing else
    top-level, with the recipes' YAML files and a working console script."""
    import shutil

    wheels, src = tmp_path / "wheels", tmp_path / "src"
    # built from a copy: setuptools writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "dist", "runs", "*.egg-info",
                                                            "__pycache__", "tests", "benchmarks"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named" in r.stderr:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = wheels.glob("tierzero-*.whl")
    env_dir = tmp_path / "venv"
    # the test venv's packages are visible (torch, omegaconf, ...), the repository is not
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    assert top == ["tierzero"], top
    assert "tierzero/recipes/configs/moe_tiny_cpu.yaml" in names
    deps = next(p for p in map(Path, sys.path) if (p / "omegaconf").is_dir())
    (Path(site) / "deps.pth").write_text(f"{deps}\n")
    code = ("import sys, tierzero.launcher.cli as cli, tierzero.recipes.trainer; "
            "from tierzero.launcher.config import load_config; load_config([], []); "
            "bad = [m for m in ('launcher', 'parallel', 'recipes', 'checkpoint', 'telemetry', 'slurm', "
            "'collectives_bench') if m in sys.modules]; assert not bad, bad; "
            "assert cli.__file__.startswith(sys.argv[1]), cli.__file__")
    r = subprocess.run([str(py), "-c", code, site], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("launcher", "parallel", "recipes"):
        r = subprocess.run([str(py), "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode != 0, f"`import {name}` works in the fresh venv: something installs it top-level"


MAX_FUNCTION_LINES = 60
LONG_MARK = "# long:"


def long_functions(path: Path):
    """(line, name, length) of every function longer than MAX_FUNCTION_LINES whose `def` line
    does not say why (`# long: <reason>`)."""
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            header = lines[node.lineno - 1: node.body[0].lineno - 1]  # the signature, over several lines
            if length > MAX_FUNCTION_LINES and not any(LONG_MARK in line for line in header):
                yield node.lineno, node.name, length


def test_functions_are_a_screen_long():
    """A function a reader must scroll through says why beside its `def` (e.g. a declarative table)."""
    bad = [f"{path.relative_to(ROOT)}:{line} {name} is {n} lines" for pkg in PACKAGES
           for path in sorted((ROOT / pkg).rglob("*.py")) for line, name, n in long_functions(path)]
    assert not bad, f"over {MAX_FUNCTION_LINES} lines without a '{LONG_MARK} <reason>' on the def line:\n" + "\n".join(bad)


def test_length_checker_sees_a_long_function(tmp_path):
    f = tmp_path / "x.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    f.write_text(f"def long():\n{body}\n\ndef table():  {LONG_MARK} a table\n{body}\n")
    assert [name for _, name, _ in long_functions(f)] == ["long"]
