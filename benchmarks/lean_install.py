"""A lean install, as a new clinic makes it: a fresh venv with `pip install -e .` (no extras), then the README's
first command path on it: no PyTorch, and images still scored.

    python3.11 benchmarks/lean_install.py [--venv DIR] [--images N] [--keep]

Steps: create the venv; install with a fresh pip cache (every wheel downloaded from PyPI) and time it; check that
`import torch` (and torchvision, timm, pytorch_grad_cam) fails; import every serving module (web, the worker's
tasks, scoring and heat maps, the CLI); `skinscan clinics create`, `skinscan serve`, `skinscan submit` of N images of
../shared/data/ISIC2017 with `--out`, and check every image was scored. Prints the venv's size and the install time
as JSON (the README's "Install" figures come from it). Standard library only, so any Python 3.11 runs it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "ISIC2017" / "ISIC-2017_Test_v2_Data"
SERVING_MODULES = ("web", "web.pages.images", "worker.tasks", "worker.gradcam", "worker.pipeline", "skinscan.cli",
                   "skinscan.cli.service", "skinscan.cli.submit", "skinscan.model.scorer", "skinscan.model.registry",
                   "skinscan.model.predictor")
TORCH_MODULES = ("torch", "torchvision", "timm", "pytorch_grad_cam")


def _size(path: Path) -> int:
    """Bytes of every file under path (links not followed)."""
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True, **kw: object) -> \
        subprocess.CompletedProcess[str]:
    out = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        command = " ".join(map(str, args))
        raise SystemExit(f"{command} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _largest(venv: Path, n: int = 8) -> list[tuple[str, float]]:
    """The n largest top-level entries of the venv's site-packages, in MB."""
    site = next(venv.glob("lib/python*/site-packages"))
    sizes = [(p.name, _size(p) / 1e6 if p.is_dir() else p.stat().st_size / 1e6) for p in site.iterdir()]
    return [(name, round(mb, 1)) for name, mb in sorted(sizes, key=lambda x: -x[1])[:n]]


def main(argv: list[str] | None = None) -> int:
    """Install, check and run; print the figures as JSON; non-zero exit on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, help="where to create the venv (default: a temporary folder)")
    parser.add_argument("--python", default=sys.executable, help="the Python 3.11 that creates the venv")
    parser.add_argument("--images", type=int, default=5, help="images of ISIC 2017's test set to submit")
    parser.add_argument("--keep", action="store_true", help="keep the venv and the data folder afterwards")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="skinscan-lean-"))
    venv = args.venv or work / "venv"
    if venv.exists():
        raise SystemExit(f"{venv} exists: the check needs a fresh venv")
    result: dict[str, object] = {}
    server = None
    try:
        _run(args.python, "-m", "venv", venv)
        bin_ = venv / "bin"
        env = {**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        start = time.monotonic()
        _run(bin_ / "pip", "install", "-q", "-e", ROOT, env=env)
        result["install_seconds"] = round(time.monotonic() - start, 1)
        result["venv_bytes"] = _size(venv)
        result["venv_mb"] = round(result["venv_bytes"] / 1e6, 1)  # type: ignore[operator]
        result["largest_packages_mb"] = _largest(venv)

        for module in TORCH_MODULES:
            out = _run(bin_ / "python", "-c", f"import {module}", env=env, check=False)
            if out.returncode == 0:
                raise SystemExit(f"`import {module}` works in the lean venv: it must not be installed")
        result["torch_installed"] = False
        code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n" \
               "assert 'torch' not in sys.modules, 'a serving module imported torch'"
        _run(bin_ / "python", "-c", code, *SERVING_MODULES, env=env, cwd=work)
        result["serving_modules_import_without_torch"] = list(SERVING_MODULES)

        # The README's first command path, in a data folder of its own.
        app_env = {**env, "SKINSCAN_DATA_DIR": str(work / "data")}
        app_env.pop("SKINSCAN_MODEL", None)
        created = _run(bin_ / "skinscan", "clinics", "create", "Lean Clinic", env=app_env, cwd=work).stdout
        key = next(line.split("API key: ", 1)[1].strip() for line in created.splitlines() if "API key: " in line)
        port = _free_port()
        console = (work / "console.txt").open("wb")
        server = subprocess.Popen([bin_ / "skinscan", "serve", "--port", str(port)], env=app_env, cwd=work,
                                  stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start:\n" + (work / "console.txt").read_text()[-3000:])
            time.sleep(0.5)
        images = sorted(IMAGES.glob("ISIC_*.jpg"))[: args.images]
        if len(images) < args.images:
            raise SystemExit(f"{IMAGES} has fewer than {args.images} images")
        start = time.monotonic()
        _run(bin_ / "skinscan", "submit", *images, "--url", url, "--no-progress", "--out", work / "results.csv",
             env={**app_env, "SKINSCAN_API_KEY": key}, cwd=work, timeout=600)
        result["submit_seconds"] = round(time.monotonic() - start, 1)
        with (work / "results.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        scored = [r for r in rows if r.get("status") == "scored" and r.get("predicted_label")]
        if len(scored) != len(images):
            raise SystemExit(f"{len(scored)} of {len(images)} images scored:\n{rows}")
        result["images_scored"] = len(scored)
        result["labels"] = sorted({r["predicted_label"] for r in scored})
        print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's result
        return 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if args.venv:
                shutil.rmtree(args.venv, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)  # noqa: T201


if __name__ == "__main__":
    raise SystemExit(main())
