"""Speculative decoding by prompt lookup: guess a row's next tokens from its own text, check them in one pass.

A row that copies its prompt (rewriting, extraction, correction) keeps producing tokens that already appear
earlier in its prompt or output. NgramDrafter finds the latest earlier occurrence of the row's last few tokens
and proposes what followed it; the scheduler feeds the row's last token and the draft to the model in one
forward pass (DecoderRunner.verify) and keeps the draft up to the first token the row would not have produced.

Exactness: every position is sampled exactly as a plain decode step samples it (same penalties, same filters,
the row's own generator, one draw per token), and a draft token is kept only if it is the token drawn. A row
therefore produces the same tokens with and without speculation, greedy or seeded. This is speculative
sampling's rejection rule for a draft that is a single proposed token (accept with probability p(draft), else
draw from the rest), realised by coupling the draw: the kept tokens follow the model's distribution exactly.

The policy (SpeculationPolicy): a verify pass over `rows` rows of `width` positions costs more than a decode
step; it learns how much more on this machine from the steps it times (a least-squares fit of step time on
rows and extra positions, recent steps weighing most) and, for each step, picks the width that maximises
expected tokens per second, given each row's recent acceptance rate. With many rows on a CPU, extra positions
cost nearly what rows do and speculation pays only for rows that copy well; with few rows (a job's tail, a small
job) it pays more often. Since acceptance is learnt only from verify steps, a step now and then verifies short
drafts anyway (EXPLORE_EVERY), so that rows which start to copy late are noticed.

In order: NgramDrafter -> Acceptance -> StepCost -> SpeculationPolicy -> SpeculationStats -> plan_step (the drafts
of one step) -> may_verify (could a step verify at all: else it may run ahead) -> verify_step (feed them, keep what
matches).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy

from contract.settings import Settings

if TYPE_CHECKING:  # the scheduler's parts; they import this module
    from workers.decoder import DecoderRunner
    from workers.kv_cache import KVCache
    from workers.rows import RowState, RunningBatch
    from workers.types import Sample

SPECULATIVE_TOKENS: int = Settings.model_fields["speculative_tokens"].default
"""Most draft tokens one row proposes in one step (the speculative_tokens setting; 0 turns speculation off)."""
NGRAM_SIZES = (3, 2, 1)
"""The lengths of the row's suffix looked up, longest first."""
PROBE_EVERY = 8
"""While the cost of a wider pass is not measured yet, one step in this many speculates to measure it."""
MARGIN = 0.03
"""A verify step must be expected to beat a decode step by this much (the cost fit is an estimate)."""
EXPLORE_EVERY = 16
"""Once the costs are measured, a step this many steps after the last verify step verifies short drafts even where
the estimates say a decode step pays: rows' acceptance is learnt only from verify steps, so estimates made on a
job's first tokens (a reply's opening words, rarely found in the prompt) would otherwise keep speculation off for
the rest of the job, however well the rows copy later. Costs at most one pass of EXPLORE_WIDTH extra positions per
row in this many steps (by the cost fit, ~2% at 64 rows on a CPU where no draft is kept; the bench workload, which
copies little, measured level: docs/benchmarks.md)."""
EXPLORE_WIDTH = 2
"""Draft tokens per row verified by an exploring step."""


class Drafter(Protocol):
    """One row's source of draft tokens: NgramDrafter, or workers.draft_model.ModelDrafter."""

    def sync(self, generated: list[int]) -> None: ...

    def propose(self, limit: int) -> list[int]: ...


class NgramDrafter:
    """Where each n-gram of a row's tokens (prompt, then output) last occurred, kept up to date as tokens come.

    `ends[n][gram]` is the position right after the latest occurrence of `gram` that has a token after it, so
    the draft for a suffix is what followed its latest earlier occurrence.
    """

    def __init__(self, prompt: list[int]) -> None:
        self.tokens: list[int] = []
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        self._extend(prompt)
        self.prompt_length = len(prompt)

    def _extend(self, tokens: list[int]) -> None:
        seq = self.tokens
        for token in tokens:
            end = len(seq)  # the n-grams ending here now have a token after them
            for n, index in self.ends.items():
                if end >= n:
                    index[tuple(seq[end - n : end])] = end
            seq.append(token)

    def sync(self, generated: list[int]) -> None:
        """Take the row's output tokens not seen yet."""
        seen = len(self.tokens) - self.prompt_length
        if len(generated) > seen:
            self._extend(generated[seen:])

    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix found."""
        seq = self.tokens
        if limit <= 0:
            return []
        for n, index in self.ends.items():
            if len(seq) < n:
                continue
            end = index.get(tuple(seq[len(seq) - n :]))
            if end is not None:
                return seq[end : end + limit]
        return []


@dataclass
class Acceptance:
    """A row's recent draft tokens kept and rejected (decayed), and the worker-wide rate as its prior."""

    kept: float = 0.0
    rejected: float = 0.0

    DECAY = 0.8
    PRIOR = 2.0
    """Weight of the worker-wide rate in a row's estimate (in draft tokens)."""

    def rate(self, prior: float) -> float:
        """The estimated chance that the row's next draft token is kept, given the one before it was."""
        return (self.kept + self.PRIOR * prior) / (self.kept + self.rejected + self.PRIOR)

    def record(self, proposed: int, kept: int) -> None:
        self.kept = self.kept * self.DECAY + kept
        self.rejected = self.rejected * self.DECAY + (1 if kept < proposed else 0)


