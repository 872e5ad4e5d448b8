"""Speculative decoding: drafts from the row's own text, verified in one pass; nothing a row produces changes."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import prefill
from tests.test_engine import cache_dir, engine  # noqa: F401
from workers.engine import Engine
from workers.rows import Row, RunningBatch, start_row
from workers.speculation import EXPLORE_EVERY, EXPLORE_WIDTH, NgramDrafter, SpeculationPolicy, StepCost, may_verify
from workers.types import GenerationRequest, SamplingParams

COPY_ME = (
    "Fix the spelling mistakes in this text and write the whole text back, nothing else:\n\n"
    "The quick brown fox jumsp over the lazy dog. The quick brown fox jumps over the lazy dgo again and again."
)


def engine_with(engine: Engine, speculative_tokens: int, always: bool = False, rows: int = 8) -> Engine:
    """The same loaded model behind a fresh engine; always: verify every draft, whatever the cost model says."""
    fresh = Engine(
        engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=rows,
        speculative_tokens=speculative_tokens,
    )
    if always:
        assert fresh.scheduler is not None and fresh.scheduler.speculation is not None
        fresh.scheduler.speculation.always = True
    return fresh


# --- drafting ------------------------------------------------------------------------------------------


def test_the_drafter_proposes_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    drafter = NgramDrafter([1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 2, 3])
    assert drafter.propose(3) == [4, 5, 6]  # "2 3" last came before 4 (the "1 2 3" before 9 is older)
    drafter.sync([8])  # the output so far: [8]; "3 8" and "8" were never seen
    assert drafter.propose(4) == []
    drafter.sync([8, 1, 2])  # now "8 1 2": "1 2" was last followed by 3
    assert drafter.propose(2) == [3, 4]
    assert drafter.propose(0) == []


def test_the_drafter_may_copy_from_the_rows_own_output() -> None:
    drafter = NgramDrafter([5, 6])
    drafter.sync([7, 8, 9, 7, 8])
    assert drafter.propose(5) == [9, 7, 8]  # what followed "7 8", up to the end of the text


# --- the policy ----------------------------------------------------------------------------------------


def test_the_step_cost_fit_recovers_a_linear_cost() -> None:
    cost = StepCost()
    for rows in (8, 16, 32, 64):
        for extra in (0, rows, 4 * rows):
            cost.record(rows, extra, 0.040 + 0.001 * rows + 0.0003 * extra)
    assert cost.known
    assert cost.seconds(24, 48) == pytest.approx(0.040 + 0.024 + 0.0144, rel=1e-3)


def policy_with(seconds) -> SpeculationPolicy:  # type: ignore[no-untyped-def]
    policy = SpeculationPolicy(max_tokens=8)
    for rows in (4, 8, 32, 64):
        for width in (1, 2, 5):
            policy.record_step(rows, width, seconds(rows, rows * (width - 1)))
    return policy


def test_speculation_runs_where_it_pays_and_stays_off_where_it_does_not() -> None:
    cpu = policy_with(lambda rows, extra: 0.040 + 0.0013 * rows + 0.0003 * extra)
    drafts = [[1, 2, 3, 4, 5, 6]] * 8
    plan = cpu.plan(drafts, [0.9] * 8)
    assert plan is not None and plan.width > 3  # few rows that copy: several tokens a step
    assert cpu.plan(drafts, [0.05] * 8) is None  # drafts that are rarely right cost more than they give
    assert cpu.plan([[]] * 8, [0.9] * 8) is None  # nothing to verify
    # Extra positions that cost as much as whole steps: never worth it.
    dear = policy_with(lambda rows, extra: 0.010 + 0.001 * rows + 0.01 * extra)
    assert dear.plan([[1, 2, 3]] * 64, [0.8] * 64) is None


def test_until_the_cost_is_measured_a_step_in_a_few_probes_it() -> None:
    policy = SpeculationPolicy(max_tokens=8)
    plans = [policy.plan([[1, 2, 3, 4, 5, 6]], [0.9]) for _ in range(20)]
    probes = [p for p in plans if p is not None]
    assert 1 <= len(probes) <= 3 and all(p.width == 5 for p in probes)
    assert SpeculationPolicy(max_tokens=0).enabled is False


def test_the_prior_is_the_rate_rows_estimate_not_tokens_kept_over_proposed() -> None:
    """A draft of 8 whose first 3 tokens are kept says a token after a kept one is kept 3 times in 4, not 3 in 8:
    the 5 tokens after the rejection were never checked."""
    policy = SpeculationPolicy(max_tokens=8)
    for _ in range(200):
        policy.record_verify(kept=3, rejected=1)
    assert policy.prior == pytest.approx(0.75, abs=1e-3)


def test_a_policy_that_stopped_verifying_explores_now_and_then_and_learns_rows_copy_later() -> None:
    """Rows whose first drafts failed (a reply's opening words) still get a short verify step every EXPLORE_EVERY
    steps; once their drafts are kept, the policy verifies wider on its own. Without drafts, nothing is verified
    and the count starts over."""
    policy = policy_with(lambda rows, extra: 0.040 + 0.0013 * rows + 0.0006 * extra)
    policy.prior = 0.1
    drafts = [[1, 2, 3, 4, 5, 6]] * 64
    rows = [start_row(Row(i, 0, [1, 2, 3, 4, 5, 6, 1], SamplingParams(max_new_tokens=50, temperature=0), None)) for i in range(64)]
    plans = []
    for _ in range(2 * EXPLORE_EVERY):
        rates = [row.acceptance.rate(policy.prior) for row in rows]
        plan = policy.plan(drafts, rates)
        plans.append(plan)
        policy.record_step(64, 1 if plan is None else plan.width, 0.1)
        if plan is not None:  # every draft token kept
            for row in rows:
                row.acceptance.record(EXPLORE_WIDTH, EXPLORE_WIDTH)
            policy.record_verify(kept=64 * EXPLORE_WIDTH, rejected=0)
    explored = plans.index(next(p for p in plans if p is not None))
    assert explored == EXPLORE_EVERY and plans[explored].width == 1 + EXPLORE_WIDTH  # type: ignore[union-attr]
    assert plans[explored + 1] is not None  # what the exploring step learnt makes verifying pay by itself
    # Rows with nothing to draft: the due step verifies nothing, and the next EXPLORE_EVERY steps are plain again.
    quiet = policy_with(lambda rows, extra: 0.040 + 0.0013 * rows + 0.0006 * extra)
    quiet.prior = 0.1
    for _ in range(EXPLORE_EVERY):
        quiet.record_step(64, 1, 0.1)
    assert quiet.explore_due and may_verify(quiet, rows)  # the step after may verify: it must not run ahead
    assert quiet.plan([[]] * 64, [0.1] * 64) is None and not quiet.explore_due


# --- exactness -----------------------------------------------------------------------------------------


@torch.inference_mode()
def test_a_verify_pass_gives_the_logits_of_decode_steps_bit_for_bit(engine: Engine) -> None:  # noqa: F811
    runner = engine.runner
    assert runner is not None and engine.dtype == "float32"
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 4000, (20 + 5 * i,), generator=generator).tolist() for i in range(3)]
    chunks = [torch.randint(10, 4000, (4,), generator=generator).tolist() for _ in range(3)]
    stepped, verified = runner.new_cache(3, 64, engine.device), runner.new_cache(3, 64, engine.device)
    prefill(runner, stepped, prompts)
    prefill(runner, verified, prompts)
    steps = torch.stack([runner.decode(stepped, torch.tensor([c[j] for c in chunks])) for j in range(4)], dim=1)
    assert torch.equal(runner.verify(verified, chunks), steps)
    assert torch.equal(stepped.lengths, verified.lengths)


def requests() -> list[GenerationRequest]:
    """Greedy and seeded rows with every parameter that shapes a draw, stop strings and short limits."""
    many = [
        {"temperature": 0},
        {"temperature": 0, "max_new_tokens": 3},
        {"temperature": 0, "stop": [" the", "."]},
        {"temperature": 0, "repetition_penalty": 1.3},
        {"temperature": 0, "frequency_penalty": 0.5, "presence_penalty": 0.3},
        {"temperature": 0, "logprobs": True, "top_logprobs": 2},
        {"temperature": 0.8, "seed": 11},
        {"temperature": 0.7, "top_k": 5, "seed": 12, "n": 3},
        {"temperature": 1.0, "top_p": 0.9, "seed": 13, "logprobs": True},
        {"temperature": 0.9, "repetition_penalty": 1.2, "seed": 14},
    ]
    return [
        GenerationRequest(SamplingParams(**({"max_new_tokens": 40} | params)), prompt=COPY_ME + f" ({i})")
        for i, params in enumerate(many)
    ]


def test_every_row_gives_the_same_tokens_with_speculation(engine: Engine) -> None:  # noqa: F811
    """Greedy and seeded rows alike, with penalties, stop strings, max_new_tokens and logprobs (float32)."""
    off = engine_with(engine, 0).generate(requests())
    speculating = engine_with(engine, 8, always=True)
    on = speculating.generate(requests())
    assert on == off  # text, finish reason, token counts, seeds, logprobs
    assert speculating.scheduler is not None
    assert speculating.scheduler.speculated.kept > 0  # drafts were verified and some kept: the path ran
    samples = [s for r in on for s in r.samples]
    assert all(0 <= s.accepted_tokens <= s.draft_tokens for s in samples)
    assert sum(s.draft_tokens for s in samples) > 0


def test_the_default_policy_gives_the_same_tokens(engine: Engine) -> None:  # noqa: F811
    off = engine_with(engine, 0, rows=4).generate(requests())
    assert engine_with(engine, 8, rows=4).generate(requests()) == off


def test_a_kept_draft_token_has_the_models_probability(engine: Engine) -> None:  # noqa: F811
    """Speculative sampling's rule, checked by counting: over many seeded rows, a draft token is kept as often as
    the model would draw it, and a row's first token follows the model's distribution whether its draft is kept
    or not (a binomial and a chi-square test; a wrong rule fails them by far more than these bounds)."""
    rows = 4000
    vocab = engine.model.config.vocab_size
    favoured = [100, 200, 300, 400]
    logits = torch.full((rows, 2, vocab), -math.inf)
    logits[:, :, favoured] = torch.tensor([2.0, 1.0, 0.5, 0.0])
    params = SamplingParams(max_new_tokens=10, temperature=0.8)
    batch = RunningBatch(vocab, engine.device, engine.tokenizer, engine.eos_ids)
    batch.add([Row(i, 0, [1, 2, 3], params, 1000 + i) for i in range(rows)])
    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0]) / 0.8, dim=0)
    draft = 200
    _, taken = batch.accept(logits, [[draft]] * rows)
    kept = sum(1 for t in taken if t == 2)
    p = float(probs[1])
    assert abs(kept - rows * p) / math.sqrt(rows * p * (1 - p)) < 4.5
    first = torch.tensor([state.generated[0] for state in batch.states])
    observed = torch.tensor([float((first == token).sum()) for token in favoured])
    expected = probs * rows
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # p = 0.001 with 3 degrees of freedom
    assert all(state.generated[0] in favoured for state in batch.states)


@pytest.mark.slow
def test_the_real_model_copies_its_prompt_in_fewer_steps_with_the_same_text(cache_dir) -> None:  # noqa: F811
    """SmolLM2 in float32 on rewriting prompts: the texts are those of plain decoding, and drafts are kept."""
    from contract.registry import SMOLLM2, resolve

    real = Engine.load(resolve(SMOLLM2), max_batch_rows=4, speculative_tokens=0)
    asks = [
        GenerationRequest(
            SamplingParams(max_new_tokens=48, temperature=t, seed=5), messages=[{"role": "user", "content": COPY_ME + f" {i}"}]
        )
        for i, t in enumerate((0.0, 0.0, 0.6))
    ]
    off = real.generate(asks)
    speculating = engine_with(real, 8, always=True, rows=4)
    assert speculating.generate(asks) == off
    stats = speculating.scheduler.speculated  # type: ignore[union-attr]
    assert stats.kept >= 20  # decode steps saved, of 3 x 48 tokens


# --- draft-model drafting ------------------------------------------------------------------------------


def other_tiny_llama(engine: Engine, seed: int) -> torch.nn.Module:
    """A random Llama of the tiny model's shape with other weights: a draft model that is mostly wrong."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(engine.model.config)
    return model.eval().requires_grad_(False)


def engine_drafting_with(engine: Engine, draft: torch.nn.Module, always: bool = True, rows: int = 8) -> Engine:
    from workers.draft_model import DraftModel

    fresh = Engine(
        engine.model, engine.tokenizer, "cpu", engine.model_name, engine.dtype, max_batch_rows=rows,
        speculative_tokens=6, draft_model=DraftModel(draft, engine.tokenizer, target=engine.tokenizer),
    )
    assert fresh.scheduler is not None and fresh.scheduler.speculation is not None
    fresh.scheduler.speculation.always = always
    return fresh


def test_the_model_drafting_for_itself_is_kept_and_changes_no_text(engine: Engine) -> None:  # noqa: F811
    """The model as its own draft model proposes (greedily) what greedy rows then draw: nearly every draft
    token is kept, which holds only if each row's draft cache follows the row's text through kept and
    rejected drafts; and every row, greedy or seeded, gives the tokens it gives without speculation."""
    asks = requests()
    off = engine_with(engine, 0).generate(asks)
    drafting = engine_drafting_with(engine, engine.model)
    assert drafting.generate(asks) == off
    greedy = [s for ask, result in zip(asks, off) for s in result.samples if ask.params.temperature == 0]
    assert greedy
    stats = drafting.scheduler.speculated  # type: ignore[union-attr]
    assert stats.proposed > 100
    on = drafting.generate(asks)
    plain = [
        s for ask, result in zip(asks, on) for s in result.samples
        if ask.params.temperature == 0 and ask.params.repetition_penalty == 1.0
        and ask.params.frequency_penalty == 0 and ask.params.presence_penalty == 0
    ]
    assert sum(s.accepted_tokens for s in plain) >= 0.9 * sum(s.draft_tokens for s in plain) > 0


def test_a_draft_model_that_guesses_wrong_changes_no_text(engine: Engine) -> None:  # noqa: F811
    asks = requests()
    off = engine_with(engine, 0).generate(asks)
    drafting = engine_drafting_with(engine, other_tiny_llama(engine, seed=7))
    assert drafting.generate(asks) == off
    stats = drafting.scheduler.speculated  # type: ignore[union-attr]
    assert stats.proposed > 100 and stats.kept < stats.proposed / 2


def test_a_draft_model_with_another_tokenizer_is_refused(engine: Engine) -> None:  # noqa: F811
    import copy

    from workers.draft_model import DraftModel

    other = copy.deepcopy(engine.tokenizer)
    other.add_tokens(["<not-in-the-worker-model>"])
    with pytest.raises(ValueError, match="same tokenizer"):
        DraftModel(engine.model, other, target=engine.tokenizer)


def test_a_costly_drafter_is_not_run_when_the_policy_expects_no_gain() -> None:
    """With a draft model the width is chosen before drafting: where wider passes do not pay (many rows, extra
    positions costing what rows cost), no row is drafted for at all."""
    built: list[list[int]] = []

    def drafter(prompt: list[int]) -> NgramDrafter:
        built.append(prompt)
        return NgramDrafter(prompt)

    policy = SpeculationPolicy(max_tokens=8, drafter=drafter)
    assert policy.costly_drafts
    for rows in (2, 16, 64):  # a fixed cost (the weights read once per pass), then rows and positions alike
        for extra in (0, rows, 4 * rows):
            policy.record_step(rows, 1 + extra // rows, 0.05 + 0.001 * rows + 0.001 * extra)
    assert policy.plan_ahead([8] * 64, [0.6] * 64) is None
    few = policy.plan_ahead([8, 8], [0.95, 0.95])  # two rows: a wider pass costs little more than a decode step
    assert few is not None and few.width > 1
    assert built == []  # plan_ahead decides; the scheduler drafts only after it


def test_the_worker_loads_its_draft_model_from_a_name(cache_dir) -> None:  # noqa: F811
    from contract.registry import TINY, resolve

    loaded = Engine.load(resolve(TINY), speculative_tokens=4, draft_spec=resolve(TINY))
    assert loaded.scheduler is not None and loaded.scheduler.speculation is not None
    assert loaded.scheduler.speculation.costly_drafts
    loaded.scheduler.speculation.always = True
    asks = requests()[:3]
    assert loaded.generate(asks) == engine_with(loaded, 0).generate(asks)
    assert loaded.scheduler.speculated.kept > 0
