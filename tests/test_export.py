"""Exports stream every request of a job, in each format, with the right fields and types."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from click.testing import CliRunner
from openai.types import Completion
from openai.types.chat import ChatCompletion
from sqlalchemy import update

from models.db import make_engine, session_factory, utcnow
from models.intake import create_job, insert_requests, mark_enqueued, request_row, set_job_totals
from models.store import Outcome, claim_requests, record_outcomes
from models.tables import Request
from producer.cli import main

CHAT_LOGPROBS = [
    {"token": "Hello", "logprob": -0.5, "top_logprobs": [{"token": "Hello", "logprob": -0.5}, {"token": "Hi", "logprob": -1.5}]},
    {"token": ", “", "logprob": -2.0, "top_logprobs": [{"token": ", “", "logprob": -2.0}, {"token": "!", "logprob": -2.25}]},
    {"token": "friend”", "logprob": -0.25, "top_logprobs": [{"token": "friend”", "logprob": -0.25}, {"token": "you", "logprob": -3.0}]},
]
"""As workers.types.Sample.logprobs holds them (top_logprobs=2)."""
RAW_LOGPROBS = [
    {"token": "upon", "logprob": -0.1, "top_logprobs": []},
    {"token": " a", "logprob": -0.2, "top_logprobs": []},
    {"token": " time", "logprob": -0.3, "top_logprobs": []},
]


def _job_with_results(url: str) -> int:
    """A job of three requests: a chat one with n=2, a raw one, and one that failed."""
    db = make_engine(url)
    with db.begin() as c:
        job_id = create_job(c, name="x", model="tiny-random-llama", source=None, defaults={})
        insert_requests(c, job_id, [[
            request_row(1, "chat", None, [{"role": "user", "content": "hi"}], {"n": 2}, {"k": 1}),
            request_row(2, "raw", "once", None, {}, None),
            request_row(3, "bad", "x" * 10, None, {}, None),
        ]])
        set_job_totals(c, job_id, total_requests=3, total_samples=4, rejected=0)
        mark_enqueued(c, job_id)
    sessions = session_factory(db)
    with sessions() as s:
        claim = claim_requests(s, job_id, [1, 2, 3], "w")
        assert claim is not None
        ids = {r.custom_id: r.id for r in claim.requests}
    now = utcnow()

    def row(request_id: int, sample: int, text: str, tokens: int, logprobs: list | None = None, cached: int = 0,
            draft: int | None = None, accepted: int | None = None) -> dict:
        return {"request_id": request_id, "job_id": job_id, "sample_index": sample, "text": text, "finish_reason": "stop",
                "prompt_tokens": 7, "completion_tokens": tokens, "params": {"seed": sample}, "seed": 40 + sample,
                "model": "tiny-random-llama", "dtype": "float32", "quantization": "none", "worker_host": "h",
                "device": "cpu", "started_at": now, "finished_at": now, "generation_seconds": 0.5, "logprobs": logprobs,
                "cached_prompt_tokens": cached, "draft_tokens": draft, "accepted_draft_tokens": accepted}

    with sessions() as s:
        record_outcomes(s, job_id, [
            Outcome(ids["chat"], 7, [row(ids["chat"], 0, "Hello, “friend”", 3, CHAT_LOGPROBS, 4, draft=5, accepted=2),
                                     row(ids["chat"], 1, "Hi,\nthere", 4, cached=4, draft=3, accepted=0)]),
            Outcome(ids["raw"], 7, [row(ids["raw"], 0, "upon a time", 3, RAW_LOGPROBS)]),
            Outcome(ids["bad"], 0, error="prompt has 9000 tokens"),
        ])
    db.dispose()
    return job_id


def _export(url: str, job_id: int, *args: str) -> str:
    result = CliRunner().invoke(main, ["results", str(job_id), "--database-url", url, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_jsonl_and_csv(store_url: str) -> None:
    job_id = _job_with_results(store_url)
    lines = [json.loads(x) for x in _export(store_url, job_id).splitlines()]
    assert [(x["custom_id"], x.get("sample_index")) for x in lines] == [("chat", 0), ("chat", 1), ("raw", 0), ("bad", None)]
    assert lines[0]["text"] == "Hello, “friend”" and lines[0]["metadata"] == {"k": 1} and lines[0]["completion_tokens"] == 3
    assert lines[3] == {"custom_id": "bad", "status": "failed", "error": "prompt has 9000 tokens", "metadata": None}
    assert [(x.get("draft_tokens"), x.get("accepted_draft_tokens")) for x in lines] == [(5, 2), (3, 0), (None, None), (None, None)]
    rows = list(csv.DictReader(io.StringIO(_export(store_url, job_id, "--format", "csv"))))
    assert len(rows) == 4 and rows[1]["text"] == "Hi,\nthere" and rows[0]["metadata"] == '{"k": 1}'
    assert [(r["draft_tokens"], r["accepted_draft_tokens"]) for r in rows] == [("5", "2"), ("3", "0"), ("", ""), ("", "")]
    assert rows[3]["status"] == "failed" and rows[3]["text"] == ""


def test_parquet_loads_with_types(sqlite_url: str, tmp_path: Path) -> None:
    job_id = _job_with_results(sqlite_url)
    out = tmp_path / "r.parquet"
    _export(sqlite_url, job_id, "--format", "parquet", "-o", str(out))
    table = pq.read_table(out)
    assert table.num_rows == 4
    assert str(table.schema.field("prompt_tokens").type) == "int32" and str(table.schema.field("seed").type) == "int64"
    records = table.to_pylist()
    assert records[1]["text"] == "Hi,\nthere" and records[1]["seed"] == 41 and records[3]["error"] == "prompt has 9000 tokens"


def test_parquet_loads_with_pandas_and_datasets(sqlite_url: str, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The two ways users open a Parquet export: pandas, and Hugging Face datasets' parquet builder."""
    import datasets
    import pandas

    job_id = _job_with_results(sqlite_url)
    out = tmp_path / "r.parquet"
    _export(sqlite_url, job_id, "--format", "parquet", "-o", str(out))
    frame = pandas.read_parquet(out)
    assert list(frame["custom_id"]) == ["chat", "chat", "raw", "bad"]
    assert frame["completion_tokens"].iloc[:3].tolist() == [3, 4, 3] and list(frame["status"]) == ["done", "done", "done", "failed"]
    typed = pandas.read_parquet(out, dtype_backend="numpy_nullable")  # the failed row's counts stay missing, not NaN floats
    assert str(typed["completion_tokens"].dtype) == "Int32" and str(typed["seed"].dtype) == "Int64"
    assert typed["seed"].tolist()[:3] == [40, 41, 40] and typed["seed"].isna().tolist() == [False, False, False, True]
    assert typed["cached_prompt_tokens"].tolist()[:3] == [4, 4, 0] and str(typed["cached_prompt_tokens"].dtype) == "Int32"
    for column, stored in (("draft_tokens", [5, 3]), ("accepted_draft_tokens", [2, 0])):  # the raw request's engine did not say
        assert str(typed[column].dtype) == "Int32" and typed[column].tolist()[:2] == stored and typed[column].isna().tolist()[2:] == [True, True]
    assert frame["text"].iloc[1] == "Hi,\nthere" and frame["error"].iloc[3] == "prompt has 9000 tokens"

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    dataset = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert dataset.num_rows == 4
    assert dataset.features["prompt_tokens"].dtype == "int32" and dataset.features["seed"].dtype == "int64"
    assert dataset[0]["custom_id"] == "chat" and dataset[0]["text"] == "Hello, “friend”" and dataset[2]["seed"] == 40
    assert dataset[3]["text"] is None and dataset[3]["status"] == "failed" and dataset[3]["seed"] is None


