"""The decoder family's forward pass over a slot KV cache (workers.kv_cache): what the engine's continuous batching
runs on. One runner for every architecture of workers.architectures.ARCHITECTURES (Llama, Mistral, Qwen2/3, Phi-3,
Gemma 1/2/3); each one's Decoder says what its layers do beyond Llama's.

transformers' forward keeps one cache per batch, grows it by concatenation at every step, and wants every row of
the batch to start together. Here the cache is one preallocated tensor of slots: row r of the running batch lives
in slot r at its own length, so a finished row can leave and a new row can be prefilled into a free slot while
the others keep decoding. The model's own modules are called (embeddings, projections, norms, MLP, rotary
embedding), so quantized Linear modules, biases, Gemma's norms and embedding scale and rope scaling work unchanged.

Sliding windows are masked, not trimmed: a sliding-window layer keeps every position's K/V in the cache like any
other layer (memory as for full attention), and each query sees only the keys less than a window behind it,
the shared base's included (Sight). A window that no query has yet outgrown costs nothing.

In order: DecoderRunner.extend / verify / decode -> what each query sees (_sights) -> the layers -> the logits.
The K/V live in workers.kv_cache.KVCache, which alone decides which slots are used and how long each row is.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import Tensor
from transformers import PreTrainedModel

from workers.architectures import describe, layer_types, layer_windows, text_config
from workers.attention import attention, cascade_attention, check_kernels, softcapped
from workers.kv_cache import KVCache

ALIGN = 16
"""Rows and attention lengths are padded to this when batch-invariant (see DecoderRunner)."""
QUERY_ROWS = 8
"""An attention product's query rows (per key head) are padded to this when batch-invariant (see DecoderRunner)."""


def supports(model: PreTrainedModel) -> str | None:
    """None when model can run on DecoderRunner, else why not (the engine then uses transformers' forward)."""
    return describe(model)[1]


