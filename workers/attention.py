"""Attention over the slot KV cache's layout (workers.kv_cache): every row's own keys, and the cascade form that reads
a prefix all rows share once. Pure tensor functions; workers.decoder calls them for every layer.

Two ways to compute each: the products (scores in float32, a softmax, then values: exact, and shaped for batch
invariance when asked), and fused kernels that hold no scores tensor: on CUDA PyTorch's scaled_dot_product_attention
(its flash / memory-efficient / cuDNN kernels; KERNEL_DEVICES), on a CPU its flash-attention kernel for the cascade's
half-precision parts (fused).

In order: padded_matmul (batch invariance) -> attention (products or SDPA) -> the kernels that also return each
query's log-sum-exp, checked once per device -> cascade_attention.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

log = logging.getLogger(__name__)

KERNEL_DEVICES = frozenset({"cuda"})
"""Device types whose attention runs as scaled_dot_product_attention (workers.kv_cache.KEYS_BY_POSITION stores
their keys as its kernels read them), unless batch invariance or a soft cap asks for the products."""


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
    Where kernel() says so, one scaled_dot_product_attention over the same grouped shapes (K read by position:
    k_t is then a transposed view of position-major storage, and no copy is made).
    """
    rows, heads, tokens, d = q.shape
    kv_heads = k_t.shape[1]
    group = heads // kv_heads
    q = q.reshape(rows, kv_heads, group * tokens, d)
    if kernel(q, min_queries, softcap):
        mask = visible[:, :, None].expand(rows, 1, group, tokens, -1).reshape(rows, 1, group * tokens, -1)
        return F.scaled_dot_product_attention(q, k_t.transpose(-1, -2), v, attn_mask=mask, scale=scale).view(rows, heads, tokens, d)
    scores = softcapped(padded_matmul(q, k_t, min_queries).float() * scale, softcap)  # (rows, kv_heads, group * tokens, keys)
    scores = scores.view(rows, kv_heads, group, tokens, -1).masked_fill(~visible[:, :, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows, kv_heads, group * tokens, -1)
    return padded_matmul(probs, v, min_queries).view(rows, heads, tokens, d)


FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
"""PyTorch's fused CPU attention (blocked, float32 accumulation, no scores tensor), which alone of the SDPA entry
points also returns each query's log-sum-exp: what merging two parts of one softmax needs. Private (torch pinned)."""


def kernel(q: Tensor, min_queries: int = 1, softcap: float | None = None) -> bool:
    """Whether attention on q runs as scaled_dot_product_attention: a KERNEL_DEVICES device, not batch-invariant
    (the kernels' tiling follows the batch's shape), no soft cap (they have none)."""
    return q.device.type in KERNEL_DEVICES and min_queries == 1 and softcap is None


def fused(q: Tensor, min_queries: int = 1, softcap: float | None = None) -> bool:
    """Whether cascade_attention on q runs its two parts as fused kernels merged by log-sum-exp: on a CPU, FLASH_CPU
    for half-precision tensors (its exp is an approximation, relative error ~1e-7, far below bfloat16's 4e-3 steps,
    so float32 and float64, where tests and batch invariance ask for exact softmax numbers, keep the products); on a
    KERNEL_DEVICES device, the memory-efficient kernel, once lse_kernel_works has checked it there. Never when
    batch-invariant or soft-capped."""
    if min_queries != 1 or softcap is not None:
        return False
    if q.device.type in KERNEL_DEVICES:
        return lse_kernel_works(q.device, q.dtype)
    return FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def _bias(visible: Tensor, dtype: torch.dtype, keys_stride: int | None = None) -> Tensor:
    """visible (bool) as an additive mask of dtype: 0 where visible, -inf elsewhere; keys_stride: its rows stored
    that many elements apart (at least the keys), as a kernel that wants aligned rows reads them."""
    keys = visible.shape[-1]
    bias = torch.zeros((*visible.shape[:-1], keys_stride or keys), dtype=dtype, device=visible.device)
    return (bias[..., :keys] if keys_stride else bias).masked_fill_(~visible, -math.inf)


def _flash_cpu(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    # K must be laid out (keys, d) with d contiguous: given the cache's transposed view, the kernel returns wrong
    # numbers without an error (torch 2.13; the public scaled_dot_product_attention copes).
    bias = None if visible is None else _bias(visible, q.dtype)
    out, lse = FLASH_CPU(q, k.contiguous(), v, attn_mask=bias, scale=scale)
    return out, lse


def _efficient(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    # The kernel wants the bias's rows aligned to 16 elements (what scaled_dot_product_attention's own
    # preprocessing does: pad, then slice) and its log-sum-exp may come padded past the queries.
    batch, heads, queries, keys = *q.shape[:3], k.shape[-2]
    bias = None
    if visible is not None:
        bias = _bias(visible, q.dtype, -(-keys // 16) * 16).expand(batch, heads, queries, keys)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)[:2]
    return out.nan_to_num(0.0), lse[..., :queries]  # a query that sees nothing: 0 (as FLASH_CPU gives), not nan


LSE_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor | None, float], tuple[Tensor, Tensor]]] = {
    "cpu": _flash_cpu, "cuda": _efficient,
}
"""By device type: fused attention (q, k, v, visible (bool, (batch, 1, queries, keys)) or None, scale) -> (out in
q's dtype, 0 for a query that sees nothing; each query's log-sum-exp in float32), each kernel building the mask it
wants. Private ATen entry points (torch is pinned), so each is checked before use (lse_kernel_works: the check
includes a query that sees nothing)."""


def lse_attention(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v over the keys `visible` (bool, (batch, 1, queries, keys), or None: all) marks, in q's
    dtype, and each query's log-sum-exp (batch, heads, queries), -inf where it sees no key (its output is 0);
    q (batch, heads, queries, d), k and v (batch, heads, keys, d), by LSE_KERNELS."""
    out, lse = LSE_KERNELS[q.device.type](q, k, v, visible, scale)
    if visible is not None:  # the kernels report 0, not -inf, for a query that sees nothing
        lse = lse.masked_fill(~visible.any(-1), -math.inf)
    return out, lse


_LSE_CHECKED: dict[tuple[str, int | None, torch.dtype], bool] = {}


def lse_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether lse_attention gives attention's numbers on this device in this dtype, checked once (a small random
    problem against float64 on the host: GQA-free, keys not a multiple of 16, one query seeing nothing); when it
    does not (or raises), why is logged once and cascade_attention keeps its products there."""
    key = (device.type, device.index, dtype)
    if key not in _LSE_CHECKED:
        _LSE_CHECKED[key] = _check_lse_kernel(device, dtype)
    return _LSE_CHECKED[key]


def check_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Run lse_kernel_works' one-off check now where the device would use it (a model's load), not in a step."""
    if device.type in KERNEL_DEVICES:
        lse_kernel_works(device, dtype)


def _check_lse_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 64, generator=generator, dtype=torch.float64) for n in (3, 21, 21))
    visible = torch.rand(2, 1, 3, 21, generator=generator) < 0.6
    visible[..., 0] = True
    visible[1, :, 2] = False
    scale = 0.125
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -math.inf)
    want_lse = torch.logsumexp(scores, -1)
    want = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    try:
        out, lse = lse_attention(*(t.to(device, dtype) for t in (q, k, v)), visible.to(device), scale)
        out, lse = out.double().cpu(), lse.double().cpu()
    except Exception as error:  # a kernel this build or card lacks: keep the products
        log.warning("fused cascade attention is not available on %s in %s (%s); cascades use the products", device, dtype, error)
        return False
    tolerance = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    worst = max(float((out - want).abs().max()), float((lse - want_lse).nan_to_num(posinf=1e9, neginf=0.0).abs().max()))
    if not (torch.isinf(lse[1, :, 2]).all() and worst <= tolerance):
        log.warning("fused cascade attention gives wrong numbers on %s in %s (off by %.3g); cascades use the products",
                    device, dtype, worst)
        return False
    return True


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

    When fused() (bfloat16 on CPU; CUDA), each part is one fused attention (lse_attention) and the two are merged by their
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
        from_prefix, prefix_lse = lse_attention(stacked[None], shared_k_t.transpose(-1, -2)[None], shared_v[None], prefix_visible, scale)
        from_own, own_lse = lse_attention(q, k_t.transpose(-1, -2), v, own_visible, scale)
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
