"""Attention from fused kernels, as a CUDA engine runs it (workers.attention: scaled_dot_product_attention over keys
stored by position, the cascade's two parts merged by log-sum-exp), checked on the CPU by letting the CPU take the
CUDA path (KERNEL_DEVICES, KEYS_BY_POSITION): against float64 attention, the same texts as the products, and a
kernel that gives wrong numbers is caught before it is used. (Which kernel SDPA picks on a card: bench.gpu.)"""
from __future__ import annotations

import logging
import math
from dataclasses import fields, is_dataclass

import pytest
import torch
from torch.nn import functional as F

import workers.attention
import workers.kv_cache
from tests.test_engine import PROMPTS, cache_dir, engine  # noqa: F401
from tests.test_prefix_cache import QUESTIONS, chat
from tests.test_sync_free import mixed_requests, steps_each_reading_once
from workers.attention import LSE_KERNELS, attention, cascade_attention, fused, kernel, lse_kernel_works
from workers.engine import Engine
from workers.kv_cache import KVCache
from workers.types import GenerationRequest, GenerationResult, SamplingParams

BOTH = frozenset({"cpu", "cuda"})


@pytest.fixture
def cuda_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU runs what a CUDA device runs: SDPA, the checked log-sum-exp kernel, keys stored by position."""
    monkeypatch.setattr(workers.attention, "KERNEL_DEVICES", BOTH)
    monkeypatch.setattr(workers.kv_cache, "KEYS_BY_POSITION", BOTH)
    monkeypatch.setattr(workers.attention, "_LSE_CHECKED", {})


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention in float64 with K/V repeated per query head: q (rows, heads, tokens, d), k and v (rows, kv_heads,
    keys, d), visible (rows, 1, tokens, keys)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)
    return torch.softmax(scores, -1) @ v


def by_position(k: torch.Tensor) -> torch.Tensor:
    """k (..., keys, d) as a KVCache that stores keys by position hands it over: transposed (..., d, keys), a view."""
    return k.contiguous().transpose(-1, -2)


def visible_keys(rows: int, tokens: int, keys: int, window: int | None, seed: int) -> torch.Tensor:
    """Each row's queries at its own length (causal), some rows short (padding keys masked), maybe a window."""
    lengths = torch.randint(tokens, keys + 1, (rows,), generator=torch.Generator().manual_seed(seed))
    queries = lengths[:, None] - tokens + torch.arange(tokens)[None]  # (rows, tokens)
    positions = torch.arange(keys)
    seen = positions <= queries[..., None]
    if window is not None:
        seen &= positions > queries[..., None] - window
    return seen[:, None]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens,window", [(1, None), (1, 5), (6, None), (6, 4)])
