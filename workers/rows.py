"""Rows (one sample of one request) and the sampling state of a running batch of them.

A request with n samples is expanded into rows; each row carries its own parameters and seed. Once a row
joins a batch, its sampling state (generator, the tokens it has produced, its repetition-penalty mask, its
generated-token counts, its logprobs) is built once and kept across steps in RunningBatch, whose tensors are
in the batch's slot order: row i of every tensor is the row in cache slot i.

In order: Row -> expand_rows -> RowState -> RunningBatch (add, keep, sample).
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from workers.finish import decode, ending_ids, finish
from workers.grammar import Grammars, advance, grammars_for
from workers.prefix_cache import BlockKey
from workers.sampling import RowParams, SamplingGroups, apply_repetition_penalty, draw_uniforms, next_tokens
from workers.speculation import Acceptance, Drafter, NgramDrafter, SpeculationStats
from workers.syncs import PendingRead, sent, start_read
from workers.types import Sample, SamplingParams

if TYPE_CHECKING:
    from workers.graphs import SamplingGraphs

SEED_LIMIT = 2**31
"""Seeds the engine picks stay below this (and seed + i too), so they fit a 32-bit integer column."""


@dataclass
class Row:
    """One sample of one request: what the scheduler generates."""

    request: Hashable
    """Whose row this is: the caller's key of the request."""
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    """The seed reported in the Sample; for sampled rows (temperature > 0) also the seed of the row's generator."""
    cached_tokens: int = 0
    """Set at admission: its prompt's first tokens whose K/V were copied from the prefix cache."""
    block_keys: list[BlockKey] | None = field(default=None, repr=False)
    """The prefix cache's keys of its prompt's full blocks (prefix cache on; computed once, when first needed)."""
    offset: int = 0
    """Set at admission: its first positions read from the KV cache's base (a shared prefix held once), not its slot."""

    @property
    def sampled(self) -> bool:
        return self.params.temperature > 0

    @property
    def need(self) -> int:
        """Cache positions the row may take: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def slot_need(self) -> int:
        """Positions of its own slot the row may take: need, less the base positions it reads."""
        return self.need - self.offset


def decoded_rows(params: SamplingParams) -> int:
    """How many rows a request is decoded as: n, but one for a greedy request (its samples are all the same)."""
    return 1 if params.temperature == 0 else params.n


def expand_rows(request: Hashable, prompt_ids: list[int], params: SamplingParams) -> list[Row]:
    """Rows of one request: sample i is drawn with seed + i (the seed is picked here when the request has none).

    Greedy samples report seed + i when the request gave a seed, None otherwise (see complete_greedy).
    """
    if params.temperature == 0:
        return [Row(request, 0, prompt_ids, params, params.seed)]
    seed = params.seed if params.seed is not None else secrets.randbelow(SEED_LIMIT - params.n)
    return [Row(request, i, prompt_ids, params, seed + i) for i in range(decoded_rows(params))]


@dataclass
class RowState:
    """A row in a running batch: its generator and what it has produced so far."""

    row: Row
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    """One entry per generated token, kept only when the row asks for logprobs."""
    drafter: Drafter | None = None
    """Built the first time the row is drafted for (speculative decoding)."""
    acceptance: Acceptance = field(default_factory=Acceptance)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    matcher: Any = None
    """Structured output: the row's llguidance matcher (workers.grammar), in step with generated; None: free text."""
    pending: int = 0
    """Tokens drawn on the device and not yet recorded in generated (RunningBatch.launch, collect)."""
    done: bool = False
    """The row has produced its Sample: a token drawn after it (a launched step's) is dropped."""

    def draft_limit(self, limit: int) -> int:
        """How many draft tokens the row may take: never past max_new_tokens."""
        return max(0, min(limit, self.row.params.max_new_tokens - len(self.generated) - 1))

    def draft(self, limit: int, make_drafter: Callable[[list[int]], Drafter] = NgramDrafter) -> list[int]:
        """Up to `limit` tokens guessed to come next (workers.speculation), never past max_new_tokens."""
        limit = self.draft_limit(limit)
        if limit <= 0:
            return []
        if self.drafter is None:
            self.drafter = make_drafter(self.row.prompt_ids)
        self.drafter.sync(self.generated)
        draft = self.drafter.propose(limit)
        if self.matcher is not None and draft:  # a constrained row's draft stops where its grammar would refuse it
            draft = draft[: self.matcher.validate_tokens(draft)]
        return draft


