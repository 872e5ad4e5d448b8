"""Pure tensor helpers that pick the next token of every row of a batch, each row with its own parameters.

Logits are (rows, vocab); every parameter is a (rows,) tensor. The order follows transformers' logits
processors: repetition penalty, then temperature, top-k and top-p, then a draw. Greedy rows (temperature 0)
take the argmax of the penalised logits, as transformers' greedy search does.

A sampled row's randomness is one uniform number per step from that row's own torch.Generator, turned into a
token by inverse-CDF lookup in vocabulary order. No draw depends on the other rows, so a request with a given
seed yields the same tokens alone or inside any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

CANDIDATES = 64
"""How many best tokens filter_threshold ranks first (it ranks more when a row needs them)."""


@dataclass
class RowParams:
    """Per-row sampling parameters of one batch, as (rows,) tensors on the logits' device."""

    temperature: Tensor
    """float; 0 means greedy."""
    top_k: Tensor
    """long; 0 means no top-k filter."""
    top_p: Tensor
    """float; 1.0 means no top-p filter."""
    repetition_penalty: Tensor
    """float; 1.0 means no penalty."""

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        repetition_penalty: list[float],
        device: torch.device,
    ) -> RowParams:
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.long, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(repetition_penalty, dtype=torch.float32, device=device),
        )

    def select(self, index: Tensor) -> RowParams:
        """Only the rows at index (used when finished rows leave the batch)."""
        return RowParams(self.temperature[index], self.top_k[index], self.top_p[index], self.repetition_penalty[index])


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """For tokens already in the row (seen, bool (rows, vocab)): logit / p if logit > 0, else logit * p."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide by the temperature; greedy rows (0) are left alone (they take the argmax anyway)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / t[:, None].to(logits.dtype)


def filter_threshold(logits: Tensor, top_k: Tensor, top_p: Tensor, candidates: int = CANDIDATES) -> Tensor:
    """The smallest logit each row keeps after top-k and then top-p, as transformers' warpers keep them; -inf
    for rows with neither (top_k 0, top_p 1). Returns (rows,).

    Top-k keeps the top_k largest logits and ties with the k-th. Top-p then keeps, among those, the smallest set of
    most likely tokens whose probability (renormalised over the top-k set, else over the whole row) reaches
    top_p: a token is kept while the tokens ranked above it hold less than top_p, so at least one is.

    Sorting a vocabulary is slow (120 ms for 40 rows on one core), so only the `candidates` best tokens of the
    filtered rows are ranked; a top-p row whose candidates hold less than top_p is ranked again 16 times wider,
    up to the whole vocabulary, so the result never depends on `candidates`.
    """
    rows, vocab = logits.shape
    threshold = torch.full((rows,), -math.inf, dtype=logits.dtype, device=logits.device)
    todo = ((top_k > 0) | (top_p < 1.0)).nonzero().squeeze(-1)
    width = min(vocab, max(candidates, int(top_k.max()) if rows else 0))
    while todo.numel():
        x, k, p = logits[todo], top_k[todo].clamp(max=vocab), top_p[todo]
        values = x.topk(width, dim=-1).values  # (todo, width), descending
        in_k = (k[:, None] == 0) | (torch.arange(width, device=x.device)[None, :] < k[:, None])
        # Normalise over the top-k set (wholly inside the candidates) or, without top-k, over the whole row.
        log_z = values.masked_fill(~in_k, -math.inf).logsumexp(dim=-1)
        no_k = k == 0
        if bool(no_k.any()):
            log_z[no_k] = x[no_k].logsumexp(dim=-1)
        probs = (values - log_z[:, None]).exp().masked_fill(~in_k, 0.0)
        kept = in_k & (probs.cumsum(dim=-1) - probs < p[:, None])  # a prefix of the ranking, never empty
        last = kept.sum(dim=-1, keepdim=True) - 1
        covered = ~no_k | (p >= 1.0) | (probs.sum(dim=-1) >= p) | (width == vocab)
        threshold[todo[covered]] = values.gather(-1, last).squeeze(-1)[covered]
        todo = todo[~covered]
        width = min(vocab, width * 16)
    return threshold


def sample(logits: Tensor, threshold: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """Inverse-CDF sampling in vocabulary order from softmax(logits) restricted to logits >= threshold.

    uniform is (rows,) in [0, 1): the token is the first whose cumulative weight exceeds uniform * total, so a
    zero-weight token is never picked. The cumulative sum is taken in blocks (a float32 sum inside a block of
    `block` tokens, float64 across blocks), which is exact enough and a tenth of the cost of one float64 sum
    over the vocabulary. Each row's result depends on that row alone.
    """
    rows, vocab = logits.shape
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp_()
    weights.masked_fill_(logits < threshold[:, None], 0.0)
    if vocab % block:
        weights = torch.nn.functional.pad(weights, (0, block - vocab % block))
    inside = weights.view(rows, -1, block).cumsum(dim=-1)  # (rows, blocks, block)
    totals = inside[:, :, -1]
    cdf = totals.double().cumsum(dim=-1)
    target = uniform.to(cdf.device, torch.float64) * cdf[:, -1]
    which = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=cdf.shape[-1] - 1)  # (rows, 1)
    row = torch.arange(rows, device=logits.device)
    chosen = inside[row, which.squeeze(-1)].double()  # (rows, block): the chosen block's running sum
    offset = target[:, None] - (cdf.gather(-1, which) - totals.gather(-1, which).double())
    offset = torch.minimum(offset.clamp(min=0.0), torch.nextafter(chosen[:, -1:], torch.zeros_like(chosen[:, -1:])))
    index = torch.searchsorted(chosen, offset, right=True).clamp(max=block - 1)
    return (which * block + index).squeeze(-1)


def draw_uniforms(generators: list[torch.Generator | None], device: torch.device) -> Tensor:
    """One uniform number per row from that row's generator; 0 for rows without one (greedy rows)."""
    draws = [float(torch.rand((), generator=g, dtype=torch.float64)) if g is not None else 0.0 for g in generators]
    return torch.tensor(draws, dtype=torch.float64, device=device)


def next_tokens(logits: Tensor, params: RowParams, seen: Tensor | None, uniform: Tensor) -> Tensor:
    """The next token of every row: the argmax for greedy rows, a sample for the others.

    seen: bool (rows, vocab) of the tokens already in each row, or None when no row has a repetition penalty.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    tokens = logits.argmax(dim=-1)
    rows = (params.temperature > 0).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return tokens
    scaled = apply_temperature(logits[rows], params.temperature[rows])
    threshold = filter_threshold(scaled, params.top_k[rows], params.top_p[rows])
    tokens[rows] = sample(scaled, threshold, uniform[rows])
    return tokens
