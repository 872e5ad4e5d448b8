"""A Llama-family forward pass over a slot KV cache (workers.kv_cache): what the engine's continuous batching runs on.

transformers' forward keeps one cache per batch, grows it by concatenation at every step, and wants every row of
the batch to start together. Here the cache is one preallocated tensor of slots: row r of the running batch lives
in slot r at its own length, so a finished row can leave and a new row can be prefilled into a free slot while
the others keep decoding. The model's own modules are called (embeddings, projections, norms, rotary embedding),
so quantized Linear modules, biases and rope scaling work unchanged.

In order: supports (which models can run here) -> attention -> LlamaRunner.extend/decode. The K/V live
in workers.kv_cache.KVCache, which alone decides which slots are used and how long each row is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from workers.kv_cache import KVCache

FAST_ARCHITECTURES = ("LlamaForCausalLM",)
ALIGN = 16
"""Rows and attention lengths are padded to this when batch-invariant (see LlamaRunner)."""
QUERY_ROWS = 8
"""An attention product's query rows (per key head) are padded to this when batch-invariant (see LlamaRunner)."""


def padded_matmul(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """a @ b with a's second-to-last dimension padded with zeros to at least `rows` (the padding's output is
    dropped): a batched product with fewer query rows takes another kernel path, which rounds differently."""
    m = a.shape[-2]
    if m >= rows:
        return torch.matmul(a, b)
    pad = a.new_zeros(*a.shape[:-2], rows - m, a.shape[-1])
    return torch.matmul(torch.cat([a, pad], dim=-2), b)[..., :m, :].contiguous()


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


def attention(q: Tensor, k_t: Tensor, v: Tensor, visible: Tensor, scale: float, min_queries: int = 1) -> Tensor:
    """q (rows, heads, tokens, d) against k_t (rows, kv_heads, d, keys) and v (rows, kv_heads, keys, d);
    visible: bool (rows, 1, tokens, keys).

    Grouped-query heads are matched by a reshape (query head h uses key head h // group, as transformers'
    repeat_kv does), not by copying K and V. Scores and softmax are in float32. min_queries: pad each product's
    query rows to at least this many (batch invariance: a decode step's few rows round as a verify pass's do).
    """
    rows, heads, tokens, d = q.shape
    kv_heads = k_t.shape[1]
    group = heads // kv_heads
    q = q.reshape(rows, kv_heads, group * tokens, d)
    scores = padded_matmul(q, k_t, min_queries).float() * scale  # (rows, kv_heads, group * tokens, keys)
    scores = scores.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows, kv_heads, group * tokens, -1)
    return padded_matmul(probs, v, min_queries).view(rows, heads, tokens, d)


FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""PyTorch's fused CPU attention (blocked, float32 accumulation, no scores tensor), which alone of the SDPA entry
points also returns each query's log-sum-exp: what merging two parts of one softmax needs. Private (torch pinned)."""


def fused(q: Tensor, min_queries: int = 1) -> bool:
    """Whether attention on q runs as FLASH_CPU: half-precision CPU tensors, not batch-invariant. The kernel's exp is
    an approximation (relative error ~1e-7, far below bfloat16's 4e-3 steps), so float32 and float64, where tests
    and batch invariance ask for exact softmax numbers, keep the unfused products."""
    return FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and min_queries == 1


