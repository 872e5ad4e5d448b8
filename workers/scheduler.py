"""The scheduler: which rows wait, which run, and how the KV cache's memory is split between them.

`add(rows)` queues rows; each `step()` first admits waiting rows into free cache slots (one prefill for a
group of them), then feeds one token to every running row and returns the rows that finished. Rows can be
added at any time, so a caller that keeps adding never sees the batch drain. `Engine.generate` is add
everything, then step until idle; a worker adds what it claims from its queue as rows finish.

Admission, in order: rows wait in the order they were added (each add sorted by prompt length, so that a
prefill pads little); a row joins while the batch has a free slot and the running rows' prompt +
max_new_tokens stays within the token budget (a row that exceeds it alone still runs alone); rows join in
groups of at least `admit_at` (default max_rows / 8: each prefill reads every weight once more, so one prefill
per finished row cost 3-7% in bfloat16), or whatever is left.

Memory: the cache is `slots` rows of `capacity` positions (workers.kv_cache). The capacity is the length (rounded up by
at most 12.5%) that fits the longest row running or joining; up to budget // capacity rows (at most max_rows) may
run. The cache holds only as many slots as rows have joined, doubling as more join, so that its memory follows the
rows that exist rather than the budget. When a longer row comes, the cache is reshaped to longer slots as soon as
the rows running fit the budget at that length; when only rows needing half the length or less are left, to
shorter ones.

Prefix caching (workers.prefix_cache): a joining row whose prompt starts with blocks held in the prefix cache gets
their K/V copied into its slot and is prefilled from there; after the prefill its blocks are stored. A row that
would find more of its prompt cached once a row of the same group is prefilled waits for the next admission
instead (the first request of a job with a shared system prompt computes it, the others copy it).

The base (workers.kv_cache): while no running row reads it, the next waiting row's cached prefix (at least
MIN_SHARED tokens) becomes the cache's base, held once; every row that starts with at least MIN_SHARED tokens of
it (running rows too: their slots drop those positions) reads them from there, and its slot holds only the rest.
So a job's shared system prompt takes memory once, not once per row, slots are cut to the rows' own tokens (more,
shorter slots), and each step reads the prefix's K/V once for all rows (cascade attention). Not when the runner
is batch-invariant (float32): a row's numbers must not depend on which rows share its prefix.

Speculative decoding (workers.speculation): before each step every running row proposes a draft from its own text;
when the policy expects more tokens per second from verifying them, the step feeds each row its last token and its
draft in one pass (DecoderRunner.verify), keeps each row's tokens while they match what it draws, and truncates the
rejected drafts' K/V. Either way every row gets at least one token per step, drawn exactly as a decode step draws it.

On CUDA (workers.graphs): each decode step replays the forward pass and the draw from CUDA graphs, and is launched
before the host records the last step's tokens, so that the card never waits for the host's bookkeeping; see
step(). Rows with a grammar, and steps where a verify pass could pay, run one after the other.

Out of memory: the rows that were running start over from their prompts (fresh generators, so they give
exactly what they would have given) with at most half as many rows at once; a row out of memory alone fails.
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from workers.batch import Finished, halved, is_out_of_memory, out_of_memory_alone
from workers.decoder import DecoderRunner
from workers.graphs import DecodeGraphs, SamplingGraphs
from workers.kv_cache import KVCache
from workers.prefix_cache import BLOCK, BlockKey, PrefixCache, block_keys, reusable_blocks
from workers.rows import Drawn, Row, RunningBatch
from workers.speculation import SpeculationPolicy, SpeculationStats, may_verify, plan_step, verify_step
from workers.types import Sample

log = logging.getLogger(__name__)

PREFILL_TOKENS = 4096
"""Most (padded) prompt tokens one prefill forward takes; more waiting rows wait for the next one."""
MIN_CAPACITY = 16
"""The shortest slot the cache is cut into (positions)."""
MIN_SHARED = 4 * BLOCK
"""A prefix every running row shares is read once per decode step (cascade attention) from this length on."""


@dataclass
class Admission:
    """The rows that join at one admission, and where each one's K/V come from (Scheduler._plan_admission)."""

    rows: list[Row] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    """Each joining row's positions preloaded into its slot (from the prefix cache)."""
    offsets: list[int] = field(default_factory=list)
    """Each joining row's positions read from the base."""
    keys: list[list[BlockKey]] = field(default_factory=list)
    """Each joining row's block keys (prefix cache on)."""
    budget: int = 0
    """The scheduler's budget once they have joined."""

    @property
    def cached(self) -> list[int]:
        """Each joining row's prompt tokens it does not compute (prefix cache and base)."""
        return [start + offset for start, offset in zip(self.starts, self.offsets)]


