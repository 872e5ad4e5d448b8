"""Structured output in the engine (workers.grammar): every answer that ends 'stop' matches its schema, regex or
choices; constrained and free rows share a batch; seeds give the same text alone or in a batch; speculation and the
static-batch path keep the constraint; a decode step still reads the device once.

Fast tests run the tiny random Llama (whose choices among the allowed tokens are arbitrary: a strict test of the
mask); the slow ones the real SmolLM2, whose answers must also parse and validate (jsonschema)."""
from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from bench.schemas import LABEL, PERSON, QA_LIST
from contract.structured import CHOICE, JSON_OBJECT, JSON_SCHEMA, REGEX, Constraint, compact
from tests.test_engine import cache_dir, engine, needs_smollm2, with_batch_rows  # noqa: F401
from tests.test_sync_free import steps_each_reading_once, sync_free_engine
from workers.engine import Engine
from workers.grammar import grammars_for
from workers.scheduler import Scheduler
from workers.types import GenerationRequest, SamplingParams

SMALL = {
    "type": "object",
    "properties": {
        "label": {"enum": ["red", "green", "blue"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["label", "score", "ok"],
    "additionalProperties": False,
}
PHONE = r"[0-9]{3}-[0-9]{4}"
COLOURS = ["red", "green", "light blue"]


def schema(value: dict[str, Any]) -> Constraint:
    return Constraint(JSON_SCHEMA, compact(value))


def request(constraint: Constraint | None, prompt: str = "Answer:", **params: Any) -> GenerationRequest:
    params.setdefault("max_new_tokens", 48)
    params.setdefault("temperature", 0)
    return GenerationRequest(SamplingParams(constraint=constraint, **params), prompt=prompt)


def check(constraint: Constraint, text: str) -> None:
    """The text matches the constraint exactly."""
    if constraint.kind == REGEX:
        assert re.fullmatch(constraint.spec, text), text
    elif constraint.kind == CHOICE:
        assert text in json.loads(constraint.spec), text
    else:
        value = json.loads(text)
        jsonschema.validate(value, json.loads(constraint.spec))
        if constraint.kind == JSON_OBJECT:
            assert isinstance(value, dict)


TINY_CONSTRAINTS = [schema(SMALL), Constraint(REGEX, PHONE), Constraint(CHOICE, compact(COLOURS))]


def test_every_constrained_answer_matches_its_constraint(engine: Engine) -> None:  # noqa: F811
    requests = [request(c, seed=s, temperature=t) for c in TINY_CONSTRAINTS for s, t in ((None, 0), (7, 1.0), (8, 0.8))]
    results = engine.generate(requests)
    for req, result in zip(requests, results):
        [sample] = result.samples
        assert sample.finish_reason == "stop", (req.params.constraint, sample)
        check(req.params.constraint, sample.text)


def test_free_rows_are_unchanged_by_constrained_rows_beside_them(engine: Engine) -> None:  # noqa: F811
    free = [request(None, "Hello there, how", max_new_tokens=12), request(None, "One", max_new_tokens=9, temperature=0.9, seed=3)]
    alone = engine.generate(free)
    mixed = engine.generate([free[0], *(request(c) for c in TINY_CONSTRAINTS), free[1]])
    assert [mixed[0].samples, mixed[-1].samples] == [r.samples for r in alone]
    for constraint, result in zip(TINY_CONSTRAINTS, mixed[1:-1]):
        check(constraint, result.samples[0].text)


def test_a_seeded_constrained_request_gives_the_same_text_alone_or_in_a_batch(engine: Engine) -> None:  # noqa: F811
    seeded = request(schema(SMALL), temperature=1.0, seed=42, n=2)
    [alone] = engine.generate([seeded])
    batch = engine.generate([request(None, "In a distant galaxy"), seeded, request(Constraint(REGEX, PHONE), temperature=0.7, seed=1)])
    assert batch[1].samples == alone.samples
    assert alone.samples[0].text != alone.samples[1].text  # seed + i: the samples differ


def test_an_answer_cut_by_max_tokens_ends_length(engine: Engine) -> None:  # noqa: F811
    [result] = engine.generate([request(schema(QA_LIST), max_new_tokens=5)])
    assert result.samples[0].finish_reason == "length" and result.samples[0].completion_tokens == 5


def test_a_compiled_constraint_is_cached_per_worker(engine: Engine) -> None:  # noqa: F811
    grammars = grammars_for(engine.tokenizer, engine.model.config.vocab_size, engine.eos_ids)
    before = grammars.compiles
    fresh = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    engine.generate([request(schema(fresh)) for _ in range(5)])
    engine.generate([request(schema(fresh))])
    assert grammars.compiles == before + 1


def test_the_engine_refuses_a_constraint_it_cannot_enforce(engine: Engine) -> None:  # noqa: F811
    bad = engine.generate([request(Constraint(REGEX, "a(b")), request(schema({"not": {}}))])
    assert bad[0].error == "structured output (regex) cannot be enforced: unclosed group"
    assert bad[1].error == 'structured output (json_schema) cannot be enforced: Unimplemented keys: ["not"]'


def test_speculation_checks_drafts_against_the_grammar(engine: Engine) -> None:  # noqa: F811
    """Drafts are cut where the grammar refuses them; the text is the same with and without speculation."""
    prompt = 'Write {"label": "red", "score": 3, "ok": true} again: {"label": "red", "score": 3, "ok": true} and'
    reqs = [request(schema(SMALL), prompt), request(Constraint(CHOICE, compact(COLOURS)), prompt, temperature=0.8, seed=5)]
    plain = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, speculative_tokens=0).generate(reqs)
    speculating = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, speculative_tokens=4)
    assert speculating.generate(reqs) == plain


def test_static_batches_enforce_the_same_constraints(engine: Engine) -> None:  # noqa: F811
    static = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, static_batches=True)
    assert not static.continuous
    requests = [request(c) for c in TINY_CONSTRAINTS] + [request(None, "Hello", max_new_tokens=6)]
    results = static.generate(requests)
    assert results == engine.generate(requests)
    for constraint, result in zip(TINY_CONSTRAINTS, results):
        check(constraint, result.samples[0].text)


