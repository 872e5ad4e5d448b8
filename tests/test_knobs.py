"""The knobs users of these models set: min_p, min_tokens, stop_token_ids, ignore_eos, logit_bias, on both engine
paths (continuous and static batches), on the tiny random model in float32."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from contract.registry import TINY, resolve
from workers.engine import Engine
from workers.sampling import kept_by_threshold, top_candidates
from workers.types import GenerationRequest, GenerationResult, SamplingParams, resolve_params

PROMPT = "The quick brown fox jumps over the lazy dog and then"
FORCED = 1000
"""An ordinary token of SmolLM2's vocabulary, to push with logit_bias."""


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(resolve(TINY), "cpu", "float32")


@pytest.fixture(scope="module", params=["continuous", "static"])
def either(request: pytest.FixtureRequest, engine: Engine) -> Engine:
    """The same model behind each scheduler: every knob must work on both."""
    if request.param == "continuous":
        return engine
    return Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, static_batches=True)


def run(engine: Engine, prompt: str = PROMPT, **params) -> GenerationResult:  # type: ignore[no-untyped-def]
    [result] = engine.generate([GenerationRequest(SamplingParams(**params), prompt=prompt)])
    assert result.error is None, result.error
    return result


def greedy_ids(engine: Engine, prompt: str, count: int, bias: dict[int, float] | None = None) -> list[int]:
    """transformers' forward, greedy, with the bias added to each step's logits: what the engine should pick."""
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(count):
            logits = engine.model(torch.tensor([ids + out])).logits[0, -1].float()
            for token, value in (bias or {}).items():
                logits[token] += value
            out.append(int(logits.argmax()))
    return out


def eos(engine: Engine) -> int:
    return min(engine.eos_ids)


def test_logit_bias_minus_100_on_the_greedy_token_changes_it(either: Engine) -> None:
    [first] = greedy_ids(either, PROMPT, 1)
    expected = greedy_ids(either, PROMPT, 4, {first: -100})
    assert expected[0] != first
    sample = run(either, temperature=0, max_new_tokens=4, logit_bias={first: -100}).samples[0]
    assert sample.text == either.tokenizer.decode(expected, skip_special_tokens=True)


def test_logit_bias_plus_100_forces_a_token_greedy_and_sampled(either: Engine) -> None:
    forced = either.tokenizer.decode([FORCED] * 5, skip_special_tokens=True)
    assert run(either, temperature=0, max_new_tokens=5, logit_bias={FORCED: 100}).samples[0].text == forced
    assert run(either, temperature=1.0, seed=3, max_new_tokens=5, logit_bias={FORCED: 100}).samples[0].text == forced


def test_min_tokens_holds_back_eos_until_reached(either: Engine) -> None:
    eager = {eos(either): 100}  # EOS would come first
    assert run(either, temperature=0, max_new_tokens=10, logit_bias=eager).samples[0].completion_tokens == 0
    held = run(either, temperature=0, max_new_tokens=10, logit_bias=eager, min_tokens=4).samples[0]
    assert (held.finish_reason, held.completion_tokens) == ("stop", 4)
    sampled = run(either, temperature=1.0, seed=9, max_new_tokens=10, logit_bias=eager, min_tokens=6).samples[0]
    assert (sampled.finish_reason, sampled.completion_tokens) == ("stop", 6)


def test_min_tokens_holds_back_stop_token_ids_and_stop_strings(either: Engine) -> None:
    forced_text = either.tokenizer.decode([FORCED], skip_special_tokens=True)
    held = run(either, temperature=0, max_new_tokens=10, logit_bias={FORCED: 100}, stop_token_ids=[FORCED], min_tokens=3)
    assert (held.samples[0].finish_reason, held.samples[0].completion_tokens) == ("stop", 3)
    assert forced_text not in held.samples[0].text
    ids = greedy_ids(either, PROMPT, 8)
    text = either.tokenizer.decode(ids, skip_special_tokens=True)
    stop = either.tokenizer.decode(ids[:1], skip_special_tokens=True)
    assert run(either, temperature=0, max_new_tokens=8, stop=[stop]).samples[0].completion_tokens == 1
    late = run(either, temperature=0, max_new_tokens=8, stop=[stop], min_tokens=5).samples[0]
    assert late.completion_tokens >= 5 and late.text == text[: text.find(stop)]


def test_stop_token_ids_end_the_row_with_stop(either: Engine) -> None:
    prompt = "Hello there, how"
    ids = greedy_ids(either, prompt, 12)
    at = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # the random model repeats itself a while
    sample = run(either, prompt, temperature=0, max_new_tokens=12, stop_token_ids=[ids[at]]).samples[0]
    assert (sample.finish_reason, sample.completion_tokens) == ("stop", at)
    assert sample.text == either.tokenizer.decode(ids[:at], skip_special_tokens=True)


def test_ignore_eos_runs_to_max_new_tokens(either: Engine) -> None:
    eager = {eos(either): 100}
    sample = run(either, temperature=0, max_new_tokens=6, logit_bias=eager, ignore_eos=True).samples[0]
    assert (sample.finish_reason, sample.completion_tokens) == ("length", 6)
    stopped = run(either, temperature=0, max_new_tokens=6, logit_bias=eager, ignore_eos=True, stop_token_ids=[eos(either)])
    assert stopped.samples[0].completion_tokens == 0  # a stop_token_id still ends it, EOS or not


