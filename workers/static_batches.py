"""Static batches on transformers' own forward: the decode path of architectures workers.decoder does not run.

StaticScheduler has the continuous scheduler's interface (workers.batch): each step() takes every waiting row,
sorts the rows by prompt length and cuts them into batches of at most rows_limit rows (max_rows, halved after
an out-of-memory error) and max_tokens positions.
Each batch is prefilled together (left-padded) and decoded until its last row ends; a finished row leaves the
batch (its cache rows are dropped). Sampling goes through the same RunningBatch as the continuous path, so every
per-row feature (seeds, filters, repetition and OpenAI penalties, logprobs, stop strings) behaves the same.

In order: KVBatch -> left_pad -> decode_batch -> StaticScheduler.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from workers.batch import Finished, halved, is_out_of_memory, out_of_memory_alone
from workers.rows import Row, RunningBatch
from workers.types import Sample

log = logging.getLogger(__name__)


class KVBatch:
    """transformers' DynamicCache for one static batch, with its attention mask and each row's next position.

    Only for architectures workers.decoder does not run; the continuous path keeps its cache in workers.kv_cache.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.attention_mask: Tensor | None = None
        self.next_position: Tensor | None = None

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Run the left-padded prompts (rows, length); return the logits of each row's last position (rows, vocab)."""
        # Positions count real tokens only, so left padding does not shift them (as transformers' generate does).
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.attention_mask = attention_mask
        self.next_position = position_ids[:, -1] + 1
        return self._forward(input_ids, position_ids)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one new token per row (rows,); return the next logits (rows, vocab)."""
        assert self.attention_mask is not None and self.next_position is not None, "prefill first"
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(tokens), 1)], dim=-1)
        position_ids = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._forward(tokens[:, None], position_ids)

    def keep(self, index: Tensor) -> None:
        """Keep only the rows at index (finished rows leave the batch, so they cost nothing more)."""
        assert self.attention_mask is not None and self.next_position is not None, "prefill first"
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.next_position = self.next_position[index]

    def _forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=position_ids,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]


def left_pad(rows: list[Row], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (rows, longest prompt), padded on the left."""
    length = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.prompt_ids)
        input_ids[i, length - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
        attention_mask[i, length - n :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decode_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[Row],
    eos_ids: frozenset[int],
    device: torch.device,
) -> list[Sample]:
    """Generate every row of one batch; returns one Sample per row, in the rows' order.

    Each step feeds one token to every active row. A row that finishes leaves the batch (its cache rows are
    dropped), so it neither costs compute nor influences the others; the loop ends when no row is left.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any id does
    input_ids, attention_mask = left_pad(rows, pad_id, device)
    kv = KVBatch(model)
    logits = kv.prefill(input_ids, attention_mask)
    batch = RunningBatch(logits.shape[-1], device, tokenizer, eos_ids)
    batch.add(rows)
    active = list(range(len(rows)))  # batch position -> index into rows
    samples: list[Sample | None] = [None] * len(rows)
    while True:
        ended = batch.sample(logits)
        for r, sample in zip(active, ended):
            samples[r] = sample
        still = [i for i, sample in enumerate(ended) if sample is None]
        if not still:
            break
        if len(still) < len(active):
            kv.keep(torch.tensor(still, dtype=torch.long, device=device))
            batch.keep(still)
            active = [active[i] for i in still]
        logits = kv.step(batch.last_tokens())
    assert all(sample is not None for sample in samples)
    return samples  # type: ignore[return-value]


class StaticScheduler:
    """Waiting rows decoded in static batches by decode_batch; add(rows), step() -> finished rows (workers.batch)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        device: torch.device,
        max_rows: int,
        max_tokens: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.device = device
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.rows_limit = max_rows
        self.waiting: list[Row] = []
        self.on_step: Callable[[int, int], None] | None = None
        """Unused: a static batch runs to its end inside one step()."""

    @property
    def idle(self) -> bool:
        return not self.waiting

    @property
    def running(self) -> int:
        return 0  # rows run only inside step()

    def add(self, rows: list[Row]) -> None:
        self.waiting += rows

    def drop_waiting(self, unwanted: Callable[[Row], bool]) -> list[Row]:
        dropped = [row for row in self.waiting if unwanted(row)]
        self.waiting = [row for row in self.waiting if not unwanted(row)]
        return dropped

    def clear(self) -> list[Row]:
        rows, self.waiting = self.waiting, []
        return rows

    def step(self) -> list[Finished]:
        """Every waiting row, in batches; on out of memory a batch's halves run on their own."""
        rows, self.waiting = self.waiting, []
        finished: list[Finished] = []
        for batch in self._batches(rows):
            self._decode(batch, finished)
        return finished

    def _decode(self, batch: list[Row], finished: list[Finished]) -> None:
        try:
            samples = decode_batch(self.model, self.tokenizer, batch, self.eos_ids, self.device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(batch) == 1:
                finished.append(out_of_memory_alone(batch[0], exc))
                return
            log.warning("out of memory with a batch of %d rows; splitting it", len(batch))
            self.rows_limit = halved(self.rows_limit, len(batch))
            half = len(batch) // 2
            self._decode(batch[:half], finished)
            self._decode(batch[half:], finished)
            return
        finished += [Finished(row, sample) for row, sample in zip(batch, samples)]

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """Rows sorted by prompt length, cut into batches of at most rows_limit rows and max_tokens positions."""
        batches: list[list[Row]] = []
        batch: list[Row] = []
        longest = 0
        for row in sorted(rows, key=lambda r: len(r.prompt_ids)):
            if batch and (len(batch) == self.rows_limit or (len(batch) + 1) * max(longest, row.need) > self.max_tokens):
                batches.append(batch)
                batch, longest = [], 0
            batch.append(row)
            longest = max(longest, row.need)
        if batch:
            batches.append(batch)
        return batches
