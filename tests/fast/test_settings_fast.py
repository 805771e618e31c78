"""Settings are typed and validated: a typo is an error naming the variable, never a silent default or false."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from skinscan.settings import ConfigError, Settings, env_name, read_settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SkinScan variable from the surrounding shell leaks into these tests."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_embedded_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home-data"))
    settings = read_settings()
    assert settings.data_dir == tmp_path / "home-data" / "skinscan"  # per user (platformdirs), not the working folder
    assert settings.database_url == f"sqlite:///{tmp_path / 'home-data' / 'skinscan' / 'skinscan.db'}"
    assert settings.embedded and settings.s3_bucket is None and not settings.production
    assert settings.rescore_enabled is True and settings.rate_limit_per_minute == 600
    assert settings.referral_sensitivity is None and settings.model_cache == settings.data_dir / "model-cache"


def test_values_are_read_and_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {"SKINSCAN_RESCORE_ENABLED": "off", "SKINSCAN_CHUNK_SIZE": " 8 ", "SKINSCAN_BACKEND": "ONNX",
                        "SKINSCAN_REFERRAL_SENSITIVITY": "0.95", "SKINSCAN_LOG_LEVEL": "debug",
                        "SKINSCAN_ENV": "Production", "DATABASE_URL": "postgres://u:p@db/skinscan",
                        "REDIS_URL": "redis://r:6379/0", "SKINSCAN_MODEL": "~/bundle",
                        "SKINSCAN_DATA_DIR": "data", "SKINSCAN_RATE_LIMIT_PER_MINUTE": "0",
                        "SKINSCAN_MAX_FILES": ""}.items():
        monkeypatch.setenv(name, value)
    settings = read_settings()
    assert settings.rescore_enabled is False and settings.chunk_size == 8 and settings.backend == "onnx"
    assert settings.referral_sensitivity == 0.95 and settings.log_level == "DEBUG" and settings.production
    assert settings.database_url == "postgresql+psycopg://u:p@db/skinscan" and settings.redis_url == "redis://r:6379/0"
    assert settings.model_path == Path("~/bundle").expanduser() and settings.data_dir == tmp_path / "data"
    assert settings.rate_limit_per_minute == 0  # 0 turns the limit off: allowed
    assert settings.max_files == 10_000  # an empty variable is unset, not an error


@pytest.mark.parametrize("name, value", [
    ("SKINSCAN_RESCORE_ENABLED", "ture"),  # a typo in a boolean used to read as false
    ("SKINSCAN_CHUNK_SIZE", "32x"),
    ("SKINSCAN_CHUNK_SIZE", "0"),
    ("SKINSCAN_REFERRAL_SENSITIVITY", "95"),
    ("SKINSCAN_RESCORE_HOUR", "24"),
    ("SKINSCAN_BACKEND", "tensorflow"),
    ("SKINSCAN_LOG_LEVEL", "LOUD"),
    ("SKINSCAN_ENV", "prod"),  # a misspelt production must not start in development mode
    ("SKINSCAN_SIGNIN_FAILURES_PER_ACCOUNT", "-1"),
])
def test_a_bad_value_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        read_settings()
    message = str(refused.value)
    assert message.startswith("1 setting is not valid: ") and f"{name}:" in message and repr(value) in message


def test_one_error_lists_every_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {"SKINSCAN_RESCORE_ENABLED": "ture", "SKINSCAN_MAX_FILES": "many", "SKINSCAN_WORKER_NICE": "40",
           "SKINSCAN_REFERRAL_SENSITIVITY": "0"}
    for name, value in bad.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SKINSCAN_CHUNK_SIZE", "16")  # a good one among them is not listed
    with pytest.raises(ConfigError) as refused:
        read_settings()
    message = str(refused.value)
    assert message.startswith("4 settings are not valid: ")
    assert all(f"{name}:" in message for name in bad) and "SKINSCAN_CHUNK_SIZE" not in message


def test_every_field_has_its_variable_in_env_example() -> None:
    """.env.example documents every variable Settings reads (commented out or set)."""
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    missing = [env_name(name) for name in Settings.model_fields if env_name(name) not in example]
    assert not missing, missing


def test_importing_the_processes_reads_no_settings() -> None:
    """A bad variable fails when settings are read, not when the worker's tasks or the web app are imported."""
    code = "import worker.tasks, worker.celery_app, skinscan.broker, web, web.pages, skinscan.cli.service"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "SKINSCAN_CHUNK_SIZE": "many"})
    assert out.returncode == 0, out.stderr[-3000:]
    fails = subprocess.run([sys.executable, "-c", code + "\nfrom skinscan.settings import load_settings\n"
                            "load_settings()"], cwd=root, capture_output=True, text=True, timeout=300,
                           env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "SKINSCAN_CHUNK_SIZE": "many"})
    assert fails.returncode != 0 and "SKINSCAN_CHUNK_SIZE" in fails.stderr


def test_task_retries_follow_the_setting_read_when_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.tasks  # noqa: F401 - the shared tasks join every app
    from skinscan.broker import create_celery
    from skinscan.settings import load_settings

    monkeypatch.setenv("SKINSCAN_TASK_MAX_RETRIES", "7")
    app = create_celery(load_settings())
    assert app.tasks["worker.tasks.score_chunk"].max_retries == 7
    monkeypatch.setenv("SKINSCAN_TASK_MAX_RETRIES", "2")
    load_settings.cache_clear()
    assert app.tasks["worker.tasks.score_chunk"].max_retries == 2
