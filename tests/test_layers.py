"""The layering in pyproject.toml's import-linter contracts: the core's layer names every module of the core, the
code keeps the contracts, and an import that crosses a layer breaks them (so `lint-imports` fails CI)."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("skinscan", "web", "worker", "training")
LINT = "import sys\nfrom importlinter.cli import lint_imports_command\nsys.exit(lint_imports_command())"


def _contracts() -> dict[str, dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def _not_source(folder: str, names: list[str]) -> list[str]:
    """What a copy leaves out: caches and every file that is not Python (the bundled model, templates)."""
    return [n for n in names if n == "__pycache__" or not (n.endswith(".py") or (Path(folder) / n).is_dir())]


def _copy(dest: Path) -> Path:
    """The four packages' Python files and pyproject.toml, copied to dest."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=_not_source)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--no-logo"], cwd=root, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_core_layer_names_every_module_of_skinscan_but_the_cli() -> None:
    layers = _contracts()["layers"]["layers"]
    assert isinstance(layers, list) and layers[:2] == ["skinscan.cli", "web | worker | training"]
    core = {name.strip() for name in layers[2].split(":")}
    modules = {f"skinscan.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "skinscan")]) if m.name != "cli"}
    assert core == modules
    assert not any("ignore_imports" in c for c in _contracts().values())


def test_the_code_keeps_the_contracts(tmp_path: Path) -> None:
    out = _lint(_copy(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "3 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(("module", "code", "broken"), [
    ("web/shortcut.py", "from worker.dispatch import requeue_lost\n", "web, worker and training import none"),
    ("worker/shortcut.py", "import training.train\n", "web, worker and training import none"),
    ("skinscan/shortcut.py", "def lazy() -> None:\n    from web import create_app\n", "Only the CLI imports"),
    ("skinscan/model/shortcut.py", "from training.export import save_bundle\n", "Only the CLI imports"),
    ("training/shortcut.py", "from skinscan.cli import main\n", "skinscan.cli on top"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, code: str, broken: str) -> None:
    root = _copy(tmp_path)
    (root / module).write_text(f'"""An import across the layers."""\n\n{code}')
    out = _lint(root)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "BROKEN" in out.stdout and broken in out.stdout.replace("\n", " ")
    assert module.removesuffix(".py").replace("/", ".") in out.stdout
