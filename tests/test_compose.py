"""The compose stack as `docker compose config` would see it, CPU form and GPU form, without Docker.

The files are parsed with PyYAML, variables interpolated by the compose rules (`${VAR}`, `${VAR:-default}`,
`${VAR:?error}`, `$$` for a literal `$`) and the GPU override merged onto the base file (mappings merge, other
values replace), then the services, their commands, variables and health checks are checked against SkinScan
itself: its command-line parser, its settings in production mode and its health routes. `.ci/run` also runs
`docker compose config` on both forms where Docker Compose is installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
GPU = ROOT / "docker-compose.gpu.yml"
SKINSCAN_SERVICES = ("migrate", "web", "worker", "beat")
SECRETS = ("SECRET_KEY", "POSTGRES_PASSWORD", "DB_APP_PASSWORD", "REDIS_PASSWORD", "MINIO_ROOT_USER",
           "MINIO_ROOT_PASSWORD", "S3_APP_ACCESS_KEY", "S3_APP_SECRET_KEY")
VALUES = {"SECRET_KEY": "k" * 64, "POSTGRES_PASSWORD": "pgpass123", "DB_APP_PASSWORD": "apppass321",
          "REDIS_PASSWORD": "redispass456", "MINIO_ROOT_USER": "minioadmin1", "MINIO_ROOT_PASSWORD": "miniopass789",
          "S3_APP_ACCESS_KEY": "skinscanapp", "S3_APP_SECRET_KEY": "s3secret987"}
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|\{(?P<braced>[^}]*)\})")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset: compose stops with the message."""


def interpolate_text(text: str, env: dict[str, str]) -> str:
    """Substitute variables in one string as compose does; raise MissingVariable for a required one."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            return env.get(match["bare"], "")
        braced = _BRACED.fullmatch(match["braced"])
        if braced is None:
            raise ValueError(f"invalid interpolation format: ${{{match['braced']}}}")
        name, op, arg = braced["name"], braced["op"], braced["arg"] or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return interpolate_text(arg, env) if unset else value or ""
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return value or ""
        if op in ("+", ":+"):
            return "" if unset else interpolate_text(arg, env)
        return value or ""

    return _VARIABLE.sub(one, text)


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Substitute variables in every string value of a parsed compose file."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    return interpolate_text(node, env) if isinstance(node, str) else node


def merge(base: Any, override: Any) -> Any:
    """Merge an override file onto a base file: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


def raw(path: Path) -> dict[str, Any]:
    """A compose file as PyYAML reads it (anchors and aliases resolved)."""
    return yaml.safe_load(path.read_text())