def test_openai_batch_output_format(sqlite_url: str) -> None:
    job_id = _job_with_results(sqlite_url)
    lines = [json.loads(x) for x in _export(sqlite_url, job_id, "--format", "openai").splitlines()]
    assert [x["custom_id"] for x in lines] == ["chat", "raw", "bad"]
    chat = lines[0]
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny-random-llama"
    assert [c["message"] for c in body["choices"]] == [
        {"role": "assistant", "content": "Hello, “friend”", "refusal": None}, {"role": "assistant", "content": "Hi,\nthere", "refusal": None}]
    ChatCompletion.model_validate(body)  # the official SDK's type parses it
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14, "prompt_tokens_details": {"cached_tokens": 4},
                             "completion_tokens_details": {"accepted_prediction_tokens": 2, "rejected_prediction_tokens": 6}}
    usage = ChatCompletion.model_validate(body).usage
    assert usage.prompt_tokens_details.cached_tokens == 4 and usage.completion_tokens_details.rejected_prediction_tokens == 6
    raw = lines[1]["response"]["body"]
    assert "completion_tokens_details" not in raw["usage"]  # its draft columns are NULL: nothing said, nothing claimed
    assert raw["object"] == "text_completion" and raw["choices"][0]["text"] == "upon a time"
    Completion.model_validate(raw)
    assert raw["id"] != body["id"] and lines[0]["id"] != lines[1]["id"]
    # a request that failed on its own account: an HTTP 400 response with an error body, as OpenAI writes it
    bad = lines[2]
    assert bad["error"] is None and bad["response"]["status_code"] == 400
    assert bad["response"]["body"] == {"error": {"message": "prompt has 9000 tokens", "type": "invalid_request_error",
                                                 "param": None, "code": None}}


