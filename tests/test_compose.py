"""compose.yaml is valid and passes only settings the code reads."""
from __future__ import annotations

from pathlib import Path

import yaml

from contract.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_services_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "worker", "flower"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    assert "--requirepass" in redis_command
    assert "${REDIS_PASSWORD" in services["worker"]["environment"]["BULKGEN_BROKER_URL"]
    assert "flower" in services["flower"]["command"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["migrate"]["command"] == ["producer", "db", "upgrade"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for name in ("migrate", "worker", "flower"):
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
    assert "${POSTGRES_PASSWORD:?" in raw and "${REDIS_PASSWORD:?" in raw
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=$", example, re.M) and re.search(r"^REDIS_PASSWORD=$", example, re.M)
