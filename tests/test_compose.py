"""compose.yaml is valid and passes only settings the code reads."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from contract.redis_acl import PASSWORD_ENV
from contract.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert "--requirepass" not in redis_command, "the users come from the ACL file; requirepass is the default user's"
    assert "${REDIS_WORKER_PASSWORD" in services["worker"]["environment"]["BULKGEN_WORKER_BROKER_URL"]
    assert "flower" in services["flower"]["command"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["migrate"]["command"] == ["producer", "db", "upgrade"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name in ("migrate", "producer", "worker", "flower"):
        env = services[name]["environment"]
        bulkgen_vars = {key for key in env if key.startswith(ENV_PREFIX)}
        assert bulkgen_vars, name
        assert bulkgen_vars <= known, bulkgen_vars - known
    assert services["worker"]["environment"]["BULKGEN_DEVICE"].startswith("cuda")
    assert (ROOT / "Dockerfile").is_file()


def test_compose_has_no_default_password() -> None:
    """Every password is ${VAR:?...}: compose refuses to start without it; none has a fallback value."""
    import re

    raw = (ROOT / "compose.yaml").read_text()
    assert not re.search(r"\$\{[A-Z_]*PASSWORD[A-Z_]*:-", raw)
    assert "${POSTGRES_PASSWORD:?" in raw
    for variable in PASSWORD_ENV.values():
        assert "${" + variable + ":?" in raw, variable
    assert not re.search(r"\bREDIS_PASSWORD\b", raw), "one shared Redis password is gone: one per ACL user"
    assert not re.search(r"://[^/:@\s]*:(?!\$\{)[^@\s]+@", raw), "a URL's password is always a ${VAR:?...}"
    for name, service in yaml.safe_load(raw)["services"].items():
        for key, value in _environment(service).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (name, key)
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.M)
    for variable in PASSWORD_ENV.values():
        assert re.search(rf"^{variable}=$", example, re.M), variable
    assert not re.search(r"^[A-Z_]*PASSWORD=\S", example, re.M), "placeholders only"


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    return dict(env) if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


REDIS_URL = re.compile(r"rediss?://(?P<user>[^:@/]*):(?P<password>[^@]*)@")


def test_compose_redis_urls_use_named_users_and_the_acl_file() -> None:
    """Every Redis URL names its part's ACL user (never the default user's empty name) and the password is
    that user's own variable; redis loads the file the redis-acl one-shot writes, and starts after it."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    urls: dict[str, dict[str, str]] = {}
    for name, service in services.items():
        for key, value in _environment(service).items():
            if isinstance(value, str) and value.startswith(("redis://", "rediss://")):
                urls.setdefault(name, {})[key] = value
    for name, found in urls.items():
        for key, url in found.items():
            match = REDIS_URL.match(url)
            assert match, (name, key, url)
            user = match["user"]
            assert user in PASSWORD_ENV, f"{name} {key}: Redis user {user!r} is not one of {sorted(PASSWORD_ENV)}"
            assert match["password"] == "${" + PASSWORD_ENV[user] + ":?set " + PASSWORD_ENV[user] + "}", (name, key)
    assert urls["producer"] == {"BULKGEN_SUBMITTER_BROKER_URL": urls["producer"]["BULKGEN_SUBMITTER_BROKER_URL"]}
    assert REDIS_URL.match(urls["producer"]["BULKGEN_SUBMITTER_BROKER_URL"])["user"] == "submitter"
    assert urls["worker"].keys() == {"BULKGEN_WORKER_BROKER_URL"}
    assert REDIS_URL.match(urls["worker"]["BULKGEN_WORKER_BROKER_URL"])["user"] == "worker"
    assert urls["flower"].keys() == {"BULKGEN_BROKER_URL"}  # celery -A workers.app reads BULKGEN_BROKER_URL
    assert REDIS_URL.match(urls["flower"]["BULKGEN_BROKER_URL"])["user"] == "monitor"
    assert "migrate" not in urls, "migrating touches no Redis"
    for name, service in services.items():  # a service holds one part's Redis password at most
        held = {variable for variable in PASSWORD_ENV.values() if variable in str(_environment(service))}
        assert name == "redis-acl" or len(held) <= 1, (name, held)
    assert {v for v in PASSWORD_ENV.values() if v in str(_environment(services["redis"]))} == {"REDIS_MONITOR_PASSWORD"}

    command = services["redis"]["command"]
    acl_path = command[command.index("--aclfile") + 1]
    writer = services["redis-acl"]
    assert writer["command"][:3] == ["producer", "redis", "acl"] and writer["command"][-1] == acl_path
    assert services["redis"]["depends_on"]["redis-acl"]["condition"] == "service_completed_successfully"
    volume = acl_path.rsplit("/", 1)[0]
    assert any(v.split(":")[1] == volume for v in writer["volumes"])
    assert any(v.split(":")[1] == volume and v.endswith(":ro") for v in services["redis"]["volumes"])
    assert set(_environment(writer)) == set(PASSWORD_ENV.values())
    health = " ".join(services["redis"]["healthcheck"]["test"])
    assert "--user monitor" in health and "REDIS_MONITOR_PASSWORD" in health
