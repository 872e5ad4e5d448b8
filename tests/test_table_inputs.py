"""Table inputs (Parquet, CSV, a save_to_disk directory, pyarrow Tables, DataFrames, Datasets) through
`producer submit` and producer.api.submit, against a real store and a real Redis: the column mapping,
metadata kept, bad rows reported by row number with nothing written, resume, and the join export."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from contract.errors import InputFileError, InvalidDefaults, InvalidInput
from contract.messages import queue_name
from producer import api
from producer.cli import main
from tests.helpers import TINY, WorkerProcess, env_for, producer, table_columns, wait_for_job

ROWS = {
    "question": ["What is 2+2?", "Name a colour.", "Say hi."],
    "qid": [101, 102, 103],
    "topic": ["math", "art", "chat"],
    "asked": [dt.datetime(2024, 5, 1, 12, 0), dt.datetime(2024, 5, 2, 8, 30), None],
    "budget": [4, 6, 5],
}


def cli(store: str, broker: str | None, *args: str) -> tuple[int, str]:
    urls = ["--database-url", store] + (["--broker-url", broker] if broker else [])
    result = CliRunner().invoke(main, [*args, *urls], catch_exceptions=False)
    return result.exit_code, result.output


def submit(store: str, broker: str, *args: str) -> tuple[int, str]:
    return cli(store, broker, "submit", *args, "--model", TINY)


def rows(store: str, sql: str, **params: object) -> list[dict]:
    engine = create_engine(store)
    with engine.connect() as connection:
        found = [dict(r._mapping) for r in connection.execute(text(sql), params)]
    engine.dispose()
    return found


def requests_of(store: str, job_id: int) -> list[dict]:
    found = rows(store, "SELECT line_no, custom_id, prompt, messages, params, metadata FROM requests WHERE job_id = :j ORDER BY line_no", j=job_id)
    for row in found:
        for key in ("messages", "params", "metadata"):
            if isinstance(row[key], str):
                row[key] = json.loads(row[key])
    return found


def job_count(store: str) -> int:
    return rows(store, "SELECT count(*) AS c FROM jobs")[0]["c"]


def job_id_of(output: str) -> int:
    return int(output.strip().splitlines()[-1])


def write_parquet(path: Path, data: dict, **kw: object) -> Path:
    pq.write_table(pa.table(data), path, **kw)
    return path


def test_parquet_with_the_column_mapping_keeps_the_other_columns_as_metadata(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", ROWS)
    code, output = submit(sqlite_url, broker_url, str(path), "--prompt-column", "question", "--id-column", "qid",
                          "--column", "max_new_tokens=budget", "--temperature", "0")
    assert code == 0, output
    job_id = job_id_of(output)
    stored = requests_of(sqlite_url, job_id)
    assert [r["custom_id"] for r in stored] == ["101", "102", "103"]
    assert [r["prompt"] for r in stored] == ROWS["question"]
    assert [r["params"] for r in stored] == [{"max_new_tokens": 4}, {"max_new_tokens": 6}, {"max_new_tokens": 5}]
    assert stored[0]["metadata"] == {"topic": "math", "asked": "2024-05-01T12:00:00"}
    assert stored[2]["metadata"] == {"topic": "chat", "asked": None}
    job = rows(sqlite_url, "SELECT source, defaults, input_columns FROM jobs WHERE id = :j", j=job_id)[0]
    assert job["source"] == str(path)
    assert json.loads(job["defaults"]) == {"temperature": 0}  # the mapping is not a sampling default
    assert json.loads(job["input_columns"])["fields"] == {"prompt": "question", "custom_id": "qid", "max_new_tokens": "budget"}
    assert redis.Redis.from_url(broker_url).llen(queue_name(TINY)) >= 1


def test_namesake_columns_are_taken_as_their_fields(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "plain.parquet", {
        "prompt": ["a", "b"], "custom_id": ["x", "y"], "temperature": [0.5, None], "n": [2, None],
        "stop": [["\n"], None], "source": ["s1", "s2"],
    })
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code == 0, output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert [r["custom_id"] for r in stored] == ["x", "y"]
    assert stored[0]["params"] == {"temperature": 0.5, "n": 2, "stop": ["\n"]}
    assert stored[1]["params"] == {}  # null cells: not given
    assert [r["metadata"] for r in stored] == [{"source": "s1"}, {"source": "s2"}]


def test_messages_from_a_list_of_structs(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    chats = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    path = write_parquet(tmp_path / "chat.parquet", {"conversation": chats, "lang": ["en", "en"]})
    assert pq.read_schema(path).field("conversation").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    code, output = submit(sqlite_url, broker_url, str(path), "--messages-column", "conversation")
    assert code == 0, output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert [r["messages"] for r in stored] == chats
    assert stored[0]["prompt"] is None and stored[0]["metadata"] == {"lang": "en"}


def test_csv_cells_are_text_and_sampling_fields_are_parsed(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('\ufeffq,tokens,temperature,stop,note\n"Hello, world",5,0.5,"[""\\n""]",first\nBye,,,,\n', encoding="utf-8")
    code, output = submit(sqlite_url, broker_url, str(path), "--prompt-column", "q", "--column", "max_new_tokens=tokens")
    assert code == 0, output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert stored[0]["prompt"] == "Hello, world"
    assert stored[0]["params"] == {"max_new_tokens": 5, "temperature": 0.5, "stop": ["\n"]}
    assert stored[0]["metadata"] == {"note": "first"}
    assert stored[1]["params"] == {} and stored[1]["metadata"] == {"note": None}


def test_a_directory_saved_by_datasets(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"question": ["one", "two", "three"], "label": [0, 1, 0]}).save_to_disk(str(saved))
    code, output = submit(sqlite_url, broker_url, str(saved), "--prompt-column", "question")
    assert code == 0, output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert [(r["prompt"], r["metadata"]) for r in stored] == [("one", {"label": 0}), ("two", {"label": 1}), ("three", {"label": 0})]
    # a DatasetDict is refused with its splits named
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]})}).save_to_disk(str(dd))
    code, output = submit(sqlite_url, broker_url, str(dd))
    assert code != 0 and "give one split's directory" in output and str(dd / "train") in output and "Traceback" not in output


def test_in_memory_tables_through_the_api(sqlite_url: str, broker_url: str) -> None:
    pd = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    frame = pd.DataFrame({
        "text": ["a", "b", "c"], "max_new_tokens": [3, None, 5], "score": [0.5, float("nan"), 1.5],
        "day": pd.to_datetime(["2024-01-01", "2024-01-02", None]),
    })
    job = api.submit(frame, model=TINY, columns={"prompt": "text"}, database_url=sqlite_url, broker_url=broker_url)
    stored = requests_of(sqlite_url, job.id)
    assert [r["params"] for r in stored] == [{"max_new_tokens": 3}, {}, {"max_new_tokens": 5}]  # a float column with NaN
    assert stored[0]["metadata"] == {"score": 0.5, "day": "2024-01-01T00:00:00"}
    assert stored[1]["metadata"] == {"score": None, "day": "2024-01-02T00:00:00"}
    assert stored[2]["metadata"]["day"] is None
    assert job.report is not None and job.report.unit == "row"

    table = pa.table({"prompt": ["x", "y"], "k": [1, 2]})
    job = api.submit(table, model=TINY, database_url=sqlite_url, broker_url=broker_url)
    assert [r["metadata"] for r in requests_of(sqlite_url, job.id)] == [{"k": 1}, {"k": 2}]

    dataset = datasets.Dataset.from_dict({"prompt": ["p0", "p1", "p2", "p3"], "i": [0, 1, 2, 3]}).select([3, 1])
    job = api.submit(dataset, model=TINY, database_url=sqlite_url, broker_url=broker_url)
    assert [(r["prompt"], r["metadata"]) for r in requests_of(sqlite_url, job.id)] == [("p3", {"i": 3}), ("p1", {"i": 1})]


def test_every_bad_row_is_reported_by_row_number_and_nothing_is_written(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "bad.parquet", {
        "prompt": ["fine", None, "fine", "fine", "fine\x00nul"],
        "temperature": [0.7, 0.7, -1.0, float("inf"), 0.5],
        "custom_id": ["a", "b", "c", "a", "e"],
        "extra": [1.0, 2.0, 3.0, 4.0, 5.0],
    }, row_group_size=2)  # several row groups: row numbers run across them
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0 and "Traceback" not in output
    assert "bad.parquet:1:" not in output
    assert "bad.parquet:2: prompt: is null (column 'prompt')" in output
    assert "bad.parquet:3: temperature: must be" in output
    assert "bad.parquet:4: temperature: must be a finite number" in output
    assert "bad.parquet:4: duplicate custom_id 'a' (first on row 1)" in output
    assert "bad.parquet:5: prompt: contains a NUL character" in output
    assert "4 invalid rows" in output
    assert job_count(sqlite_url) == 0
    assert redis.Redis.from_url(broker_url).llen(queue_name(TINY)) == 0
    with pytest.raises(InvalidInput) as raised:
        api.submit(path, model=TINY, database_url=sqlite_url, broker_url=broker_url)
    assert sorted({r.position for r in raised.value.rows}) == [2, 3, 4, 5]
    assert job_count(sqlite_url) == 0


def test_skip_invalid_stores_the_good_rows_and_records_the_rejects(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "some.parquet", {"prompt": ["ok", None, "ok too"]})
    code, output = submit(sqlite_url, broker_url, str(path), "--skip-invalid")
    assert code == 0 and "skipped 1 invalid row(s)" in output
    job_id = job_id_of(output)
    assert [r["line_no"] for r in requests_of(sqlite_url, job_id)] == [1, 3]
    assert rows(sqlite_url, "SELECT line_no FROM rejects WHERE job_id = :j", j=job_id) == [{"line_no": 2}]


def test_bad_files_and_bad_mappings_get_a_clean_error(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "good.parquet", {"question": ["a"], "prompt": ["b"]})
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text('{"prompt": "x"}\n')
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    cases = [
        ((str(not_parquet),), "fake.parquet: not a Parquet file"),
        ((str(truncated),), "cut.parquet: cannot be read"),
        ((str(good), "--prompt-column", "missing"), "good.parquet: no column 'missing' (for prompt); its columns: 'question', 'prompt'"),
        ((str(good), "--column", "temprature=question"), "unknown field 'temprature' (did you mean 'temperature'?)"),
        ((str(good), "--column", "metadata=question"), "metadata is every column not mapped"),
        ((str(good), "--column", "max_new_tokens"), "expected FIELD=COLUMN"),
        ((str(write_parquet(tmp_path / "noprompt.parquet", {"q": ["a"]})),), "no prompt column"),
    ]
    for args, message in cases:
        code, output = submit(sqlite_url, broker_url, *args)
        assert code != 0, args
        assert message in output, (args, output)
        assert "Traceback" not in output
    assert job_count(sqlite_url) == 0
    with pytest.raises(InvalidDefaults):
        api.submit(good, model=TINY, columns={"tempreature": "question"}, database_url=sqlite_url, broker_url=broker_url)
    with pytest.raises(InputFileError):
        api.submit(good, model=TINY, columns={"prompt": "nope"}, database_url=sqlite_url, broker_url=broker_url)
    # the mapped column wins over the namesake, which is kept as metadata
    job = api.submit(good, model=TINY, columns={"prompt": "question"}, database_url=sqlite_url, broker_url=broker_url)
    assert [(r["prompt"], r["metadata"]) for r in requests_of(sqlite_url, job.id)] == [("a", {"prompt": "b"})]


def test_resume_reads_the_table_again_with_the_recorded_mapping(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", ROWS)
    code, output = submit(sqlite_url, broker_url, str(path), "--prompt-column", "question", "--id-column", "qid")
    assert code == 0, output
    job_id = job_id_of(output)
    broker = redis.Redis.from_url(broker_url)
    broker.delete(queue_name(TINY))  # as if the messages were lost
    engine = create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE jobs SET enqueued_at = NULL WHERE id = :j"), {"j": job_id})
    engine.dispose()
    code, output = submit(sqlite_url, broker_url, str(path), "--resume", str(job_id))  # no column options: recorded
    assert code == 0, output
    assert "3 requests without results enqueued again" in output
    assert broker.llen(queue_name(TINY)) >= 1
    other = write_parquet(tmp_path / "other.parquet", {**ROWS, "qid": [201, 202, 203]})
    code, output = submit(sqlite_url, broker_url, str(other), "--resume", str(job_id))
    assert code != 0 and "is not the input job" in output


def _fake_results(store: str, job_id: int) -> None:
    """Results for the first request (two samples) and the second; the third stays queued."""
    engine = create_engine(store)
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as connection:
        ids = [r[0] for r in connection.execute(text("SELECT id FROM requests WHERE job_id = :j ORDER BY line_no"), {"j": job_id})]
        for request_id, sample in ((ids[0], 0), (ids[0], 1), (ids[1], 0)):
            connection.execute(text(
                "INSERT INTO results (request_id, job_id, sample_index, text, finish_reason, prompt_tokens, completion_tokens, "
                "params, seed, model, dtype, quantization, worker_host, device, started_at, finished_at, generation_seconds) "
                "VALUES (:r, :j, :s, :t, 'length', 3, 2, '{}', 7, 'm', 'float32', 'none', 'h', 'cpu', :now, :now, 0.1)"),
                {"r": request_id, "j": job_id, "s": sample, "t": f"out {request_id}.{sample}", "now": now})
        connection.execute(text("UPDATE requests SET status = 'done' WHERE id IN (:a, :b)"), {"a": ids[0], "b": ids[1]})
    engine.dispose()


def test_the_join_export_writes_the_input_columns_back(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    data = {**ROWS, "text": ["t1", "t2", "t3"], "tags": [["a"], [], None]}
    path = write_parquet(tmp_path / "data.parquet", data)
    code, output = submit(sqlite_url, broker_url, str(path), "--prompt-column", "question", "--id-column", "qid",
                          "--column", "max_new_tokens=budget")
    assert code == 0, output
    job_id = job_id_of(output)
    _fake_results(sqlite_url, job_id)
    out = tmp_path / "joined.parquet"
    code, output = cli(sqlite_url, None, "results", str(job_id), "--join", "-o", str(out))
    assert code == 0, output
    joined = pq.read_table(out)
    source = pq.read_schema(path)
    for name in source.names:  # every input column, with its type
        assert joined.schema.field(name).type == source.field(name).type, name
    assert joined.column_names[: len(source.names)] == source.names
    assert "result_text" in joined.column_names  # the input has its own `text`
    records = joined.to_pylist()
    assert [r["qid"] for r in records] == [101, 101, 102, 103]
    assert [r["question"] for r in records] == [ROWS["question"][0], *ROWS["question"]]
    assert [r["asked"] for r in records] == [ROWS["asked"][0], *ROWS["asked"]]
    assert [r["budget"] for r in records] == [4, 4, 6, 5]
    assert [r["text"] for r in records] == ["t1", "t1", "t2", "t3"]
    assert [r["tags"] for r in records] == [["a"], ["a"], [], None]
    assert [(r["input_row"], r["sample_index"], r["status"]) for r in records] == [(1, 0, "done"), (1, 1, "done"), (2, 0, "done"), (3, None, "queued")]
    assert records[0]["result_text"].startswith("out ") and records[3]["result_text"] is None
    pd = pytest.importorskip("pandas")
    assert list(pd.read_parquet(out)["topic"]) == ["math", "math", "art", "chat"]
    # a JSONL job has no input columns to join
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"prompt": "x"}\n')
    code, output = submit(sqlite_url, broker_url, str(jsonl))
    code, output = cli(sqlite_url, None, "results", str(job_id_of(output)), "--join", "-o", str(tmp_path / "j.parquet"))
    assert code != 0 and "was not submitted from a table" in output and "Traceback" not in output


@pytest.mark.slow
def test_a_parquet_job_end_to_end_through_a_real_worker(store_url: str, broker_url: str, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", ROWS)
    env = env_for(store_url, broker_url)
    submitted = producer(["submit", str(path), "--model", TINY, "--prompt-column", "question", "--id-column", "qid",
                          "--column", "max_new_tokens=budget", "--temperature", "0"], env, check=True)
    job_id = int(submitted.stdout.strip().splitlines()[-1])
    worker = WorkerProcess(env)
    try:
        assert wait_for_job(store_url, job_id, timeout=240) == "completed", worker.output()[-3000:]
    finally:
        worker.stop()
    out = tmp_path / "joined.parquet"
    producer(["results", str(job_id), "--join", "-o", str(out)], env, check=True)
    records = pq.read_table(out).to_pylist()
    assert [r["qid"] for r in records] == ROWS["qid"]
    assert [r["topic"] for r in records] == ROWS["topic"]
    assert all(r["status"] == "done" and isinstance(r["text"], str) for r in records)
    assert [r["completion_tokens"] <= r["budget"] for r in records] == [True] * 3


def test_the_producer_reads_tables_without_importing_pandas_or_datasets(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = write_parquet(tmp_path / "data.parquet", ROWS)
    code = (
        "import sys, producer.cli, producer.api\n"
        "from producer.inputs import open_input\n"
        f"data = open_input({str(path)!r}, {{'prompt': 'question'}})\n"
        "assert all(o.ok for o in data.outcomes({}, 2048))\n"
        "assert 'pandas' not in sys.modules and 'datasets' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_migration_0008_adds_and_drops_the_input_columns(store_url: str, broker_url: str, tmp_path: Path) -> None:
    from alembic import command

    from migrations import alembic_config

    path = write_parquet(tmp_path / "data.parquet", ROWS)
    job = api.submit(path, model=TINY, columns={"prompt": "question"}, database_url=store_url, broker_url=broker_url)

    command.downgrade(alembic_config(store_url), "0007")
    assert "input_columns" not in table_columns(store_url, "jobs")
    assert rows(store_url, "SELECT count(*) AS c FROM requests WHERE job_id = :j", j=job.id)[0]["c"] == 3
    command.upgrade(alembic_config(store_url), "head")
    assert "input_columns" in table_columns(store_url, "jobs")
    assert rows(store_url, "SELECT input_columns FROM jobs WHERE id = :j", j=job.id)[0]["input_columns"] is None


def test_the_join_export_gives_back_the_types_json_cannot_carry(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    import decimal

    from models.db import make_engine
    from producer.export import write_joined

    table = pa.table({
        "prompt": ["a", "b"],
        "day": pa.array([dt.date(2024, 1, 2), None], pa.date32()),
        "at": pa.array([dt.time(12, 1, 2), dt.time(0, 0)], pa.time64("us")),
        "price": pa.array([decimal.Decimal("1.25"), None], pa.decimal128(10, 2)),
        "raw": pa.array([b"\x00\x01", b"xyz"], pa.binary()),
        "when": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), None], pa.timestamp("us", tz="UTC")),
        "took": pa.array([dt.timedelta(seconds=90), None], pa.duration("s")),
        "kind": pa.array(["x", "y"]).dictionary_encode(),
        "info": pa.array([{"a": 1, "b": "q"}, None], pa.struct([("a", pa.int64()), ("b", pa.string())])),
        "stamps": pa.array([[dt.datetime(2024, 1, 1)], []], pa.list_(pa.timestamp("us"))),
    })
    job = api.submit(table, model=TINY, database_url=sqlite_url, broker_url=broker_url)
    meta = requests_of(sqlite_url, job.id)[0]["metadata"]
    assert meta == {"day": "2024-01-02", "at": "12:01:02", "price": "1.25", "raw": "AAE=", "when": "2024-01-01T00:00:00+00:00",
                    "took": 90.0, "kind": "x", "info": {"a": 1, "b": "q"}, "stamps": ["2024-01-01T00:00:00"]}
    db = make_engine(sqlite_url)
    try:
        assert write_joined(db, job.id, str(tmp_path / "j.parquet")) == 2
    finally:
        db.dispose()
    joined = pq.read_table(tmp_path / "j.parquet")
    for name in ("day", "at", "price", "raw", "when", "took", "info"):
        assert joined.schema.field(name).type == table.schema.field(name).type, name
        assert joined.column(name).to_pylist() == table.column(name).to_pylist(), name
    assert joined.schema.field("kind").type == pa.string() and joined.column("kind").to_pylist() == ["x", "y"]
    # a nested column holding timestamps comes back as its JSON text
    assert joined.column("stamps").to_pylist() == ['["2024-01-01T00:00:00"]', "[]"]


def test_a_csv_bad_row_is_reported_by_its_row_number_not_its_line(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text('prompt,n\n"two\nlines",1\nok,zero\n,2\n', encoding="utf-8")  # row 1 spans two lines
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0 and "Traceback" not in output
    assert "multi.csv:2: n: expected an integer, got string 'zero'" in output
    assert "multi.csv:3: prompt: is null (column 'prompt')" in output
    assert "2 invalid rows" in output and job_count(sqlite_url) == 0


def test_resume_of_a_dataframe_through_the_api(sqlite_url: str, broker_url: str) -> None:
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"question": ["a", "b"], "tag": ["x", "y"]})
    job = api.submit(frame, model=TINY, columns={"prompt": "question"}, database_url=sqlite_url, broker_url=broker_url)
    redis.Redis.from_url(broker_url).delete(queue_name(TINY))
    assert job.resume(frame) == 2  # the recorded mapping: no columns given
    assert api.resume(frame, job.id, columns={"prompt": "question"}, database_url=sqlite_url, broker_url=broker_url) == 0
    with pytest.raises(InputFileError, match="no prompt column"):
        api.resume(frame, job.id, columns={}, database_url=sqlite_url, broker_url=broker_url)


def test_csv_cells_are_text_and_null_words_only_when_named(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """pyarrow's null words (NA, null, N/A, nan, NULL) are a user's text; only an empty cell is null, unless
    --csv-null names more; a temperature `nan` is refused as not a number (issue 27)."""
    path = tmp_path / "words.csv"
    path.write_text('prompt,note,temperature\nNA,NA,\nnull,null,0.5\nN/A,N/A,\nnan,,\nNULL,"",\n', encoding="utf-8")
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code == 0, output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert [r["prompt"] for r in stored] == ["NA", "null", "N/A", "nan", "NULL"]
    assert [r["metadata"]["note"] for r in stored] == ["NA", "null", "N/A", None, ""]  # empty: null; quoted "": text
    assert [r["params"] for r in stored] == [{}, {"temperature": 0.5}, {}, {}, {}]

    tsv = tmp_path / "nan.tsv"
    tsv.write_text("prompt\ttemperature\nhello\tnan\nhi\t0.7\n", encoding="utf-8")
    code, output = submit(sqlite_url, broker_url, str(tsv))
    assert code != 0 and "nan.tsv:1: temperature: expected a number, got string 'nan'" in output, output
    assert job_count(sqlite_url) == 1

    code, output = submit(sqlite_url, broker_url, str(path), "--csv-null", "NA", "--csv-null", "null", "--skip-invalid")
    assert code == 0, output
    assert "words.csv:1: prompt: is null (column 'prompt')" in output and "words.csv:2: prompt: is null" in output
    stored = requests_of(sqlite_url, job_id_of(output))
    assert [r["prompt"] for r in stored] == ["N/A", "nan", "NULL"]
    code, output = submit(sqlite_url, broker_url, str(write_parquet(tmp_path / "t.parquet", {"prompt": ["a"]})), "--csv-null", "NA")
    assert code != 0 and "--csv-null) are for CSV and TSV inputs only" in output and "Traceback" not in output
    assert job_count(sqlite_url) == 2
    assert "--csv-null" in CliRunner().invoke(main, ["submit", "--help"]).output


def test_resume_reads_a_csv_with_the_recorded_null_words(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("custom_id,prompt\na,Hello\nb,NA\nc,Bye\n", encoding="utf-8")
    code, output = submit(sqlite_url, broker_url, str(path), "--csv-null", "NA", "--skip-invalid")
    assert code == 0 and "data.csv:2: prompt: is null" in output, output
    job_id = job_id_of(output)
    assert rows(sqlite_url, "SELECT input_columns FROM jobs")[0]["input_columns"].count("csv_nulls") == 1
    redis.Redis.from_url(broker_url).delete(queue_name(TINY))
    code, output = submit(sqlite_url, broker_url, str(path), "--resume", str(job_id))  # NA is null again: b stays out
    assert code == 0 and "2 requests without results enqueued again" in output, output
