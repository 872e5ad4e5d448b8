"""Writing a job's results as JSONL, CSV, Parquet or the OpenAI Batch output format, streamed.

Every writer takes records one request at a time from the store (models.reads.iter_results, keyset
pagination), so a job of a million results exports in bounded memory.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import groupby
from typing import IO, Any

from sqlalchemy import Engine

from models.db import as_utc
from models.reads import iter_results
from models.tables import Request, RequestStatus, Result

FORMATS = ("jsonl", "csv", "parquet", "openai")
FLAT_COLUMNS = (
    "custom_id", "sample_index", "status", "text", "finish_reason", "prompt_tokens", "cached_prompt_tokens",
    "completion_tokens", "draft_tokens", "accepted_draft_tokens", "seed", "constrained", "error", "metadata",
    "reasoning_content",
)
"""reasoning_content: a reasoning model's thinking when its template marks it (text is then the answer alone);
JSONL lines carry it only when there is some."""


@dataclass
class RequestResults:
    request: Request
    results: list[Result] = field(default_factory=list)


def iter_request_results(db: Engine, job_id: int) -> Iterator[RequestResults]:
    """Each request of the job with all its results, in line order."""
    for _, pairs in groupby(iter_results(db, job_id), key=lambda pair: pair[0].id):
        pairs = list(pairs)
        yield RequestResults(pairs[0][0], [result for _, result in pairs if result is not None])


def flat_records(db: Engine, job_id: int, logprobs: bool = False) -> Iterator[dict[str, Any]]:
    """One record per result (per request when it has none: failed, cancelled or not yet done).

    With `logprobs`, a result that has them carries them too, as stored (workers.types.Sample.logprobs).
    """
    for item in iter_request_results(db, job_id):
        request = item.request
        base = {"custom_id": request.custom_id, "status": request.status, "error": request.error, "metadata": request.meta}
        if not item.results:
            yield {**dict.fromkeys(FLAT_COLUMNS), **base}
            continue
        for result in item.results:
            record = {
                **base,
                "sample_index": result.sample_index,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "cached_prompt_tokens": result.cached_prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "draft_tokens": result.draft_tokens,
                "accepted_draft_tokens": result.accepted_draft_tokens,
                "seed": result.seed,
                "reasoning_content": result.reasoning_content,
                "constrained": result.constrained,
            }
            if logprobs and result.logprobs is not None:
                record["logprobs"] = result.logprobs
            yield record


def write_jsonl(db: Engine, job_id: int, out: IO[str]) -> int:
    count = 0
    for record in flat_records(db, job_id, logprobs=True):
        if record["text"] is not None:
            record = {k: v for k, v in record.items() if k not in ("status", "error")}
            if record["reasoning_content"] is None:
                del record["reasoning_content"]
        else:
            record = {k: record[k] for k in ("custom_id", "status", "error", "metadata")}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(db: Engine, job_id: int, out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=FLAT_COLUMNS)
    writer.writeheader()
    count = 0
    for record in flat_records(db, job_id):
        record["metadata"] = None if record["metadata"] is None else json.dumps(record["metadata"], ensure_ascii=False)
        writer.writerow(record)
        count += 1
    return count


def arrow_schema():  # type: ignore[no-untyped-def]
    """The columns of the Parquet export and of Job.to_arrow() (metadata as JSON text)."""
    import pyarrow as pa

    return pa.schema([
        ("custom_id", pa.string()), ("sample_index", pa.int32()), ("status", pa.string()), ("text", pa.string()),
        ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()), ("cached_prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()), ("draft_tokens", pa.int32()), ("accepted_draft_tokens", pa.int32()),
        ("seed", pa.int64()), ("constrained", pa.bool_()), ("error", pa.string()), ("metadata", pa.string()),
        ("reasoning_content", pa.string()),
    ])


def arrow_batches(db: Engine, job_id: int, rows: int = 10_000) -> Iterator[Any]:
    """flat_records as pyarrow RecordBatches of up to `rows` rows (at least one batch, maybe empty)."""
    import pyarrow as pa

    schema = arrow_schema()
    batch: list[dict[str, Any]] = []
    sent = False
    for record in flat_records(db, job_id):
        record["metadata"] = None if record["metadata"] is None else json.dumps(record["metadata"], ensure_ascii=False)
        batch.append(record)
        if len(batch) == rows:
            yield pa.RecordBatch.from_pylist(batch, schema=schema)
            sent, batch = True, []
    if batch or not sent:
        yield pa.RecordBatch.from_pylist(batch, schema=schema)


def write_parquet(db: Engine, job_id: int, path: str, row_group: int = 10_000) -> int:
    import pyarrow.parquet as pq

    count = 0
    with pq.ParquetWriter(path, arrow_schema()) as writer:
        for batch in arrow_batches(db, job_id, row_group):
            writer.write_batch(batch)
            count += batch.num_rows
    return count


_SERVER_FAILURES = ("gave up after ", "out of memory")
"""A failed request whose error starts with one of these failed on our side (HTTP 500); any other failure
is a problem of the request itself, such as a prompt too long for the model's context (HTTP 400)."""


