"""Every setting SkinScan reads from the environment, in one place (see .env.example for the list).

`Settings` is one pydantic-settings class: each field `x` is read from the environment variable `SKINSCAN_X` (or
the name its validation alias gives), typed, with its default and limits, so a setting is one line here. Every value
is validated: a typo in a number or a boolean (`SKINSCAN_RESCORE_ENABLED=ture`) stops the process with one
ConfigError naming every bad variable, instead of silently reading as a default or false. An empty variable counts
as unset. Nothing reads the environment at import time: `load_settings()` reads it on first use and keeps the result
for the process (`load_settings.cache_clear()` reads it again; `read_settings()` always reads it).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "dev-insecure-change-me"
# Credentials published in examples and earlier compose files: a production node refuses each of them.
KNOWN_DEFAULT_SECRETS = frozenset({
    DEFAULT_SECRET, "change-me-to-a-long-random-string",  # SECRET_KEY: built in, .env.example
    "minioadmin", "skinscan-minio-secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # S3: MinIO, compose, AWS docs
    "skinscan", "secret", "postgres", "password",  # database passwords: compose, .env.example, common images
})
KNOWN_DEFAULT_ACCESS_KEYS = frozenset({"minioadmin", "AKIAIOSFODNN7EXAMPLE"})


def default_data_dir() -> Path:
    """The per-user data folder (platformdirs: ~/.local/share/skinscan on Linux), whatever the working directory."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("skinscan", appauthor=False))


class ConfigError(RuntimeError):
    """A setting that is missing, malformed or unsafe for the mode SkinScan runs in."""


def _resolved(path: Path) -> Path:
    return path.expanduser().resolve()


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _mode(value: Any) -> Any:
    """SKINSCAN_ENV names a mode, production or development: a misspelt one must not mean development."""
    if not isinstance(value, str):
        return value
    mode = value.strip().lower()
    if mode not in ("production", "development"):
        raise PydanticCustomError("mode", "Input should be 'production' or 'development'")
    return mode == "production"


