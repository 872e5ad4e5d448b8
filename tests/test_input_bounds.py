"""What one input may hold, the same in every format (producer.limits; issue 27): a row of at most 1 MiB (a JSONL
line, a Parquet/CSV/dataset row, a row from Python), at most 1,024 columns, a path that is a regular file or a
directory; and CSV rows pyarrow cannot read named by their number. Each through `producer submit` (CliRunner, or a
process where the old behaviour was to block or spin) against a real store and Redis: refused, nothing written or
enqueued."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from contract.errors import InvalidInput
from contract.messages import queue_name
from producer import api
from producer.limits import MAX_COLUMNS, MAX_ROW_BYTES
from tests.helpers import TINY, env_for, producer
from tests.test_table_inputs import job_count, job_id_of, requests_of, submit

BIG = "p" * (2 * MAX_ROW_BYTES)
LIMIT = f"the limit is {MAX_ROW_BYTES:,}"


def nothing_sent(store: str, broker: str) -> None:
    assert job_count(store) == 0, "a job was written"
    assert redis.Redis.from_url(broker).llen(queue_name(TINY)) == 0, "a message was enqueued"


def test_a_row_over_the_limit_is_refused_by_its_number_in_every_format(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    parquet = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": ["fine", BIG, "also fine"], "note": ["a", "b", "c"]}), parquet)
    csv_file = tmp_path / "big.csv"  # a metadata cell over the limit
    csv_file.write_text(f"prompt,note\nfine,a\nok,{'n' * (MAX_ROW_BYTES + 10)}\n", encoding="utf-8")
    arrow_dir = tmp_path / "saved"  # a directory as datasets' save_to_disk writes it
    arrow_dir.mkdir()
    with pa.ipc.new_stream(arrow_dir / "data-00000-of-00001.arrow", pa.schema([("prompt", pa.string())])) as out:
        out.write_table(pa.table({"prompt": ["fine", BIG]}))
    (arrow_dir / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": BIG}) + "\n")
    for path, name in ((parquet, "big.parquet"), (csv_file, "big.csv"), (arrow_dir, "saved"), (jsonl, "big.jsonl")):
        code, output = submit(sqlite_url, broker_url, str(path))
        assert code != 0 and "Traceback" not in output, output
        assert f"{name}:2: " in output and ("the limit is 1048576" in output or LIMIT in output), output[:500]
        assert ":1: " not in output and ":3: " not in output, output[:500]
    assert "its largest cell: column 'prompt', 2,097,152 bytes" in submit(sqlite_url, broker_url, str(parquet))[1]
    assert "its largest cell: column 'note'" in submit(sqlite_url, broker_url, str(csv_file))[1]
    for source in (pa.table({"prompt": ["fine", BIG]}), [{"prompt": "fine"}, {"prompt": BIG}]):
        with pytest.raises(InvalidInput) as refused:
            api.submit(source, model=TINY, database_url=sqlite_url, broker_url=broker_url)
        assert [bad.position for bad in refused.value.rows] == [2], refused.value
        assert "the limit is" in refused.value.rows[0].reason
    nothing_sent(sqlite_url, broker_url)


def test_cells_together_count_nested_ones_as_json(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """No cell alone is over the limit; the row is (a text cell and a list of strings together)."""
    path = tmp_path / "wide-row.parquet"
    half = "h" * (MAX_ROW_BYTES // 2)
    pq.write_table(pa.table({"prompt": ["ok", half], "tags": [["a"], [half]]}), path)
    code, output = submit(sqlite_url, broker_url, str(path))
    assert code != 0 and "wide-row.parquet:2: row is 1,048,58" in output and "column 'tags'" in output, output[:500]
    nothing_sent(sqlite_url, broker_url)
    code, output = submit(sqlite_url, broker_url, str(path), "--skip-invalid")  # the good row still goes
    assert code == 0 and [r["prompt"] for r in requests_of(sqlite_url, job_id_of(output))] == ["ok"]


def test_columns_are_bounded_with_an_honest_message(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    wide = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"prompt": ["x"], **{f"c{i}": ["v"] for i in range(MAX_COLUMNS)}}), wide)
    sixty = tmp_path / "sixty.csv"
    sixty.write_text(",".join(f"c{i}" for i in range(60_000)) + ",prompt\n" + "," * 60_000 + "x\n")
    million = tmp_path / "million.csv"  # a header of more than 1 MiB
    million.write_text(",".join(f"c{i}" for i in range(1_000_000)) + "\nx\n")
    long_name = tmp_path / "long-name.csv"  # a header cell over csv's 128 KiB field limit
    long_name.write_text("prompt," + "h" * (200 << 10) + "\na,b\n")
    cases = [
        (wide, f"wide.parquet: 1,025 columns, the limit is {MAX_COLUMNS:,}"),
        (sixty, f"sixty.csv: 60,001 columns, the limit is {MAX_COLUMNS:,}"),
        (million, "million.csv: the header row is larger than the 1,048,576-byte row limit"),
        (long_name, "long-name.csv: column 2's name is 204,800 characters, the limit is 1,024"),
    ]
    for path, message in cases:
        code, output = submit(sqlite_url, broker_url, str(path))
        assert code != 0 and message in output and "Traceback" not in output, output[:500]
        assert "Empty CSV file or block" not in output
    nothing_sent(sqlite_url, broker_url)


def test_csv_rows_pyarrow_cannot_read_are_named(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    files = {
        "row2.csv": (b"prompt,x\na,b\n\xff,y\n", "row2.csv:2: column 'prompt' is not UTF-8 text"),
        "row1.csv": (b"prompt,x\r\n\xff,y\n", "row1.csv:1: column 'prompt' is not UTF-8 text"),  # right after the header
        "far.csv": (b"prompt,x\n" + b"a,b\n" * 3000 + b"ok,\xfe\n", "far.csv:3001: column 'x' is not UTF-8 text"),
        "header.csv": (b"pro\xffmpt,x\na,b\n", "header.csv: the header is not UTF-8 (byte 4)"),
        "quote.tsv": (b"prompt\tx\n" + b"a\tb\n" * 3 + b'"never closed\tz\n' + b"c\td\n" * 5,
                      "quote.tsv:4: a quoted cell is never closed"),
        "ragged.csv": (b"prompt,x\na,b\nc,d,e\n", "ragged.csv:2: 3 cells, but the header names 2 columns"),
        "huge.csv": (b"prompt,x\n" + b"a,b\n" * 3 + b"p" * (6 * MAX_ROW_BYTES) + b",y\nc,d\n",
                     "huge.csv:4: "),
    }
    for name, (content, message) in files.items():
        (tmp_path / name).write_bytes(content)
        code, output = submit(sqlite_url, broker_url, str(tmp_path / name))
        assert code != 0 and message in output and "Traceback" not in output, (name, output[:500])
        assert "invalid UTF8 data" not in output and "Expected 2 columns" not in output, output[:500]
    (tmp_path / "header-only.csv").write_text("prompt,x")  # no line break: pyarrow says "Empty CSV file or block"
    code, output = submit(sqlite_url, broker_url, str(tmp_path / "header-only.csv"))
    assert code != 0 and "header-only.csv: the table has no rows" in output, output
    nothing_sent(sqlite_url, broker_url)


def test_what_is_not_a_regular_file_is_refused_at_once(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """/dev/zero used to be read forever and a FIFO without a writer to block forever: a real process each, with
    a timeout, so that the old behaviour fails the test instead of hanging it."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    env = env_for(sqlite_url, broker_url)
    for path, message in (("/dev/zero", "/dev/zero: a character device, not a regular file or directory"),
                          (str(fifo), "pipe.jsonl: a FIFO (named pipe), not a regular file or directory")):
        done = producer(["submit", path, "--model", TINY], env, timeout=60)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    for path, message in (("a.jsonl", "a.jsonl: a symbolic link loop"),
                          ("dangling.jsonl", "dangling.jsonl: a symbolic link to nothing"),
                          ("missing.jsonl", "missing.jsonl: no such file")):
        code, output = submit(sqlite_url, broker_url, str(tmp_path / path))
        assert code != 0 and message in output and "Traceback" not in output, output
    nothing_sent(sqlite_url, broker_url)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc for the peak memory")
def test_a_huge_parquet_cell_is_refused_without_holding_it_in_python(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    """A 64 MiB prompt: refused by row, and never turned into Python strings (the cell is nulled in Arrow first)."""
    from producer.inputs import open_input

    path = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"prompt": ["ok", "p" * (64 << 20)]}), path, compression="zstd")
    import tracemalloc

    tracemalloc.start()
    outcomes = list(open_input(str(path)).outcomes({}, 2048))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [o.line_no for o in outcomes if o.errors] == [2]
    assert peak < 16 << 20, f"Python held {peak:,} bytes at its peak"