def config(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration of these files, merged in order and interpolated (the `docker compose config` model)."""
    merged: dict[str, Any] = {}
    for path in files:
        merged = merge(merged, raw(path))
    return interpolate(merged, VALUES if env is None else env)


FORMS = {"cpu": (BASE,), "gpu": (BASE, GPU)}


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The devices a service reserves."""
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def test_cpu_form_reserves_no_device_and_gpu_form_gives_the_worker_one() -> None:
    """The base file starts on a machine without an NVIDIA GPU; the override only adds the worker's GPU."""
    cpu, gpu = config(*FORMS["cpu"]), config(*FORMS["gpu"])
    assert {name: devices(s) for name, s in cpu["services"].items() if devices(s)} == {}
    assert devices(gpu["services"]["worker"]) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert set(raw(GPU)["services"]) == {"worker"}
    assert set(gpu["services"]) == set(cpu["services"])
    for name in cpu["services"]:
        if name != "worker":
            assert gpu["services"][name] == cpu["services"][name], name
    worker_cpu = {k: v for k, v in cpu["services"]["worker"].items() if k not in ("deploy", "build")}
    worker_gpu = {k: v for k, v in gpu["services"]["worker"].items() if k not in ("deploy", "build")}
    assert worker_gpu == worker_cpu
    # Every service runs the slim image (no PyTorch); the GPU form builds the worker from the gpu target.
    assert {s["build"]["target"] for s in cpu["services"].values() if "build" in s} == {"slim"}
    assert gpu["services"]["worker"]["build"] == {"context": ".", "target": "gpu"}
    stages = re.findall(r"^FROM \S+ AS (\w+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert {"slim", "gpu"} <= set(stages) and stages[-1] == "slim"  # a plain `docker build .` is the slim one


@pytest.mark.parametrize("form", sorted(FORMS))
def test_skinscan_services_run_commands_the_cli_accepts(form: str) -> None:
    """migrate, web, worker and beat each run a `skinscan` sub-command that the real parser accepts."""
    from skinscan.cli import build_parser

    services = config(*FORMS[form])["services"]
    for name in SKINSCAN_SERVICES:
        command = services[name]["command"]
        assert command[0] == "skinscan" and command[1] == name, (name, command)
        args = build_parser().parse_args(command[1:])
        assert args.command == name and callable(args.func)
    assert services["web"]["command"][-2:] == ["--port", "8000"]
    assert services["web"]["ports"] == ["8000:8000"]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_secret_comes_from_env_without_a_default(form: str) -> None:
    """Unset, each secret stops compose naming it; no password or key is written in the files."""
    for name in SECRETS:
        env = {k: v for k, v in VALUES.items() if k != name}
        with pytest.raises(MissingVariable, match=f"required variable {name} is missing a value: set {name} in .env"):
            config(*FORMS[form], env=env)
    text = BASE.read_text() + GPU.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"(:?[-?+])?", text)
        assert uses and set(uses) == {":?"}, (name, uses)  # every use required, none with a default
    services = raw(BASE)["services"]
    for service in services.values():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET|ROOT_USER|ACCESS_KEY", key):
                assert isinstance(value, str) and re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), (key, value)
    for url in ("DATABASE_URL", "REDIS_URL"):
        assert "${" in services["web"]["environment"][url], url