Count = Annotated[int, Field(ge=0)]  # 0 is meaningful (off, or automatic)
Positive = Annotated[int, Field(ge=1)]
ResolvedPath = Annotated[Path, AfterValidator(_resolved)]
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]
Backend = Annotated[Literal["auto", "onnx", "torch"], BeforeValidator(_lower)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Mode = Annotated[bool, BeforeValidator(_mode)]

# Values never repeated in an error message.
_SECRET_FIELDS = {"database_url", "redis_url", "secret_key", "s3_secret_access_key"}


class Settings(BaseSettings):
    """SkinScan's configuration, read from the environment; embedded defaults unless production services are named."""

    model_config = SettingsConfigDict(env_prefix="SKINSCAN_", env_ignore_empty=True, extra="ignore",
                                      case_sensitive=False, frozen=True)

    # per user (platformdirs follows XDG_DATA_HOME when settings are read), not the working folder
    data_dir: ResolvedPath = Field(default_factory=lambda: _resolved(default_data_dir()))
    # "": the SQLite file skinscan.db in data_dir; postgres:// URLs get the psycopg 3 driver
    database_url: str = Field("", validation_alias="DATABASE_URL", validate_default=True)
    db_runtime_role: str | None = None  # `skinscan migrate` grants this PostgreSQL role the runtime privileges
    redis_url: str | None = Field(None, validation_alias="REDIS_URL")
    s3_bucket: str | None = Field(None, validation_alias="S3_BUCKET")
    s3_endpoint_url: str | None = Field(None, validation_alias="S3_ENDPOINT_URL")
    # boto3 reads these itself; here only for the production check
    s3_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    s3_secret_access_key: str | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    secret_key: str = Field(DEFAULT_SECRET, validation_alias="SECRET_KEY")
    model_path: UserPath | None = Field(None, validation_alias="SKINSCAN_MODEL")
    production: Mode = Field(False, validation_alias="SKINSCAN_ENV")  # production, or development (the default)
    chunk_size: Positive = 32
    batch_size: Count = 0  # 0: the best measured for the backend (skinscan.model.predictor.BATCH_SIZES)
    backend: Backend = "auto"
    threads: Count = 0
    decode_workers: Count = 0
    worker_nice: Annotated[int, Field(ge=0, le=19)] = 10
    max_files: Positive = 10_000
    max_file_bytes: Positive = 50 * 1024 * 1024
    max_upload_bytes: Positive = 4 * 1024 * 1024 * 1024
    max_zip_ratio: Positive = 200
    rate_limit_per_minute: Count = 600  # API requests per key (or address) per minute (0: no limit)
    api_key_cache_seconds: Count = 10  # web: a key's clinic is remembered this long per process (0: every request)
    signin_failures_per_account: Count = 10  # failed sign-ins per window before 429 (0: no limit)
    signin_failures_per_address: Count = 20
    signin_window_seconds: Positive = 900
    trusted_proxies: Count = 0  # proxies in front of web whose X-Forwarded-For/-Proto are believed (0: none)
    rescore_enabled: bool = True
    rescore_hour: Annotated[int, Field(ge=0, le=23)] = 2
    rescore_minute: Annotated[int, Field(ge=0, le=59)] = 0
    retention_hour: Annotated[int, Field(ge=0, le=23)] = 3  # UTC: the nightly deletion of jobs past retention
    retention_minute: Annotated[int, Field(ge=0, le=59)] = 30
    retention_batch: Positive = 50  # jobs deleted per retention task; a larger backlog goes on in a next task
    requeue_after_seconds: Positive = 600
    task_max_retries: Count = 5
    sweep_interval_seconds: Positive = 60
    upload_timeout_seconds: Positive = 86_400
    storage_timeout_seconds: Positive = 10  # one storage request, sent and answered (one try)
    storage_deadline_seconds: Positive = 15  # one storage call, its tries and backoff included (>= the timeout)
    orphan_grace_seconds: Count = 3600
    visibility_timeout: Positive = 30
    task_time_limit: Positive = 1800
    log_level: LogLevel = "INFO"
    referral_sensitivity: Fraction | None = None  # None: the bundle's default operating point
    model_cache_dir: ResolvedPath | None = None  # None: <data_dir>/model-cache (see model_cache)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, raw: str, info: ValidationInfo) -> str:
        """The SQLAlchemy URL: SQLite in data_dir when unset; postgres:// URLs get the psycopg 3 driver."""
        if not raw:
            data_dir = info.data.get("data_dir")
            return f"sqlite:///{data_dir / 'skinscan.db'}" if data_dir is not None else raw
        for scheme in ("postgres://", "postgresql://"):
            if raw.startswith(scheme):
                return "postgresql+psycopg://" + raw[len(scheme):]
        return raw

    @property
    def embedded(self) -> bool:
        """True when Celery runs in-process (no REDIS_URL)."""
        return self.redis_url is None

    @property
    def broker_url(self) -> str:
        """Celery broker: Redis in production, kombu's in-process memory transport embedded."""
        return self.redis_url or "memory://"

    @property
    def model_cache(self) -> Path:
        """Folder of this machine's cache of model bundles fetched from object storage."""
        return self.model_cache_dir or self.data_dir / "model-cache"

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
        problems += self._default_credentials()
        if problems:
            raise ConfigError("refusing to start in production (SKINSCAN_ENV=production): " + "; ".join(problems))


    def _default_credentials(self) -> list[str]:
        """Every setting that holds a published default credential (example files, earlier compose files)."""
        from urllib.parse import urlsplit

        found = []
        if self.secret_key in KNOWN_DEFAULT_SECRETS and self.secret_key != DEFAULT_SECRET:
            found.append("SECRET_KEY is the example value from .env.example")
        if self.s3_access_key_id in KNOWN_DEFAULT_ACCESS_KEYS or self.s3_secret_access_key in KNOWN_DEFAULT_SECRETS:
            found.append("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are a published default (give the app its own "
                         "S3 credentials)")
        for name, url in (("DATABASE_URL", self.database_url), ("REDIS_URL", self.redis_url or "")):
            try:
                password = urlsplit(url).password
            except ValueError:
                password = None
            if password in KNOWN_DEFAULT_SECRETS:
                found.append(f"{name} has a published default password")
        return found


def env_name(field: str) -> str:
    """Return the environment variable a Settings field is read from."""
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else "SKINSCAN_" + field.upper()


def _describe(error: Any) -> str:
    """One bad variable: its name, what is wrong, and the value read (unless it may hold a secret)."""
    loc = str(error["loc"][0]) if error.get("loc") else "?"
    names = {name: name for name in Settings.model_fields} | {env_name(name).lower(): name
                                                                for name in Settings.model_fields}
    field = names.get(loc.lower())
    got = "" if field in _SECRET_FIELDS else f" (got {error.get('input')!r})"
    message = str(error["msg"])
    return f"{env_name(field) if field else loc.upper()}: {message[:1].lower()}{message[1:]}{got}"


def read_settings() -> Settings:
    """Read and validate settings from the environment now; one ConfigError names every bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{len(problems)} setting{'s are' if len(problems) > 1 else ' is'} not valid: "
                          + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """This process's settings: read from the environment on first use, then kept (pydantic validates every field,
    a few milliseconds, and a worker asks once per task). load_settings.cache_clear() makes the next call read again."""
    return read_settings()
