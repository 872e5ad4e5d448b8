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


if __name__ == "__main__":
    write_chat_file(Path(sys.argv[1]), int(sys.argv[2]))
