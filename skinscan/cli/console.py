"""What `skinscan serve` shows on its console, and where the rest of its log goes (a file in the data folder)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

LOG_FILE = "skinscan.log"
JOBS_LOGGER = "skinscan.jobs"  # one line per finished job: shown on the console
OWN_PACKAGES = ("skinscan", "web", "worker")


class ConsoleFilter(logging.Filter):
    """A person's console: errors, SkinScan's own warnings and one line per finished job; no request or task logs,
    no library warnings (they go to the log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """True for the records a person at the console needs."""
        if record.levelno >= logging.ERROR:
            return True
        own = record.name.split(".", 1)[0] in OWN_PACKAGES
        return record.name == JOBS_LOGGER or (own and record.levelno >= logging.WARNING)


def log_to_file(data_dir: Path, verbose: bool) -> Path:
    """Send every log record to data_dir/skinscan.log (rotated) and only ConsoleFilter's to the console (all of
    them with verbose); Python warnings (sklearn's, Celery's) are logged, not printed. Returns the file's path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOG_FILE
    root = logging.getLogger()
    console = next((h for h in root.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler)), None)
    if console is None:
        console = logging.StreamHandler()
        root.addHandler(console)
    if not verbose:
        console.addFilter(ConsoleFilter())
        console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    to_file = logging.handlers.RotatingFileHandler(path, maxBytes=20 * 1024 * 1024, backupCount=3, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(to_file)
    logging.captureWarnings(True)
    return path
