"""Structured output while decoding: a compiled grammar per constraint, a matcher per row, and the token mask.

The grammar engine is llguidance (contract.structured; docs/benchmarks.md says why). Per worker, `Grammars` holds
the tokenizer as llguidance sees it (built once, on the first constrained row: ~0.3 s) and one compiled matcher per
constraint key (an LRU of COMPILED_KEPT), so a job of a million requests with one schema compiles it once; each row
gets a copy (`LLMatcher.deep_copy`: microseconds), advanced with every token the row accepts.

A decode step's mask is computed on the host from the matchers, which the host already keeps in step with the
tokens it read at the end of the last step; the mask goes to the device as one host-to-device copy of a bitmask
(32 tokens a word) and is unpacked and applied there. No read of the device is added (workers.syncs).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from contract.structured import Constraint

if TYPE_CHECKING:
    from llguidance import LLMatcher
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
COMPILED_KEPT = 256
"""Compiled constraints a worker keeps (least recently used goes first)."""
_BITS = 32


class Grammars:
    """One worker's compiled constraints, for one tokenizer and vocabulary (the logits' width)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab: int, eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.eos_ids = eos_ids
        self._lltokenizer: Any = None
        self._executor: Any = None
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self.compiles = 0
        """Constraints compiled so far (a cached one is not compiled again)."""

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher for one row (at the grammar's start)."""
        from llguidance import LLMatcher

        key = constraint.key
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = LLMatcher(self._tokenizer(), constraint.grammar(), log_level=0)
            if compiled.is_error():
                raise ValueError(f"structured output ({constraint.kind}) cannot be enforced: {compiled.get_error()}")
            self.compiles += 1
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return compiled.deep_copy()

    def apply(self, logits: Tensor, rows: list[int], matchers: list[LLMatcher]) -> Tensor:
        """logits (rows, vocab) with every token the matchers forbid set to -inf in the given rows; a new tensor."""
        from llguidance.torch import fill_next_token_bitmask_par

        words = (logits.shape[-1] + _BITS - 1) // _BITS
        bitmask = torch.empty((len(rows), words), dtype=torch.int32, pin_memory=logits.device.type == "cuda")
        fill_next_token_bitmask_par(self._parallel(), [(m, i) for i, m in enumerate(matchers)], bitmask)
        bits = torch.arange(_BITS, dtype=torch.int32, device=logits.device)
        packed = bitmask.to(logits.device, non_blocking=True)
        allowed = ((packed[:, :, None] >> bits) & 1).view(len(rows), -1)[:, : logits.shape[-1]].bool()
        if len(rows) == logits.shape[0]:
            return logits.masked_fill(~allowed, float("-inf"))
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        return logits.index_copy(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))

    def _tokenizer(self) -> Any:
        if self._lltokenizer is None:
            import llguidance.hf

            self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab, eos_token=sorted(self.eos_ids))
        return self._lltokenizer

    def _parallel(self) -> Any:
        if self._executor is None:
            from llguidance import LLExecutor

            self._executor = LLExecutor()
        return self._executor


def advance(matcher: LLMatcher, token: int, eos_ids: frozenset[int]) -> bool:
    """Feed a row's new token to its matcher; True when the grammar is complete (nothing but EOS may follow), so the
    row ends 'stop' without spending a step on the EOS. An EOS ends the row through workers.finish as always."""
    if token in eos_ids:
        return False
    if not matcher.consume_token(token):  # cannot happen while the mask holds; the row ends rather than loop
        log.warning("a constrained row's token %d was refused by its grammar: %s", token, matcher.get_error())
        return True
    return matcher.is_stopped()


_registry: dict[tuple[int, int], tuple[Any, Grammars]] = {}


def grammars_for(tokenizer: PreTrainedTokenizerBase, vocab: int, eos_ids: frozenset[int]) -> Grammars:
    """The process's Grammars for this tokenizer and vocabulary: every batch of a worker (static batches make a new
    RunningBatch per batch) shares one cache of compiled constraints."""
    key = (id(tokenizer), vocab)
    held = _registry.get(key)
    if held is None or held[0] is not tokenizer:
        held = (tokenizer, Grammars(tokenizer, vocab, eos_ids))
        _registry[key] = held
    return held[1]
