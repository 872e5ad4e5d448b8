"""Property test: random and mutated JSONL fed to `producer submit` (in process, real store and Redis).

Whatever the file holds, the command never shows a traceback; each line known to be invalid is
reported with its number; a file with an invalid line exits non-zero and stores and enqueues nothing;
a line known to be valid is never reported.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text

from producer.cli import main
from contract.messages import queue_name

STANDIN = "stand-in"
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)

valid_objects = st.fixed_dictionaries(
    {"prompt": TEXT.map(lambda s: "p" + s)},
    optional={
        "max_new_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2, allow_nan=False),
        "seed": st.integers(0, 2**31),
        "n": st.integers(1, 3),
        "metadata": st.dictionaries(TEXT, st.integers() | TEXT, max_size=2),
    },
)


@st.composite
def invalid_lines(draw: st.DrawFn) -> bytes:
    """Lines that no validator may accept."""
    valid = json.dumps(draw(valid_objects))
    kind = draw(st.sampled_from(["truncated", "unknown field", "wrong type", "out of range", "not an object", "garbage"]))
    if kind == "truncated":  # a proper prefix of an object is never JSON
        return valid[: draw(st.integers(1, len(valid) - 1))].encode()
    if kind == "unknown field":
        field = draw(st.sampled_from(["temprature", "prompts", "max_tokens", "Prompt"]))
        return json.dumps(json.loads(valid) | {field: 1}).encode()
    if kind == "wrong type":
        return draw(st.sampled_from([
            '{"prompt": 5}', '{"prompt": "x", "max_new_tokens": "7"}', '{"prompt": "x", "temperature": true}',
            '{"prompt": null}', '{"messages": "hi"}', '{"prompt": "x", "stop": [1]}', '{"prompt": ["a"]}',
        ])).encode()
    if kind == "out of range":
        return draw(st.sampled_from([
            '{"prompt": "x", "n": 0}', '{"prompt": "x", "top_p": 0}', '{"prompt": "x", "temperature": -1}',
            '{"prompt": "x", "max_new_tokens": 0}', '{"prompt": "x", "seed": -1}', '{"prompt": ""}',
            '{"prompt": "x", "temperature": NaN}', '{"prompt": "x", "top_k": 1e999}',
        ])).encode()
    if kind == "not an object":
        return draw(st.sampled_from(["[1, 2]", "7", '"prompt"', "null", "true"])).encode()
    junk = draw(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")))
    return b"x" + junk


@st.composite
def mutated_lines(draw: st.DrawFn) -> bytes:
    """A valid line with random bytes changed: valid or not, nobody knows."""
    line = bytearray(json.dumps(draw(valid_objects)).encode())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(line) - 1))
        line[at] = draw(st.integers(0, 255).filter(lambda b: b not in (10, 13)))
    return bytes(line)


lines = st.lists(
    st.one_of(
        valid_objects.map(lambda o: ("valid", json.dumps(o).encode())),
        invalid_lines().map(lambda b: ("invalid", b)),
        mutated_lines().map(lambda b: ("unknown", b)),
        st.sampled_from([b"", b"   ", b"\t"]).map(lambda b: ("blank", b)),
    ),
    min_size=1,
    max_size=8,
)


def _count(url: str) -> int:
    engine = create_engine(url)
    with engine.connect() as connection:
        jobs = connection.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    engine.dispose()
    return jobs


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=lines)
def test_any_file_gives_line_numbered_errors_and_no_traceback(content: list[tuple[str, bytes]], sqlite_url: str, broker_url: str) -> None:
    client = redis.Redis.from_url(broker_url)
    queue = queue_name(STANDIN)
    jobs_before, messages_before = _count(sqlite_url), client.llen(queue)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "in.jsonl"
        path.write_bytes(b"\n".join(line for _, line in content) + b"\n")
        result = CliRunner().invoke(
            main, ["submit", str(path), "--model", STANDIN, "--database-url", sqlite_url, "--broker-url", broker_url]
        )
    output = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    numbered = {n: kind for n, (kind, _) in enumerate(content, start=1)}
    for line_no, kind in numbered.items():
        reported = f"in.jsonl:{line_no}: " in output
        if kind == "invalid":
            assert reported, (line_no, output)
        elif kind in ("valid", "blank"):
            assert not reported, (line_no, output)
    if any(kind == "invalid" for kind in numbered.values()) or all(kind == "blank" for kind in numbered.values()):
        assert result.exit_code != 0
    if result.exit_code != 0:
        assert _count(sqlite_url) == jobs_before and client.llen(queue) == messages_before  # nothing stored or sent
    else:
        assert _count(sqlite_url) == jobs_before + 1 and client.llen(queue) > messages_before
    if all(kind in ("valid", "blank") for kind in numbered.values()) and "valid" in numbered.values():
        assert result.exit_code == 0, output