def openai_line(item: RequestResults, model: str) -> dict[str, Any]:
    """One line of the OpenAI Batch output format for a request and its n results.

    As OpenAI does: a request that failed is a response with status_code 400 (the request's fault) or 500
    (ours) and an `{"error": {...}}` body; the top-level `error` is for requests that never ran (cancelled,
    or not finished yet).
    """
    request = item.request
    line: dict[str, Any] = {"id": f"batch_req_{request.id}", "custom_id": request.custom_id, "response": None, "error": None}
    if not item.results:
        if request.status == RequestStatus.FAILED:
            line["response"] = _error_response(request)
        else:
            code = "batch_cancelled" if request.status == RequestStatus.CANCELLED else str(request.status)
            line["error"] = {"code": code, "message": request.error or f"request is {request.status}"}
        return line
    chat = request.messages is not None
    choices = []
    for result in item.results:
        choice: dict[str, Any] = {"index": result.sample_index, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text, "refusal": None}
            if result.reasoning_content is not None:  # vLLM's field for a reasoning model's thinking
                choice["message"]["reasoning_content"] = result.reasoning_content
            choice["logprobs"] = chat_logprobs(result.logprobs)
        else:
            choice["text"] = result.text
            choice["logprobs"] = completion_logprobs(result.logprobs)
        choices.append(choice)
    prompt_tokens = item.results[0].prompt_tokens
    cached_tokens = item.results[0].cached_prompt_tokens or 0
    completion_tokens = sum(r.completion_tokens for r in item.results)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    predictions = _prediction_tokens(item.results)
    if predictions is not None:
        usage["completion_tokens_details"] = predictions
    finished = max(r.finished_at for r in item.results)
    created = int(as_utc(finished).timestamp())
    line["response"] = {
        "status_code": 200,
        "request_id": f"req_{request.id}",
        "body": {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request.id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
        },
    }
    return line


def _prediction_tokens(results: list[Result]) -> dict[str, int] | None:
    """The samples' draft tokens under OpenAI's names for predicted-output tokens: those kept (accepted) and the
    rest (rejected); None when no sample's engine said."""
    draft = accepted = 0
    counted = False
    for result in results:
        if result.draft_tokens is not None and result.accepted_draft_tokens is not None:
            draft, accepted, counted = draft + result.draft_tokens, accepted + result.accepted_draft_tokens, True
    if not counted:
        return None
    return {"accepted_prediction_tokens": accepted, "rejected_prediction_tokens": draft - accepted}


def _error_response(request: Request) -> dict[str, Any]:
    message = request.error or "failed"
    server = message.startswith(_SERVER_FAILURES)
    return {
        "status_code": 500 if server else 400,
        "request_id": f"req_{request.id}",
        "body": {
            "error": {
                "message": message,
                "type": "server_error" if server else "invalid_request_error",
                "param": None,
                "code": None,
            }
        },
    }


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", "surrogatepass"))


