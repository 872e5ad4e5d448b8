"""The whole path, with real parts: producer process -> Redis -> Celery worker processes -> SQL store."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.helpers import TINY, WorkerProcess, env_for, producer, wait_for_job, write_jsonl
from contract.messages import queue_name

pytestmark = pytest.mark.slow

MIXED = [
    {"custom_id": "chat-greedy", "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_new_tokens": 12},
    {"custom_id": "chat-sampled", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "temperature": 0.8, "top_p": 0.9, "seed": 7},
    {"custom_id": "raw", "prompt": "Once upon a time", "max_new_tokens": 9, "metadata": {"topic": "story", "k": [1, 2]}},
    {"custom_id": "three", "prompt": "List:", "n": 3, "seed": 11, "top_k": 20},
    {"custom_id": "beams", "prompt": "The sea is", "num_beams": 4, "n": 2, "max_new_tokens": 6},
    {"custom_id": "penalised", "prompt": "a a a a", "repetition_penalty": 1.3, "temperature": 0},
    {"custom_id": "stopper", "prompt": "1, 2, 3,", "stop": ["\n", "zz"], "seed": 3},
] + [{"prompt": f"Request number {i}:", "seed": i} for i in range(25)]


def _rows(url: str, sql: str, **params):  # type: ignore[no-untyped-def]
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).mappings().all()
    finally:
        engine.dispose()


def test_job_end_to_end(store_url: str, broker_url: str, tmp_path: Path) -> None:
    env = env_for(store_url, broker_url)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", MIXED)
    submitted = producer(["submit", str(prompts), "--model", TINY, "--max-new-tokens", "16", "--name", "e2e"], env, check=True)
    job_id = int(submitted.stdout.strip().splitlines()[-1])
    # the producer commits the job before it enqueues: rows exist, nothing generated yet
    assert _rows(store_url, "SELECT count(*) AS c FROM requests WHERE job_id = :j", j=job_id)[0]["c"] == len(MIXED)

    workers = [WorkerProcess(env), WorkerProcess(env)]
    try:
        assert wait_for_job(store_url, job_id, timeout=240) == "completed"
    finally:
        for worker in workers:
            worker.stop()

    expected_samples = sum(row.get("n", 1) for row in MIXED)
    results = _rows(
        store_url,
        "SELECT r.*, q.custom_id, q.status AS request_status FROM results r JOIN requests q ON q.id = r.request_id "
        "WHERE r.job_id = :j ORDER BY q.id, r.sample_index",
        j=job_id,
    )
    assert len(results) == expected_samples
    assert len({(r["request_id"], r["sample_index"]) for r in results}) == expected_samples
    assert {r["request_status"] for r in results} == {"done"}
    by_id: dict[str, list] = {}
    for r in results:
        by_id.setdefault(r["custom_id"], []).append(r)
    assert [r["sample_index"] for r in by_id["three"]] == [0, 1, 2]
    assert [r["seed"] for r in by_id["three"]] == [11, 12, 13]
    assert len(by_id["beams"]) == 2
    assert by_id["chat-greedy"][0]["completion_tokens"] <= 12
    assert by_id["raw"][0]["completion_tokens"] <= 9
    assert all(r["completion_tokens"] <= 16 for r in by_id["three"])
    for r in results:
        assert r["finish_reason"] in ("stop", "length")
        assert r["prompt_tokens"] > 0
        assert r["model"] == TINY and r["dtype"] == "float32" and r["quantization"] == "none" and r["device"] == "cpu"
        assert r["worker_host"] and r["generation_seconds"] > 0
        params = json.loads(r["params"]) if isinstance(r["params"], str) else r["params"]
        assert params["seed"] == r["seed"]
    assert "\n" not in by_id["stopper"][0]["text"] and "zz" not in by_id["stopper"][0]["text"]
    # a seed was chosen and recorded for a sampled row that gave none
    assert by_id["8"][0]["seed"] == 0 and by_id["raw"][0]["seed"] is not None

    job = _rows(store_url, "SELECT * FROM jobs WHERE id = :j", j=job_id)[0]
    assert job["status"] == "completed" and job["done_count"] == len(MIXED) and job["failed_count"] == 0
    assert job["completion_tokens"] == sum(r["completion_tokens"] for r in results)
    assert job["prompt_tokens"] == sum(rows[0]["prompt_tokens"] for rows in by_id.values())
    assert job["name"] == "e2e" and job["finished_at"] is not None

    exported = producer(["results", str(job_id), "-o", str(tmp_path / "out.jsonl")], env, check=True)
    assert exported.returncode == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == expected_samples
    raw = next(line for line in lines if line["custom_id"] == "raw")
    assert raw["metadata"] == {"topic": "story", "k": [1, 2]}
    assert set(raw) >= {"custom_id", "text", "prompt_tokens", "completion_tokens", "finish_reason", "metadata"}

    status = producer(["status", str(job_id), "--json"], env, check=True)
    info = json.loads(status.stdout)
    assert info["status"] == "completed" and info["by_state"] == {"done": len(MIXED)}


def test_worker_only_takes_its_own_models_work(sqlite_url: str, broker_url: str, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other_model = tmp_path / "other-model"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)).save_pretrained(other_model)
    env = env_for(sqlite_url, broker_url)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"x {i}", "max_new_tokens": 4} for i in range(6)])
    job_b = int(producer(["submit", str(prompts), "--model", str(other_model)], env, check=True).stdout.split()[-1])
    job_a = int(producer(["submit", str(prompts), "--model", TINY], env, check=True).stdout.split()[-1])

    worker = WorkerProcess(env)
    try:
        assert wait_for_job(sqlite_url, job_a, timeout=180) == "completed"
    finally:
        worker.stop()
    b = _rows(sqlite_url, "SELECT status, done_count FROM jobs WHERE id = :j", j=job_b)[0]
    assert b["status"] == "queued" and b["done_count"] == 0
    assert _rows(sqlite_url, "SELECT count(*) AS c FROM results WHERE job_id = :j", j=job_b)[0]["c"] == 0
    # model B's messages are still waiting on model B's queue
    assert redis.Redis.from_url(broker_url).llen(queue_name(str(other_model))) == 1


def test_refuses_a_schema_that_is_behind(tmp_path: Path, broker_url: str) -> None:
    env = env_for(f"sqlite:///{tmp_path / 'empty.db'}", broker_url)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    submitted = producer(["submit", str(prompts), "--model", TINY], env)
    assert submitted.returncode != 0
    assert "producer db upgrade" in submitted.stderr and "Traceback" not in submitted.stderr
    worker = WorkerProcess(env)
    try:
        worker.process.wait(120)
    finally:
        worker.stop()
    assert worker.process.returncode != 0
    assert "producer db upgrade" in worker.output()
    assert producer(["db", "upgrade"], env).returncode == 0
    assert producer(["submit", str(prompts), "--model", TINY], env).returncode == 0


def test_real_model_end_to_end(pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """The bundled SmolLM2 through the whole pipeline into PostgreSQL; counts checked with its own tokenizer."""
    import torch

    from workers.engine import Engine
    from contract.registry import SMOLLM2, resolve

    question = [{"role": "user", "content": "What is the capital of France?"}]
    lines = [
        {"custom_id": "greedy", "messages": question, "temperature": 0, "max_new_tokens": 24},
        {"custom_id": "seeded-a", "messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0.9, "seed": 5, "max_new_tokens": 20},
        {"custom_id": "seeded-b", "messages": [{"role": "user", "content": "Name a fruit."}], "temperature": 0.9, "seed": 5, "max_new_tokens": 20},
        {"custom_id": "raw", "prompt": "The three primary colours are", "temperature": 0, "max_new_tokens": 16},
        {"custom_id": "stopped", "prompt": "1, 2, 3, 4,", "temperature": 0, "stop": [" 7"], "max_new_tokens": 30},
    ]
    env = env_for(pg_url, broker_url)
    prompts = write_jsonl(tmp_path / "real.jsonl", lines)
    job_id = int(producer(["submit", str(prompts)], env, check=True).stdout.split()[-1])
    worker = WorkerProcess(env, model=SMOLLM2)
    try:
        assert wait_for_job(pg_url, job_id, timeout=400) == "completed", worker.output()[-3000:]
    finally:
        worker.stop()
    rows = {
        r["custom_id"]: r
        for r in _rows(pg_url, "SELECT q.custom_id, r.* FROM results r JOIN requests q ON q.id = r.request_id WHERE r.job_id = :j", j=job_id)
    }
    assert set(rows) == {line["custom_id"] for line in lines}

    engine = Engine.load(resolve(SMOLLM2), "cpu", "float32")
    tokenizer = engine.tokenizer
    rendered = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user" in rendered
    prompt_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert rows["greedy"]["prompt_tokens"] == len(prompt_ids)
    assert rows["raw"]["prompt_tokens"] == len(tokenizer("The three primary colours are", add_special_tokens=False).input_ids)
    for name in ("greedy", "raw", "seeded-a"):
        assert rows[name]["completion_tokens"] == len(tokenizer(rows[name]["text"], add_special_tokens=False).input_ids), name
    assert "Paris" in rows["greedy"]["text"]
    assert rows["seeded-a"]["text"] == rows["seeded-b"]["text"] and rows["seeded-a"]["seed"] == 5
    assert rows["stopped"]["finish_reason"] == "stop" and " 7" not in rows["stopped"]["text"]
    assert rows["stopped"]["text"].startswith(" 5, 6,")

    # temperature 0 is exactly transformers' greedy search
    with torch.inference_mode():
        reference = engine.model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=24, top_k=None, top_p=None,
        )
    expected = tokenizer.decode(reference[0, len(prompt_ids):], skip_special_tokens=True)
    assert rows["greedy"]["text"] == expected
