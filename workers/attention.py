"""Attention over the slot KV cache's layout (workers.kv_cache): every row's own keys, and the cascade form that reads
a prefix all rows share once. Pure tensor functions; workers.decoder calls them for every layer.

In order: padded_matmul (batch invariance) -> attention -> the fused CPU kernel -> cascade_attention.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def padded_matmul(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """a @ b with a's second-to-last dimension padded with zeros to at least `rows` (the padding's output is
    dropped): a batched product with fewer query rows takes another kernel path, which rounds differently."""
    m = a.shape[-2]
    if m >= rows:
        return torch.matmul(a, b)
    pad = a.new_zeros(*a.shape[:-2], rows - m, a.shape[-1])
    return torch.matmul(torch.cat([a, pad], dim=-2), b)[..., :m, :].contiguous()


def softcapped(scores: Tensor, softcap: float | None) -> Tensor:
    """Gemma 2's soft cap on attention scores: softcap * tanh(scores / softcap); scores unchanged when None."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def attention(
    q: Tensor, k_t: Tensor, v: Tensor, visible: Tensor, scale: float, min_queries: int = 1, softcap: float | None = None
) -> Tensor:
    """q (rows, heads, tokens, d) against k_t (rows, kv_heads, d, keys) and v (rows, kv_heads, keys, d);
    visible: bool (rows, 1, tokens, keys); softcap: cap the scores (softcapped) before the mask.

    Grouped-query heads are matched by a reshape (query head h uses key head h // group, as transformers'
    repeat_kv does), not by copying K and V. Scores and softmax are in float32. min_queries: pad each product's
    query rows to at least this many (batch invariance: a decode step's few rows round as a verify pass's do).
    """
    rows, heads, tokens, d = q.shape
    kv_heads = k_t.shape[1]
    group = heads // kv_heads
    q = q.reshape(rows, kv_heads, group * tokens, d)
    scores = softcapped(padded_matmul(q, k_t, min_queries).float() * scale, softcap)  # (rows, kv_heads, group * tokens, keys)
    scores = scores.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows, kv_heads, group * tokens, -1)
    return padded_matmul(probs, v, min_queries).view(rows, heads, tokens, d)


FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""PyTorch's fused CPU attention (blocked, float32 accumulation, no scores tensor), which alone of the SDPA entry
points also returns each query's log-sum-exp: what merging two parts of one softmax needs. Private (torch pinned)."""


def fused(q: Tensor, min_queries: int = 1, softcap: float | None = None) -> bool:
    """Whether attention on q runs as FLASH_CPU: half-precision CPU tensors, not batch-invariant, no soft cap (the
    kernel has none). The kernel's exp is an approximation (relative error ~1e-7, far below bfloat16's 4e-3 steps),
    so float32 and float64, where tests and batch invariance ask for exact softmax numbers, keep the unfused products."""
    return (
        FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        and min_queries == 1 and softcap is None
    )


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
    shared_visible: Tensor | None = None, min_queries: int = 1, softcap: float | None = None,
) -> Tensor:
    """attention() for rows whose first keys are the same for every row (a shared prefix), read once.

    q (rows, heads, tokens, d); shared_k_t (kv_heads, d, P) and shared_v (kv_heads, P, d): the prefix the rows
    see (all of it, or the positions shared_visible marks: (rows, P) for each row, or (rows, tokens, P) for each
    query, as a sliding window needs); k_t (rows, kv_heads, d, keys) and v (rows, kv_heads, keys, d): each row's
    own keys after it, with visible (rows, 1, tokens, keys); softcap: as attention()'s.
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
    if shared_visible is not None:  # one row per query of the stacked products: (rows, width, P)
        per_query = shared_visible if shared_visible.dim() == 3 else shared_visible[:, None, :].expand(rows, tokens, shared)
        shared_visible = per_query[:, None].expand(rows, group, tokens, shared).reshape(rows, width, shared)
    if fused(q, min_queries, softcap):
        own_visible = visible[:, :, None].expand(rows, 1, group, tokens, -1).reshape(rows, 1, width, -1)
        prefix_visible = None
        if shared_visible is not None:
            prefix_visible = shared_visible.reshape(1, 1, rows * width, shared)
        from_prefix, prefix_lse = _flash(stacked[None], shared_k_t[None], shared_v[None], prefix_visible, scale)
        from_own, own_lse = _flash(q, k_t, v, own_visible, scale)
        from_prefix = from_prefix[0].view(kv_heads, rows, width, d).transpose(0, 1)
        prefix_lse = prefix_lse[0].view(kv_heads, rows, width).transpose(0, 1)
        top = torch.maximum(prefix_lse, own_lse)
        prefix_weight, own_weight = torch.exp(prefix_lse - top)[..., None], torch.exp(own_lse - top)[..., None]
        out = (from_prefix * prefix_weight + from_own * own_weight) / (prefix_weight + own_weight)
        return out.to(q.dtype).reshape(rows, heads, tokens, d)
    prefix = torch.matmul(stacked, shared_k_t).float().view(kv_heads, rows, width, shared).transpose(0, 1) * scale
    prefix = softcapped(prefix, softcap)
    if shared_visible is not None:
        prefix = prefix.masked_fill(~shared_visible[:, None], -math.inf)
    own = softcapped(padded_matmul(q, k_t, min_queries).float() * scale, softcap)  # (rows, kv_heads, width, keys)
    own = own.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf).view(rows, kv_heads, width, -1)
    probs = torch.softmax(torch.cat([prefix, own], dim=-1), dim=-1).to(v.dtype)
    from_prefix = torch.matmul(probs[..., :shared].transpose(0, 1).reshape(kv_heads, rows * width, shared), shared_v)
    out = from_prefix.view(kv_heads, rows, width, d).transpose(0, 1) + padded_matmul(probs[..., shared:], v, min_queries)
    return out.reshape(rows, heads, tokens, d)
