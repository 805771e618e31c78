"""Every setting SkinScan reads from the environment, in one place (see .env.example for the list)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SECRET = "dev-insecure-change-me"


class ConfigError(RuntimeError):
    """A setting that is missing or unsafe for the mode SkinScan runs in."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _fraction(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {raw!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {raw!r}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """SkinScan's configuration; embedded defaults unless production services are named."""

    data_dir: Path
    database_url: str
    redis_url: str | None
    s3_bucket: str | None
    s3_endpoint_url: str | None
    secret_key: str
    model_path: Path | None
    production: bool
    chunk_size: int = 32
    batch_size: int = 0  # 0: the best measured for the backend (training.predictor.BATCH_SIZES)
    backend: str = "auto"
    threads: int = 0
    decode_workers: int = 0
    worker_nice: int = 10
    max_files: int = 10_000
    max_file_bytes: int = 50 * 1024 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024 * 1024
    max_zip_ratio: int = 200
    rate_limit_per_minute: int = 600
    signin_failures_per_account: int = 10  # failed sign-ins per window before 429 (0: no limit)
    signin_failures_per_address: int = 20
    signin_window_seconds: int = 900
    rescore_enabled: bool = True
    rescore_hour: int = 2
    rescore_minute: int = 0
    requeue_after_seconds: int = 600
    task_max_retries: int = 5
    sweep_interval_seconds: int = 60
    upload_timeout_seconds: int = 86_400
    orphan_grace_seconds: int = 3600
    visibility_timeout: int = 30
    task_time_limit: int = 1800
    log_level: str = "INFO"
    referral_sensitivity: float | None = None  # None: the bundle's default operating point

    @property
    def embedded(self) -> bool:
        """True when Celery runs in-process (no REDIS_URL)."""
        return self.redis_url is None

    @property
    def broker_url(self) -> str:
        """Celery broker: Redis in production, kombu's in-process memory transport embedded."""
        return self.redis_url or "memory://"

    @property
    def images_dir(self) -> Path:
        """Folder for images when no S3 bucket is configured."""
        return self.data_dir / "images"

    def check_production(self) -> None:
        """Refuse to run a production process with the default secret key or without its services, naming every
        missing one (a production node must never fall back to SQLite, a local folder or an in-memory broker)."""
        if not self.production:
            return
        problems = []
        if self.secret_key == DEFAULT_SECRET:
            problems.append("SECRET_KEY must be set to a long random value (it is the default)")
        if self.database_url.startswith("sqlite"):
            problems.append("DATABASE_URL must name the PostgreSQL database (it would be SQLite)")
        if self.redis_url is None:
            problems.append("REDIS_URL must name the Redis broker (Celery would run in-process)")
        if self.s3_bucket is None:
            problems.append("S3_BUCKET must name the image bucket (images would go to a local folder)")
        if problems:
            raise ConfigError("refusing to start in production (SKINSCAN_ENV=production): " + "; ".join(problems))


def load_settings() -> Settings:
    """Read settings from the environment."""
    data_dir = Path(os.environ.get("SKINSCAN_DATA_DIR") or "skinscan-data").expanduser().resolve()
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{data_dir / 'skinscan.db'}"
    if database_url.startswith("postgres://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgres://"):]
    elif database_url.startswith("postgresql://"):
        database_url = "postgresql+psycopg://" + database_url[len("postgresql://"):]
    model = os.environ.get("SKINSCAN_MODEL")
    production = os.environ.get("SKINSCAN_ENV", "").lower() == "production"
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        redis_url=os.environ.get("REDIS_URL") or None,
        s3_bucket=os.environ.get("S3_BUCKET") or None,
        s3_endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
        secret_key=os.environ.get("SECRET_KEY") or DEFAULT_SECRET,
        model_path=Path(model).expanduser() if model else None,
        production=production,
        chunk_size=_int("SKINSCAN_CHUNK_SIZE", 32),
        batch_size=_int("SKINSCAN_BATCH_SIZE", 0),
        backend=os.environ.get("SKINSCAN_BACKEND", "auto"),
        threads=_int("SKINSCAN_THREADS", 0),
        decode_workers=_int("SKINSCAN_DECODE_WORKERS", 0),
        worker_nice=_int("SKINSCAN_WORKER_NICE", 10),
        max_files=_int("SKINSCAN_MAX_FILES", 10_000),
        max_file_bytes=_int("SKINSCAN_MAX_FILE_BYTES", 50 * 1024 * 1024),
        max_upload_bytes=_int("SKINSCAN_MAX_UPLOAD_BYTES", 4 * 1024 * 1024 * 1024),
        max_zip_ratio=_int("SKINSCAN_MAX_ZIP_RATIO", 200),
        rate_limit_per_minute=_int("SKINSCAN_RATE_LIMIT_PER_MINUTE", 600),
        signin_failures_per_account=_int("SKINSCAN_SIGNIN_FAILURES_PER_ACCOUNT", 10),
        signin_failures_per_address=_int("SKINSCAN_SIGNIN_FAILURES_PER_ADDRESS", 20),
        signin_window_seconds=_int("SKINSCAN_SIGNIN_WINDOW_SECONDS", 900),
        rescore_enabled=_bool("SKINSCAN_RESCORE_ENABLED", True),
        rescore_hour=_int("SKINSCAN_RESCORE_HOUR", 2),
        rescore_minute=_int("SKINSCAN_RESCORE_MINUTE", 0),
        requeue_after_seconds=_int("SKINSCAN_REQUEUE_AFTER_SECONDS", 600),
        task_max_retries=_int("SKINSCAN_TASK_MAX_RETRIES", 5),
        sweep_interval_seconds=_int("SKINSCAN_SWEEP_INTERVAL_SECONDS", 60),
        upload_timeout_seconds=_int("SKINSCAN_UPLOAD_TIMEOUT_SECONDS", 86_400),
        orphan_grace_seconds=_int("SKINSCAN_ORPHAN_GRACE_SECONDS", 3600),
        visibility_timeout=_int("SKINSCAN_VISIBILITY_TIMEOUT", 30),
        task_time_limit=_int("SKINSCAN_TASK_TIME_LIMIT", 1800),
        log_level=os.environ.get("SKINSCAN_LOG_LEVEL", "INFO"),
        referral_sensitivity=_fraction("SKINSCAN_REFERRAL_SENSITIVITY"),
    )
