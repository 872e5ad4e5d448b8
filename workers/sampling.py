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


def top_candidates(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, candidates: int = CANDIDATES
) -> tuple[Tensor, Tensor, Tensor]:
    """What top-k and then top-p keep of each row of logits / temperature, as transformers' warpers keep it.

    Returns (values, index, kept), each (rows, width): the row's `width` largest scaled logits in descending order,
    their token ids, and which of them are kept. Every kept token of the row is in there.

    Top-k keeps the top_k largest logits and ties with the k-th (0: no top-k). Top-p then keeps, among those, the
    smallest set of most likely tokens whose probability (renormalised over the top-k set, else over the whole
    row) reaches top_p: a token is kept while the tokens ranked above it hold less than top_p, so at least one is;
    ties with the last kept logit are kept too.

    Sorting a vocabulary is slow (120 ms for 40 rows on one core), so only the `candidates` best tokens are
    ranked, and all of them again 16 times wider while some row keeps tokens beyond them. What is kept depends on
    each row's own logits and parameters only, never on `candidates` or on the other rows.
    """
    rows, vocab = logits.shape
    k = top_k.clamp(max=vocab)
    no_k = k == 0
    log_z_all = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
    if bool(no_k.any()):  # top-p without top-k: probabilities over the whole row
        log_z_all[no_k] = (logits[no_k] / temperature[no_k, None]).logsumexp(dim=-1)
    width = min(vocab, max(candidates, int(k.max()) + 1))
    while True:
        values, index = logits.topk(width, dim=-1)
        values = values / temperature[:, None]
        in_k = no_k[:, None] | (torch.arange(width, device=logits.device)[None, :] < k[:, None])
        log_z = torch.where(no_k, log_z_all, values.masked_fill(~in_k, -math.inf).logsumexp(dim=-1))
        probs = (values - log_z[:, None]).exp().masked_fill(~in_k, 0.0)
        last = (in_k & (probs.cumsum(dim=-1) - probs < top_p[:, None])).sum(dim=-1, keepdim=True) - 1
        kept = values >= values.gather(-1, last)
        # Complete when the list goes on past the kept tokens (ties included): nothing kept lies beyond it.
        if width == vocab or bool(kept[:, -1].logical_not().all()):
            return values, index, kept
        width = min(vocab, width * 16)


def sample_candidates(values: Tensor, index: Tensor, kept: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling among each row's kept candidates (see top_candidates), taken in token-id order.

    uniform is (rows,) in [0, 1): the token is the first whose cumulative weight exceeds uniform * total.
    """
    weights = (values - values[:, :1]).exp().masked_fill(~kept, 0.0)
    order = index.masked_fill(~kept, torch.iinfo(index.dtype).max).argsort(dim=-1)
    tokens, weights = index.gather(-1, order), weights.gather(-1, order)
    cdf = weights.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform.to(cdf.device, torch.float64)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return tokens.gather(-1, torch.searchsorted(cdf, target, right=True)).squeeze(-1)


def sample(logits: Tensor, uniform: Tensor, block: int = 256) -> Tensor:
    """Inverse-CDF sampling in vocabulary order from softmax(logits) (rows, vocab), for rows without top-k/top-p.

    uniform is (rows,) in [0, 1): the token is the first whose cumulative weight exceeds uniform * total, so a
    zero-weight token is never picked. The cumulative sum is taken in blocks (a float32 sum inside a block of
    `block` tokens, float64 across blocks), which is exact enough and a tenth of the cost of one float64 sum
    over the vocabulary. Each row's result depends on that row alone.
    """
    rows, vocab = logits.shape
    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp_()
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
    """The next token of every row: the argmax for greedy rows (temperature 0), a sample for the others.

    seen: bool (rows, vocab) of the tokens already in each row, or None when no row has a repetition penalty.
    Rows with top-k or top-p draw among their few kept candidates; only rows without either touch the whole
    vocabulary.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = params.temperature == 0
    filtered = ~greedy & ((params.top_k > 0) | (params.top_p < 1.0))
    plain = ~greedy & ~filtered
    if bool(greedy.any()):
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if bool(filtered.any()):
        rows = filtered.nonzero().squeeze(-1)
        p = params.select(rows)
        values, index, kept = top_candidates(logits[rows], p.temperature, p.top_k, p.top_p)
        tokens[rows] = sample_candidates(values, index, kept, uniform[rows])
    if bool(plain.any()):
        rows = plain.nonzero().squeeze(-1)
        tokens[rows] = sample(logits[rows] / params.temperature[rows, None], uniform[rows])
    return tokens
