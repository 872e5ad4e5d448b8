"""The KV cache's owner: its verbs keep rows contiguous and lengths right, and a prefill can start mid-prompt."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import prefill
from tests.test_engine import PROMPTS, cache_dir, engine  # noqa: F401
from workers.engine import Engine
from workers.kv_cache import KVCache, compaction, kv_budget_tokens


def small_cache(slots: int = 6, capacity: int = 8) -> KVCache:
    return KVCache(layers=2, kv_heads=1, head_dim=2, slots=slots, capacity=capacity, dtype=torch.float32, device=torch.device("cpu"))


def fill(cache: KVCache, first: int, lengths: list[int]) -> None:
    """Write each slot's own number into its K/V, at every position its row holds."""
    for i, n in enumerate(lengths):
        slot = first + i
        k = torch.full((1, 1, n, 2), float(slot))
        for layer in range(2):
            cache.write(layer, slot, k, k, torch.arange(n)[None])
    cache.extend(first, lengths)


@given(st.integers(1, 12).flatmap(lambda rows: st.tuples(st.just(rows), st.sets(st.integers(0, rows - 1)))))
def test_compaction_keeps_the_remaining_rows_contiguous_and_moves_only_rows_from_beyond_the_new_end(case) -> None:
    rows, leaving = case
    order, moves = compaction(rows, sorted(leaving))
    assert sorted(order) == sorted(set(range(rows)) - leaving)
    keep = rows - len(leaving)
    assert len(order) == keep
    assert all(src >= keep > dst for src, dst in moves)
    assert all(order[i] == i for i in range(keep) if i not in leaving)


def test_admit_extend_advance_and_release_keep_each_rows_tokens_with_it() -> None:
    cache = small_cache()
    first = cache.admit([0, 0, 0, 0])
    assert (first, cache.rows, cache.free) == (0, 4, 2)
    fill(cache, 0, [3, 5, 2, 4])
    cache.advance()
    assert cache.lengths[:4].tolist() == [4, 6, 3, 5]
    order = cache.release([0, 2])  # rows 1 and 3 stay; row 3 moves into slot 0
    assert order == [3, 1] and cache.rows == 2
    assert cache.lengths.tolist() == [5, 6, 0, 0, 0, 0]
    assert bool((cache.keys[:, 0, :, :, :4] == 3.0).all()) and bool((cache.values[:, 1, :, :5] == 1.0).all())
    assert cache.admit([0]) == 2


def test_truncate_forgets_tokens_past_a_length_and_refuses_to_grow() -> None:
    cache = small_cache()
    cache.admit([0])
    fill(cache, 0, [6])
    cache.truncate(0, 2)
    assert int(cache.lengths[0]) == 2
    with pytest.raises(AssertionError):
        cache.truncate(0, 3)
    with pytest.raises(AssertionError):
        cache.truncate(1, 0)  # not in use


def test_admitting_more_rows_than_free_slots_is_refused() -> None:
    cache = small_cache(slots=2)
    cache.admit([0, 0])
    with pytest.raises(AssertionError):
        cache.admit([0])


def test_a_reshaped_cache_holds_the_same_rows() -> None:
    cache = small_cache(slots=6, capacity=8)
    cache.admit([0, 0, 0])
    fill(cache, 0, [3, 8, 1])
    longer = cache.reshaped(slots=3, capacity=16)
    assert (longer.slots, longer.capacity, longer.rows) == (3, 16, 3)
    assert longer.lengths.tolist() == [3, 8, 1]
    assert torch.equal(longer.keys[:, :, :, :, :8], cache.keys[:, :3]) and not bool(longer.keys[..., 8:].any())
    with pytest.raises(AssertionError):
        cache.reshaped(slots=2, capacity=16)  # three rows do not fit two slots
    with pytest.raises(AssertionError):
        cache.reshaped(slots=6, capacity=4)  # a row of 8 tokens does not fit


def test_the_budget_is_the_setting_when_given_and_a_default_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert kv_budget_tokens(cpu, 1000, 4096) == 4096
    assert kv_budget_tokens(cpu, 1000) == 65536
    # SmolLM2-135M: 30 layers x (K, V) x 3 heads x 64 values; float32 K/V takes twice what bfloat16 takes,
    # and the default budget holds the same bytes for both
    smol = 30 * 2 * 3 * 64
    assert kv_budget_tokens(cpu, smol * 2) == (1 << 30) // (smol * 2) == 46603
    assert kv_budget_tokens(cpu, smol * 4) == 23301
    assert kv_budget_tokens(cpu, smol * 4, 65536) == 65536
    with pytest.raises(ValueError):
        kv_budget_tokens(cpu, 1000, 0)


def test_a_prompt_prefilled_in_two_parts_gives_the_logits_of_one_prefill(engine: Engine) -> None:  # noqa: F811
    """Prefill from a start position (what prefix caching needs): the rest of a prompt after its first tokens
    are in place gives the same next-token logits and the same K/V as the whole prompt at once."""
    runner = engine.runner
    assert runner is not None
    prompts = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in (PROMPTS[1], PROMPTS[3])]
    with torch.inference_mode():
        whole_cache = runner.new_cache(2, 64, torch.device("cpu"))
        whole = prefill(runner, whole_cache, prompts)
        split_cache = runner.new_cache(2, 64, torch.device("cpu"))
        cut = [3, 7]
        prefill(runner, split_cache, [p[:c] for p, c in zip(prompts, cut)])
        rest = runner.extend(split_cache, 0, [p[c:] for p, c in zip(prompts, cut)])
    assert split_cache.lengths[:2].tolist() == whole_cache.lengths[:2].tolist() == [len(p) for p in prompts]
    torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-4)
    for slot, prompt in enumerate(prompts):
        n = len(prompt)
        torch.testing.assert_close(split_cache.keys[:, slot, :, :, :n], whole_cache.keys[:, slot, :, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(split_cache.values[:, slot, :, :n], whole_cache.values[:, slot, :, :n], rtol=1e-4, atol=1e-4)