def test_env_example_lists_every_variable_the_compose_files_read() -> None:
    """`.env.example` names each variable compose interpolates (set or commented out)."""
    text = "\n".join(line for path in (BASE, GPU) for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    used = {m["bare"] or _BRACED.fullmatch(m["braced"])["name"]  # type: ignore[index]
            for m in _VARIABLE.finditer(text) if not m["escaped"]}
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.M))
    assert SECRETS and set(SECRETS) <= used
    assert used - listed == set()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_skinscan_environment_is_valid_production_settings(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The services' environment loads as production settings naming the compose services and the secrets."""
    from skinscan.settings import load_settings

    services = config(*FORMS[form])["services"]
    environments = [services[name]["environment"] for name in SKINSCAN_SERVICES if name != "migrate"]
    assert all(e == environments[0] for e in environments)
    env = environments[0]
    # migrate alone connects as the schema's owner and names the runtime role it grants privileges to.
    migrate = dict(services["migrate"]["environment"])
    assert migrate.pop("DATABASE_URL") == "postgresql://skinscan:pgpass123@postgres:5432/skinscan"
    assert migrate.pop("SKINSCAN_DB_RUNTIME_ROLE") == "skinscan_app"
    assert migrate == {k: v for k, v in env.items() if k != "DATABASE_URL"}
    for key in list(os.environ):
        if key.startswith(("SKINSCAN_", "AWS_", "S3_")) or key in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    settings.check_production()
    assert settings.production and settings.secret_key == VALUES["SECRET_KEY"]
    assert settings.database_url == "postgresql+psycopg://skinscan_app:apppass321@postgres:5432/skinscan"
    assert settings.redis_url == "redis://:redispass456@redis:6379/0"
    assert settings.s3_endpoint_url == "http://minio:9000" and settings.s3_bucket == "skinscan-images"
    # The app's own MinIO user, never the root user.
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("skinscanapp", "s3secret987")
    postgres = services["postgres"]["environment"]
    assert (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"],
            postgres["DB_APP_PASSWORD"]) == ("skinscan", "pgpass123", "skinscan", "apppass321")
    assert services["minio"]["environment"] == {"MINIO_ROOT_USER": "minioadmin1", "MINIO_ROOT_PASSWORD": "miniopass789"}
    assert services["minio-bucket"]["environment"] == services["minio"]["environment"] | {
        "S3_APP_ACCESS_KEY": "skinscanapp", "S3_APP_SECRET_KEY": "s3secret987"}
    entrypoint = services["minio-bucket"]["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-ec"] and len(entrypoint) == 3
    script = entrypoint[2]
    assert script.startswith('mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"')
    assert "mc mb --ignore-existing local/skinscan-images" in script
    assert 'mc admin user add local "$S3_APP_ACCESS_KEY" "$S3_APP_SECRET_KEY"' in script
    # Redis asks for the password it is given in its own environment (the shell reads it, `$$` in the file).
    assert services["redis"]["environment"] == {"REDIS_PASSWORD": "redispass456"}
    assert services["redis"]["command"] == ["sh", "-c",
                                            'exec redis-server --appendonly yes --requirepass "$REDIS_PASSWORD"']


@pytest.mark.parametrize("form", sorted(FORMS))
def test_health_checks_and_start_order(form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Services others wait for as healthy have a health check; one-shot services are waited for to finish;
    web's check asks SkinScan's readiness route on the port web listens on."""
    services = config(*FORMS[form])["services"]
    one_shot = {"migrate", "minio-bucket"}
    waited_healthy = set()
    for name, service in services.items():
        for dep, condition in (service.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            cond = condition["condition"]
            assert cond in ("service_healthy", "service_completed_successfully"), (name, dep, cond)
            if cond == "service_healthy":
                waited_healthy.add(dep)
            else:
                assert dep in one_shot, (name, dep)
    assert waited_healthy == {"postgres", "redis", "minio"}
    for name in ("postgres", "redis", "minio", "web"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, (name, test)
    assert services["postgres"]["healthcheck"]["test"] == ["CMD-SHELL", "pg_isready -U skinscan"]
    assert services["redis"]["healthcheck"]["test"] == [
        "CMD-SHELL", 'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli ping | grep -q PONG']
    for name in ("web", "worker"):
        assert set(services[name]["depends_on"]) == {"migrate", "minio-bucket", "redis"}
    assert set(services["migrate"]["depends_on"]) == {"postgres"}
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", web_check)
    assert url and url[1] == services["web"]["command"][-1]
    for key in ("DATABASE_URL", "REDIS_URL", "S3_BUCKET", "SKINSCAN_ENV"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SKINSCAN_DATA_DIR", str(tmp_path))
    from web import create_app

    routes = {rule.rule for rule in create_app().url_map.iter_rules()}
    assert url[2] == "/readyz" and url[2] in routes


def test_interpolation_follows_the_compose_rules() -> None:
    """The test's interpolation: defaults, required variables, `$$`, and an empty value under `:` forms."""
    env = {"A": "1", "E": ""}
    assert interpolate_text("${A} $A ${B:-x} ${E:-y} ${E-z} $$A ${A:?m} ${A:+set}", env) == "1 1 x y  $A 1 set"
    with pytest.raises(MissingVariable, match="need E"):
        interpolate_text("${E:?need E}", env)
    assert interpolate_text("${E?m}", env) == ""
    with pytest.raises(MissingVariable):
        interpolate_text("${B?m}", env)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_only_known_keys_and_declared_volumes(form: str) -> None:
    """Each service uses keys of the compose specification only, and every named volume is declared."""
    model = config(*FORMS[form])
    assert set(model) - {"services", "volumes"} == {"x-skinscan-env", "x-migrate-env"}
    known = {"image", "build", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
             "healthcheck", "deploy"}
    for name, service in model["services"].items():
        assert set(service) <= known, (name, set(service) - known)
        assert ("image" in service) != ("build" in service), name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("./"):  # a bind mount of a file shipped in the repository
                assert (ROOT / source).is_file(), (name, mount)
                continue
            assert source in model["volumes"], (name, mount)
        for key in ("interval",):
            if key in service.get("healthcheck", {}):
                assert re.fullmatch(r"\d+[smh]", service["healthcheck"][key]), (name, service["healthcheck"])