def test_openai_logprobs_shapes(sqlite_url: str) -> None:
    job_id = _job_with_results(sqlite_url)
    chat, raw, _ = [json.loads(x) for x in _export(sqlite_url, job_id, "--format", "openai").splitlines()]
    ChatCompletion.model_validate(chat["response"]["body"])
    Completion.model_validate(raw["response"]["body"])
    first, second = chat["response"]["body"]["choices"]
    assert second["logprobs"] is None  # not stored for this sample
    assert first["logprobs"] == {"refusal": None, "content": [
        {"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111], "top_logprobs": [
            {"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111]}, {"token": "Hi", "logprob": -1.5, "bytes": [72, 105]}]},
        {"token": ", “", "logprob": -2.0, "bytes": list(", “".encode()), "top_logprobs": [
            {"token": ", “", "logprob": -2.0, "bytes": list(", “".encode())}, {"token": "!", "logprob": -2.25, "bytes": [33]}]},
        {"token": "friend”", "logprob": -0.25, "bytes": list("friend”".encode()), "top_logprobs": [
            {"token": "friend”", "logprob": -0.25, "bytes": list("friend”".encode())}, {"token": "you", "logprob": -3.0, "bytes": [121, 111, 117]}]},
    ]}
    assert raw["response"]["body"]["choices"][0]["logprobs"] == {
        "tokens": ["upon", " a", " time"], "token_logprobs": [-0.1, -0.2, -0.3], "top_logprobs": [{}, {}, {}],
        "text_offset": [0, 4, 6],
    }
    records = [json.loads(x) for x in _export(sqlite_url, job_id).splitlines()]
    assert records[0]["logprobs"] == CHAT_LOGPROBS and "logprobs" not in records[1] and records[2]["logprobs"] == RAW_LOGPROBS


def test_openai_requests_that_never_ran(sqlite_url: str) -> None:
    """Cancelled and unfinished requests have no HTTP response: the top-level error says why (OpenAI: batch_cancelled)."""
    job_id = _job_with_results(sqlite_url)
    db = make_engine(sqlite_url)
    with db.begin() as c:
        insert_requests(c, job_id, [[request_row(4, "late", "x", None, {}, None), request_row(5, "dropped", "x", None, {}, None)]])
        c.execute(update(Request).where(Request.job_id == job_id, Request.custom_id == "dropped").values(status="cancelled"))
    db.dispose()
    late, dropped = [json.loads(x) for x in _export(sqlite_url, job_id, "--format", "openai").splitlines()][3:]
    assert late["response"] is None and late["error"] == {"code": "queued", "message": "request is queued"}
    assert dropped["response"] is None and dropped["error"] == {"code": "batch_cancelled", "message": "request is cancelled"}


def test_parquet_needs_a_file(sqlite_url: str) -> None:
    job_id = _job_with_results(sqlite_url)
    result = CliRunner().invoke(main, ["results", str(job_id), "--database-url", sqlite_url, "--format", "parquet"])
    assert result.exit_code != 0 and "-o" in result.output