def test_a_decode_step_with_constrained_rows_reads_the_device_once(engine: Engine) -> None:  # noqa: F811
    busy = sync_free_engine(engine, batch_invariant=False)
    scheduler = busy.scheduler
    assert isinstance(scheduler, Scheduler)
    requests = [request(schema(QA_LIST), max_new_tokens=20, temperature=0.8, seed=1), request(None, "Free", max_new_tokens=15),
                request(Constraint(REGEX, "[a-z ]{30}"), max_new_tokens=40, temperature=0.9, top_p=0.9, seed=2)]
    for i, r in enumerate(requests):
        busy.submit(i, r)
    steps, _ = steps_each_reading_once(busy)
    assert steps >= 10


# --- the real model ----------------------------------------------------------------------------------------------

ARRAY = {
    "type": "object",
    "properties": {"colours": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]}, "minItems": 2, "maxItems": 3}},
    "required": ["colours"],
    "additionalProperties": False,
}
NUMBERS = {
    "type": "object",
    "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100}, "price": {"type": "number", "minimum": 0, "maximum": 100}},
    "required": ["year", "price"],
    "additionalProperties": False,
}
REAL_CASES = [
    ("Classify the sentiment of: 'I loved this film.' Answer in JSON.", schema(LABEL)),
    ("Invent a person and describe them in JSON.", schema(PERSON)),
    ("Name two or three colours, in JSON.", schema(ARRAY)),
    ("Give a year and a price in JSON.", schema(NUMBERS)),
    ("Write two questions about the sea with answers, in JSON.", schema(QA_LIST)),
    ("Describe a cat as a JSON object.", Constraint(JSON_OBJECT, '{"type":"object"}')),
    ("What is a phone number format? Give one.", Constraint(REGEX, PHONE)),
    ("Is the sky green? Answer yes or no.", Constraint(CHOICE, compact(["yes", "no"]))),
]


@pytest.fixture(scope="module")
def smollm2(cache_dir) -> Engine:  # noqa: F811
    from contract.registry import SMOLLM2, resolve

    return Engine.load(resolve(SMOLLM2))


def chat(prompt: str, constraint: Constraint | None, **params: Any) -> GenerationRequest:
    params.setdefault("max_new_tokens", 120)
    params.setdefault("temperature", 0)
    return GenerationRequest(SamplingParams(constraint=constraint, **params), messages=[{"role": "user", "content": prompt}])


BOUNDED = [0, 2, 3, 6, 7]
"""The cases whose answers cannot run on for long (enums, numbers, a fixed-length regex, choices): they must end 'stop'."""


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_parse_and_validate_mixed_with_free_rows(smollm2: Engine) -> None:
    """Every case greedy, and the bounded ones seeded, in one batch with free rows: every answer that ends 'stop'
    matches its constraint (JSON parsed and validated with jsonschema), and the bounded ones all end 'stop'."""
    greedy = [chat(p, c) for p, c in REAL_CASES]
    seeded = [chat(*REAL_CASES[i], temperature=0.8, top_p=0.95, seed=11 + i) for i in BOUNDED]
    free = [chat("Write a haiku about rain.", None, max_new_tokens=30), chat("Say hello.", None, max_new_tokens=20, temperature=0.7, seed=2)]
    results = smollm2.generate(greedy + seeded + free)
    for req, result in zip(greedy + seeded, results):
        [sample] = result.samples
        if sample.finish_reason == "stop":
            check(req.params.constraint, sample.text)
    ended = [r.samples[0].finish_reason for r in results]
    assert [ended[i] for i in BOUNDED] == ["stop"] * len(BOUNDED)
    assert ended[len(greedy) : len(greedy) + len(seeded)] == ["stop"] * len(seeded)
    assert all(r.samples[0].text for r in results[-2:])


@pytest.mark.slow
@needs_smollm2
def test_smollm2_seeded_constrained_text_is_the_same_alone_or_in_a_batch(smollm2: Engine) -> None:
    seeded = chat(*REAL_CASES[3], temperature=1.0, seed=5)
    [alone] = smollm2.generate([seeded])
    batch = smollm2.generate([chat("Say hello.", None, max_new_tokens=20), seeded, chat(*REAL_CASES[0])])
    assert batch[1].samples == alone.samples
    check(REAL_CASES[3][1], alone.samples[0].text)