class StepCost:
    """Seconds of one decode or verify step as a + b * rows + c * extra positions, fitted by least squares over
    the steps timed so far, each older step weighing FORGET times less than the one after it."""

    FORGET = 0.98
    RIDGE = 1e-9

    def __init__(self) -> None:
        self.xtx = numpy.zeros((3, 3))
        self.xty = numpy.zeros(3)
        self.steps = 0
        self.wide_steps = 0
        """Verify steps timed (extra positions > 0): until there are some, c is unknown."""
        self._fit: numpy.ndarray | None = None

    def record(self, rows: int, extra: int, seconds: float) -> None:
        x = numpy.array([1.0, rows, extra])
        self.xtx = self.xtx * self.FORGET + numpy.outer(x, x)
        self.xty = self.xty * self.FORGET + x * seconds
        self.steps += 1
        self.wide_steps += extra > 0
        self._fit = None

    @property
    def known(self) -> bool:
        return self.steps >= 4 and self.wide_steps >= 2

    def seconds(self, rows: int, extra: int) -> float:
        if self._fit is None:
            a = self.xtx + self.RIDGE * numpy.eye(3)
            self._fit = numpy.linalg.solve(a, self.xty)
        a, b, c = (float(v) for v in self._fit)
        # A fit from few or noisy steps can put a negative weight on extra positions: they are never free.
        return max(a + b * rows, 1e-6) + max(c, 1e-6 * max(a + b * rows, 1e-6)) * extra


@dataclass
class Plan:
    """What one step feeds: each running row's draft (empty: the row takes one token, as in a decode step)."""

    drafts: list[list[int]]

    @property
    def width(self) -> int:
        return 1 + max((len(d) for d in self.drafts), default=0)