def test_sdpa_attention_is_float64_attention(
    cuda_path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tolerance: float, tokens: int, window: int | None
) -> None:
    generator = torch.Generator().manual_seed(tokens)
    rows, heads, kv_heads, keys, d = 5, 8, 2, 37, 16
    q = torch.randn(rows, heads, tokens, d, generator=generator).to(dtype)
    k, v = (torch.randn(rows, kv_heads, keys, d, generator=generator).to(dtype) for _ in range(2))
    visible = visible_keys(rows, tokens, keys, window, seed=tokens)
    assert kernel(q) and not kernel(q, min_queries=8) and not kernel(q, softcap=4.0)
    calls = []
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)  # workers.attention looks it up at every call
    got = attention(q, by_position(k), v, visible, 0.3)
    assert calls == [1]
    torch.testing.assert_close(got.double(), reference(q, k, v, visible, 0.3), rtol=tolerance, atol=tolerance)
    products = attention(q, by_position(k), v, visible, 0.3, min_queries=8)  # the products, as before
    torch.testing.assert_close(got.double(), products.double(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("prefix", ["whole", "per-row", "per-query"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_the_fused_cascade_is_float64_attention_over_the_prefix_and_each_rows_own_keys(cuda_path, prefix: str, tokens: int) -> None:
    """The cascade's two parts from the checked log-sum-exp kernel, merged: attention over [prefix, own keys],
    including rows that read none of the prefix (their prefix part sees nothing)."""
    generator = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, shared, keys, d = 4, 4, 2, 24, 11, 16
    q = torch.randn(rows, heads, tokens, d, generator=generator)
    shared_k, shared_v = (torch.randn(kv_heads, shared, d, generator=generator) for _ in range(2))
    k, v = (torch.randn(rows, kv_heads, keys, d, generator=generator) for _ in range(2))
    visible = visible_keys(rows, tokens, keys, None, seed=3)
    shared_visible = None
    if prefix == "per-row":
        shared_visible = torch.arange(shared)[None] < torch.tensor([shared, 0, 10, shared])[:, None]
    elif prefix == "per-query":
        shared_visible = torch.rand(rows, tokens, shared, generator=generator) < 0.5
        shared_visible[1] = False
    assert fused(q)
    got = cascade_attention(q, by_position(shared_k), shared_v, by_position(k), v, visible, 0.2, shared_visible)
    seen_prefix = torch.ones(rows, tokens, shared, dtype=torch.bool) if shared_visible is None else (
        shared_visible if shared_visible.dim() == 3 else shared_visible[:, None].expand(rows, tokens, shared))
    whole_visible = torch.cat([seen_prefix[:, None], visible], dim=-1)
    whole_k = torch.cat([shared_k.expand(rows, -1, -1, -1), k], dim=2)
    whole_v = torch.cat([shared_v.expand(rows, -1, -1, -1), v], dim=2)
    torch.testing.assert_close(got.double(), reference(q, whole_k, whole_v, whole_visible, 0.2), rtol=1e-5, atol=1e-5)


def test_a_log_sum_exp_kernel_that_is_wrong_or_missing_is_never_used(cuda_path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Each device's kernel is a private ATen entry point: it is checked against float64 once, and where it fails
    the cascade keeps the products (and still gives attention's numbers)."""
    real = LSE_KERNELS["cpu"]

    def off_by_one(q, k, v, visible, scale):
        out, lse = real(q, k, v, visible, scale)
        return out, lse + 1

    def missing(q, k, v, visible, scale):
        raise NotImplementedError("no kernel for this backend")

    q = torch.randn(2, 4, 1, 16)
    for broken, said in ((off_by_one, "gives wrong numbers"), (missing, "is not available")):
        monkeypatch.setattr(workers.attention, "_LSE_CHECKED", {})
        monkeypatch.setitem(LSE_KERNELS, "cpu", broken)
        with caplog.at_level(logging.WARNING, logger="workers.attention"):
            caplog.clear()
            assert not fused(q) and not fused(q)
        assert [r.getMessage() for r in caplog.records if said in r.getMessage()] != []
        assert len(caplog.records) == 1  # checked once per device and dtype
    monkeypatch.setitem(LSE_KERNELS, "cpu", real)
    monkeypatch.setattr(workers.attention, "_LSE_CHECKED", {})
    assert lse_kernel_works(torch.device("cpu"), torch.float32) and lse_kernel_works(torch.device("cpu"), torch.bfloat16)


def test_keys_stored_by_position_hold_what_transposed_keys_hold_through_every_verb() -> None:
    """The same verbs on both layouts: the same K at every index, and keys by position stay d-contiguous (what
    SDPA reads without a copy), base included."""
    caches = [KVCache(2, 2, 4, 5, 12, torch.float32, torch.device("cpu"), keys_by_position=b) for b in (False, True)]
    transposed, positional = caches
    assert transposed.keys.stride(-1) == 1 and positional.keys.stride(-2) == 1
    generator = torch.Generator().manual_seed(0)
    k = torch.randn(4, 2, 6, 4, generator=generator)
    v = torch.randn(4, 2, 6, 4, generator=generator)
    base_k = torch.randn(2, 2, 4, 8, generator=generator)  # transposed and contiguous, as the prefix cache gathers it
    for cache in caches:
        cache.admit([0, 0, 0, 0])
        for layer in range(2):
            cache.write(layer, 0, k, v, None)
        cache.extend(0, [6, 6, 6, 6])
        for layer in range(2):
            cache.write(layer, 0, k[:, :, :1] + 1, v[:, :, :1], cache.lengths[:4, None])
        cache.advance()
        cache.release([1])
        cache.truncate(0, 5)
        cache.set_base(base_k, torch.randn(2, 2, 8, 4, generator=torch.Generator().manual_seed(1)))
        cache.rebase(2, 3)
        cache.place(1, 2, *cache.read(0, 0, 3))
    positional_reshaped = positional.reshaped(4, 9)
    for got, want in ((positional, transposed), (positional_reshaped, transposed.reshaped(4, 9))):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        assert torch.equal(got.base_keys, want.base_keys) and got.host_lengths == want.host_lengths
        assert got.keys.stride(-2) == 1 and got.base_keys.stride(-2) == 1
        assert torch.equal(got.view(0, 0, 3, 7)[0], want.view(0, 0, 3, 7)[0])


def requests_with_a_shared_system_prompt() -> list[GenerationRequest]:
    """Rows that share a long system prompt (the base and the cascade), beside mixed sampling without one."""
    shared = [GenerationRequest(SamplingParams(max_new_tokens=10, temperature=0.0), messages=chat(q)) for q in QUESTIONS]
    return shared + mixed_requests()


def assert_same_up_to_rounding(got: list[GenerationResult], expected: list[GenerationResult]) -> None:
    """The fields results compare equal by (texts, tokens, reasons, logprobs' tokens), logprobs' numbers within
    float32 rounding of sums taken in another order."""
    def compared(value):
        if is_dataclass(value):
            return {f.name: compared(getattr(value, f.name)) for f in fields(value) if f.compare}
        return [compared(v) for v in value] if isinstance(value, list) else value

    def first_difference(a, b, path: str = "") -> str | None:
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            return next((d for k in b if (d := first_difference(a[k], b[k], f"{path}.{k}"))), None)
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := first_difference(x, y, f"{path}[{i}]"))), None)
        same = a == pytest.approx(b, abs=1e-4) if isinstance(b, float) else a == b
        return None if same else f"{path}: {a!r} != {b!r}"

    difference = first_difference(compared(got), compared(expected))
    assert difference is None, difference


def test_the_cuda_path_gives_the_products_texts(engine: Engine, cuda_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Everything a CUDA engine runs (SDPA in prefills and decode steps, graphed or not, the fused cascade, keys by
    position, overlap, speculation's verify passes) against the products over transposed keys, float32: the
    same texts (logprobs within rounding). The kernels are counted, so that the path is known to be taken."""
    requests = requests_with_a_shared_system_prompt()
    settings = dict(max_batch_rows=12, batch_invariant=False)
    monkeypatch.setattr(workers.attention, "KERNEL_DEVICES", frozenset())
    monkeypatch.setattr(workers.kv_cache, "KEYS_BY_POSITION", frozenset())
    made = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, **settings)
    expected = made.generate(requests)
    monkeypatch.setattr(workers.attention, "KERNEL_DEVICES", BOTH)
    monkeypatch.setattr(workers.kv_cache, "KEYS_BY_POSITION", BOTH)
    monkeypatch.setattr(workers.attention, "_LSE_CHECKED", {})
    calls = {"sdpa": 0, "lse": 0}
    sdpa, lse = F.scaled_dot_product_attention, LSE_KERNELS["cpu"]

    def counted_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    def counted_lse(*args, **kwargs):
        calls["lse"] += 1
        return lse(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_sdpa)
    monkeypatch.setitem(LSE_KERNELS, "cpu", counted_lse)
    for options in (dict(cuda_graphs=True, overlap=True), dict(cuda_graphs=False, overlap=False, speculative_tokens=4)):
        calls.update(sdpa=0, lse=0)
        made = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, **settings, **options)
        assert workers.attention._LSE_CHECKED == {("cpu", None, torch.float32): True}  # checked at load, passed
        assert made.scheduler.cache is None or made.scheduler.cache.keys_by_position  # type: ignore[attr-defined]
        assert_same_up_to_rounding(made.generate(requests), expected)
        assert calls["sdpa"] > 0 and calls["lse"] > 0, calls


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "static"])
def test_the_cuda_path_reads_the_device_once_per_decode_step(engine: Engine, cuda_path, graphs: bool) -> None:  # noqa: F811
    """SDPA and the fused cascade read nothing on the host: every decode step still reads the device once (the
    cascade's rows share a system prompt; static: the graphed steps' shapes, after the cascade ends)."""
    busy = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=16,
                  speculative_tokens=0, batch_invariant=False, cuda_graphs=graphs)
    busy.scheduler.batch.sort_free = True  # type: ignore[attr-defined]
    busy.eos_ids = frozenset()
    for i, request in enumerate(mixed_requests()):
        busy.submit(i, request)
    steps, _ = steps_each_reading_once(busy)
    assert steps >= 20 and workers.attention._LSE_CHECKED == {("cpu", None, torch.float32): True}


def test_a_mask_for_a_kernel_that_wants_aligned_rows_is_the_mask_with_its_rows_16_apart() -> None:
    """What the CUDA log-sum-exp kernel is given (its rows aligned as scaled_dot_product_attention's preprocessing
    aligns them): the same additive mask, its rows stored 16 elements apart."""
    visible = torch.rand(2, 1, 3, 21, generator=torch.Generator().manual_seed(0)) < 0.5
    plain, aligned = workers.attention._bias(visible, torch.bfloat16), workers.attention._bias(visible, torch.bfloat16, 32)
    assert torch.equal(plain, aligned) and aligned.stride(-2) == 32 and plain.is_contiguous()
    assert torch.equal(plain == 0, visible) and bool(torch.isinf(plain[~visible]).all())
