"""The producer as a library: submit rows from Python, follow the job with a progress bar, read the results.

It needs what `producer submit` needs: the store and the broker (BULKGEN_DATABASE_URL, BULKGEN_BROKER_URL,
or their defaults) and at least one worker serving the model (`workers start`; `make demo` starts all three on
one machine, the way examples/demo.py does).

    python examples/api_quickstart.py
"""
from __future__ import annotations

import sys

from contract.errors import BulkgenError
from producer import api

TOPICS = {"geography": "What is the capital of France?", "science": "Why is the sky blue?",
          "cooking": "How long should I boil an egg?", "history": "Who built the pyramids of Giza?"}


def main() -> int:
    rows = [
        {"custom_id": topic, "messages": [{"role": "user", "content": question}], "metadata": {"topic": topic}}
        for topic, question in TOPICS.items()
    ]
    try:
        # The same validation as the CLI: a bad row raises InvalidInput with every bad row, and nothing is written.
        job = api.submit(rows, name="api quickstart", max_new_tokens=24, temperature=0)
        print(f"job {job.id}: {job.report.valid} requests submitted", flush=True)
        info = job.wait(progress=True, timeout=900)
    except (BulkgenError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.id} {info.status}: {info.done} done, {info.completion_tokens} tokens generated")
    for record in job.results():  # streamed from the store, in bounded memory for any job size
        print(f"{record['custom_id']:>10}: {record['text']!r} ({record['completion_tokens']} tokens)")
    frame = job.to_pandas()  # the Parquet export's columns, in memory
    print(frame[["custom_id", "prompt_tokens", "completion_tokens"]].to_string(index=False))
    return 0 if info.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