class SpeculationPolicy:
    """Per step: draft for each row, and keep the drafts only as long as the expected gain pays for the wider pass."""

    def __init__(
        self,
        max_tokens: int = SPECULATIVE_TOKENS,
        always: bool = False,
        drafter: Callable[[list[int]], Drafter] | None = None,
    ) -> None:
        """always: speculate at every step where some row has a draft (tests of exactness), whatever it costs.
        drafter: builds a row's drafter from its prompt; None: prompt lookup (NgramDrafter). Any other is taken
        to cost forward passes (a draft model): the width is then chosen before drafting (plan_ahead), and only
        that many tokens are drafted."""
        self.max_tokens = max_tokens
        self.always = always
        self.drafter: Callable[[list[int]], Drafter] = drafter if drafter is not None else NgramDrafter
        self.costly_drafts = self.drafter is not NgramDrafter
        self.cost = StepCost()
        self.prior = 0.5
        """The worker-wide acceptance rate (exponentially weighted over verify steps)."""
        self._since_probe = 0
        self.since_verify = 0
        """Steps since the last verify step (or since an exploring step found no draft): EXPLORE_EVERY."""

    @property
    def enabled(self) -> bool:
        return self.max_tokens > 0

    def plan(self, drafts: list[list[int]], rates: list[float]) -> Plan | None:
        """Cut drafts (each row's full proposal) to the width that maximises expected tokens per second;
        None: a plain decode step pays best."""
        rows = len(drafts)
        longest = max((len(d) for d in drafts), default=0)
        if longest == 0:
            if self.explore_due:  # nothing to explore now: look again EXPLORE_EVERY steps on
                self.since_verify = 0
            return None
        if self.always:
            return Plan(drafts)
        if not self.cost.known:
            self._since_probe += 1
            if self._since_probe < PROBE_EVERY:
                return None
            self._since_probe = 0
            return Plan([d[: max(1, self.max_tokens // 2)] for d in drafts])
        best, best_rate = 0, rows / self.cost.seconds(rows, 0) * (1 + MARGIN)
        for width in range(1, longest + 1):
            rate = self._expected(drafts, rates, width) / self.cost.seconds(rows, rows * width)
            if rate > best_rate:
                best, best_rate = width, rate
        if best == 0:
            return Plan([d[:EXPLORE_WIDTH] for d in drafts]) if self.explore_due else None
        return Plan([d[:best] for d in drafts])

    @property
    def explore_due(self) -> bool:
        """Whether the next step that has drafts verifies some even if a decode step is expected to pay more."""
        return self.cost.known and not self.always and self.since_verify >= EXPLORE_EVERY

    def plan_ahead(self, limits: list[int], rates: list[float]) -> Plan | None:
        """For drafts that cost time to make: the plan for rows that could each draft up to limits[r] tokens, as if
        they all did; the caller drafts only as far as it says. None: a plain decode step pays best."""
        return self.plan([[0] * limit for limit in limits], rates)

    @staticmethod
    def _expected(drafts: list[list[int]], rates: list[float], width: int) -> float:
        """Expected tokens of a step where each row may keep up to `width` draft tokens: one, plus rate + rate^2
        + ... + rate^k for k = its draft's length within width (a token is kept only if every one before it was)."""
        total = 0.0
        for draft, rate in zip(drafts, rates):
            k = min(width, len(draft))
            total += 1.0 + (rate * (1 - rate**k) / (1 - rate) if rate < 1.0 else float(k))
        return total

    def record_step(self, rows: int, width: int, seconds: float) -> None:
        self.cost.record(rows, rows * (width - 1), seconds)
        self.since_verify = 0 if width > 1 else self.since_verify + 1

    def ran_ahead(self) -> None:
        """A decode step ran without being planned (launched ahead of the last one's record: workers.scheduler)."""
        self.since_verify += 1

    def record_verify(self, kept: int, rejected: int) -> None:
        """A verify step's draft tokens kept and its drafts cut short (a row's draft ends at its first rejected
        token), folded into the prior as Acceptance estimates a row's rate: the chance a draft token is kept given
        the one before it was. (Kept over proposed would count the tokens after a rejection, never checked, as
        rejected too, and set every new row's rate too low: on rewriting prompts, ~0.5 against ~0.85.)"""
        if kept + rejected:
            self.prior = 0.9 * self.prior + 0.1 * (kept / (kept + rejected))


@dataclass
class SpeculationStats:
    """Draft tokens proposed and kept, for one row (reported with its Sample) or a whole worker."""

    proposed: int = 0
    kept: int = 0

    def add(self, proposed: int, kept: int) -> None:
        self.proposed += proposed
        self.kept += kept


def plan_step(policy: SpeculationPolicy, states: list[RowState]) -> Plan | None:
    """The drafts the running rows (states, in slot order) feed this step; None: a plain decode step."""
    rates = [state.acceptance.rate(policy.prior) for state in states]
    if not policy.costly_drafts:
        return policy.plan([state.draft(policy.max_tokens, policy.drafter) for state in states], rates)
    ahead = policy.plan_ahead([state.draft_limit(policy.max_tokens) for state in states], rates)
    if ahead is None:
        return None
    drafts = [state.draft(len(draft), policy.drafter) if draft else [] for state, draft in zip(states, ahead.drafts)]
    return Plan(drafts) if any(drafts) else None


def may_verify(policy: SpeculationPolicy, states: list[RowState]) -> bool:
    """Whether this step could verify drafts, before any is made: while the cost of verify passes is not measured,
    yes (the policy probes); then, whether the plan for rows that each drafted as far as they may (the most a draft
    can promise) pays. False lets a step run ahead of the host's record of the last one (workers.scheduler): rows
    whose drafts are rarely kept, or a card where a verify pass costs much more than a decode step, never pay."""
    if not policy.cost.known or policy.always or policy.explore_due:
        return True
    rates = [state.acceptance.rate(policy.prior) for state in states]
    return policy.plan_ahead([state.draft_limit(policy.max_tokens) for state in states], rates) is not None


def verify_step(
    plan: Plan, runner: DecoderRunner, cache: KVCache, batch: RunningBatch, policy: SpeculationPolicy, stats: SpeculationStats
) -> list[Sample | None]:
    """Feed every row its last token and its draft in one pass, keep what matches what the row draws, and truncate
    the rejected drafts' K/V; each row's Sample if it finished. Proposed and kept tokens are added to stats."""
    chunks = [[state.generated[-1]] + draft for state, draft in zip(batch.states, plan.drafts)]
    before = cache.host_lengths[: len(chunks)]
    logits = runner.verify(cache, chunks)
    ended, taken = batch.accept(logits, plan.drafts)
    proposed = kept = rejected = 0
    for slot, (chunk, count) in enumerate(zip(chunks, taken)):
        if count < len(chunk):
            cache.truncate(slot, before[slot] + count)  # the rejected drafts' K/V
            rejected += 1
        if len(chunk) > 1:
            proposed, kept = proposed + len(chunk) - 1, kept + count - 1
    stats.add(proposed, kept)
    policy.record_verify(kept, rejected)
    return ended
