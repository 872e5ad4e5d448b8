"""A reasoning model's thinking kept apart from its answer (reasoning_content), when its chat template marks it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from contract.registry import TINY, resolve
from tests.helpers import WorkerProcess, env_for, producer, table_columns, wait_for_job, write_jsonl
from workers.engine import Engine
from workers.reasoning import marks_thinking, split_thinking
from workers.types import GenerationRequest, Sample, SamplingParams

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's shape: the model opens <think> itself; enable_thinking false closes an empty block in the prompt."""
R1_LIKE = QWEN3_LIKE.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n", 1)
"""DeepSeek-R1's shape: the prompt opens the block, the model's text holds only its end."""
QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def sample(text_: str) -> Sample:
    return Sample(text_, "stop", 5, None)


@pytest.mark.parametrize(
    ("text_", "opened", "reasoning", "answer"),
    [
        ("<think>\nadd them\n</think>\n\n4", False, "add them", "4"),
        ("add them</think>4", True, "add them", "4"),
        ("add them, carry", True, "add them, carry", ""),  # cut by max_new_tokens while thinking
        ("<think>\nadd them, carry", False, "add them, carry", ""),
        ("4", False, None, "4"),  # did not think
        ("\n\n4", False, None, "\n\n4"),
    ],
)
def test_split_follows_vllms_reasoning_parsers(text_: str, opened: bool, reasoning: str | None, answer: str) -> None:
    split = split_thinking(sample(text_), opened)
    assert (split.reasoning, split.text) == (reasoning, answer)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(resolve(TINY), "cpu", "float32")


def with_template(engine: Engine, template: str) -> Engine:
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = template
    return Engine(engine.model, tokenizer, "cpu", engine.model_name, engine.dtype)


def test_a_template_that_marks_thinking_is_recognised(engine: Engine) -> None:
    assert not marks_thinking(engine.tokenizer) and not engine.marks_thinking
    assert with_template(engine, QWEN3_LIKE).marks_thinking


def test_a_chat_request_to_a_thinking_model_keeps_its_thinking_apart(engine: Engine) -> None:
    r1 = with_template(engine, R1_LIKE)
    params = SamplingParams(temperature=0, max_new_tokens=6, logit_bias={1000: 100})  # some visible text
    [chat, plain] = r1.generate([GenerationRequest(params, messages=QUESTION), GenerationRequest(params, prompt="What is")])
    [same] = engine.generate([GenerationRequest(params, messages=QUESTION)])
    thought = chat.samples[0]
    assert thought.reasoning == engine.tokenizer.decode([1000] * 6).strip() and thought.text == ""  # never closed
    assert plain.samples[0].reasoning is None  # a plain prompt is not rendered with the template
    assert same.samples[0].reasoning is None and same.samples[0].text.strip()
    qwen3 = with_template(engine, QWEN3_LIKE)
    off = SamplingParams(temperature=0, max_new_tokens=6, logit_bias={1000: 100}, chat_template_kwargs={"enable_thinking": False})
    [answer] = qwen3.generate([GenerationRequest(off, messages=QUESTION)])
    assert answer.samples[0].reasoning is None and answer.samples[0].text


def test_migration_adds_the_column(sqlite_url: str) -> None:
    assert "reasoning_content" in table_columns(sqlite_url, "results")


@pytest.mark.slow
def test_reasoning_content_is_stored_and_exported(engine: Engine, pg_url: str, broker_url: str, tmp_path: Path) -> None:
    """A local model directory whose template opens <think> in the prompt, through a real worker."""
    model_dir = tmp_path / "thinker"
    engine.model.save_pretrained(model_dir)
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = R1_LIKE
    tokenizer.save_pretrained(model_dir)
    env = env_for(pg_url, broker_url)
    visible = {"temperature": 0, "max_new_tokens": 5, "logit_bias": {"1000": 100}}
    lines = [{"custom_id": "chat", "messages": QUESTION, **visible}, {"custom_id": "raw", "prompt": "What is", **visible}]
    job_id = int(producer(["submit", str(write_jsonl(tmp_path / "in.jsonl", lines)), "--model", str(model_dir)], env,
                          check=True).stdout.split()[-1])
    worker = WorkerProcess(env, model=str(model_dir))
    try:
        assert wait_for_job(pg_url, job_id, timeout=300) == "completed", worker.output()[-3000:]
    finally:
        worker.stop()
    with create_engine(pg_url).connect() as c:
        rows = dict(c.execute(text("SELECT q.custom_id, r.reasoning_content FROM results r JOIN requests q ON q.id = r.request_id")).all())
    assert rows["chat"] and rows["raw"] is None
    out = tmp_path / "out.jsonl"
    producer(["results", str(job_id), "--format", "openai", "-o", str(out)], env, check=True)
    by_id = {line["custom_id"]: line for line in map(json.loads, out.read_text().splitlines())}
    message = by_id["chat"]["response"]["body"]["choices"][0]["message"]
    assert message["reasoning_content"] == rows["chat"] and message["content"] == ""
    native = tmp_path / "native.jsonl"
    producer(["results", str(job_id), "-o", str(native)], env, check=True)
    records = {r["custom_id"]: r for r in map(json.loads, native.read_text().splitlines())}
    assert records["chat"]["reasoning_content"] == rows["chat"] and "reasoning_content" not in records["raw"]
