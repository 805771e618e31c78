"""Serving without PyTorch (a plain `pip install -e .`): every serving module imports, and a worker scores images
with their Grad-CAM grids, in a process where torch, torchvision, timm and pytorch_grad_cam cannot be imported.
(benchmarks/lean_install.py checks the same in a fresh venv from PyPI.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = ("web", "web.pages.images", "worker.tasks", "skinscan.model.scorer", "worker.gradcam", "worker.pipeline",
           "worker.rescore", "skinscan.cli", "skinscan.cli.service", "skinscan.cli.submit", "skinscan.model.registry",
           "skinscan.model.predictor", "skinscan.model.bundle")
BLOCK = """
import importlib.machinery, sys
class NoTorch(importlib.machinery.PathFinder):  # the path finder, blind to PyTorch's packages: as if not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "pytorch_grad_cam"):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path = [NoTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""

def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_the_blocker_blocks() -> None:
    out = _run("import torch")
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr


def test_serving_modules_import_without_torch() -> None:
    out = _run("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
               "assert not [m for m in sys.modules if m.split('.')[0] == 'torch']", *SERVING)
    assert out.returncode == 0, out.stderr[-3000:]


def test_scoring_and_heat_maps_without_torch(tmp_path: Path, ham_dir: Path) -> None:
    from training.export import create_model, save_bundle

    bundle = tmp_path / "resnet18"
    save_bundle(create_model("resnet18", 7), bundle, {
        "architecture": "resnet18", "version": "lean", "input_size": 64, "resize_size": 73, "resize_mode": "squash",
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "temperature": 1.0})
    images = sorted((ham_dir / "images").glob("*.jpg"))[:3]
    out = _run("""
import sys
from pathlib import Path
from skinscan.model.bundle import load_bundle
from skinscan.model.scorer import Scorer
scorer = Scorer(load_bundle(sys.argv[1]), backend="auto")
assert scorer.predictor.backend == "onnx" and scorer.predictor.has_features
results = scorer.score_bytes([(p, Path(p).read_bytes()) for p in sys.argv[2:]])
assert all(r.error is None and len(r.heatmap) == 2 and len(r.heatmap[0]) == 2 for r in results), results
assert 'torch' not in sys.modules
print(len(results))
""", str(bundle), *map(str, images))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "3"
