"""The decode step in static shapes (workers.graphs), as a CUDA graph records it, checked on the CPU: the same
numbers and texts as the eager step, no read of the device, buckets, and graphs that follow the cache they belong to.
(Recording and replaying a CUDA graph needs a GPU: bench.gpu measures it there.)"""
from __future__ import annotations

import pytest
import torch
import transformers

from tests.helpers import prefill
from tests.test_engine import PROMPTS, cache_dir, engine  # noqa: F401
from tests.test_sync_free import mixed_requests, steps_each_reading_once
from workers.decoder import DecoderRunner
from workers.engine import Engine
from workers.graphs import CAPTURE_AT, DecodeGraphs, SamplingGraphs, row_bucket
from workers.sampling import Filters, RowParams, apply_repetition_penalty, kept_by_threshold, next_tokens, sort_free_tokens
from workers.scheduler import Scheduler
from workers.syncs import count_syncs
from workers.types import GenerationRequest, SamplingParams


def test_row_buckets_pad_at_most_a_quarter_and_stay_within_the_slots():
    seen = set()
    for slots in (1, 7, 16, 100, 512):
        for rows in range(1, slots + 1):
            bucket = row_bucket(rows, slots)
            assert rows <= bucket <= slots
            assert bucket == slots or bucket - rows <= rows // 4, (rows, slots, bucket)
            seen.add(bucket)
    assert sorted(b for b in seen if b <= 64) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    assert [row_bucket(r, 512) for r in (1, 3, 9, 17, 33, 65, 129, 257)] == [1, 3, 10, 20, 40, 80, 160, 320]
    assert row_bucket(3, 512, min_rows=16) == 16 and row_bucket(3, 8, min_rows=16) == 8


def fresh(engine: Engine, cuda_graphs: bool, **kwargs) -> Engine:  # noqa: F811
    return Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, cuda_graphs=cuda_graphs, **kwargs)


def more_requests() -> list[GenerationRequest]:
    """Rows without a shared prefix, ending at different steps, so that the running rows pass through several
    buckets as they leave."""
    return [
        GenerationRequest(SamplingParams(max_new_tokens=4 + 2 * i, temperature=0.9 if i % 2 else 0.0, top_k=30, seed=i), prompt=PROMPTS[i % 4])
        for i in range(16)
    ]


@pytest.mark.parametrize(
    "batch_invariant,sort_free", [(True, False), (True, True), (False, True)], ids=["batch-invariant", "sort-free", "cascade"]
)
def test_static_steps_give_the_eager_steps_texts(engine: Engine, batch_invariant: bool, sort_free: bool):  # noqa: F811
    """Every way of sampling, rows ending at different steps (buckets shrink), float32: the same texts. sort_free:
    the draws too go through SamplingGraphs (what a CUDA engine does) against next_tokens' sort-free draws."""
    requests = mixed_requests() + (more_requests() if batch_invariant else [])
    eager = fresh(engine, False, max_batch_rows=32, speculative_tokens=0, batch_invariant=batch_invariant)
    static = fresh(engine, True, max_batch_rows=32, speculative_tokens=0, batch_invariant=batch_invariant)
    assert isinstance(static.scheduler, Scheduler) and static.scheduler.graphs is not None
    eager.scheduler.batch.sort_free = static.scheduler.batch.sort_free = sort_free  # type: ignore[attr-defined]
    assert eager.generate(requests) == static.generate(requests)
    draws = static.scheduler.batch.draws
    assert draws is not None and draws.failed is None
    assert draws.recorded >= 3 if sort_free else draws.recorded == 0  # the draws of several buckets, or none graphed
    if batch_invariant:
        assert static.scheduler.graphs.recorded >= 3  # buckets of 32, 28, 24, 20, 16 rows as rows leave
    else:
        assert static.scheduler.graphs.recorded == 0  # a shared base throughout: the cascade stays eager


@pytest.mark.parametrize("batch_invariant", [True, False], ids=["batch-invariant", "not"])
def test_static_step_logits_are_the_eager_steps(engine: Engine, batch_invariant: bool):  # noqa: F811
    """Rows of different lengths, with padding rows and attention over the whole capacity: the eager step's logits
    (exactly when batch-invariant; else within float32 rounding of products of other shapes)."""
    runner = DecoderRunner(engine.model, batch_invariant)
    tolerance = 0 if batch_invariant else 1e-5
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in (PROMPTS * 3)[:9]]
    caches = [runner.new_cache(12, 48, engine.device) for _ in range(2)]  # a bucket of 10 rows, or 16
    graphs = DecodeGraphs(runner, capture=False)
    with torch.inference_mode():
        logits = [prefill(runner, cache, prompts) for cache in caches]
        for step in range(6):
            tokens = logits[0].argmax(-1)
            torch.testing.assert_close(logits[1], logits[0], rtol=tolerance, atol=tolerance, msg=lambda m, step=step: f"step {step}: {m}")
            logits = [runner.decode(caches[0], tokens), graphs.decode(caches[1], tokens.clone())]
            assert caches[0].host_lengths == caches[1].host_lengths
            assert torch.equal(caches[0].lengths, caches[1].lengths)
    assert graphs.recorded == 1  # one bucket over six steps (16 rows when batch-invariant, else 10)