def slot_length(n: int) -> int:
    """n rounded up to the next of eight steps per power of two (at most 12.5% more): long enough for rows a
    little longer than this one, so that the cache is rarely reshaped, and little memory is left unused."""
    step = max(1, (1 << (max(1, n).bit_length() - 1)) // 8)
    return -(-n // step) * step


class Scheduler:
    """Waiting rows, running rows and the token budget of one KV cache; add(rows), step() -> finished rows."""

    def __init__(
        self,
        runner: DecoderRunner,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        device: torch.device,
        max_rows: int,
        max_tokens: int,
        admit_at: int | None = None,
        prefix: PrefixCache | None = None,
        speculation: SpeculationPolicy | None = None,
        graphs: bool | None = None,
        overlap: bool | None = None,
        compile_decode: bool = False,
    ) -> None:
        """graphs: decode steps through CUDA graphs (workers.graphs); None: when the device is CUDA.
        compile_decode: those steps through torch.compile too (DecodeGraphs' compile).
        overlap: launch each decode step before recording the last one's tokens (see step()); None: on CUDA."""
        if max_rows < 1 or max_tokens < 1:
            raise ValueError(f"max_rows and max_tokens must be at least 1, got {max_rows} and {max_tokens}")
        self.runner = runner
        self.device = device
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.admit_at = admit_at
        self.rows_limit = max_rows
        """max_rows, lowered for the scheduler's life after an out-of-memory error."""
        self.waiting: deque[Row] = deque()
        self.batch = RunningBatch(runner.vocab_size, device, tokenizer, eos_ids)
        self.cache: KVCache | None = None
        self.budget = 0
        """prompt + max_new_tokens summed over the running rows."""
        self.prefix = prefix if prefix is not None and prefix.enabled else None
        """The prefix cache joining rows copy from and store into; None: off."""
        self.speculation = speculation if speculation is not None and speculation.enabled else None
        """Decides, per step, whether rows' drafts are verified (workers.speculation); None: off."""
        self.base: list[BlockKey] = []
        """The prefix-cache keys of the blocks whose K/V the cache's base holds (base_kv)."""
        self.base_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.speculated = SpeculationStats()
        """Draft tokens proposed and kept over the scheduler's life."""
        self.graphs = DecodeGraphs(runner, compile=compile_decode) if (device.type == "cuda" if graphs is None else graphs) else None
        """The decode steps' CUDA graphs (workers.graphs); None: every step eager."""
        if self.graphs is not None:
            self.batch.draws = SamplingGraphs(self.graphs.capture)
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self.pending: Drawn | None = None
        """The last decode step's draw, launched and not yet recorded (overlap)."""
        self.on_step: Callable[[int, int], None] | None = None
        """Called after every decode step with (rows running, rows the cache's shape allows): occupancy."""

    # --- what it holds ---------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.waiting and not len(self.batch) and self.pending is None

    @property
    def running(self) -> int:
        return len(self.batch)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.batch.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids: frozenset[int]) -> None:
        self.batch.eos_ids = ids

    @property
    def slots(self) -> int:
        """Rows the current cache shape lets run at once."""
        return self._slots_for(self.cache.capacity if self.cache is not None else MIN_CAPACITY)

    # --- the verbs ---------------------------------------------------------------------------------

    def add(self, rows: list[Row]) -> None:
        """Queue rows behind those already waiting (this group sorted by prompt length)."""
        self.waiting.extend(sorted(rows, key=lambda r: len(r.prompt_ids)))

    def drop_waiting(self, unwanted: Callable[[Row], bool]) -> list[Row]:
        """Remove the waiting rows for which unwanted(row) is true (e.g. a cancelled job's); running rows stay."""
        dropped = [row for row in self.waiting if unwanted(row)]
        if dropped:
            self.waiting = deque(row for row in self.waiting if not unwanted(row))
        return dropped

    def clear(self) -> list[Row]:
        """Forget every row, running and waiting (after an error the caller hands them all back); returns them."""
        rows = [s.row for s in self.batch.states] + list(self.waiting)
        self.waiting.clear()
        self.batch.clear()
        self.pending = None
        self.budget = 0
        if self.cache is not None:
            self.cache.clear()
        if self.graphs is not None:
            self.graphs.clear()
        return rows

    def step(self) -> list[Finished]:
        """Admit what fits, decode one token for every running row; the rows that finished.

        Overlapped (on CUDA): a decode step is launched and its tokens are recorded by the next step(), which
        first launches its own decode step, so that the device computes step N+1 while the host records step N's
        tokens (stop strings, finished rows) and admits rows: the device never waits for the host's bookkeeping.
        A row that ended at step N was in step N+1 too; that token is dropped. Not while a row has a grammar, or
        while a verify pass of speculation could pay (both need step N's tokens before step N+1): those steps run
        one after the other."""
        finished: list[Finished] = []
        try:
            ahead = None
            if self.pending is not None:
                if len(self.batch) and self._overlaps():
                    ahead = self._launch()
                self._collect(finished)
                self.pending = ahead
            self._admit(finished)
            if ahead is None and len(self.batch):
                if self._overlaps():
                    self.pending = self._launch()
                else:
                    rows = len(self.batch)
                    self._retire(finished, self._decode())
                    if self.on_step is not None:
                        self.on_step(rows, self.slots)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            self._recover(exc, finished)
        return finished

    # --- one token (or more) for every running row ----------------------------------------------------

    def _overlaps(self) -> bool:
        """Whether the next decode step may run ahead of the host's record of the last one (see step()): not for
        a row with a grammar, nor while a verify pass could pay (its drafts need the last tokens)."""
        if not self.overlap or self.batch.guided:
            return False
        return self.speculation is None or not may_verify(self.speculation, self.batch.states)

    def _forward(self) -> Tensor:
        """A decode step's logits for every running row (through the bucket's CUDA graph, when there is one)."""
        assert self.cache is not None
        decode = self.graphs.decode if self.graphs is not None else self.runner.decode
        return decode(self.cache, self.batch.last_tokens())

    def _launch(self) -> Drawn:
        """A decode step whose tokens are recorded later (_collect)."""
        rows = len(self.batch)
        drawn = self.batch.launch(self._forward())
        if self.speculation is not None:
            self.speculation.ran_ahead()
        if self.on_step is not None:
            self.on_step(rows, self.slots)
        return drawn

    def _collect(self, finished: list[Finished]) -> None:
        """Record the pending step's tokens; the rows that ended leave."""
        assert self.pending is not None
        drawn, self.pending = self.pending, None
        ended = dict(zip(map(id, drawn.states), self.batch.collect(drawn)))
        self._retire(finished, [ended.get(id(state)) for state in self.batch.states])

    def _decode(self) -> list[Sample | None]:
        """A decode step, or a verify step of the rows' drafts when the policy expects it to pay; each row's
        Sample if it finished."""
        assert self.cache is not None
        rows = len(self.batch)
        started = time.perf_counter()  # drafting counts: a draft model's passes are part of what speculation costs
        plan = plan_step(self.speculation, self.batch.states) if self.speculation is not None else None
        if plan is None:
            ended = self.batch.sample(self._forward())
        else:
            assert self.speculation is not None
            ended = verify_step(plan, self.runner, self.cache, self.batch, self.speculation, self.speculated)
        if self.speculation is not None:
            self.speculation.record_step(rows, 1 if plan is None else plan.width, time.perf_counter() - started)
        return ended

    # --- the base: a shared prefix held once ---------------------------------------------------------

    def _keys(self, row: Row) -> list[BlockKey]:
        if row.block_keys is None:
            row.block_keys = block_keys(row.prompt_ids)
        return row.block_keys

    def _base_offset(self, row: Row) -> int:
        """How many first positions of the row's prompt the base holds (whole blocks that leave its last prompt
        token to compute), or 0 below MIN_SHARED."""
        if not self.base:
            return 0
        keys, base = self._keys(row), self.base
        n, limit = 0, min(len(base), reusable_blocks(row.prompt_ids))
        while n < limit and keys[n][0] == base[n][0]:
            n += 1
        return n * BLOCK if n * BLOCK >= MIN_SHARED else 0

    def _choose_base(self) -> None:
        """While no running row reads the base: the next waiting row's cached prefix becomes it, and running rows
        that start with it read it from there (their slots drop those positions)."""
        if self.prefix is None or self.runner.align != 1 or not self.waiting:
            return
        states = self.batch.states
        if any(state.row.offset for state in states):
            return
        row = self.waiting[0]
        keys = self._keys(row)
        held = self.prefix.held(keys[: reusable_blocks(row.prompt_ids)])
        if held * BLOCK < MIN_SHARED or keys[:held] == self.base:
            return
        self.base, self.base_kv = keys[:held], self.prefix.gather(keys[:held])
        if self.cache is None:
            return
        self.cache.set_base(*self.base_kv)
        for slot, state in enumerate(states):
            offset = self._base_offset(state.row)
            if offset:
                self.cache.rebase(slot, offset)
                state.row.offset = offset
                self.budget -= offset

    # --- admission and retirement ---------------------------------------------------------------------

    def _slots_for(self, capacity: int) -> int:
        return max(1, min(self.rows_limit, self.max_tokens // capacity))

    def _fit(self, need: int) -> bool:
        """Shape the cache so that a row of `need` positions can join the running rows; False when it cannot yet.

        Only the slot length is chosen here: the cache holds as many slots as rows run, and grows (_grow) as rows
        join, so memory follows the rows that exist, not the budget (a job's first row, or a few rows, take
        little). Slots at least twice as long as every row needs are cut down."""
        running_need = max((s.row.slot_need for s in self.batch.states), default=0)
        capacity = self.runner.aligned(slot_length(max(need, running_need, MIN_CAPACITY)))
        cache = self.cache
        if cache is not None and capacity <= cache.capacity < 2 * capacity:
            now = self._slots_for(cache.capacity)
            shorter_helps = self._slots_for(capacity) > now and (not self.running or self.running >= now)
            if not shorter_helps:
                return True  # long enough, not wasteful, and shorter slots would not let more rows run now
        slots = self._slots_for(capacity)
        if self.running > slots:
            return False  # wait until enough rows leave to fit the longer slots
        if cache is None or not self.running:
            self.cache = None  # drop the old memory before taking the new
            del cache
            gc.collect()
            self.cache = self.runner.new_cache(1, capacity, self.device)
            if self.base_kv is not None:
                self.cache.set_base(*self.base_kv)
        else:
            log.debug("reshaping the KV cache to %d slots of %d positions (%d rows running)", self.running, capacity, self.running)
            self.cache = cache.reshaped(max(self.running, self.runner.min_rows), self.runner.aligned(capacity))
        return True

    def _grow(self, rows: int) -> None:
        """At least `rows` slots (doubling, so that a filling batch reshapes a few times only; never more than
        the budget allows at this slot length)."""
        cache = self.cache
        assert cache is not None
        if cache.slots >= rows:
            return
        slots = min(max(rows, 2 * cache.slots), max(rows, self._slots_for(cache.capacity)))
        log.debug("growing the KV cache to %d slots of %d positions", slots, cache.capacity)
        self.cache = cache.reshaped(max(slots, self.runner.min_rows), cache.capacity)

    def _admit(self, finished: list[Finished]) -> None:
        """Waiting rows join the batch when enough of them fit (see the module docstring): one prefill for the group."""
        admission = self._plan_admission()
        if admission is not None:
            self._join(admission, finished)

    def _plan_admission(self) -> Admission | None:
        """Which waiting rows join now (taken off the queue), and where their K/V come from; None: none yet."""
        if not self.waiting:
            return None
        self._choose_base()
        room = (self.slots if self.cache is not None else self.rows_limit) - self.running
        coming_rows = itertools.islice(self.waiting, max(1, room))
        if not self._fit(max(row.need - self._base_offset(row) for row in coming_rows)):
            return None
        assert self.cache is not None
        limit = self._slots_for(self.cache.capacity)
        free = limit - self.running
        admit_at = max(1, limit // 8) if self.admit_at is None else self.admit_at
        if free <= 0 or not (free >= admit_at or not self.running or len(self.waiting) <= free):
            return None
        admission = Admission(budget=self.budget)
        later: list[Row] = []
        coming: set[int] = set()
        """Keys of the blocks this group's prefill will store in the prefix cache."""
        longest = 0
        while self.waiting and len(admission.rows) < free:
            row = self.waiting[0]
            offset = self._base_offset(row)
            slot_need = row.need - offset
            if slot_need > self.cache.capacity:
                break  # the next step reshapes the cache for it
            if (self.running or admission.rows) and admission.budget + slot_need > self.max_tokens:
                break
            cached, keys = 0, []
            if self.prefix is not None:
                keys = self._keys(row)
                reusable = reusable_blocks(row.prompt_ids)
                held = self.prefix.held(keys[:reusable], offset // BLOCK)
                if held < reusable and keys[held][0] in coming and len(later) < 4 * free:
                    later.append(self.waiting.popleft())  # its next block is being computed by this group
                    continue
                coming.update(key for key, _ in keys[held : self.prefix.max_blocks])
                cached = held * BLOCK
            rest = self.runner.aligned(len(row.prompt_ids) - cached)
            if admission.rows and (len(admission.rows) + 1) * max(longest, rest) > PREFILL_TOKENS:
                break
            admission.rows.append(self.waiting.popleft())
            row.offset = offset
            admission.starts.append(cached - offset)
            admission.offsets.append(offset)
            admission.keys.append(keys)
            admission.budget += slot_need
            longest = max(longest, rest)
        self.waiting.extendleft(reversed(later))
        return admission if admission.rows else None

    def _join(self, admission: Admission, finished: list[Finished]) -> None:
        """The admitted rows take slots, copy their cached K/V, are prefilled together and draw their first token."""
        group = admission.rows
        try:
            self._grow(self.running + len(group))
        except BaseException:
            self.waiting.extendleft(reversed(group))  # out of memory: the group waits again (step recovers)
            raise
        assert self.cache is not None
        self.budget = admission.budget
        cached_of = admission.cached
        for row, cached in zip(group, cached_of):
            row.cached_tokens = cached
        self.batch.add(group)
        first = self.cache.admit(admission.starts, admission.offsets)
        if self.prefix is not None:
            for slot, (keys, cached, offset) in enumerate(zip(admission.keys, cached_of, admission.offsets), start=first):
                self.prefix.load(self.cache, slot, keys[: cached // BLOCK], offset // BLOCK)
        logits = self.runner.extend(self.cache, first, [row.prompt_ids[cached:] for row, cached in zip(group, cached_of)])
        if self.prefix is not None:
            for slot, (row, keys, cached) in enumerate(zip(group, admission.keys, cached_of), start=first):
                self.prefix.store(self.cache, slot, keys)
                self.prefix.count(len(row.prompt_ids), cached)
        self._retire(finished, [None] * first + self.batch.sample(logits, first))

    def _retire(self, finished: list[Finished], ended: list[Sample | None]) -> None:
        """Rows whose Sample is set leave the batch (and the cache) at once."""
        leaving = [slot for slot, sample in enumerate(ended) if sample is not None]
        if not leaving:
            return
        for slot in leaving:
            state = self.batch.states[slot]
            row, drafted = state.row, state.speculation
            sample = dataclasses.replace(
                ended[slot], cached_tokens=row.cached_tokens, draft_tokens=drafted.proposed, accepted_tokens=drafted.kept
            )
            finished.append(Finished(row, sample))
            self.budget -= row.slot_need
        assert self.cache is not None
        self.batch.keep(self.cache.release(leaving))

    def _recover(self, exc: BaseException, finished: list[Finished]) -> None:
        """Out of memory: the running rows start over with fewer rows at once; alone, the row fails."""
        rows = [s.row for s in self.batch.states]
        self.batch.clear()
        self.pending = None
        self.budget = 0
        self.cache = None
        if self.graphs is not None:
            self.graphs.clear()  # their memory pool
        if self.batch.draws is not None:
            self.batch.draws.clear()
        self.base, self.base_kv = [], None
        for row in rows:
            row.offset = 0
        if self.prefix is not None:
            self.prefix.clear()  # its memory first: a worker never runs out of memory because of the cache
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(rows) <= 1:
            finished.append(out_of_memory_alone(rows[0] if rows else self.waiting.popleft(), exc))
            return
        self.rows_limit = halved(self.rows_limit, len(rows))
        log.warning("out of memory with %d rows running; retrying with at most %d rows", len(rows), self.rows_limit)
        self.waiting.extendleft(reversed(rows))
