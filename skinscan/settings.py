"""Every setting SkinScan reads from the environment, in one place (see .env.example for the list).

`Settings` lists them once, typed, with their defaults and limits. Each field `x` is read from the environment
variable `SKINSCAN_X` (or the name in ENV_NAMES) by a pydantic-settings model built from that list, so a setting
is one line here. Every value is validated: a typo in a number or a boolean (`SKINSCAN_RESCORE_ENABLED=ture`)
stops the process with one ConfigError naming every bad variable, instead of silently reading as a default or false.
An empty variable counts as unset.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, create_model
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


Count = Annotated[int, Field(ge=0)]  # 0 is meaningful (off, or automatic)
Positive = Annotated[int, Field(ge=1)]
ResolvedPath = Annotated[Path, AfterValidator(_resolved)]
UserPath = Annotated[Path, AfterValidator(Path.expanduser)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)]
Backend = Annotated[Literal["auto", "onnx", "torch"], BeforeValidator(_lower)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]

# Fields read from a variable other than SKINSCAN_<FIELD>.
ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "s3_bucket": "S3_BUCKET",
    "s3_endpoint_url": "S3_ENDPOINT_URL",
    "secret_key": "SECRET_KEY",
    "s3_access_key_id": "AWS_ACCESS_KEY_ID",
    "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "model_path": "SKINSCAN_MODEL",
    "production": "SKINSCAN_ENV",
}
# Values never repeated in an error message.
_SECRET_FIELDS = {"database_url", "redis_url", "secret_key", "s3_secret_access_key"}


@dataclass(frozen=True)
class Settings:
    """SkinScan's configuration; embedded defaults unless production services are named."""

    data_dir: ResolvedPath = dataclasses.field(default_factory=default_data_dir)  # per user, not the working folder
    database_url: str = ""  # "": the SQLite file skinscan.db in data_dir
    db_runtime_role: str | None = None  # `skinscan migrate` grants this PostgreSQL role the runtime privileges
    redis_url: str | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None  # boto3 reads these itself; here only for the production check
    s3_secret_access_key: str | None = None
    secret_key: str = DEFAULT_SECRET
    model_path: UserPath | None = None
    production: bool = False  # SKINSCAN_ENV=production (or development, the default)
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
    return ENV_NAMES.get(field, "SKINSCAN_" + field.upper())


class _EnvironmentBase(BaseSettings):
    """Reads the environment: names case-insensitive, an empty variable counts as unset, others ignored."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", case_sensitive=False, frozen=True)


@cache
def environment_model() -> type[BaseSettings]:
    """The pydantic-settings model of Settings: the same fields, types, defaults and limits, read from env_name."""
    hints = get_type_hints(Settings, include_extras=True)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        kind, default = hints[field.name], field.default
        if field.name == "production":  # SKINSCAN_ENV names a mode: a misspelt one must not mean "development"
            kind, default = Annotated[Literal["production", "development"], BeforeValidator(_lower)], "development"
        elif field.name == "data_dir":  # read when settings are read: platformdirs follows XDG_DATA_HOME
            kind, default = ResolvedPath | None, None
        fields[field.name] = (kind, Field(default, validation_alias=env_name(field.name)))
    return create_model("EnvironmentSettings", __base__=_EnvironmentBase, __module__=__name__, **fields)


def _describe(error: Any) -> str:
    """One bad variable: its name, what is wrong, and the value read (unless it may hold a secret)."""
    loc = str(error["loc"][0]) if error.get("loc") else "?"
    field = {env_name(f.name).lower(): f.name for f in dataclasses.fields(Settings)}.get(loc.lower())
    got = "" if field in _SECRET_FIELDS else f" (got {error.get('input')!r})"
    message = str(error["msg"])
    return f"{env_name(field) if field else loc.upper()}: {message[:1].lower()}{message[1:]}{got}"


def _database_url(raw: str, data_dir: Path) -> str:
    """The SQLAlchemy URL: SQLite in data_dir when unset; postgres:// URLs get the psycopg 3 driver."""
    if not raw:
        return f"sqlite:///{data_dir / 'skinscan.db'}"
    for scheme in ("postgres://", "postgresql://"):
        if raw.startswith(scheme):
            return "postgresql+psycopg://" + raw[len(scheme):]
    return raw


def load_settings() -> Settings:
    """Read and validate settings from the environment; one ConfigError names every bad variable.

    Reading costs a few milliseconds (pydantic validates every field), and a worker asks once per task: the
    result is kept for as long as the environment and the working directory (relative paths) stay the same.
    """
    key = (frozenset(os.environ.items()), os.getcwd())
    cached = _LOADED.get(key)
    if cached is None:
        cached = _read_settings()
        _LOADED.clear()  # one environment at a time: a test that changes it gets a fresh read
        _LOADED[key] = cached
    return cached


_LOADED: dict[tuple[frozenset[tuple[str, str]], str], Settings] = {}


def _read_settings() -> Settings:
    try:
        values = environment_model()().model_dump()
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        raise ConfigError(f"{len(problems)} setting{'s are' if len(problems) > 1 else ' is'} not valid: "
                          + "; ".join(problems)) from None
    values["production"] = values["production"] == "production"
    values["data_dir"] = values["data_dir"] or _resolved(default_data_dir())
    values["database_url"] = _database_url(values["database_url"], values["data_dir"])
    return Settings(**values)
