"""Every architecture of the fast engine's table (workers.architectures) on the continuous-batching engine, each as a
tiny random checkpoint built here and saved with SmolLM2's tokenizer (nothing from the hub): logits as transformers'
forward gives them, greedy text as its generate gives it, seeded sampling alone and in a batch, the prefix cache,
cascade attention and speculation changing no text, int8 quantization. Sliding windows are WINDOW keys, far
fewer than the prompts and outputs used, so that masking them wrongly shows. A model outside the table (GPT-2's
shape) runs on static batches, and says why."""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from transformers import PretrainedConfig

from contract.registry import SMOLLM2_GGUF, resolve, smollm2_dir
from tests.helpers import prefill
from tests.test_engine import PROMPTS, _smollm2_available, cache_dir, reference_generate, text_of  # noqa: F401
from tests.test_prefix_cache import QUESTIONS, chat, texts
from tests.test_speculation import COPY_ME
import workers.attention
import workers.kv_cache
from workers import loader
from workers.decoder import DecoderRunner
from workers.engine import Engine
from workers.graphs import DecodeGraphs
from workers.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.skipif(not _smollm2_available(), reason="the tokenizer comes from the bundled SmolLM2 GGUF")

WINDOW = 8
"""Sliding windows, in keys: every prompt below is longer."""
SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    initializer_range=0.1,  # larger than the default 0.02: sharper attention and logits, so a wrong detail shows
)
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW)
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def gemma3_text(vocab: int) -> dict:
    return dict(
        SHAPE, **GEMMA, vocab_size=vocab, layer_types=ALTERNATING, final_logit_softcapping=3.0,
        attn_logit_softcapping=4.0,  # which Gemma 3 ignores, as transformers does
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )


def gemma3_multimodal(vocab: int) -> PretrainedConfig:
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
    )
    config = transformers.Gemma3Config(text_config=gemma3_text(vocab), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 2, 2, 1
    return config


CONFIGS: dict[str, Callable[[int], PretrainedConfig]] = {
    "llama3-rope": lambda v: transformers.LlamaConfig(**SHAPE, vocab_size=v, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "qwen2": lambda v: transformers.Qwen2Config(
        **SHAPE, vocab_size=v, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
    ),
    "qwen3": lambda v: transformers.Qwen3Config(**SHAPE, vocab_size=v, head_dim=16, tie_word_embeddings=True),
    "mistral": lambda v: transformers.MistralConfig(**SHAPE, vocab_size=v, sliding_window=WINDOW),
    "phi3": lambda v: transformers.Phi3Config(**SHAPE, vocab_size=v, sliding_window=WINDOW, partial_rotary_factor=0.5),
    "gemma": lambda v: transformers.GemmaConfig(**SHAPE, vocab_size=v, head_dim=16),
    "gemma2": lambda v: transformers.Gemma2Config(
        **SHAPE, **GEMMA, vocab_size=v, attn_logit_softcapping=4.0, final_logit_softcapping=3.0,
    ),
    "gemma3": lambda v: transformers.Gemma3TextConfig(**gemma3_text(v)),
    "gemma3-multimodal": gemma3_multimodal,
}
ARCHITECTURE = {
    "llama3-rope": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "gemma3-multimodal": "Gemma3ForConditionalGeneration",
}


@pytest.fixture(scope="module")
def tokenizer(cache_dir: Path):  # noqa: F811
    return loader.load_gguf_tokenizer(str(smollm2_dir()), SMOLLM2_GGUF)


def save_random(config: PretrainedConfig, tokenizer, folder: Path, seed: int = 0) -> Path:
    """A random model of config saved as a checkpoint folder, SmolLM2's tokenizer beside it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(CONFIGS))
def engine(request: pytest.FixtureRequest, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The architecture's checkpoint, loaded as a worker loads a model folder (float32: batch-invariant)."""
    folder = save_random(CONFIGS[request.param](len(tokenizer)), tokenizer, tmp_path_factory.mktemp(request.param))
    spec = resolve(str(folder))
    loaded = Engine.load(spec, max_batch_rows=8)
    assert type(loaded.model).__name__ == ARCHITECTURE[request.param]
    assert spec.context_length == loaded.context_length == SHAPE["max_position_embeddings"]  # the producer's check too
    assert loaded.continuous, f"{request.param} fell back to static batches"
    return loaded


def like(engine: Engine, model: torch.nn.Module | None = None, dtype: str | None = None, **kwargs) -> Engine:
    """The same (or another) loaded model behind a fresh engine with other settings."""
    return Engine(model or engine.model, engine.tokenizer, "cpu", engine.model_name, dtype or engine.dtype, **kwargs)


def forward_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' forward on one unpadded sequence: the last position's logits."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("path", ["eager", "static", "kernels"])
def test_logits_are_transformers_on_the_prefill_and_every_decode_step(engine: Engine, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """static: the decode steps in the shapes a CUDA graph records (workers.graphs: attention over the cache's
    whole capacity, every sliding window masked), run eagerly. kernels: those steps as a CUDA engine runs them
    (not batch-invariant, keys stored by position, scaled_dot_product_attention but where a soft cap needs the
    products), on the CPU."""
    runner, model = engine.runner, engine.model
    assert runner is not None
    if path == "kernels":
        monkeypatch.setattr(workers.attention, "KERNEL_DEVICES", frozenset({"cpu"}))
        monkeypatch.setattr(workers.kv_cache, "KEYS_BY_POSITION", frozenset({"cpu"}))
        runner = DecoderRunner(model, batch_invariant=False)
    decode = runner.decode if path == "eager" else DecodeGraphs(runner, capture=False).decode
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert max(map(len, prompts)) > WINDOW
    sequences = [list(p) for p in prompts]
    cache = runner.new_cache(len(prompts), 64, engine.device)
    assert cache.keys_by_position == (path == "kernels")
    with torch.inference_mode():
        logits = prefill(runner, cache, prompts)
        for step in range(12):  # every row's sequence grows past the window
            for row, ids in enumerate(sequences):
                torch.testing.assert_close(logits[row].float(), forward_logits(model, ids), rtol=1e-4, atol=1e-4,
                                           msg=lambda m, step=step, row=row: f"step {step}, row {row}: {m}")
            tokens = logits.argmax(-1)
            for ids, token in zip(sequences, tokens.tolist()):
                ids.append(token)
            logits = decode(cache, tokens)


def test_greedy_text_is_transformers_generate(engine: Engine) -> None:
    results = engine.generate([GenerationRequest(SamplingParams(max_new_tokens=20, temperature=0), prompt=p) for p in PROMPTS])
    expected = reference_generate(engine, PROMPTS, do_sample=False, max_new_tokens=20)
    assert [r.samples[0].text for r in results] == [text_of(engine, ids) for ids in expected]


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_batch(engine: Engine) -> None:
    target = GenerationRequest(SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.9, seed=7), prompt=PROMPTS[3])
    others = [
        GenerationRequest(SamplingParams(max_new_tokens=10 + 3 * i, temperature=1.1, top_k=20, seed=i), prompt=PROMPTS[i % 4])
        for i in range(7)
    ]
    (alone,) = like(engine, max_batch_rows=8).generate([target])
    together = like(engine, max_batch_rows=8).generate(others[:3] + [target] + others[3:])
    assert together[3] == alone


def test_the_prefix_cache_changes_no_text_and_is_used(engine: Engine) -> None:
    requests = [chat(q, max_new_tokens=12) for q in QUESTIONS[:4]]
    without = texts(like(engine, prefix_cache_tokens=0), requests)
    caching = like(engine, max_batch_rows=2)  # rows join later and find the system prompt cached
    results = caching.generate(requests)
    assert [[s.text for s in r.samples] for r in results] == without
    assert sum(s.cached_tokens for r in results for s in r.samples) > 0


def test_cascade_attention_over_a_shared_base_changes_no_text(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float64, not batch-invariant: the system prompt held once as the cache's base (read by every row, through
    the sliding windows too) against no base."""
    import workers.decoder
    import workers.scheduler

    model = copy.deepcopy(engine.model).double()
    calls: list[int] = []
    real = workers.decoder.cascade_attention

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    requests = [chat(q, max_new_tokens=12) for q in QUESTIONS] + [chat(QUESTIONS[0], system=None, max_new_tokens=12)]
    monkeypatch.setattr(workers.decoder, "cascade_attention", counted)
    monkeypatch.setattr(workers.scheduler, "MIN_SHARED", 10**9)
    alone = texts(like(engine, model, "float64", max_batch_rows=8, batch_invariant=False), requests)
    assert not calls
    monkeypatch.setattr(workers.scheduler, "MIN_SHARED", 32)
    assert texts(like(engine, model, "float64", max_batch_rows=8, batch_invariant=False), requests) == alone
    assert calls


def test_speculation_changes_no_text(engine: Engine) -> None:
    requests = [
        GenerationRequest(SamplingParams(max_new_tokens=24, **params), prompt=COPY_ME + f" ({i})")
        for i, params in enumerate([{"temperature": 0}, {"temperature": 0.8, "seed": 3}, {"temperature": 0}])
    ]
    off = like(engine, speculative_tokens=0).generate(requests)
    speculating = like(engine, speculative_tokens=6)
    assert speculating.scheduler.speculation is not None
    speculating.scheduler.speculation.always = True
    on = speculating.generate(requests)
    assert on == off
    assert sum(s.draft_tokens for r in on for s in r.samples) > 0  # verify passes ran


def test_int8_weights_give_the_quantized_models_logits(engine: Engine) -> None:
    from workers.quantize import quantize_model

    model = quantize_model(copy.deepcopy(engine.model), "int8")
    quantized = like(engine, model, quantize="int8")
    assert quantized.continuous and "Int8" in type(quantized.runner.layers[0].mlp.down_proj.weight).__name__
    prompt = engine.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    cache = quantized.runner.new_cache(1, 64, engine.device)
    with torch.inference_mode():
        logits = prefill(quantized.runner, cache, [prompt])[0].float()
    torch.testing.assert_close(logits, forward_logits(model, prompt), rtol=1e-3, atol=1e-3)
    (result,) = quantized.generate([GenerationRequest(SamplingParams(max_new_tokens=8, temperature=0), prompt=PROMPTS[0])])
    assert result.samples[0].completion_tokens > 0


# --- outside the table -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    return save_random(config, tokenizer, tmp_path_factory.mktemp("gpt2"))


def test_a_model_outside_the_table_runs_on_static_batches_and_says_why(gpt2_folder: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="workers.engine"):
        engine = Engine.load(resolve(str(gpt2_folder)), max_batch_rows=4)
    assert not engine.continuous and engine.runner is None
    assert "GPT2LMHeadModel is not on the fast engine" in caplog.text
    results = engine.generate([GenerationRequest(SamplingParams(max_new_tokens=12, temperature=0), prompt=p) for p in PROMPTS])
    expected = reference_generate(engine, PROMPTS, do_sample=False, max_new_tokens=12)
    assert [r.samples[0].text for r in results] == [text_of(engine, ids) for ids in expected]


@pytest.mark.slow
def test_a_worker_holding_a_model_outside_the_table_says_why_and_completes_its_job(
    gpt2_folder: Path, sqlite_url: str, broker_url: str, tmp_path: Path
) -> None:
    from tests.helpers import WorkerProcess, env_for, producer, wait_for_job, write_jsonl

    env = env_for(sqlite_url, broker_url)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Request {i}:", "max_new_tokens": 6} for i in range(5)])
    job = int(producer(["submit", str(prompts), "--model", str(gpt2_folder)], env, check=True).stdout.split()[-1])
    worker = WorkerProcess(env, model=str(gpt2_folder))
    try:
        assert wait_for_job(sqlite_url, job, timeout=240) == "completed"
    finally:
        worker.stop()
    log = worker.output()
    assert "static batches on transformers' forward: architecture GPT2LMHeadModel is not on the fast engine" in log


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_joint_qk_norm_gives_q_norm_and_k_norm_exactly(tokenizer, name: str, dtype: torch.dtype) -> None:
    """The runner norms q's and k's heads in one call (workers.decoder.joint_qk_norm): with q_norm's and k_norm's
    weights made different (a fresh model's are equal), each is what the model's own two modules give."""
    from workers.decoder import DecoderRunner

    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](len(tokenizer))).to(dtype)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_()
            layer.self_attn.k_norm.weight.normal_()
    runner = DecoderRunner(model, batch_invariant=False)
    assert all(norm is not None for norm in runner.qk_norms)
    h = torch.randn(3, 5, SHAPE["hidden_size"], dtype=dtype)
    with torch.inference_mode():
        for layer, joint in zip(model.model.layers, runner.qk_norms):
            together, apart = runner._qkv(layer.self_attn, h, joint), runner._qkv(layer.self_attn, h, None)
            for got, expected in zip(together, apart):
                assert torch.equal(got, expected)