def joint_qk_norm(attn: torch.nn.Module, heads: int, kv_heads: int) -> torch.nn.Module | None:
    """One module that norms q's heads and k's heads together (Qwen3's and Gemma 3's per-head RMSNorm): a copy of
    attn.q_norm whose weight holds q_norm's for each of the `heads` query heads, then k_norm's for each key head, to
    be called on q and k concatenated along the heads. Each head's vector is normed on its own as either module
    does it, so the numbers are the same, but a layer runs the norm's eight small operations once, not twice (the
    two norms took about 7% of Qwen3's decode step at SmolLM2's size on a CPU, by torch.profiler). None when the
    two modules differ in anything but their weight."""
    q_norm, k_norm = attn.q_norm, attn.k_norm
    settings = [{k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"} for m in (q_norm, k_norm)]
    if type(q_norm) is not type(k_norm) or settings[0] != settings[1] or q_norm.weight.dim() != 1:
        return None
    joint = copy.deepcopy(q_norm)
    weight = torch.cat([q_norm.weight.detach().expand(heads, -1), k_norm.weight.detach().expand(kv_heads, -1)])
    joint.weight = torch.nn.Parameter(weight, requires_grad=False)
    return joint


@dataclass(frozen=True)
class Sight:
    """What a forward pass's queries see in the layers of one window: own, bool (rows, 1, tokens, keys), of the keys
    in their slots (or of the new keys alone, in a prefill); base, of the shared base's positions: (rows, P) for
    each row, (rows, tokens, P) for each query (a window), or None (every row sees all of it, or none reads it)."""

    own: Tensor
    base: Tensor | None


class DecoderRunner:
    """Prefill, extend, verify and decode steps of a decoder-only model over a KVCache."""

    def __init__(self, model: PreTrainedModel, batch_invariant: bool = True) -> None:
        """batch_invariant: shape every product so that a row's numbers do not depend on the rest of its batch.

        CPU matrix kernels pick their code path by shape: on our CPUs a float32 product with fewer than 12 rows,
        or an attention product whose key count is not a multiple of 8, rounds a row differently than the same row
        inside a bigger batch; on AVX2-only CPUs a batched attention product with fewer than 4 query rows does
        too. So, when batch_invariant, every product sees at least ALIGN rows (padding rows are dropped), every
        attention spans a multiple of ALIGN keys (the padding keys are masked out) and has at least QUERY_ROWS
        query rows per key head.
        """
        decoder, reason = describe(model)
        assert decoder is not None, reason
        config = text_config(model)
        self.model = model
        self.decoder = decoder
        self.text = attrgetter(decoder.text_model)(model)
        self.layers = self.text.layers
        self.lm_head = model.get_output_embeddings()
        self.vocab_size: int = config.vocab_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attn = self.layers[0].self_attn
        self.scale: float = attn.scaling  # head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
        # The family's own: Phi-3's rotates only part of each head (partial_rotary_factor).
        self.rotate = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
        self.windows = layer_windows(decoder, config)
        self.rope_kinds = layer_types(decoder, config)
        self.attention_softcap: float | None = config.attn_logit_softcapping if decoder.attention_softcap else None
        self.final_softcap: float | None = config.final_logit_softcapping if decoder.final_softcap else None
        self.align = ALIGN if batch_invariant else 1
        self.min_rows = ALIGN if batch_invariant else 1
        self.min_queries = QUERY_ROWS if batch_invariant else 1
        self.dtype = self.text.embed_tokens.weight.dtype
        self.qk_norms = [joint_qk_norm(layer.self_attn, self.heads, self.kv_heads) if decoder.qk_norm else None for layer in self.layers]
        device = self.text.embed_tokens.weight.device
        if not batch_invariant and self.attention_softcap is None:
            check_kernels(device, self.dtype)  # at load, not inside the first cascade step

    @property
    def host_bound_rope(self) -> str | None:
        """The rope type whose rotary module reads the step's positions on the host (transformers'
        dynamic_rope_update: the `dynamic` kinds and LongRoPE), which a CUDA graph cannot hold; None: none does."""
        kinds = getattr(self.text.rotary_emb, "rope_type", "default")
        for kind in kinds.values() if isinstance(kinds, dict) else [kinds]:
            if "dynamic" in kind or kind == "longrope":
                return kind
        return None

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
        host_offsets = cache.host_offsets[first : first + rows]
        ids = torch.zeros((rows, tokens), dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        ids = ids.to(device)
        counts = torch.tensor([len(c) for c in chunks], device=device)
        steps = torch.arange(tokens, device=device)
        positions = starts[:, None] + steps[None, :]  # in the slot
        real = steps[None, :] < counts[:, None]
        reach = max(o + n + len(c) for o, n, c in zip(host_offsets, host_starts, chunks))
        base = self._base_visible(cache, offsets, host_offsets)
        if not any(host_starts) and base is None and tokens <= cache.capacity:
            sights = self._sights(positions, tokens, offsets, None, reach)
            hidden = self._layers(cache, ids, positions, positions, sights, first, None, tokens, real)
        else:
            length = min(self.aligned(max(n + len(c) for n, c in zip(host_starts, chunks))), cache.capacity)
            sights = self._sights(positions, length, offsets, base, reach)
            hidden = self._layers(
                cache, ids, positions + offsets[:, None], positions, sights, first, real, length, real, base is not None
            )
        cache.extend(first, [len(c) for c in chunks])
        return hidden

    def decode(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """Feed one token to each of the rows 0..len(tokens)-1 (at their own positions); logits (rows, vocab)."""
        rows = tokens.shape[0]
        assert rows == cache.rows, f"decode feeds {rows} tokens to a batch of {cache.rows} rows"
        run = max(rows, min(self.min_rows, cache.slots))  # padding rows sit in free slots (length 0); output dropped
        if run > rows:
            tokens = torch.cat([tokens, tokens.new_zeros(run - rows)])
        positions = cache.lengths[:run].clone()  # in the slot
        offsets = cache.offsets[:run]
        length = min(self.aligned(cache.longest + 1), cache.capacity)
        rotary = (positions + offsets)[:, None]
        base = self._base_visible(cache, offsets, cache.host_offsets)
        reach = max(o + n + 1 for o, n in zip(cache.host_offsets, cache.host_lengths))
        sights = self._sights(positions[:, None], length, offsets, base, reach)
        hidden = self._layers(cache, tokens[:, None], rotary, positions[:, None], sights, 0, True, length, None, base is not None)
        cache.advance()
        return self._logits(hidden[:rows, 0])

    def decode_graphable(self, cache: KVCache, tokens: Tensor) -> Tensor:
        """decode() in shapes that depend on len(tokens) and the cache's shape alone, reading nothing on the host:
        what a CUDA graph captures (workers.graphs). Feeds tokens[i] to slot i for every i < len(tokens), which may
        run past the rows in use (padding: free slots hold length 0, their outputs are dropped); attention spans
        the cache's whole capacity (positions past a row's length are masked) and every sliding window is masked.
        Only while no row reads the base. The caller advances the cache (KVCache.advance)."""
        rows = tokens.shape[0]
        assert rows <= cache.slots and not cache.uses_base, f"{rows} rows of a cache of {cache.slots} slots, base {cache.uses_base}"
        positions = cache.lengths[:rows, None]  # in the slot, which is the row's position (no base)
        sights = self._sights(positions, cache.capacity, cache.offsets[:rows], None, None)
        hidden = self._layers(cache, tokens[:, None], positions, positions, sights, 0, True, cache.capacity, None)
        return self._logits(hidden[:, 0])

    @staticmethod
    def _base_visible(cache: KVCache, offsets: Tensor, host_offsets: list[int]) -> tuple[Tensor, bool] | None:
        """Which of the base's positions each row reads (rows, P), and whether every row reads all of them; None
        when no row reads any. offsets (rows,) on the device; host_offsets: the same rows' (fewer: padding rows
        read none) on the host."""
        if not cache.base_length or not any(host_offsets):
            return None
        whole = len(host_offsets) == offsets.shape[0] and min(host_offsets) == cache.base_length
        return torch.arange(cache.base_length, device=offsets.device)[None, :] < offsets[:, None], whole

    def _sights(
        self, queries: Tensor, keys: int, offsets: Tensor, base: tuple[Tensor, bool] | None, reach: int | None
    ) -> dict[int | None, Sight]:
        """What queries at slot positions queries (rows, tokens) see of slot positions 0..keys-1 and of the base
        (base: _base_visible's), for full attention (key None) and for each sliding window of the layers; reach:
        one past the furthest position of any row's real query, counted from the row's start (the base's
        positions included), which the host knows: a window no query has outgrown is full attention (None: not
        known, every window is masked)."""
        key_positions = torch.arange(keys, device=queries.device)
        own = key_positions <= queries[..., None]  # (rows, tokens, keys)
        full = Sight(own[:, None], None if base is None or base[1] else base[0])
        sights: dict[int | None, Sight] = {None: full}
        for window in set(self.windows) - {None}:
            if reach is not None and reach <= window:
                sights[window] = full
                continue
            # A query sees the keys less than `window` positions behind it (transformers' sliding_window_overlay).
            windowed_base = None
            if base is not None:
                behind = (queries + offsets[:, None])[..., None] - window  # (rows, tokens, 1), in the row's positions
                base_positions = torch.arange(base[0].shape[1], device=queries.device)
                windowed_base = base[0][:, None, :] & (base_positions > behind)
            sights[window] = Sight((own & (key_positions > queries[..., None] - window))[:, None], windowed_base)
        return sights

    def _layers(
        self,
        cache: KVCache,
        ids: Tensor,
        rotary: Tensor,
        positions: Tensor,
        sights: dict[int | None, Sight],
        first: int,
        read_cache: Tensor | bool | None,
        length: int,
        real: Tensor | None,
        reads_base: bool = False,
    ) -> Tensor:
        """The decoder stack on ids (rows, tokens) at positions rotary (rows, tokens) of their rows, written at
        positions (rows, tokens) of slots first.. (only the real ones, when real is given), then attended: the new
        K/V alone when read_cache is None, else the slots' cache over length positions, after the base's positions
        (reads_base), read once for all rows (cascade_attention); each layer as sights[its window] says."""
        rows, tokens = ids.shape
        x = self.text.embed_tokens(ids)
        rope = self._rope(x, rotary)
        written = real if read_cache is not None and real is not None else None
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            sight = sights[self.windows[index]]
            q, k, v = self._qkv(attn, layer.input_layernorm(x), self.qk_norms[index])
            q, k = self.rotate(q, k, *rope[self.rope_kinds[index]])
            cache.write(index, first, k, v, None if read_cache is None else positions, written)
            if read_cache is None:  # a prefill from position 0: the new rows attend to their own tokens
                keys, values = k.transpose(-1, -2), v
            else:
                keys, values = cache.view(index, first, rows, length)
            if reads_base:
                o = cascade_attention(
                    q, cache.base_keys[index], cache.base_values[index], keys, values, sight.own, self.scale, sight.base,
                    self.min_queries, self.attention_softcap,
                )
            else:
                o = attention(q, keys, values, sight.own, self.scale, self.min_queries, self.attention_softcap)
            x = self._residuals(layer, x, attn.o_proj(o.transpose(1, 2).reshape(rows, tokens, self.heads * self.head_dim)))
        return x

    def _rope(self, x: Tensor, rotary: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """cos and sin at positions rotary, by the layers' rope kind ("" when every layer shares one)."""
        if self.decoder.rope_per_layer_type:
            return {kind: self.text.rotary_emb(x, rotary, kind) for kind in set(self.rope_kinds)}
        return {"": self.text.rotary_emb(x, rotary)}

    def _qkv(self, attn: torch.nn.Module, h: Tensor, joint_norm: torch.nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """q (rows, heads, tokens, d), k and v (rows, kv_heads, tokens, d) of the normed hidden states h, before rope;
        joint_norm: the layer's joint_qk_norm, if it has one."""
        rows, tokens, _ = h.shape
        if self.decoder.fused_qkv:
            qkv = attn.qkv_proj(h)
            q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q, k, v = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.reshape(rows, tokens, self.heads, self.head_dim)
        k = k.reshape(rows, tokens, self.kv_heads, self.head_dim)
        if joint_norm is not None:  # over each head's dimensions, before rope
            qk = joint_norm(torch.cat([q, k], dim=2))
            q, k = qk[:, :, : self.heads], qk[:, :, self.heads :]
        elif self.decoder.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        v = v.reshape(rows, tokens, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _residuals(self, layer: torch.nn.Module, x: Tensor, attended: Tensor) -> Tensor:
        """x after the layer's attention output `attended` and its MLP, each added to the residual stream."""
        if self.decoder.sandwich_norms:
            x = x + layer.post_attention_layernorm(attended)
            return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
        x = x + attended
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _logits(self, hidden: Tensor) -> Tensor:
        rows = hidden.shape[0]
        if rows < self.min_rows:
            hidden = torch.cat([hidden, hidden.new_zeros(self.min_rows - rows, hidden.shape[1])])
        logits = self.lm_head(self.text.norm(hidden))[:rows]
        return softcapped(logits, self.final_softcap)
