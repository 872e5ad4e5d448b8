"""A Llama-family forward pass over a slot KV cache: what the engine's continuous batching runs on.

transformers' forward keeps one cache per batch, grows it by concatenation at every step, and wants every row of
the batch to start together. Here the cache is one preallocated tensor of slots: row r of the running batch lives
in slot r at its own length, so a finished row can leave and a new row can be prefilled into a free slot while
the others keep decoding. The model's own modules are called (embeddings, projections, norms, rotary embedding),
so quantized Linear modules, biases and rope scaling work unchanged.

In order: supports (which models can run here) -> SlotCache (the one owner of K/V) -> LlamaRunner.prefill/decode.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

FAST_ARCHITECTURES = ("LlamaForCausalLM",)
ALIGN = 16
"""Rows and attention lengths are padded to this when batch-invariant (see LlamaRunner)."""


def supports(model: PreTrainedModel) -> str | None:
    """None when model can run on LlamaRunner, else why not (the engine then uses transformers' forward)."""
    name = type(model).__name__
    if name not in FAST_ARCHITECTURES:
        return f"architecture {name} is not one of {', '.join(FAST_ARCHITECTURES)}"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


class SlotCache:
    """K and V of every layer for up to `slots` rows of up to `capacity` tokens each.

    keys: (layers, slots, kv_heads, head_dim, capacity), stored transposed so that a step's query-key product
    reads them in place (in bfloat16 a product over the other layout copies them first, 3x slower);
    values: (layers, slots, kv_heads, capacity, head_dim). The running batch occupies slots 0..rows-1, with
    no gaps: when a row leaves, the last row moves into its slot (move), so that every step reads one contiguous
    view. lengths[r] is how many tokens slot r holds; the next token of row r goes to position lengths[r].
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, slots: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.keys = torch.zeros((layers, slots, kv_heads, head_dim, capacity), dtype=dtype, device=device)
        self.values = torch.zeros((layers, slots, kv_heads, capacity, head_dim), dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = 0

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.values.shape[3]

    def fits(self, slots: int, capacity: int, dtype: torch.dtype, device: torch.device) -> bool:
        return self.slots >= slots and self.capacity >= capacity and self.keys.dtype == dtype and self.keys.device == device

    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def move(self, src: int, dst: int) -> None:
        """Slot src's tokens become slot dst's (the row in src takes dst's place)."""
        n = int(self.lengths[src])
        self.keys[:, dst, :, :, :n] = self.keys[:, src, :, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.lengths[dst] = n

    def write(self, layer: int, start: int, k: Tensor, v: Tensor, positions: Tensor | None) -> None:
        """Store k, v (rows, kv_heads, tokens, head_dim) of slots start.. : at positions 0.. (prefill, positions None)
        or, one token per row, at positions (rows,) (decode)."""
        rows = k.shape[0]
        if positions is None:
            self.keys[layer, start : start + rows, :, :, : k.shape[2]] = k.transpose(-1, -2)
            self.values[layer, start : start + rows, :, : v.shape[2]] = v
        else:
            index = torch.arange(start, start + rows, device=k.device)
            self.keys[layer, index, :, :, positions] = k[:, :, 0]
            self.values[layer, index, :, positions] = v[:, :, 0]

    def view(self, layer: int, rows: int, length: int) -> tuple[Tensor, Tensor]:
        """K transposed (rows, kv_heads, head_dim, length) and V (rows, kv_heads, length, head_dim) of slots
        0..rows-1, positions 0..length-1: views, no copy."""
        return self.keys[layer, :rows, :, :, :length], self.values[layer, :rows, :, :length]


def attention(q: Tensor, k_t: Tensor, v: Tensor, visible: Tensor, scale: float) -> Tensor:
    """q (rows, heads, tokens, d) against k_t (rows, kv_heads, d, keys) and v (rows, kv_heads, keys, d);
    visible: bool (rows, 1, tokens, keys).

    Grouped-query heads are matched by a reshape (query head h uses key head h // group, as transformers'
    repeat_kv does), not by copying K and V. Scores and softmax are in float32.
    """
    rows, heads, tokens, d = q.shape
    kv_heads = k_t.shape[1]
    group = heads // kv_heads
    q = q.reshape(rows, kv_heads, group * tokens, d)
    scores = torch.matmul(q, k_t).float() * scale  # (rows, kv_heads, group * tokens, keys)
    scores = scores.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows, kv_heads, group * tokens, -1)
    return torch.matmul(probs, v).view(rows, heads, tokens, d)


class LlamaRunner:
    """Prefill and decode steps of a Llama-family model over a SlotCache."""

    def __init__(self, model: PreTrainedModel, batch_invariant: bool = True) -> None:
        """batch_invariant: shape every product so that a row's numbers do not depend on the rest of its batch.

        CPU matrix kernels pick their code path by shape: on our CPUs a float32 product with fewer than 12 rows,
        or an attention product whose key count is not a multiple of 8, rounds a row differently than the same row
        inside a bigger batch. So, when batch_invariant, every product sees at least ALIGN rows (padding rows
        are dropped) and every attention spans a multiple of ALIGN keys (the padding keys are masked out).
        """
        reason = supports(model)
        assert reason is None, reason
        config = model.config
        self.model = model
        self.layers = model.model.layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.align = ALIGN if batch_invariant else 1
        self.min_rows = ALIGN if batch_invariant else 1
        self.dtype = model.model.embed_tokens.weight.dtype

    def aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def new_cache(self, slots: int, capacity: int, device: torch.device) -> SlotCache:
        """A cache of at least min_rows slots of capacity tokens (rounded up to the alignment)."""
        slots, capacity = max(slots, self.min_rows), self.aligned(capacity)
        return SlotCache(len(self.layers), self.kv_heads, self.head_dim, slots, capacity, self.activation_dtype, device)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The hidden states' dtype (the embeddings' dtype; quantized Linear layers keep it)."""
        return self.dtype

    def prefill(self, cache: SlotCache, prompts: list[list[int]]) -> Tensor:
        """Put the prompts in the next free slots (cache.rows..) and return each one's next-token logits (rows, vocab).

        The prompts are right-padded to the longest; a pad position only ever sees real tokens before it (causal),
        and its K/V lie beyond the row's length, where the row's own next tokens overwrite them.
        """
        device = cache.keys.device
        rows = len(prompts)
        longest = max(len(p) for p in prompts)
        tokens = self.aligned(max(longest, -(-self.min_rows // rows)))
        ids = torch.zeros((rows, tokens), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ids = ids.to(device)
        positions = torch.arange(tokens, device=device).expand(rows, tokens)
        causal = torch.ones((tokens, tokens), dtype=torch.bool, device=device).tril()
        visible = causal[None, None].expand(rows, 1, tokens, tokens)
        start = cache.rows
        hidden = self._layers(cache, ids, positions, visible, start, None, tokens)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        hidden = hidden[torch.arange(rows, device=device), last]  # (rows, hidden)
        cache.lengths[start : start + rows] = torch.tensor([len(p) for p in prompts], device=device)
        cache.rows += rows
        return self._logits(hidden)

    def decode(self, cache: SlotCache, tokens: Tensor) -> Tensor:
        """Feed one token to each of the rows 0..len(tokens)-1 (at their own positions); logits (rows, vocab)."""
        rows = tokens.shape[0]
        assert rows == cache.rows, f"decode feeds {rows} tokens to a batch of {cache.rows} rows"
        device = tokens.device
        run = max(rows, min(self.min_rows, cache.slots))  # padding rows sit in free slots, their output is dropped
        if run > rows:
            tokens = torch.cat([tokens, tokens.new_zeros(run - rows)])
            cache.lengths[rows:run] = 0
        positions = cache.lengths[:run].clone()
        length = min(self.aligned(int(positions.max()) + 1), cache.capacity)
        visible = (torch.arange(length, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        hidden = self._layers(cache, tokens[:, None], positions[:, None], visible, 0, positions, length)
        cache.lengths[:rows] += 1
        return self._logits(hidden[:rows, 0])

    def _layers(
        self, cache: SlotCache, ids: Tensor, positions: Tensor, visible: Tensor, start: int, write_at: Tensor | None, length: int
    ) -> Tensor:
        """The decoder stack on ids (rows, tokens); K/V of slots start.. are written, then attended over length."""
        model = self.model.model
        rows, tokens = ids.shape
        x = model.embed_tokens(ids)
        cos, sin = model.rotary_emb(x, positions)
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.write(index, start, k, v, write_at)
            if write_at is None:  # prefill: the new rows attend to their own tokens
                keys, values = k.transpose(-1, -2), v
            else:
                keys, values = cache.view(index, rows, length)
            o = attention(q, keys, values, visible, self.scale)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, tokens, self.heads * self.head_dim))
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return x

    def _logits(self, hidden: Tensor) -> Tensor:
        rows = hidden.shape[0]
        if rows < self.min_rows:
            hidden = torch.cat([hidden, hidden.new_zeros(self.min_rows - rows, hidden.shape[1])])
        return self.model.lm_head(self.model.model.norm(hidden))[:rows]
