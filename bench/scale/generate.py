"""Generate a JSONL file of chat requests for the scale benchmarks and tests (never committed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

_TOPICS = ("the sky", "tides", "volcanoes", "bread", "compilers", "bees", "glaciers", "jazz", "rust", "comets")


def chat_line(i: int) -> dict:
    """Line i: a chat request with a custom_id, a system and a user message, some sampling values and metadata."""
    line: dict = {
        "custom_id": f"req-{i:08d}",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": f"Question {i}: explain {_TOPICS[i % len(_TOPICS)]} to a child in two sentences."},
        ],
        "max_new_tokens": 64 + i % 128,
    }
    if i % 2:
        line["temperature"] = 0.7
        line["top_p"] = 0.95
    if i % 5 == 0:
        line["seed"] = i
    if i % 3 == 0:
        line["metadata"] = {"shard": i % 16, "source": "bench"}
    return line


def write_chat_file(path: Path, lines: int) -> Path:
    """Write `lines` chat requests to path, streaming (bounded memory)."""
    dumps = json.JSONEncoder(separators=(", ", ": ")).encode
    with path.open("w", encoding="utf-8") as out:
        buffer = []
        for i in range(1, lines + 1):
            buffer.append(dumps(chat_line(i)))
            if len(buffer) == 10_000:
                out.write("\n".join(buffer) + "\n")
                buffer.clear()
        if buffer:
            out.write("\n".join(buffer) + "\n")
    return path


def table_row(i: int) -> tuple[str, str, int]:
    """Row i of the table benchmark: a prompt and two metadata columns (topic, shard)."""
    topic = _TOPICS[i % len(_TOPICS)]
    return f"Question {i}: explain {topic} to a child in two sentences.", topic, i % 16


def write_table_files(directory: Path, rows: int, batch: int = 50_000) -> tuple[Path, Path]:
    """The same `rows` rows as prompts.parquet (columns prompt, topic, shard) and as prompts.jsonl
    ({"prompt", "metadata": {"topic", "shard"}}, what the Parquet rows are stored as), streaming."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("topic", pa.string()), ("shard", pa.int64())])
    parquet, jsonl = directory / "prompts.parquet", directory / "prompts.jsonl"
    dumps = json.JSONEncoder(separators=(", ", ": ")).encode
    with pq.ParquetWriter(parquet, schema) as writer, jsonl.open("w", encoding="utf-8") as out:
        for start in range(1, rows + 1, batch):
            chunk = [table_row(i) for i in range(start, min(start + batch, rows + 1))]
            prompts, topics, shards = zip(*chunk)
            writer.write_table(pa.table([list(prompts), list(topics), list(shards)], schema=schema))
            out.write("\n".join(dumps({"prompt": p, "metadata": {"topic": t, "shard": s}}) for p, t, s in chunk) + "\n")
    return parquet, jsonl


if __name__ == "__main__":
    write_chat_file(Path(sys.argv[1]), int(sys.argv[2]))
