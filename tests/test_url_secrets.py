"""Passwords in URLs are hidden in every form they are written in (`user:pass@`, an unencoded `@` in the
password, `?password=` and other secret parameters) by every command that shows a URL; a broker URL with
`?password=` works."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from contract.redaction import redact, url_secrets
from producer.cli import main
from tests.helpers import TINY, RedisServer, write_jsonl

SECRET = "s3cret-Pw-91"

HIDDEN_FORMS = [
    (f"postgresql+psycopg://bob:{SECRET}@127.0.0.1:1/test", "postgresql+psycopg://bob:***@127.0.0.1:1/test"),
    ("postgresql+psycopg://bob:p@ss@w0rd@127.0.0.1:1/test", "postgresql+psycopg://bob:***@127.0.0.1:1/test"),
    (f"postgresql+psycopg://bob@127.0.0.1:1/test?password={SECRET}", "postgresql+psycopg://bob@127.0.0.1:1/test?password=***"),
    (f"postgresql+psycopg://bob@127.0.0.1:1/test?sslmode=require&PASSWORD={SECRET}",
     "postgresql+psycopg://bob@127.0.0.1:1/test?sslmode=require&PASSWORD=***"),
    (f"postgresql://u:pa?ss/x@h/db?sslpassword={SECRET}", "postgresql://u:***@h/db?sslpassword=***"),
    (f"redis://127.0.0.1:1/0?password={SECRET}", "redis://127.0.0.1:1/0?password=***"),
    (f"redis://:{SECRET}@127.0.0.1:1/0", "redis://:***@127.0.0.1:1/0"),
]


@pytest.mark.parametrize(("url", "shown"), HIDDEN_FORMS)
def test_every_form_of_password_is_hidden(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert url_secrets(url)  # and found, for scrubbing logs


@pytest.mark.parametrize("url", ["sqlite:////tmp/a@b/store.db", "postgresql://h:5432/db?options=a@b", "redis://h:6379/0"])
def test_urls_without_a_password_are_shown_as_they_are(url: str) -> None:
    assert redact(url) == url and url_secrets(url) == []


UNREACHABLE = [
    f"postgresql+psycopg://bob@127.0.0.1:1/test?password={SECRET}",
    "postgresql+psycopg://bob:p@ss@w0rd-x9@127.0.0.1:1/test",
]


def _run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _hidden(result: Result, *secrets: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for secret in secrets:
        assert secret not in result.output, result.output
    assert "***" in result.output, result.output


@pytest.mark.parametrize("url", UNREACHABLE)
@pytest.mark.parametrize("command", [["jobs"], ["status", "1"], ["query", "SELECT 1"], ["db", "upgrade"], ["db", "current"],
                                     ["db", "roles"], ["stats"]])
def test_commands_hide_the_password_of_an_unreachable_store(url: str, command: list[str]) -> None:
    _hidden(_run(*command, "--database-url", url), SECRET, "ss@w0rd", "w0rd-x9")


def test_submit_hides_a_redis_password_given_as_a_parameter(sqlite_url: str, tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "max_new_tokens": 2}])
    result = _run("submit", str(prompts), "--model", TINY, "--database-url", sqlite_url,
                  "--broker-url", f"redis://127.0.0.1:1/0?password={SECRET}")
    _hidden(result, SECRET)
    assert "cannot reach the broker" in result.output


def test_submit_works_with_a_redis_password_given_as_a_parameter(sqlite_url: str, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "broker", aof=False, password=SECRET)
    server.start()
    try:
        prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "max_new_tokens": 2}])
        url = f"redis://127.0.0.1:{server.port}/0?password={SECRET}"
        result = CliRunner().invoke(main, ["submit", str(prompts), "--model", TINY, "--database-url", sqlite_url,
                                           "--broker-url", url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert SECRET not in result.output
        client = server.client()
        assert sum(client.llen(key) for key in client.scan_iter("gen.*") if client.type(key) == b"list") == 1
        client.close()
        twice = _run("submit", str(prompts), "--model", TINY, "--database-url", sqlite_url,
                     "--broker-url", f"redis://:{SECRET}@127.0.0.1:{server.port}/0?password=other-pw-7")
        assert twice.exit_code != 0 and "password twice" in twice.output and SECRET not in twice.output, twice.output
    finally:
        server.kill()


@pytest.mark.parametrize("url", ["postgresql+psycopg://postgres@127.0.0.1:1/test", "nonsense://x", "sqlite:////no/such/dir/store.db"])
@pytest.mark.parametrize("command", [["db", "current"], ["db", "upgrade"], ["db", "roles"], ["jobs"], ["query", "SELECT 1"]])
def test_an_unreachable_store_is_a_message_not_a_traceback(url: str, command: list[str]) -> None:
    result = _run(*command, "--database-url", url)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("Error: ") and "Traceback" not in result.output, result.output
    assert "cannot" in result.output or "is not PostgreSQL" in result.output, result.output
