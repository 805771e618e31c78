"""`skinscan serve` in a subprocess on a private data folder, and the `skinscan` command line beside it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests
from realservices import ROOT, free_port, wait_port

SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "S3_ENDPOINT_URL", "SKINSCAN_ENV", "SECRET_KEY",
                     "SKINSCAN_API_KEY", "SKINSCAN_URL")


def embedded_env(data: Path, bundle: Path) -> dict[str, str]:
    """The environment of an embedded install with its data in `data`."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update({"SKINSCAN_DATA_DIR": str(data), "SKINSCAN_MODEL": str(bundle)})
    return env


def cli(env: dict[str, str], *args: str, check: bool = True, cwd: Path = ROOT, stdin: str = "") -> \
        subprocess.CompletedProcess[str]:
    """Run `python -m skinscan.cli ARGS`; with check, it must succeed."""
    out = subprocess.run([sys.executable, "-m", "skinscan.cli", *args], env={**env, "PYTHONPATH": str(ROOT)},
                         cwd=cwd, capture_output=True, text=True, timeout=600, input=stdin)
    if check:
        assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out


class Serve:
    """A running `skinscan serve`, its console captured in a file."""

    def __init__(self, env: dict[str, str], console: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.console_path = console
        self._out = console.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "skinscan.cli", "serve", "--port", str(self.port), *args], env=env, cwd=ROOT,
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_port("127.0.0.1", self.port, timeout=180)
            assert requests.get(f"{self.url}/readyz", timeout=30).json()["status"] == "ok"
        except BaseException:
            self.stop()
            raise

    def console(self) -> str:
        """What the console showed so far."""
        return self.console_path.read_text()

    def stop(self) -> str:
        """Stop the server (as Ctrl+C would) and return its console."""
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._out.close()
        return self.console()
