"""Pure tensor helpers that pick the next token of every row of a batch, each row with its own parameters.

Logits are (rows, vocab); every parameter is a (rows,) tensor. The order follows transformers' logits
processors: repetition penalty, then temperature, top-k and top-p, then a draw. Greedy rows (temperature 0)
take the argmax of the penalised logits, as transformers' greedy search does.

A sampled row's randomness is one uniform number per step from that row's own torch.Generator, turned into a
token by inverse-CDF lookup in vocabulary order. No draw depends on the other rows, so a request with a given
seed yields the same tokens alone or inside any batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep the top_k largest logits of each row (ties with the k-th are kept); 0 keeps everything."""
    k_max = min(int(top_k.max()), logits.shape[-1])
    if k_max <= 0:
        return logits
    values = torch.topk(logits, k_max, dim=-1).values
    k = top_k.clamp(1, k_max)
    threshold = values.gather(-1, (k - 1)[:, None])
    threshold = torch.where(top_k[:, None] > 0, threshold, torch.full_like(threshold, -float("inf")))
    return logits.masked_fill(logits < threshold, -float("inf"))


def apply_top_p(logits: Tensor, top_p: Tensor, candidates: int = 1024) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one); 1.0 keeps all.

    A token is kept when the tokens ranked above it hold less than top_p. Sorting the whole vocabulary is slow
    (a third of a decode step of a 135M model), so only the rows with top_p < 1 are ranked, and only their
    `candidates` best tokens unless those hold less than top_p in some row.
    """
    rows = (top_p < 1.0).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return logits
    sub, p = logits[rows], top_p[rows, None]
    values, index = sub.topk(min(candidates, sub.shape[-1]), dim=-1)
    probs = (values - sub.logsumexp(dim=-1, keepdim=True)).exp()
    if values.shape[-1] < sub.shape[-1] and bool((probs.sum(dim=-1, keepdim=True) < p).any()):
        values, index = sub.sort(dim=-1, descending=True)
        probs = values.softmax(dim=-1)
    remove_ranked = probs.cumsum(dim=-1) - probs >= p
    remove = torch.ones_like(sub, dtype=torch.bool).scatter(-1, index, remove_ranked)
    out = logits.clone()
    out[rows] = sub.masked_fill(remove, -float("inf"))
    return out


def logits_to_probs(logits: Tensor, params: RowParams) -> Tensor:
    """Temperature, top-k and top-p, then softmax (penalties are applied before, see next_tokens)."""
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return torch.softmax(logits.float(), dim=-1)


def sample(probs: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling: the first token whose cumulative probability exceeds uniform * total.

    uniform is (rows,) in [0, 1). Zero-probability tokens are never picked. float64 keeps the cumulative sum exact
    enough that the choice does not depend on how the rows were batched.
    """
    cdf = probs.double().cumsum(dim=-1)
    target = (uniform.to(cdf.device, torch.float64) * cdf[:, -1])[:, None]
    index = torch.searchsorted(cdf, target, right=True)
    return index.squeeze(-1).clamp(max=probs.shape[-1] - 1)


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
    greedy = logits.argmax(dim=-1)
    sampled_rows = params.temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    sampled = sample(logits_to_probs(logits, params), uniform)
    return torch.where(sampled_rows, sampled, greedy)