def test_a_static_step_reads_nothing_on_the_host(engine: Engine):  # noqa: F811
    runner = engine.runner
    assert runner is not None
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    cache = runner.new_cache(4, 64, engine.device)
    with torch.inference_mode():
        tokens = prefill(runner, cache, prompts).argmax(-1)
        with count_syncs() as counted:
            runner.decode_graphable(cache, torch.cat([tokens, tokens.new_zeros(cache.slots - 4)]))
    assert counted.calls == {}


def test_graphs_belong_to_one_cache_and_a_bucket_is_recorded_at_its_capture_step(engine: Engine):  # noqa: F811
    runner = engine.runner
    assert runner is not None
    graphs = DecodeGraphs(runner, capture=False)
    prompts = [engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    first, second = runner.new_cache(4, 64, engine.device), runner.new_cache(4, 64, engine.device)
    with torch.inference_mode():
        tokens = prefill(runner, first, prompts).argmax(-1)
        prefill(runner, second, prompts)
        for step in range(1, CAPTURE_AT + 2):
            graphs.decode(first, tokens)
            assert graphs.recorded == (1 if step >= CAPTURE_AT else 0)
        graphs.decode(second, tokens)  # another cache: the first one's graphs are dropped
        assert graphs.recorded == 1 and len(graphs._graphs) == 0
        for _ in range(CAPTURE_AT):
            graphs.decode(second, tokens)
        assert graphs.recorded == 2 and len(graphs._graphs) == 1


def test_a_worker_engine_on_the_cpu_keeps_eager_steps(engine: Engine):  # noqa: F811
    """Static steps attend over the whole capacity: on a CPU, where nothing is graphed, they would only cost."""
    scheduler = Engine(engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype).scheduler
    assert isinstance(scheduler, Scheduler) and scheduler.graphs is None


def test_a_static_step_reads_the_device_once_per_step(engine: Engine):  # noqa: F811
    busy = fresh(engine, True, max_batch_rows=16, speculative_tokens=0)
    assert isinstance(busy.scheduler, Scheduler)
    busy.scheduler.batch.sort_free = True
    busy.eos_ids = frozenset()
    for i in range(8):
        busy.submit(i, GenerationRequest(SamplingParams(max_new_tokens=10 + i, temperature=0.8, top_p=0.9, seed=i), prompt=PROMPTS[i % 4]))
    steps, _ = steps_each_reading_once(busy)
    assert steps >= 10 and busy.scheduler.graphs is not None and busy.scheduler.graphs.recorded >= 1


def test_a_step_that_cannot_be_recorded_leaves_every_later_step_eager(engine: Engine, monkeypatch, caplog):  # noqa: F811
    """Recording fails (as a kernel that a CUDA graph cannot hold would make it): same texts, said once, no retry."""
    def unsupported(self: DecodeGraphs, graph):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_record", unsupported)
    requests = more_requests()
    expected = fresh(engine, False, max_batch_rows=32, speculative_tokens=0).generate(requests)
    static = fresh(engine, True, max_batch_rows=32, speculative_tokens=0)
    with caplog.at_level("WARNING", logger="workers.graphs"):
        assert static.generate(requests) == expected
    graphs = static.scheduler.graphs  # type: ignore[attr-defined]
    assert graphs.failed == "RuntimeError: operation not permitted when stream is capturing" and graphs.recorded == 0
    assert [r.getMessage() for r in caplog.records if "stay eager" in r.getMessage()] == [
        f"decode steps stay eager: recording a CUDA graph of 16 rows failed ({graphs.failed})"
    ]


@pytest.mark.slow
def test_a_compiled_static_step_gives_the_eager_steps_texts(engine: Engine):  # noqa: F811
    """torch.compile of the static step (inductor on the CPU here; on CUDA its kernels are what the graphs record):
    rows ending at different steps, so several buckets compile; the same texts as eager steps, within float32
    rounding of fused elementwise work."""
    from tests.test_attention_kernels import assert_same_up_to_rounding

    requests = more_requests()
    expected = fresh(engine, False, max_batch_rows=32, speculative_tokens=0, batch_invariant=False).generate(requests)
    compiled = fresh(engine, True, max_batch_rows=32, speculative_tokens=0, batch_invariant=False, compile_decode=True)
    assert_same_up_to_rounding(compiled.generate(requests), expected)
    graphs = compiled.scheduler.graphs  # type: ignore[attr-defined]
    assert graphs.compiled is not None and graphs.compile_failed is None and graphs.recorded >= 3


def test_a_step_that_cannot_be_compiled_runs_uncompiled(engine: Engine, caplog):  # noqa: F811
    """torch.compile fails (no C++ compiler, an op inductor lacks): the same texts, said once, never retried."""
    calls = []

    def cannot(cache, tokens):
        calls.append(1)
        raise RuntimeError("InductorError: no working C++ compiler found")

    requests = more_requests()
    expected = fresh(engine, False, max_batch_rows=32, speculative_tokens=0).generate(requests)
    static = fresh(engine, True, max_batch_rows=32, speculative_tokens=0, compile_decode=True)
    graphs = static.scheduler.graphs  # type: ignore[attr-defined]
    graphs.compiled = cannot
    with caplog.at_level("WARNING", logger="workers.graphs"):
        assert static.generate(requests) == expected
    assert graphs.compile_failed == "RuntimeError: InductorError: no working C++ compiler found" and calls == [1]
    assert graphs.compiled is None and graphs.recorded >= 1  # the graphs go on, uncompiled
    assert [r.getMessage() for r in caplog.records if "uncompiled" in r.getMessage()] == [
        "decode steps run uncompiled: torch.compile failed (RuntimeError: InductorError: no working C++ compiler found)"
    ]


def test_sort_free_tokens_draw_as_next_tokens_does():
    """One fixed-shape draw for every row (greedy, plain, top-k, top-p, min-p, penalised; flat and peaked logits)
    gives next_tokens' sort-free tokens exactly, and a row's token does not depend on the bucket's padding."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 24, 3000
    logits = torch.randn(rows, vocab, generator=generator) * torch.tensor([0.5, 4.0, 12.0]).repeat(8)[:, None]
    temperature = [0.0, 0.7, 1.0, 1.3] * 6
    top_k = [0, 0, 20, 0, 50, 0] * 4
    top_p = [1.0, 0.9, 1.0, 0.8, 0.95, 1.0] * 4
    min_p = [0.0] * 20 + [0.05, 0.1, 0.0, 0.2]
    params = RowParams.build(temperature, top_k, top_p, [1.0, 1.2] * 12, torch.device("cpu"), min_p)
    seen = torch.rand(rows, vocab, generator=generator) < 0.05
    draws = SamplingGraphs(capture=False)
    for step in range(4):
        uniform = torch.rand(rows, generator=generator, dtype=torch.float64)
        expected = next_tokens(logits, params, seen, uniform, sort_free=True)
        penalised = apply_repetition_penalty(logits, seen, params.repetition_penalty)
        assert torch.equal(sort_free_tokens(penalised, params, uniform), expected)
        some = 17 - step  # fewer rows each step: the bucket's buffers hold the earlier rows' values past them
        filters = Filters.of(top_k[:some], top_p[:some], min_p[:some])
        assert torch.equal(draws.tokens(penalised[:some], params.select(torch.arange(some)), uniform[:some], filters), expected[:some])
    assert draws.recorded == 1  # buckets of 20 (17 rows), 16 (16 and 15 rows: recorded at its second draw), 14


@pytest.mark.parametrize("filters", [Filters(False, True, False), Filters(True, False, False), Filters(False, False, True),
                                     Filters(False, False, False)], ids=["top-p", "top-k", "min-p", "none"])
def test_a_draw_skips_the_filters_no_row_uses_and_draws_the_same(filters: Filters):
    generator = torch.Generator().manual_seed(1)
    rows, vocab = 12, 2000
    logits = torch.randn(rows, vocab, generator=generator) * 3
    top_k = [20 * (i % 3) for i in range(rows)] if filters.top_k else [0] * rows
    top_p = [1.0 - 0.05 * (i % 4) for i in range(rows)] if filters.top_p else [1.0] * rows
    min_p = [0.05 * (i % 2) for i in range(rows)] if filters.min_p else [0.0] * rows
    params = RowParams.build([0.0, 0.8, 1.2] * 4, top_k, top_p, [1.0] * rows, torch.device("cpu"), min_p)
    assert Filters.of(top_k, top_p, min_p) == filters
    kept = kept_by_threshold(logits, params.top_k, params.top_p, params.min_p, filters)
    assert torch.equal(kept, kept_by_threshold(logits, params.top_k, params.top_p, params.min_p))
    uniform = torch.rand(rows, generator=generator, dtype=torch.float64)
    assert torch.equal(sort_free_tokens(logits, params, uniform, filters), sort_free_tokens(logits, params, uniform))
    assert torch.equal(sort_free_tokens(logits, params, uniform, filters), next_tokens(logits, params, None, uniform, sort_free=True))


def test_a_rope_that_reads_positions_on_the_host_keeps_decode_steps_eager():
    """transformers' dynamic rope update reads the step's positions on the host: no graph can hold that step."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=100, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    graphs = DecodeGraphs(DecoderRunner(transformers.LlamaForCausalLM(config)), capture=False)
    assert graphs.failed == "the dynamic rope type reads the step's positions on the host"
