"""Prefix caching: prompts that start alike reuse the K/V already computed, and nothing they generate changes."""
from __future__ import annotations

import pytest
import torch

from tests.test_engine import cache_dir, engine  # noqa: F401
from workers.engine import Engine
from workers.kv_cache import KVCache
from workers.prefix_cache import BLOCK, PrefixCache, block_keys, reusable_blocks
from workers.speculation import SPECULATIVE_TOKENS
from workers.types import GenerationRequest, SamplingParams

SYSTEM = (
    "You label customer messages. Answer with one word: billing, delivery, product or other. "
    "Examples. 'My card was charged twice' -> billing. 'The parcel never came' -> delivery. "
    "'The handle broke after a day' -> product. 'Do you have a shop in Lyon?' -> other. "
    "'I was billed for a month I cancelled' -> billing. 'The courier left it in the rain' -> delivery."
)
QUESTIONS = [
    "The invoice shows the wrong address.",
    "Where is my order?",
    "The zip is stuck.",
    "Can I pay in instalments?",
    "It arrived broken.",
    "Do you ship to Norway?",
]


def with_prefix_cache(engine: Engine, tokens: int, rows: int = 8) -> Engine:
    """The same loaded model behind an engine with a prefix cache of `tokens` (0: off)."""
    return Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=rows, prefix_cache_tokens=tokens)


def chat(question: str, system: str | None = SYSTEM, **params) -> GenerationRequest:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return GenerationRequest(SamplingParams(**({"max_new_tokens": 10, "temperature": 0} | params)), messages=messages)


def texts(engine: Engine, requests: list[GenerationRequest]) -> list[list[str]]:
    return [[s.text for s in r.samples] for r in engine.generate(requests)]


def test_block_keys_name_a_block_by_every_token_before_it() -> None:
    a = list(range(40))
    b = [99] + a[1:]  # the same tokens from position 1 on: no block is the same
    assert [k for k, _ in block_keys(a)] != [k for k, _ in block_keys(b)]
    assert block_keys(a)[1][1] == block_keys(b)[1][1] and block_keys(a)[1][0] != block_keys(b)[1][0]
    assert len(block_keys(a)) == 40 // BLOCK and block_keys(a, 1) == block_keys(a)[:1]
    assert block_keys(a[: BLOCK - 1]) == []


def small_cache(capacity: int = 64) -> KVCache:
    return KVCache(layers=2, kv_heads=1, head_dim=2, slots=4, capacity=capacity, dtype=torch.float32, device=torch.device("cpu"))


def cached_blocks(prefix: PrefixCache, ids: list[int]) -> int:
    """How many of a prompt's first blocks the cache holds (at most its reusable_blocks); touches none."""
    return prefix.held(block_keys(ids, reusable_blocks(ids)))


def test_store_then_load_copies_exactly_the_blocks_and_leaves_the_last_token_to_compute() -> None:
    cache, prefix = small_cache(), PrefixCache(max_tokens=1024)
    ids = list(range(3 * BLOCK))  # exactly three blocks
    cache.admit([0])
    cache.keys[:, 0] = torch.randn_like(cache.keys[:, 0])
    cache.values[:, 0] = torch.randn_like(cache.values[:, 0])
    assert prefix.store(cache, 0, block_keys(ids)) == 3 and prefix.store(cache, 0, block_keys(ids)) == 0
    # the same prompt again: two blocks copied, the third computed (its last token's logits are needed)
    assert cached_blocks(prefix, ids) == 2
    assert cached_blocks(prefix, ids + [7]) == 3
    assert cached_blocks(prefix, ids[: 2 * BLOCK] + [5] * BLOCK) == 2
    cache.admit([3 * BLOCK])
    prefix.load(cache, 1, block_keys(ids + [7])[:3])
    assert torch.equal(cache.keys[:, 1, :, :, : 3 * BLOCK], cache.keys[:, 0, :, :, : 3 * BLOCK])
    assert torch.equal(cache.values[:, 1, :, : 3 * BLOCK], cache.values[:, 0, :, : 3 * BLOCK])


def test_least_recently_used_blocks_leave_first_and_the_size_is_bounded() -> None:
    cache, prefix = small_cache(), PrefixCache(max_tokens=3 * BLOCK)
    cache.admit([0])
    first, second = [1] * (2 * BLOCK), [2] * (2 * BLOCK)
    prefix.store(cache, 0, block_keys(first))
    prefix.store(cache, 0, block_keys(second))  # four blocks for a room of three: first's oldest block leaves
    assert len(prefix) == 3 and prefix.tokens == 3 * BLOCK
    assert cached_blocks(prefix, first + [0]) == 0  # its start is gone, so its second block is unreachable
    assert cached_blocks(prefix, second + [0]) == 2
    assert prefix.nbytes() == 3 * 2 * (2 * 1 * 2 * BLOCK * 4)
    longer = [3] * (5 * BLOCK)  # a prompt longer than the whole cache keeps its first blocks, not its last
    prefix.store(cache, 0, block_keys(longer[: 4 * BLOCK]))
    assert cached_blocks(prefix, longer) == 3