def chat_logprobs(stored: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Stored per-token logprobs in the chat endpoint's shape; None when the request did not ask for them."""
    if stored is None:
        return None
    content = [
        {
            "token": entry["token"],
            "logprob": entry["logprob"],
            "bytes": _token_bytes(entry["token"]),
            "top_logprobs": [
                {"token": top["token"], "logprob": top["logprob"], "bytes": _token_bytes(top["token"])}
                for top in entry.get("top_logprobs") or []
            ],
        }
        for entry in stored
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(stored: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Stored per-token logprobs in the completions endpoint's shape; text_offset counts characters of the completion."""
    if stored is None:
        return None
    offsets, at = [], 0
    for entry in stored:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [entry["token"] for entry in stored],
        "token_logprobs": [entry["logprob"] for entry in stored],
        "top_logprobs": [{top["token"]: top["logprob"] for top in entry.get("top_logprobs") or []} for entry in stored],
        "text_offset": offsets,
    }


def write_openai(db: Engine, job_id: int, out: IO[str], model: str) -> int:
    count = 0
    for item in iter_request_results(db, job_id):
        out.write(json.dumps(openai_line(item, model), ensure_ascii=False) + "\n")
        count += 1
    return count




# --- the join export: the input's columns back, beside the generated ones ------------------------

JOIN_GENERATED = (
    ("input_row", "int64"), ("sample_index", "int32"), ("status", "string"), ("text", "string"),
    ("finish_reason", "string"), ("prompt_tokens", "int32"), ("cached_prompt_tokens", "int32"),
    ("completion_tokens", "int32"), ("draft_tokens", "int32"), ("accepted_draft_tokens", "int32"),
    ("seed", "int64"), ("error", "string"), ("reasoning_content", "string"),
)
"""The columns `results --join` adds to the input's: input_row is the row's number in the input, from 1.
One that an input column already uses is written as result_<name>."""


def write_joined(db: Engine, job_id: int, path: str, row_group: int = 10_000) -> int:
    """A Parquet file of the job's input columns, as the input had them (the metadata columns, and those mapped to
    prompt, messages, custom_id and sampling fields under their own names), with the generated columns added:
    one row per result, and one per request without a result (its status and error). Streamed; returns the rows.

    Types come back from the input's recorded schema: timestamps, dates, times, decimals and bytes from the
    JSON the store holds; a nested column holding one of those is written as JSON text. Raises
    contract.errors.JobNotFound, and InputFileError when the job was not submitted from a table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contract.errors import InputFileError, JobNotFound
    from models.tables import Job
    from producer.tables import schema_of

    with db.connect() as connection:
        row = connection.execute(Job.__table__.select().where(Job.__table__.c.id == job_id)).first()
    if row is None:
        raise JobNotFound(job_id)
    record = row._mapping["input_columns"]
    if not record:
        raise InputFileError(f"job {job_id} was not submitted from a table (Parquet, CSV, a dataset, a DataFrame): "
                             "--join has no input columns to write; export it without --join")
    schema = schema_of(record)
    field_of = {column: field for field, column in record["fields"].items()}
    plans = [_input_plan(f.name, f.type, field_of.get(f.name)) for f in schema]
    taken = set(schema.names)
    generated = [((f"result_{n}" if n in taken else n), getattr(pa, t)()) for n, t in JOIN_GENERATED]
    out_schema = pa.schema([(name, kind) for name, kind, _, _ in plans] + generated)
    columns: list[list[Any]] = [[] for _ in out_schema]
    count = 0

    def flush(writer: pq.ParquetWriter) -> None:
        arrays = [convert(values) for (_, _, _, convert), values in zip(plans, columns)]
        arrays += [pa.array(values, type=kind) for (_, kind), values in zip(generated, columns[len(plans):])]
        writer.write_table(pa.Table.from_arrays(arrays, schema=out_schema))
        for values in columns:
            values.clear()

    with pq.ParquetWriter(path, out_schema) as writer:
        pending = 0
        for item in iter_request_results(db, job_id):
            request = item.request
            inputs = [get(request) for _, _, get, _ in plans]
            for result in item.results or [None]:
                for values, value in zip(columns, inputs):
                    values.append(value)
                tail = columns[len(plans):]
                own = [request.line_no, None, request.status, None, None, None, None, None, None, None, None, request.error, None]
                if result is not None:
                    own[12] = result.reasoning_content
                    own[1:11] = [result.sample_index, request.status, result.text, result.finish_reason, result.prompt_tokens,
                                 result.cached_prompt_tokens, result.completion_tokens, result.draft_tokens,
                                 result.accepted_draft_tokens, result.seed]
                for values, value in zip(tail, own):
                    values.append(value)
                pending += 1
                count += 1
            if pending >= row_group:
                flush(writer)
                pending = 0
        if pending or count == 0:
            flush(writer)
    return count


def _input_plan(name: str, kind: Any, field: str | None) -> tuple[str, Any, Any, Any]:
    """(column, its type in the export, request -> the stored value, values -> an Arrow array) for one input column."""
    import pyarrow as pa

    if field == "prompt":
        get = lambda request: request.prompt  # noqa: E731
    elif field == "messages":
        get = lambda request: request.messages  # noqa: E731
    elif field == "custom_id":
        get = lambda request: request.custom_id  # noqa: E731
    elif field is not None:
        get = lambda request: (request.params or {}).get(field)  # noqa: E731
    else:
        get = lambda request: (request.meta or {}).get(name)  # noqa: E731
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    out, parse = _restorer(kind)
    if field == "custom_id" and pa.types.is_integer(kind):
        parse = _int_or_none
    elif field == "stop" and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        parse = _one_stop
    elif field not in (None, "prompt", "custom_id") and out in (pa.string(), pa.large_string()):
        parse = _json_text  # messages or a sampling field read from text (CSV) go back as text
    elif field is not None and pa.types.is_integer(out):
        parse = _integral
    if parse is None:
        return name, out, get, lambda values: pa.array(values, type=out)
    return name, out, get, lambda values: pa.array([None if v is None else parse(v) for v in values], type=out)


def _restorer(kind: Any) -> tuple[Any, Any]:
    """(export type, JSON value -> Python value for that type, or None when pyarrow takes the JSON value as it is)."""
    import base64
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.types as t

    if _json_native(kind):
        return kind, None
    if t.is_timestamp(kind):
        return kind, datetime.datetime.fromisoformat
    if t.is_date(kind):
        return kind, datetime.date.fromisoformat
    if t.is_time(kind):
        return kind, datetime.time.fromisoformat
    if t.is_duration(kind):
        return kind, lambda seconds: datetime.timedelta(seconds=seconds)
    if t.is_decimal(kind):
        return kind, decimal.Decimal
    if t.is_binary(kind) or t.is_large_binary(kind) or t.is_fixed_size_binary(kind):
        return kind, base64.b64decode
    return pa.string(), _json_text


def _json_native(kind: Any) -> bool:
    """Types whose values the store's JSON holds as they are: strings, numbers, booleans, and lists and structs of them."""
    import pyarrow.types as t

    if t.is_string(kind) or t.is_large_string(kind) or t.is_integer(kind) or t.is_floating(kind) or t.is_boolean(kind) or t.is_null(kind):
        return True
    if t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind):
        return _json_native(kind.value_type)
    if t.is_struct(kind):
        return all(_json_native(kind.field(i).type) for i in range(kind.num_fields))
    return False


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _one_stop(value: Any) -> str:
    if isinstance(value, list):
        return value[0] if len(value) == 1 else json.dumps(value, ensure_ascii=False)
    return value
