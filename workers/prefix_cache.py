"""Prefix caching: the K/V of prompt prefixes already computed, kept to be copied into a new row's slot instead
of being computed again (a job's shared system prompt, worked examples, a chat template's opening).

As vLLM's automatic prefix caching does, a prompt is cut into blocks of BLOCK tokens and each full block is
named by a hash chained over every block before it, so a block is found again only after the same tokens from
position 0 (its K/V depend on all of them). A row looks up the longest run of its blocks from the start, gets
their K/V copied into its slot (workers.kv_cache), and is prefilled from there on (DecoderRunner.extend, with the
rotary positions continuing). At least its last prompt token is always computed: its logits give the first
new token. After a prefill, the row's full blocks not held yet are copied in.

Memory is bounded by max_tokens (the prefix_cache_tokens setting): least recently used blocks go first. Running
rows hold copies in their own slots, so evicting a block never takes anything from a row; the scheduler also
drops the whole cache before it retries after running out of memory.

In order: block_keys (the chain of hashes) -> PrefixCache (lookup, load, store, eviction, counters).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.kv_cache import KVCache
from contract.settings import Settings

BLOCK = 16
"""Tokens per cached block (vLLM's default block size): a shared prefix is reused up to its last full block."""
PREFIX_CACHE_TOKENS: int = Settings.model_fields["prefix_cache_tokens"].default
"""The prefix cache's default size in tokens (8,192; SmolLM2-135M: 188 MiB in bfloat16, 377 MiB in float32)."""


BlockKey = tuple[int, tuple[int, ...]]
"""(chained hash, tokens) of one full block."""


def reusable_blocks(ids: Sequence[int]) -> int:
    """How many of a prompt's blocks a row may copy: all full blocks that leave its last token to compute."""
    return (len(ids) - 1) // BLOCK


def block_keys(ids: Sequence[int], blocks: int | None = None) -> list[BlockKey]:
    """(chained hash, tokens) of the first `blocks` full blocks of ids (all of them when None)."""
    count = len(ids) // BLOCK if blocks is None else min(blocks, len(ids) // BLOCK)
    keys: list[BlockKey] = []
    parent = 0
    for b in range(count):
        tokens = tuple(ids[b * BLOCK : (b + 1) * BLOCK])
        parent = hash((parent, tokens))
        keys.append((parent, tokens))
    return keys


@dataclass
class Block:
    """One block's K (layers, kv_heads, head_dim, BLOCK) and V (layers, kv_heads, BLOCK, head_dim), and what
    names it: its tokens and its parent's key, checked on every lookup so that a hash collision never reuses
    the wrong K/V."""

    parent: int
    tokens: tuple[int, ...]
    keys: Tensor
    values: Tensor


class PrefixCache:
    """Blocks of prompt K/V by chained key, least recently used first out; at most max_tokens tokens."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"the prefix cache size must be at least 0 tokens, got {max_tokens}")
        self.max_blocks = max_tokens // BLOCK
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self.looked_up_tokens = 0
        """Prompt tokens of every row admitted."""
        self.hit_tokens = 0
        """Of those, the tokens copied from the cache instead of computed."""

    # --- what it holds ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.max_blocks > 0

    @property
    def tokens(self) -> int:
        return len(self._blocks) * BLOCK

    def nbytes(self) -> int:
        return sum(b.keys.numel() * b.keys.element_size() + b.values.numel() * b.values.element_size() for b in self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    # --- the verbs ---------------------------------------------------------------------------------

    def held(self, keys: Sequence[BlockKey], start: int = 0) -> int:
        """How many of these keys (a prompt's, from its first block) are held, from block `start` on (the blocks
        before it are known to the caller); touches none."""
        held = start
        parent = keys[start - 1][0] if start else 0
        for key, tokens in keys[start:]:
            block = self._blocks.get(key)
            if block is None or block.tokens != tokens or block.parent != parent:
                break
            held += 1
            parent = key
        return held

    def load(self, cache: KVCache, slot: int, keys: Sequence[BlockKey], start: int = 0) -> None:
        """Copy the K/V of these held blocks (a prompt's first ones: see held), from block `start` on (those before
        it are in the cache's base), into slot's row at their positions."""
        for b in range(start, len(keys)):
            key = keys[b][0]
            block = self._blocks[key]
            self._blocks.move_to_end(key)
            cache.place(slot, b * BLOCK, block.keys, block.values)

    def gather(self, keys: Sequence[BlockKey]) -> tuple[Tensor, Tensor]:
        """The K (layers, kv_heads, head_dim, len(keys) * BLOCK) and V of these held blocks, one after another:
        a base for the KV cache (a copy; the blocks may be evicted afterwards)."""
        blocks = [self._blocks[key] for key, _ in keys]
        return torch.cat([b.keys for b in blocks], dim=-1), torch.cat([b.values for b in blocks], dim=-2)

    def count(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A row was admitted with prompt_tokens, cached_tokens of them copied (the hit rate's counters)."""
        self.looked_up_tokens += prompt_tokens
        self.hit_tokens += cached_tokens

    def store(self, cache: KVCache, slot: int, keys: Sequence[BlockKey]) -> int:
        """Copy the blocks of these keys (block_keys of the prompt now in slot) that are not held yet out of the
        slot; returns how many blocks were added. The oldest blocks make room."""
        if not self.enabled:
            return 0
        added = 0
        parent = 0
        for b, (key, tokens) in enumerate(keys[: self.max_blocks]):  # more would evict its own start
            block = self._blocks.get(key)
            if block is not None and block.tokens == tokens and block.parent == parent:
                self._blocks.move_to_end(key)
            else:
                keys_of_block, values_of_block = cache.read(slot, b * BLOCK, (b + 1) * BLOCK)
                self._blocks[key] = Block(parent, tokens, keys_of_block.clone(), values_of_block.clone())
                self._blocks.move_to_end(key)
                added += 1
            parent = key
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return added

    def clear(self) -> None:
        """Drop every block (their memory is freed once nothing else refers to it)."""
        self._blocks.clear()