def _flash(q: Tensor, k_t: Tensor, v: Tensor, visible: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k * scale) v over the keys `visible` (bool, (batch, 1, queries, keys), or None: all) marks, in q's
    dtype, and each query's log-sum-exp (batch, heads, queries), -inf where it sees no key; q (batch, heads,
    queries, d), k_t (batch, heads, d, keys), v (batch, heads, keys, d)."""
    mask = None
    if visible is not None:
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, -math.inf)
    # K must be laid out (keys, d) with d contiguous: given the cache's transposed view, the kernel returns wrong
    # numbers without an error (torch 2.13; the public scaled_dot_product_attention copes).
    out, lse = FLASH_CPU(q, k_t.transpose(-1, -2).contiguous(), v, attn_mask=mask, scale=scale)
    if visible is not None:  # the kernel reports 0, not -inf, for a query that sees nothing
        lse = lse.masked_fill(~visible.any(-1), -math.inf)
    return out, lse


def cascade_attention(
    q: Tensor, shared_k_t: Tensor, shared_v: Tensor, k_t: Tensor, v: Tensor, visible: Tensor, scale: float,
    shared_visible: Tensor | None = None, min_queries: int = 1,
) -> Tensor:
    """attention() for rows whose first keys are the same for every row (a shared prefix), read once.

    q (rows, heads, tokens, d); shared_k_t (kv_heads, d, P) and shared_v (kv_heads, P, d): the prefix the rows
    see (all of it, or the first positions shared_visible (rows, P) marks for each row); k_t (rows, kv_heads, d,
    keys) and v (rows, kv_heads, keys, d): each row's own keys after it, with visible (rows, 1, tokens, keys).
    The same function as attention() over the full keys, but the prefix's K/V are read once for all rows, not
    once per row, and its products have rows x heads x tokens rows instead of heads x tokens.

    When fused() (bfloat16 on CPU), each part is one fused attention (FLASH_CPU) and the two are merged by their
    log-sum-exps: out = (o_prefix e^lse_prefix + o_own e^lse_own) / (e^lse_prefix + e^lse_own), as vLLM's
    merge_attn_states does; otherwise the two parts' scores are concatenated in float32 for one softmax.
    """
    rows, heads, tokens, d = q.shape
    kv_heads, _, shared = shared_k_t.shape
    group = heads // kv_heads
    width = group * tokens
    q = q.reshape(rows, kv_heads, width, d)
    stacked = q.transpose(0, 1).reshape(kv_heads, rows * width, d)
    if fused(q, min_queries):
        own_visible = visible[:, :, None].expand(rows, 1, group, tokens, -1).reshape(rows, 1, width, -1)
        prefix_visible = None
        if shared_visible is not None:
            prefix_visible = shared_visible[:, None, :].expand(rows, width, shared).reshape(1, 1, rows * width, shared)
        from_prefix, prefix_lse = _flash(stacked[None], shared_k_t[None], shared_v[None], prefix_visible, scale)
        from_own, own_lse = _flash(q, k_t, v, own_visible, scale)
        from_prefix = from_prefix[0].view(kv_heads, rows, width, d).transpose(0, 1)
        prefix_lse = prefix_lse[0].view(kv_heads, rows, width).transpose(0, 1)
        top = torch.maximum(prefix_lse, own_lse)
        prefix_weight, own_weight = torch.exp(prefix_lse - top)[..., None], torch.exp(own_lse - top)[..., None]
        out = (from_prefix * prefix_weight + from_own * own_weight) / (prefix_weight + own_weight)
        return out.to(q.dtype).reshape(rows, heads, tokens, d)
    prefix = torch.matmul(stacked, shared_k_t).float().view(kv_heads, rows, width, shared).transpose(0, 1) * scale
    if shared_visible is not None:
        prefix = prefix.masked_fill(~shared_visible[:, None, None, :], -math.inf)
    own = padded_matmul(q, k_t, min_queries).float() * scale  # (rows, kv_heads, width, keys)
    own = own.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf).view(rows, kv_heads, width, -1)
    probs = torch.softmax(torch.cat([prefix, own], dim=-1), dim=-1).to(v.dtype)
    from_prefix = torch.matmul(probs[..., :shared].transpose(0, 1).reshape(kv_heads, rows * width, shared), shared_v)
    out = from_prefix.view(kv_heads, rows, width, d).transpose(0, 1) + padded_matmul(probs[..., shared:], v, min_queries)
    return out.reshape(rows, heads, tokens, d)


class LlamaRunner:
    """Prefill, extend and decode steps of a Llama-family model over a KVCache."""

    def __init__(self, model: PreTrainedModel, batch_invariant: bool = True) -> None:
        """batch_invariant: shape every product so that a row's numbers do not depend on the rest of its batch.

        CPU matrix kernels pick their code path by shape: on our CPUs a float32 product with fewer than 12 rows,
        or an attention product whose key count is not a multiple of 8, rounds a row differently than the same row
        inside a bigger batch; on AVX2-only CPUs a batched attention product with fewer than 4 query rows does
        too. So, when batch_invariant, every product sees at least ALIGN rows (padding rows are dropped), every
        attention spans a multiple of ALIGN keys (the padding keys are masked out) and has at least QUERY_ROWS
        query rows per key head.
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
        self.min_queries = QUERY_ROWS if batch_invariant else 1
        self.dtype = model.model.embed_tokens.weight.dtype

    def aligned(self, n: int) -> int:
        return -(-n // self.align) * self.align

    def new_cache(self, slots: int, capacity: int, device: torch.device) -> KVCache:
        """A cache of at least min_rows slots of capacity tokens (rounded up to the alignment)."""
        slots, capacity = max(slots, self.min_rows), self.aligned(capacity)
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, slots, capacity, self.activation_dtype, device)

    def bytes_per_token(self) -> int:
        return KVCache.bytes_per_token(len(self.layers), self.kv_heads, self.head_dim, self.activation_dtype)

    @property
    def activation_dtype(self) -> torch.dtype:
        """The hidden states' dtype (the embeddings' dtype; quantized Linear layers keep it)."""
        return self.dtype

    def extend(self, cache: KVCache, first: int, chunks: list[list[int]]) -> Tensor:
        """Feed chunks[i] to the row in slot first + i, after the tokens it already holds (a prompt's rest once
        its first tokens are in place: the positions, rotary embeddings included, continue from there);
        returns each row's next-token logits (rows, vocab).

        The chunks are right-padded to the longest; a pad position only ever sees real tokens before it
        (causal), and its output is dropped. When every row starts empty, the rows attend to their own new
        K/V only; otherwise over their slot's cache, earlier tokens included.
        """
        rows = len(chunks)
        assert rows and all(chunks), "extend needs a non-empty chunk for every row"
        tokens = self.aligned(max(max(len(c) for c in chunks), -(-self.min_rows // rows)))
        hidden = self._feed(cache, first, chunks, tokens)
        last = torch.tensor([len(c) - 1 for c in chunks], device=hidden.device)
        return self._logits(hidden[torch.arange(rows, device=hidden.device), last])  # (rows, vocab)

    def verify(self, cache: KVCache, chunks: list[list[int]]) -> Tensor:
        """Feed chunks[r] (the row's last token, then its draft tokens) to every running row r, after the tokens
        it holds; logits at every position (rows, tokens, vocab), tokens = the longest chunk (shorter chunks are
        padded; a pad's output is garbage and its K/V is not kept). Each row's length grows by its chunk's
        length: the caller truncates what it rejects (KVCache.truncate)."""
        rows = len(chunks)
        assert rows == cache.rows, f"verify feeds {rows} chunks to a batch of {cache.rows} rows"
        assert all(chunks), "verify needs at least the last token of every row"
        width = max(len(c) for c in chunks)
        # Not aligned: only the products' rows (rows x tokens) must reach min_rows for batch invariance.
        hidden = self._feed(cache, 0, chunks, max(width, -(-self.min_rows // rows)))
        return self._logits(hidden[:, :width].reshape(rows * width, -1)).view(rows, width, -1)

    def _feed(self, cache: KVCache, first: int, chunks: list[list[int]], tokens: int) -> Tensor:
        """The decoder stack on chunks[i] (right-padded to `tokens`) after what slot first + i holds; the hidden
        states at every position (rows, tokens, hidden). The chunks' K/V are written (pads' are not) and the
        slots' lengths grow by their chunks' lengths. When every row starts empty, the rows attend to their own
        new K/V only; otherwise over their slot's cache, earlier tokens (and the base positions they use) included."""
        device = cache.keys.device
        rows = len(chunks)
        starts = cache.lengths[first : first + rows].clone()
        offsets = cache.offsets[first : first + rows]
        host_starts = cache.host_lengths[first : first + rows]
        ids = torch.zeros((rows, tokens), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        ids = ids.to(device)
        counts = torch.tensor([len(c) for c in chunks], device=device)
        steps = torch.arange(tokens, device=device)
        positions = starts[:, None] + steps[None, :]  # in the slot
        real = steps[None, :] < counts[:, None]
        base = self._base_visible(cache, offsets, cache.host_offsets[first : first + rows])
        if not any(host_starts) and base is None and tokens <= cache.capacity:
            causal = torch.ones((tokens, tokens), dtype=torch.bool, device=device).tril()
            visible = causal[None, None].expand(rows, 1, tokens, tokens)
            hidden = self._layers(cache, ids, positions, positions, visible, first, None, tokens, real)
        else:
            length = min(self.aligned(max(n + len(c) for n, c in zip(host_starts, chunks))), cache.capacity)
            keys = torch.arange(length, device=device)
            visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (rows, 1, tokens, length)
            hidden = self._layers(cache, ids, positions + offsets[:, None], positions, visible, first, real, length, real, base)
        cache.extend(first, [len(c) for c in chunks])
        return hidden

    def decode(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """Feed one token to each of the rows 0..len(tokens)-1 (at their own positions); logits (rows, vocab)."""
        rows = tokens.shape[0]
        assert rows == cache.rows, f"decode feeds {rows} tokens to a batch of {cache.rows} rows"
        device = tokens.device
        run = max(rows, min(self.min_rows, cache.slots))  # padding rows sit in free slots (length 0); output dropped
        if run > rows:
            tokens = torch.cat([tokens, tokens.new_zeros(run - rows)])
        positions = cache.lengths[:run].clone()  # in the slot
        offsets = cache.offsets[:run]
        length = min(self.aligned(cache.longest + 1), cache.capacity)
        visible = (torch.arange(length, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        rotary = (positions + offsets)[:, None]
        base = self._base_visible(cache, offsets, cache.host_offsets)
        hidden = self._layers(cache, tokens[:, None], rotary, positions[:, None], visible, 0, True, length, None, base)
        cache.advance()
        return self._logits(hidden[:rows, 0])

    @staticmethod
    def _base_visible(cache: KVCache, offsets: Tensor, host_offsets: list[int]) -> tuple[Tensor, bool] | None:
        """Which of the base's positions each row reads (rows, P), and whether every row reads all of them; None
        when no row reads any. offsets (rows,) on the device; host_offsets: the same rows' (fewer: padding rows
        read none) on the host."""
        if not cache.base_length or not any(host_offsets):
            return None
        whole = len(host_offsets) == offsets.shape[0] and min(host_offsets) == cache.base_length
        return torch.arange(cache.base_length, device=offsets.device)[None, :] < offsets[:, None], whole

    def _layers(
        self,
        cache: KVCache,
        ids: Tensor,
        rotary: Tensor,
        positions: Tensor,
        visible: Tensor,
        first: int,
        read_cache: Tensor | bool | None,
        length: int,
        real: Tensor | None,
        base: tuple[Tensor, bool] | None = None,
    ) -> Tensor:
        """The decoder stack on ids (rows, tokens) at positions rotary (rows, tokens) of their rows, written at
        positions (rows, tokens) of slots first.. (only the real ones, when real is given), then attended: the new
        K/V alone when read_cache is None, else the slots' cache over length positions, after the base positions
        that base (rows, P) marks, read once for all rows (cascade_attention); base's flag: every row reads all of
        them (no mask needed)."""
        model = self.model.model
        rows, tokens = ids.shape
        x = model.embed_tokens(ids)
        cos, sin = model.rotary_emb(x, rotary)
        base_mask = None if base is None or base[1] else base[0]
        written = real if read_cache is not None and real is not None else None
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            cache.write(index, first, k, v, None if read_cache is None else positions, written)
            if read_cache is None:  # a prefill from position 0: the new rows attend to their own tokens
                keys, values = k.transpose(-1, -2), v
            else:
                keys, values = cache.view(index, first, rows, length)
            if base is not None:
                o = cascade_attention(
                    q, cache.base_keys[index], cache.base_values[index], keys, values, visible, self.scale, base_mask,
                    self.min_queries,
                )
            else:
                o = attention(q, keys, values, visible, self.scale, self.min_queries)
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
