"""The layout is the architecture: imports point one way (STYLE.md section 1)."""

import ast
from pathlib import Path

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


def imported_packages(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


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


def test_slurm_never_imports_torch():
    for path in (ROOT / "slurm").rglob("*.py"):
        assert "torch" not in {t for _, t in imported_packages(path)}, path


def test_checker_sees_a_back_edge(tmp_path):
    # the test above must be able to fail: feed it a file with a forbidden import
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom launcher.cli import main\n")
    assert ("launcher" in {t for _, t in imported_packages(f)})


def test_the_cli_and_config_do_not_import_torch():
    """Composing and checking a config (tierzero config, ckpt list, the local launcher before
    it spawns) stays fast: torch is imported only where a command needs it."""
    import subprocess
    import sys

    code = ("import sys, launcher.cli, launcher.config, checkpoint.store; "
            "launcher.config.load_config([], []); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