@dataclass
class Drawn:
    """A draw whose tokens are on their way to the host: the rows it drew for (in slot order at the time), which
    of them (positions) asked for logprobs, and the pending read of the tokens and those logprobs."""

    states: list[RowState]
    wanted: list[int]
    read: PendingRead


def start_row(row: Row) -> RowState:
    """A fresh RowState: the generator is seeded here, so a row restarted after an out-of-memory error draws the same."""
    sampled = row.sampled and row.seed is not None
    return RowState(row, torch.Generator().manual_seed(row.seed) if sampled else None)


class RunningBatch:
    """The sampling state of the rows of a running batch, in slot order, kept across steps.

    Per-row parameters are (rows,) tensors; the repetition-penalty mask (bool), the generated-token counts
    (float), the logit biases (float) and the tokens min_tokens holds back (bool) are (rows, vocab) tensors,
    allocated only while some row needs them and built on the host when rows join (never read back). Rows join
    with add() and leave with keep(order), which follows the cache's own compaction.

    A draw asks the device once (workers.syncs.start_read) for its tokens and logprobs; each row's latest token
    stays on the device too (last), for the next decode step to feed. A decode step's draw can be launched and
    collected later (launch, collect), so that the next step runs on the device while the host records this one.
    sort_free (default: on CUDA) finds what
    top-k and top-p keep without sorting or reading the device (workers.sampling.kept_by_threshold).
    """

    def __init__(
        self, vocab: int, device: torch.device, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int],
        sort_free: bool | None = None,
    ) -> None:
        self.vocab = vocab
        self.device = device
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.sort_free = device.type == "cuda" if sort_free is None else sort_free
        self.states: list[RowState] = []
        self.last = torch.zeros(0, dtype=torch.long, device=device)
        """Each row's latest token (rows,), on the device."""
        self._groups: SamplingGroups | None = None
        """Which rows sample how, for the whole batch (rebuilt when rows come or go)."""
        self.params = RowParams.build([], [], [], [], device)
        self.bias: Tensor | None = None
        """float (rows, vocab): each row's logit_bias (rows without one: zeros), while some row has one."""
        self.held_back: Tensor | None = None
        """bool (rows, vocab): the tokens that would end each row with min_tokens (EOS, stop_token_ids), masked
        while the row has fewer tokens than that, while some row has min_tokens."""
        self.frequency = torch.zeros(0, dtype=torch.float32, device=device)
        self.presence = torch.zeros(0, dtype=torch.float32, device=device)
        self.seen: Tensor | None = None
        """bool (rows, vocab): the tokens of each penalised row's prompt and output (other rows: unused)."""
        self.counts: Tensor | None = None
        """float (rows, vocab): how often each token was generated, while a row has an OpenAI penalty."""
        self.grammars: Grammars = grammars_for(tokenizer, vocab, eos_ids)
        """Compiled structured-output constraints, shared by the worker's batches."""
        self.draws: SamplingGraphs | None = None
        """The sort-free draw of a whole batch through CUDA graphs (workers.graphs), when the scheduler graphs its
        steps; None: next_tokens, eagerly."""

    def __len__(self) -> int:
        return len(self.states)

    @property
    def guided(self) -> bool:
        """Some row has a grammar (structured output): its next mask needs its last token on the host."""
        return any(state.matcher is not None for state in self.states)

    def add(self, rows: list[Row]) -> list[RowState]:
        """New rows join at the end (the next slots)."""
        states = [start_row(row) for row in rows]
        for state in states:
            if state.row.params.constraint is not None:
                state.matcher = self.grammars.matcher(state.row.params.constraint)
        first = len(self.states)
        self.states += states
        self.last = torch.cat([self.last, self.last.new_zeros(len(rows))])
        self._groups = None
        added = RowParams.build(
            [r.params.temperature for r in rows], [r.params.top_k for r in rows], [r.params.top_p for r in rows],
            [r.params.repetition_penalty for r in rows], self.device, [r.params.min_p for r in rows],
        )
        self.params = RowParams(*(torch.cat([old, new]) for old, new in zip(_fields(self.params), _fields(added))))
        self.frequency = torch.cat([self.frequency, self._tensor([r.params.frequency_penalty for r in rows])])
        self.presence = torch.cat([self.presence, self._tensor([r.params.presence_penalty for r in rows])])
        if self.seen is not None or any(r.params.repetition_penalty != 1.0 for r in rows):
            seen = torch.zeros((len(rows), self.vocab), dtype=torch.bool, device=self.device)
            for i, row in enumerate(rows):
                if row.params.repetition_penalty != 1.0:
                    seen[i, torch.tensor(row.prompt_ids, dtype=torch.long, device=self.device)] = True
            self.seen = self._grown(self.seen, seen, first)
        if self.counts is not None or any(r.params.frequency_penalty or r.params.presence_penalty for r in rows):
            self.counts = self._grown(self.counts, torch.zeros((len(rows), self.vocab)), first)
        if self.bias is not None or any(r.params.logit_bias for r in rows):
            bias = torch.zeros((len(rows), self.vocab), dtype=torch.float32)
            for i, row in enumerate(rows):
                for token, value in row.params.logit_bias.items():
                    bias[i, token] = value
            self.bias = self._grown(self.bias, bias, first)
        if self.held_back is not None or any(r.params.min_tokens for r in rows):
            held = torch.zeros((len(rows), self.vocab), dtype=torch.bool)
            for i, row in enumerate(rows):
                if row.params.min_tokens:
                    held[i, sorted(t for t in ending_ids(row.params, self.eos_ids) if t < self.vocab)] = True
            self.held_back = self._grown(self.held_back, held, first)
        return states

    def _grown(self, old: Tensor | None, new: Tensor, first: int) -> Tensor:
        """A (rows, vocab) tensor with new's rows after old's first rows (None: no row needed it yet, zeros)."""
        if old is None:
            old = torch.zeros((first, self.vocab), dtype=new.dtype, device=self.device)
        return torch.cat([old, new.to(self.device)])

    def keep(self, order: list[int]) -> None:
        """Keep the rows at these old positions, in this order (the others left the batch)."""
        if not order:
            self.clear()
            return
        index = sent(torch.tensor(order, dtype=torch.long), self.device)
        self.states = [self.states[i] for i in order]
        self.last = self.last[index]
        self._groups = None
        self.params = self.params.select(index)
        self.frequency, self.presence = self.frequency[index], self.presence[index]
        self.seen, self.counts, self.bias, self.held_back = (
            None if t is None else t[index] for t in (self.seen, self.counts, self.bias, self.held_back)
        )

    def clear(self) -> None:
        self.states = []
        self.last = self.last[:0]
        self._groups = None
        self.params = RowParams.build([], [], [], [], self.device)
        self.frequency = self.frequency[:0]
        self.presence = self.presence[:0]
        self.seen = self.counts = self.bias = self.held_back = None

    def sample(self, logits: Tensor, first: int = 0) -> list[Sample | None]:
        """Draw the next token of rows first.. from their logits (rows, vocab), append it, and return each row's
        Sample if it is done (None if not)."""
        return self._sample_at(logits, list(range(first, first + logits.shape[0])))

    def accept(self, logits: Tensor, drafts: list[list[int]]) -> tuple[list[Sample | None], list[int]]:
        """After a verify pass (logits (rows, width, vocab) of every running row): draw each row's tokens position
        by position, exactly as decode steps would, while the token drawn is its draft's; returns each row's
        Sample if it is done, and how many tokens it took (1 + the draft tokens kept)."""
        rows = len(drafts)
        done: list[Sample | None] = [None] * rows
        taken = [0] * rows
        active = list(range(rows))
        for position in range(logits.shape[1]):
            if not active:
                break
            index = torch.tensor(active, dtype=torch.long, device=logits.device)
            ended = self._sample_at(logits[index, position], active)
            still = []
            for slot, sample in zip(active, ended):
                taken[slot] += 1
                draft = drafts[slot]
                if sample is not None:
                    done[slot] = sample
                elif position < len(draft) and self.states[slot].generated[-1] == draft[position]:
                    still.append(slot)
            active = still
        for slot, (state, draft) in enumerate(zip(self.states, drafts)):
            if draft:
                kept = min(taken[slot] - 1, len(draft))
                state.acceptance.record(len(draft), kept)
                state.speculation.add(len(draft), kept)
        return done, taken

    def launch(self, logits: Tensor) -> Drawn:
        """Draw the next token of every running row from its logits (rows, vocab), without waiting for the device:
        the tokens are on their way to the host, and collect() records them. Until then each row counts the draw
        as pending (min_tokens), and the device already holds the tokens (last, penalties) for the next step."""
        return self._draw(logits, list(range(len(self.states))))

    def collect(self, drawn: Drawn) -> list[Sample | None]:
        """Record a launched draw's tokens (waits for them), in the order of drawn.states: each row's Sample if
        it is done, None if not, or if it had finished before (a row that ended at the step before: its token of
        this one is dropped)."""
        return self._record(drawn)

    def _sample_at(self, logits: Tensor, slots: list[int]) -> list[Sample | None]:
        """Draw the next token of the rows in these slots from their logits (one row each), append it, and return
        each row's Sample if it is done (None if not)."""
        return self._record(self._draw(logits, slots))

    def _draw(self, logits: Tensor, slots: list[int]) -> Drawn:
        """The device's part of a draw for the rows in these slots: the tokens drawn, stored on the device (last,
        penalties), and on their way to the host with the logprobs asked for."""
        states = [self.states[slot] for slot in slots]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        whole = contiguous and slots[0] == 0 and len(slots) == len(self.states)
        at: slice | Tensor = (
            slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, dtype=torch.long, device=self.device)
        )
        raw = logits
        if self.bias is not None:  # first, as vLLM and OpenAI apply it
            logits = logits.float() + self.bias[at]
        young = [len(s.generated) + s.pending < s.row.params.min_tokens for s in states]
        if self.held_back is not None and any(young):  # which rows are young is known here, on the host
            young_rows = sent(torch.tensor(young, dtype=torch.bool), self.device)
            logits = logits.masked_fill(self.held_back[at] & young_rows[:, None], -torch.inf)
        if self.counts is not None:
            counts = self.counts[at]
            penalty = self.frequency[at, None] * counts + self.presence[at, None] * (counts > 0).float()
            logits = logits - penalty.to(logits.dtype)
        params = RowParams(*(t[at] for t in _fields(self.params)))
        seen = self.seen[at] if self.seen is not None else None
        guided = [i for i, s in enumerate(states) if s.matcher is not None]
        if guided:
            logits = self.grammars.apply(logits, guided, [states[i].matcher for i in guided])
        uniform = draw_uniforms([s.generator for s in states], self.device)
        if self.draws is not None and self.draws.failed is None and whole and self.sort_free:
            if seen is not None:
                logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
            tokens = self.draws.tokens(logits, params, uniform, self.groups.filters)
        else:
            tokens = next_tokens(logits, params, seen, uniform, self.groups if whole else self._groups_of(states), self.sort_free)
        if self.seen is not None or self.counts is not None:
            # (row, token) pairs need an index tensor: a slice beside tokens would pair every row with every token
            index = at if isinstance(at, Tensor) else sent(torch.tensor(slots, dtype=torch.long), self.device)
            if self.seen is not None:
                self.seen[index, tokens] = True
            if self.counts is not None:
                self.counts[index, tokens] += 1
        self.last[at] = tokens
        wanted = [i for i, s in enumerate(states) if s.row.params.logprobs]
        for state in states:
            state.pending += 1
        return Drawn(states, wanted, start_read(tokens, *self._logprobs(raw, tokens, wanted, states)))

    def _record(self, drawn: Drawn) -> list[Sample | None]:
        """The host's part of a draw: append each row's token, and return its Sample if it is done (None if not,
        or if it was done before)."""
        states, wanted = drawn.states, drawn.wanted
        host = drawn.read.values()
        generated = host[0]
        for state in states:
            state.pending -= 1
        if wanted:
            self._record_logprobs(generated, host[1:], wanted, states)
        finished: list[Sample | None] = []
        for state, token in zip(states, generated):
            if state.done:
                finished.append(None)
                continue
            state.generated.append(token)
            if state.matcher is not None and advance(state.matcher, token, self.eos_ids):
                sample: Sample | None = Sample(decode(self.tokenizer, state.generated), "stop", len(state.generated), state.row.seed)
            else:
                sample = finish(self.tokenizer, state.generated, state.row, self.eos_ids)
            if sample is not None:
                state.done = True
                if state.row.params.logprobs:
                    sample.logprobs = state.logprobs[: sample.completion_tokens]
            finished.append(sample)
        return finished

    @property
    def groups(self) -> SamplingGroups:
        """Which rows of the whole batch sample how (built on the host once per change of rows)."""
        if self._groups is None:
            self._groups = self._groups_of(self.states)
        return self._groups

    def _groups_of(self, states: list[RowState]) -> SamplingGroups:
        params = [s.row.params for s in states]
        return SamplingGroups.of(
            [p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params], self.device,
            [p.min_p for p in params],
        )

    def last_tokens(self) -> Tensor:
        """Each running row's latest token (rows,): what the next decode step feeds (on the device, never read)."""
        return self.last

    def _tensor(self, values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    @staticmethod
    def _logprobs(raw: Tensor, tokens: Tensor, wanted: list[int], states: list[RowState]) -> list[Tensor]:
        """For the rows at `wanted` (positions in raw): the chosen token's log-probability, and the values and ids of
        the most likely tokens (as many as the most any of them asks), under the model's own distribution (raw
        logits, before penalties, temperature and filters, as vLLM reports them); nothing when no row asks."""
        if not wanted:
            return []
        index = sent(torch.tensor(wanted, dtype=torch.long), raw.device)
        logprobs = raw.index_select(0, index).float().log_softmax(dim=-1)
        chosen = logprobs.gather(-1, tokens.index_select(0, index)[:, None]).squeeze(-1)
        width = max(states[i].row.params.top_logprobs for i in wanted)
        top = logprobs.topk(width, dim=-1)
        return [chosen, top.values, top.indices]

    def _record_logprobs(self, tokens: list[int], read: list[Any], wanted: list[int], states: list[RowState]) -> None:
        """Append each asking row's logprobs entry, from what _logprobs computed (read back as lists)."""
        chosen, top_values, top_ids = read
        decode = self.tokenizer.decode
        for j, i in enumerate(wanted):
            state = states[i]
            keep = state.row.params.top_logprobs
            entry: dict[str, Any] = {"token": decode([tokens[i]]), "logprob": chosen[j], "top_logprobs": []}
            for value, candidate in zip(top_values[j][:keep], top_ids[j][:keep]):
                entry["top_logprobs"].append({"token": decode([candidate]), "logprob": value})
            state.logprobs.append(entry)


def _fields(params: RowParams) -> tuple[Tensor, ...]:
    assert params.min_p is not None, "a running batch's RowParams always has min_p (RowParams.build)"
    return params.temperature, params.top_k, params.top_p, params.repetition_penalty, params.min_p