def test_a_collision_of_keys_never_reuses_other_tokens() -> None:
    cache, prefix = small_cache(), PrefixCache(max_tokens=1024)
    cache.admit([0])
    ids = list(range(2 * BLOCK))
    prefix.store(cache, 0, block_keys(ids))
    key = block_keys(ids)[0][0]
    prefix._blocks[key].tokens = tuple([5] * BLOCK)  # what a hash collision would look like
    assert cached_blocks(prefix, ids + [1]) == 0


def test_greedy_text_is_the_same_with_and_without_the_prefix_cache_and_later_rows_copy_the_prefix(engine: Engine) -> None:
    requests = [chat(q) for q in QUESTIONS]
    off = texts(with_prefix_cache(engine, 0), requests)
    cached = with_prefix_cache(engine, 4096, rows=4)
    results = cached.generate(requests)
    assert [[s.text for s in r.samples] for r in results] == off
    shared = len(engine.tokenizer.apply_chat_template(requests[0].messages, tokenize=True)) // 2
    counts = [r.samples[0].cached_tokens for r in results]
    assert counts[0] == 0 and all(c >= shared // BLOCK * BLOCK - BLOCK for c in counts[1:]), counts
    assert cached.scheduler is not None and cached.scheduler.prefix is not None
    assert cached.scheduler.prefix.hit_tokens == sum(counts)
    # a second job with the same system prompt finds it at once, in its first group too
    again = cached.generate(requests[:2])
    assert [[s.text for s in r.samples] for r in again] == off[:2]
    assert all(r.samples[0].cached_tokens > 0 for r in again)


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(lambda p: p[: len(p) // 2], id="a strict prefix of a cached prompt"),
        pytest.param(lambda p: p[:-1] + ("!" if p[-1] != "!" else "?"), id="differs only in its last character"),
        pytest.param(lambda p: p + " And one more sentence about the weather in spring.", id="longer than the cached one"),
        pytest.param(lambda p: p, id="the very same prompt"),
    ],
)
def test_prompts_related_to_a_cached_one_give_what_they_give_uncached(engine: Engine, second) -> None:
    first = "Once upon a time, in a valley between two rivers, there lived a miller who counted every grain he ground " * 2
    requests = [GenerationRequest(SamplingParams(max_new_tokens=8, temperature=0), prompt=p) for p in (first, second(first))]
    off = [texts(with_prefix_cache(engine, 0), [r]) for r in requests]
    cached = with_prefix_cache(engine, 4096)
    assert texts(cached, [requests[0]]) == off[0]
    result = cached.generate([requests[1]])[0]
    assert [s.text for s in result.samples] == off[1][0]
    assert 0 < result.samples[0].cached_tokens < result.prompt_tokens


def test_chat_with_and_without_a_system_message_and_seeded_sampling_are_unchanged(engine: Engine) -> None:
    requests = [chat(q, system=None) for q in QUESTIONS[:3]] + [chat(q) for q in QUESTIONS[:3]]
    requests += [chat(q, temperature=0.9, seed=7 + i, n=2) for i, q in enumerate(QUESTIONS)]
    off = texts(with_prefix_cache(engine, 0), requests)
    cached = with_prefix_cache(engine, 4096, rows=4)
    assert texts(cached, requests) == off
    assert cached.scheduler is not None and cached.scheduler.prefix is not None and cached.scheduler.prefix.hit_tokens > 0


def test_a_tiny_prefix_cache_evicts_and_still_gives_the_same_text(engine: Engine) -> None:
    requests = [chat(q) for q in QUESTIONS] + [chat(q, system="Be brief. " * 20) for q in QUESTIONS]
    off = texts(with_prefix_cache(engine, 0), requests)
    cached = with_prefix_cache(engine, 2 * BLOCK, rows=4)
    assert texts(cached, requests) == off
    assert cached.scheduler is not None and cached.scheduler.prefix is not None and len(cached.scheduler.prefix) <= 2


@pytest.mark.slow
def test_the_real_model_gives_the_same_greedy_text_with_a_cached_system_prompt(cache_dir) -> None:  # noqa: F811
    """SmolLM2 in float32 (the tiny random model barely looks at its context): every request after the first
    copies the shared system prompt, and the texts are those computed from scratch."""
    from contract.registry import SMOLLM2, resolve

    real = Engine.load(resolve(SMOLLM2), max_batch_rows=4)
    requests = [chat(q, max_new_tokens=16) for q in QUESTIONS]
    off = texts(with_prefix_cache(real, 0, rows=4), requests)
    cached = with_prefix_cache(real, 4096, rows=4)
    results = cached.generate(requests)
    assert [[s.text for s in r.samples] for r in results] == off
    assert all(r.samples[0].cached_tokens >= 96 for r in results[1:])


def test_cascade_attention_is_attention_over_the_prefix_and_each_rows_own_keys() -> None:
    from workers.attention import attention, cascade_attention

    generator = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, d, shared, own, tokens = 5, 6, 2, 8, 11, 7, 2
    q = torch.randn(rows, heads, tokens, d, generator=generator, dtype=torch.float64)
    prefix_k, prefix_v = (torch.randn(kv_heads, d, shared, generator=generator, dtype=torch.float64),
                          torch.randn(kv_heads, shared, d, generator=generator, dtype=torch.float64))
    k_t, v = (torch.randn(rows, kv_heads, d, own, generator=generator, dtype=torch.float64),
              torch.randn(rows, kv_heads, own, d, generator=generator, dtype=torch.float64))
    visible = torch.rand(rows, 1, tokens, own, generator=generator) > 0.3
    full_k = torch.cat([prefix_k.expand(rows, -1, -1, -1), k_t], dim=-1)
    full_v = torch.cat([prefix_v.expand(rows, -1, -1, -1), v], dim=-2)
    full_visible = torch.cat([torch.ones(rows, 1, tokens, shared, dtype=torch.bool), visible], dim=-1)
    expected = attention(q, full_k, full_v, full_visible, 0.3)
    assert torch.allclose(cascade_attention(q, prefix_k, prefix_v, k_t, v, visible, 0.3), expected, atol=1e-12)


@pytest.mark.parametrize("prefix", ["whole", "part", "window"], ids=["whole-prefix", "part-of-prefix", "sliding-window"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "extend"])
def test_fused_bfloat16_cascade_attention_is_as_close_to_exact_as_the_unfused_one(tokens: int, prefix: str) -> None:
    """bfloat16 on CPU takes the fused path (two FLASH_CPU calls merged by log-sum-exp): against attention() in
    float64 over the full keys, its error stays within bfloat16's rounding, no worse than the float32 softmax of
    the unfused path; a row that reads none of the prefix, and queries that see no own key, come out right; with a
    sliding window, each query sees its own part of the prefix (shared_visible per query)."""
    from workers.attention import attention, cascade_attention, fused

    generator = torch.Generator().manual_seed(7)
    rows, heads, kv_heads, d, shared, own = 6, 9, 3, 64, 96, 40
    q = torch.randn(rows, heads, tokens, d, generator=generator).bfloat16()
    prefix_k, prefix_v = torch.randn(kv_heads, d, shared, generator=generator).bfloat16(), torch.randn(kv_heads, shared, d, generator=generator).bfloat16()
    cache_k = torch.randn(rows, kv_heads, d, own + 24, generator=generator).bfloat16()  # the cache's layout: a view
    k_t, v = cache_k[..., :own], torch.randn(rows, kv_heads, own, d, generator=generator).bfloat16()
    visible = (torch.arange(own)[None, None, None, :] <= torch.randint(0, own, (rows, 1, tokens, 1), generator=generator))
    shared_visible = None
    if prefix != "whole":
        reads = torch.tensor([shared, shared, 48, 48, 16, 0])
        shared_visible = torch.arange(shared)[None, :] < reads[:, None]
        visible[0, 0, 0] = False  # a query of a row that reads the whole prefix and none of its own keys
    if prefix == "window":  # query t of row r sees the prefix's positions above 20 + 7 * r + t, up to what r reads
        lowest = 20 + 7 * torch.arange(rows)[:, None, None] + torch.arange(tokens)[None, :, None]
        shared_visible = shared_visible[:, None, :] & (torch.arange(shared)[None, None, :] > lowest)
    full_k = torch.cat([prefix_k.expand(rows, -1, -1, -1), k_t], dim=-1)
    full_v = torch.cat([prefix_v.expand(rows, -1, -1, -1), v], dim=-2)
    prefix_seen = torch.ones(rows, shared, dtype=torch.bool) if shared_visible is None else shared_visible
    if prefix_seen.dim() == 2:
        prefix_seen = prefix_seen[:, None, :].expand(rows, tokens, shared)
    full_visible = torch.cat([prefix_seen[:, None], visible], dim=-1)
    exact = attention(q.double(), full_k.double(), full_v.double(), full_visible, 0.125)

    assert fused(q)
    got = cascade_attention(q, prefix_k, prefix_v, k_t, v, visible, 0.125, shared_visible)
    unfused = cascade_attention(q.float(), prefix_k.float(), prefix_v.float(), k_t.float(), v.float(), visible, 0.125,
                                shared_visible).bfloat16()  # the unfused path, rounded as bfloat16 output is
    assert not torch.isnan(got).any()
    error = (got.double() - exact).abs().max().item()
    assert error <= max(2 * (unfused.double() - exact).abs().max().item(), 1e-2), error
    assert error < 0.02 * exact.abs().max().item()


@pytest.mark.parametrize("speculative_tokens", [0, SPECULATIVE_TOKENS], ids=["decode", "speculation"])
def test_the_base_holds_a_shared_prompt_once_and_rows_that_share_part_or_none_of_it_give_the_same_text(
    engine: Engine, monkeypatch, speculative_tokens: int  # noqa: F811
) -> None:
    """Float64 (no rounding can flip a greedy token), not batch-invariant, with decode steps or verify steps: rows that share the whole system prompt, rows that share only
    its first blocks, and a row without it run together; their slots hold only what follows the base positions
    they read (the own keys attended are fewer than the base's), and every text equals the one without a base."""
    import copy

    import workers.decoder
    import workers.scheduler

    model = copy.deepcopy(engine.model).double()
    seen: list[tuple[int, int]] = []
    real = workers.decoder.cascade_attention

    def counted(q, shared_k_t, shared_v, k_t, *args):  # type: ignore[no-untyped-def]
        seen.append((shared_k_t.shape[-1], k_t.shape[-1]))
        return real(q, shared_k_t, shared_v, k_t, *args)

    shorter = SYSTEM[: len(SYSTEM) // 2] + " Be brief."
    requests = (
        [chat(q, max_new_tokens=12) for q in QUESTIONS]
        + [chat(q, system=shorter, max_new_tokens=12) for q in QUESTIONS[:2]]
        + [chat(QUESTIONS[0], system=None, max_new_tokens=12), chat(QUESTIONS[1], temperature=0.8, seed=5, max_new_tokens=12)]
    )

    def run() -> list[list[str]]:
        fresh = Engine(model, engine.tokenizer, "cpu", engine.model_name, "float64", max_batch_rows=8, batch_invariant=False,
                       speculative_tokens=speculative_tokens)
        return texts(fresh, requests)

    monkeypatch.setattr(workers.decoder, "cascade_attention", counted)
    monkeypatch.setattr(workers.scheduler, "MIN_SHARED", 10**9)
    alone = run()
    assert not seen
    monkeypatch.setattr(workers.scheduler, "MIN_SHARED", 4 * BLOCK)
    assert run() == alone
    assert seen and min(base for base, _ in seen) >= 4 * BLOCK
    assert any(own < base for base, own in seen)  # the slots hold the rows' own tokens, not the prefix again


def test_a_rebased_slot_reads_its_first_positions_from_the_base() -> None:
    cache = KVCache(2, 1, 4, 3, 40, torch.float64, torch.device("cpu"))
    cache.admit([0, 0])
    cache.keys[:, 0, :, :, :20] = torch.arange(20, dtype=torch.float64)
    cache.values[:, 0, :, :20] = torch.arange(20, dtype=torch.float64)[:, None]
    cache.extend(0, [20, 5])
    cache.set_base(cache.keys[:, 0, :, :, :16].clone(), cache.values[:, 0, :, :16].clone())
    cache.rebase(0, 16)
    assert int(cache.lengths[0]) == 4 and int(cache.offsets[0]) == 16 and cache.uses_base
    keys, values = cache.read(0, 16, 20)
    assert keys[0, 0, 0].tolist() == [16, 17, 18, 19] and values[0, 0, :, 0].tolist() == [16, 17, 18, 19]
    assert cache.read(0, 0, 16)[0][0, 0, 0].tolist() == list(range(16))
    with pytest.raises(AssertionError):
        cache.read(0, 8, 24)  # straddles the base and the slot
    order = cache.release([1])  # nothing moves; the offsets stay with their rows
    assert order == [0] and cache.offsets.tolist() == [16, 0, 0]
    other = cache.reshaped(2, 16)
    assert other.offsets[0] == 16 and other.base_length == 16 and torch.equal(other.read(0, 16, 20)[0], keys)
    with pytest.raises(AssertionError):
        cache.set_base(cache.base_keys, cache.base_values)  # a row still reads the base
