"""Draft-model drafting for speculative decoding: a smaller model with the same tokenizer guesses a row's next
tokens, which the worker's model then checks in one pass (workers.scheduler, DecoderRunner.verify).

Prompt lookup (workers.speculation.NgramDrafter) is free and right where a row copies its prompt; a draft model
also guesses text that appears nowhere before, at the price of its own forward passes. It is used when the
worker is given one (the draft_model setting), in place of prompt lookup.

Each row that is drafted for gets a ModelDrafter: the draft model's own K/V of the row's tokens (a transformers
DynamicCache, one row), kept across steps. Before drafting, the cache is cut back to where it still agrees with
the row's text (the draft tokens the worker's model rejected are dropped) and fed what is new; then the draft
model decodes greedily, one token per pass. Rows draft one after another (batches of one): drafting pays only
with few rows running, which is also when the policy lets it happen (workers.speculation.SpeculationPolicy
times the drafting as part of a speculative step).

Nothing a row produces depends on the drafts (workers.rows.RunningBatch.accept keeps a draft token only if it
is the token the row draws): a poor draft model costs time, never correctness.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


class DraftModel:
    """A loaded draft model, checked against the worker's tokenizer, that drafts for any number of rows."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase) -> None:
        if tokenizer.get_vocab() != target.get_vocab():
            raise ValueError(
                "the draft model's tokenizer is not the worker model's: a draft model must use the same tokenizer"
            )
        self.model = model
        self.device = next(model.parameters()).device
        self.context_length: int = model.config.get_text_config().max_position_embeddings

    def drafter(self, prompt: list[int]) -> ModelDrafter:
        return ModelDrafter(self, prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ModelDrafter:
    """One row's draft-model state: the tokens whose K/V its cache holds (`fed`) and the row's text so far."""

    def __init__(self, draft: DraftModel, prompt: list[int]) -> None:
        self.draft = draft
        self.prompt = list(prompt)
        self.tokens = list(prompt)
        self.fed: list[int] = []
        self.cache = DynamicCache()

    def sync(self, generated: list[int]) -> None:
        """Take the row's output so far."""
        self.tokens = self.prompt + generated

    @torch.inference_mode()
    def propose(self, limit: int) -> list[int]:
        """Up to `limit` tokens the draft model would produce next, greedily."""
        tokens = self.tokens
        if limit <= 0 or len(tokens) + limit > self.draft.context_length:
            return []
        keep = _common_prefix(self.fed, tokens)
        keep = min(keep, len(tokens) - 1)  # the last token is fed again: its logits give the first draft token
        if keep == 0:
            self.cache, self.fed = DynamicCache(), []
        elif keep < len(self.fed):
            self.cache.crop(keep - len(self.fed))  # a negative count: drop that many last positions
            del self.fed[keep:]
        feed = tokens[keep:]
        proposed: list[int] = []
        model, device = self.draft.model, self.draft.device
        for _ in range(limit):
            ids = torch.tensor([feed], dtype=torch.long, device=device)
            logits = model(input_ids=ids, cache=self.cache, use_cache=True).logits[0, -1]
            self.fed.extend(feed)
            token = int(logits.argmax())
            proposed.append(token)
            feed = [token]
        return proposed