@pytest.mark.parametrize("min_p", [0.02, 0.1, 0.5])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (50, 1.0), (0, 0.9), (200, 0.95)])
def test_min_p_keeps_what_transformers_min_p_warper_keeps(min_p: float, top_k: int, top_p: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3000, generator=generator) * torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])[:, None]
    temperature = torch.full((6,), 0.8)
    scaled = logits / temperature[:, None]
    warped = scaled.clone()
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1.0:
        warped = TopPLogitsWarper(top_p)(None, warped)
    expected = MinPLogitsWarper(min_p)(None, warped) > -torch.inf
    k, p, m = torch.full((6,), top_k), torch.full((6,), top_p), torch.full((6,), min_p)
    assert torch.equal(kept_by_threshold(scaled, k, p, m), expected)
    values, index, kept = top_candidates(logits, temperature, k, p, min_p=m)
    ranked = torch.zeros_like(expected).scatter(-1, index, kept)
    assert torch.equal(ranked, expected)
    assert expected.sum() < (warped > -torch.inf).sum()  # min-p removed something


def test_min_p_one_is_greedy_and_min_p_narrows_samples(either: Engine) -> None:
    greedy = run(either, temperature=0, max_new_tokens=8).samples[0].text
    assert run(either, temperature=1.5, seed=1, max_new_tokens=8, min_p=1.0).samples[0].text == greedy
    assert run(either, temperature=1.5, seed=1, max_new_tokens=8).samples[0].text != greedy


KNOBS = [
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.0, logit_bias={FORCED: 5.0, 13: -100}),
    dict(temperature=0.8, top_k=40, min_tokens=6, stop_token_ids=[FORCED]),
    dict(temperature=1.2, ignore_eos=True, min_p=0.02, top_p=0.95),
    dict(temperature=0.0, logit_bias={FORCED: 3.0}, min_tokens=2),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(k))
def test_seeded_rows_with_each_knob_are_the_same_alone_and_in_a_batch(either: Engine, knobs: dict) -> None:
    target = GenerationRequest(SamplingParams(max_new_tokens=12, seed=42, n=2, **knobs), prompt=PROMPT)
    others = [
        GenerationRequest(SamplingParams(max_new_tokens=4 + 3 * i, seed=7 + i, **other), prompt=f"{i}: once upon a time")
        for i, other in enumerate([*KNOBS, dict(temperature=0.7, top_p=0.9), dict(temperature=0)])
    ]
    [alone] = either.generate([target])
    together = either.generate(others[:3] + [target] + others[3:])
    assert together[3] == alone


def test_the_engine_refuses_token_ids_beyond_its_vocabulary(engine: Engine) -> None:
    vocab = engine.model.config.vocab_size
    for params in (SamplingParams(stop_token_ids=[vocab]), SamplingParams(logit_bias={vocab + 5: 1.0})):
        [result] = engine.generate([GenerationRequest(params, prompt=PROMPT)])
        assert result.error is not None and f"beyond the model's vocabulary of {vocab}" in result.error
    [result] = engine.generate([GenerationRequest(SamplingParams(logit_bias={5: 101.0}), prompt=PROMPT)])
    assert result.error == "logit_bias[5]: must be in [-100, 100], got 101."
    [result] = engine.generate([GenerationRequest(SamplingParams(min_tokens=300), prompt=PROMPT)])
    assert result.error is not None and result.error.startswith("min_tokens: must be <= max_new_tokens")


def test_stored_params_become_the_engines(engine: Engine) -> None:
    """The store keeps JSON: logit_bias keys come back as text and become token ids."""
    params = resolve_params({}, {"logit_bias": {"5": -100, "17": 2}, "min_p": 0.1, "min_tokens": 2, "stop_token_ids": [9],
                                 "ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    assert params.logit_bias == {5: -100.0, 17: 2.0} and params.stop_token_ids == [9] and params.ignore_eos
    assert (params.min_p, params.min_tokens, params.chat_template_kwargs) == (0.1, 2, {"enable_thinking": False})
    assert params.problem() is None


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_chat_template_kwargs_reach_the_template(engine: Engine) -> None:
    tokenizer = copy.deepcopy(engine.tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    thinking = Engine(engine.model, tokenizer, "cpu", engine.model_name, engine.dtype)
    messages = [{"role": "user", "content": "2+2?"}]
    on = thinking.render(GenerationRequest(SamplingParams(), messages=messages))
    off = thinking.render(GenerationRequest(SamplingParams(chat_template_kwargs={"enable_thinking": False}), messages=messages))
    assert "<think>" not in on and off == on + "<think>\n\n</think>\n\n"
    [result] = thinking.generate([GenerationRequest(SamplingParams(max_new_tokens=2, chat_template_kwargs={"enable_thinking": False}),
                                                    messages=messages)])
    assert result.error is None and result.prompt_tokens == len(tokenizer(off, add_special_tokens=False).input_ids)
    [refused] = engine.generate([GenerationRequest(SamplingParams(chat_template_kwargs={"tokenize": True}), messages=messages)])
    assert refused.error == "chat_template_kwargs: 'tokenize' is set by the engine, not by a request"
