"""Pure tensor helpers that pick the next token of every row of a batch, each row with its own parameters.

Logits are (rows, vocab); every parameter is a (rows,) tensor. The order follows transformers' logits
processors: repetition penalty, then temperature, top-k, top-p and min-p, then a draw. Greedy rows (temperature 0)
take the argmax of the penalised logits, as transformers' greedy search does.

A sampled row's randomness is one uniform number per step from that row's own torch.Generator, turned into a
token by inverse-CDF lookup in vocabulary order. No draw depends on the other rows, so a request with a given
seed yields the same tokens alone or inside any batch.

Ways to find what top-k and top-p keep, with the same result: on a CPU, rank a few best candidates
(top_candidates: cheap there, but how many it ranks depends on the logits, so it reads them back), and for a row
without top-k that keeps more than those (a flat row: a random model's, a high temperature's) split its values into
ranges and rank only the range where top-p's cut-off falls (kept_by_buckets: no sort of the vocabulary, which cost
a full sort per flat row per step); on a GPU, without sorting or reading anything back (kept_by_threshold: a fixed
number of bisection passes over the vocabulary, each one compare and one sum, which a GPU does in microseconds and
which a CUDA graph can hold).
Which rows are greedy, filtered or plain is known on the host from their parameters (SamplingGroups), so that
no step asks the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from workers.syncs import sent

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
    min_p: Tensor | None = None
    """float; a token is kept when its probability is at least min_p times the most likely token's; 0 (or None for
    every row) means no min-p filter."""

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        repetition_penalty: list[float],
        device: torch.device,
        min_p: list[float] | None = None,
    ) -> RowParams:
        return cls(
            torch.tensor(temperature, dtype=torch.float32, device=device),
            torch.tensor(top_k, dtype=torch.long, device=device),
            torch.tensor(top_p, dtype=torch.float32, device=device),
            torch.tensor(repetition_penalty, dtype=torch.float32, device=device),
            torch.tensor(min_p if min_p is not None else [0.0] * len(temperature), dtype=torch.float32, device=device),
        )

    def select(self, index: Tensor) -> RowParams:
        """Only the rows at index (used when finished rows leave the batch)."""
        return RowParams(
            self.temperature[index], self.top_k[index], self.top_p[index], self.repetition_penalty[index],
            None if self.min_p is None else self.min_p[index],
        )


@dataclass(frozen=True)
class Filters:
    """Which filters some row of a batch uses, known on the host from the rows' parameters: a sort-free draw skips
    the passes of a filter that no row uses (each of top-k's and top-p's is 33 passes over the vocabulary)."""

    top_k: bool = True
    top_p: bool = True
    min_p: bool = True

    @classmethod
    def of(cls, top_k: list[int], top_p: list[float], min_p: list[float]) -> Filters:
        return cls(any(k > 0 for k in top_k), any(p < 1.0 for p in top_p), any(m > 0 for m in min_p))


EVERY_FILTER = Filters()


@dataclass(frozen=True)
class SamplingGroups:
    """Which rows of a batch are greedy, filtered (top-k, top-p or min-p) or plain samples, as index tensors on the
    logits' device (None: no such row), and what the filtered rows need: built on the host from the rows'
    parameters, so that choosing a path never reads the device."""

    greedy: Tensor | None
    filtered: Tensor | None
    plain: Tensor | None
    max_top_k: int
    """The largest top_k of the filtered rows (0: none has one)."""
    with_k: Tensor | None
    """The filtered rows with a top-k (what the ranked candidates of the CPU path always hold)."""
    without_k: Tensor | None
    """The filtered rows without one (top-p, min-p): a flat row keeps thousands of tokens."""
    filters: Filters = EVERY_FILTER
    """The filters some filtered row uses (greedy and plain rows use none)."""

    @classmethod
    def of(
        cls, temperature: list[float], top_k: list[int], top_p: list[float], device: torch.device,
        min_p: list[float] | None = None,
    ) -> SamplingGroups:
        greedy: list[int] = []
        filtered: list[int] = []
        plain: list[int] = []
        min_p = min_p if min_p is not None else [0.0] * len(temperature)
        for i, (t, k, p, m) in enumerate(zip(temperature, top_k, top_p, min_p)):
            (greedy if t == 0 else filtered if k > 0 or p < 1.0 or m > 0 else plain).append(i)

        def index(rows: list[int]) -> Tensor | None:
            return torch.tensor(rows, dtype=torch.long, device=device) if rows else None

        return cls(
            index(greedy), index(filtered), index(plain), max((top_k[i] for i in filtered), default=0),
            index([i for i in filtered if top_k[i] > 0]), index([i for i in filtered if top_k[i] <= 0]),
            Filters.of([top_k[i] for i in filtered], [top_p[i] for i in filtered], [min_p[i] for i in filtered]),
        )

    @classmethod
    def of_params(cls, params: RowParams) -> SamplingGroups:
        """From the parameter tensors themselves (reads them back: for tests and one-off calls, not for steps)."""
        min_p = params.min_p.tolist() if params.min_p is not None else None
        return cls.of(params.temperature.tolist(), params.top_k.tolist(), params.top_p.tolist(), params.temperature.device, min_p)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """For tokens already in the row (seen, bool (rows, vocab)): logit / p if logit > 0, else logit * p."""
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def top_candidates(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, candidates: int = CANDIDATES,
    min_p: Tensor | None = None, widen: bool = True, max_top_k: int | None = None, some_without_k: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """What top-k, then top-p, then min-p keep of each row of logits / temperature, as transformers' warpers keep it.

    Returns (values, index, kept), each (rows, width): the row's `width` largest scaled logits in descending order,
    their token ids, and which of them are kept. Every kept token of the row is in there.

    Top-k keeps the top_k largest logits and ties with the k-th (0: no top-k). Top-p then keeps, among those, the
    smallest set of most likely tokens whose probability (renormalised over the top-k set, else over the whole
    row) reaches top_p: a token is kept while the tokens ranked above it hold less than top_p, so at least one is;
    ties with the last kept logit are kept too. Min-p then keeps a token whose probability is at least min_p times
    the row's largest (min_keeps; renormalising after top-k/top-p changes no ratio to the largest).

    Sorting a vocabulary is slow (120 ms for 40 rows on one core), so only the `candidates` best tokens are
    ranked, and all of them again 16 times wider while some row keeps tokens beyond them. What is kept depends on
    each row's own logits and parameters only, never on `candidates` or on the other rows.

    max_top_k, some_without_k (of these rows): what the host knows of their top_k, so that fewer questions go to
    the device (this path reads it anyway: the CPU's). widen False: rank only the first `width` tokens (max(candidates, the largest
    top_k + 1)); a row whose last candidate is kept may keep more (kept_by_buckets finds those).
    """
    rows, vocab = logits.shape
    k = top_k.clamp(max=vocab)
    no_k = k == 0
    some_without_k = bool(no_k.any()) if some_without_k is None else some_without_k
    max_k = int(k.max()) if max_top_k is None else min(max_top_k, vocab)
    log_z_all = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
    if some_without_k:  # top-p without top-k: probabilities over the whole row
        log_z_all[no_k] = (logits[no_k] / temperature[no_k, None]).logsumexp(dim=-1)
    width = min(vocab, max(candidates, max_k + 1))
    while True:
        values, index = logits.topk(width, dim=-1)
        values = values / temperature[:, None]
        in_k = no_k[:, None] | (torch.arange(width, device=logits.device)[None, :] < k[:, None])
        log_z = torch.where(no_k, log_z_all, values.masked_fill(~in_k, -math.inf).logsumexp(dim=-1))
        probs = (values - log_z[:, None]).exp().masked_fill(~in_k, 0.0)
        # top_p 1.0 filters nothing (as transformers skips it): a running sum that reaches 1.0 early drops no tail
        below = (probs.cumsum(dim=-1) - probs < top_p[:, None]) | (top_p >= 1.0)[:, None]
        last = (in_k & below).sum(dim=-1, keepdim=True) - 1
        kept = values >= values.gather(-1, last)
        if min_p is not None:
            kept &= min_keeps(values, values[:, :1], min_p)
        # Complete when the list goes on past the kept tokens (ties included): nothing kept lies beyond it.
        if not widen or width == vocab or bool(kept[:, -1].logical_not().all()):
            return values, index, kept
        width = min(vocab, width * 16)


def ordered_keys(x: Tensor) -> Tensor:
    """float32 x as int64 keys in the same order (-0.0 and 0.0 alike, -inf lowest): bisection over them finds any
    value exactly in 33 halvings."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into 0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


BISECTIONS = 33
"""Halvings that narrow a range of int64 keys of float32 values (at most 2**33 wide) to one key."""


def min_keeps(scaled: Tensor, largest: Tensor, min_p: Tensor) -> Tensor:
    """Min-p's mask: a token is kept when its probability is at least min_p times the row's largest, i.e.
    exp(scaled - largest) >= min_p (as transformers' MinPLogitsWarper compares them); min_p 0 keeps every token
    and the largest is always kept. scaled (rows, width), largest (rows, 1), min_p (rows,)."""
    return (scaled.float() - largest.float()).exp() >= min_p[:, None]


def kept_by_threshold(
    scaled: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor | None = None, filters: Filters = EVERY_FILTER
) -> Tensor:
    """What top-k, then top-p, then min-p keep of each row of scaled logits (logits / temperature), as a bool
    (rows, vocab) mask: the same tokens top_candidates keeps, found without sorting and without reading the device.

    Top-k keeps the tokens at or above the k-th largest value: the largest key t with count(keys >= t) >= k.
    Top-p keeps a token while the probability of the tokens strictly above it is below top_p (ties kept alike):
    the tokens at or above the smallest key a with mass(keys > a) < top_p. Both are found by bisection over the
    keys (ordered_keys), BISECTIONS passes of one compare and one sum each; rows without top-k (0) or top-p (1.0)
    keep everything for that filter. Sums are in float32 in another order than top_candidates' running sum, so a
    token whose cut-off falls within rounding of top_p may be decided the other way (never a different law).
    filters: which filters some row uses (the others' passes are skipped: every row keeps everything for them).
    """
    rows, vocab = scaled.shape
    keys = ordered_keys(scaled)
    low, high = keys.min(dim=-1).values, keys.max(dim=-1).values
    kept = torch.ones_like(scaled, dtype=torch.bool)
    if filters.top_k:
        k = top_k.clamp(max=vocab)
        # top-k: invariant count(keys >= lo) >= k > count(keys >= hi)
        lo, hi = low, high + 1
        for _ in range(BISECTIONS):
            mid = torch.div(lo + hi, 2, rounding_mode="floor")
            enough = (keys >= mid[:, None]).sum(dim=-1) >= k
            lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
        kept = (keys >= lo[:, None]) | (k <= 0)[:, None]
    if filters.top_p:
        kept &= _top_p_keeps(scaled, keys, kept, low, high, top_p)
    if min_p is not None and filters.min_p:  # one compare against the row's largest: no bisection needed
        kept &= min_keeps(scaled, scaled.max(dim=-1, keepdim=True).values, min_p)
    return kept


def _top_p_keeps(scaled: Tensor, keys: Tensor, kept: Tensor, low: Tensor, high: Tensor, top_p: Tensor) -> Tensor:
    """kept_by_threshold's top-p pass over what top-k kept (kept), by bisection over the keys."""
    probs = scaled.float().masked_fill(~kept, -math.inf).softmax(dim=-1)
    # top-p: invariant mass(keys > lo) >= top_p > mass(keys > hi)
    lo, hi = low - 1, high
    for _ in range(BISECTIONS):
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        below = probs.masked_fill(keys <= mid[:, None], 0.0).sum(dim=-1) < top_p
        lo, hi = torch.where(below, lo, mid), torch.where(below, mid, hi)
    return (keys >= hi[:, None]) | (top_p >= 1.0)[:, None]


BUCKETS = 4096
"""How many equal ranges of its scaled logits kept_by_buckets splits a row into."""


def kept_by_buckets(scaled: Tensor, top_p: Tensor, min_p: Tensor | None = None) -> Tensor:
    """What top-p, then min-p keep of each row of scaled logits (logits / temperature; rows without top-k), as a
    bool (rows, vocab) mask: the tokens top_candidates keeps, found without ranking the whole vocabulary.

    A flat row (a random model's, or a high temperature's) keeps most of a 50k vocabulary, which top_candidates
    can only find by sorting it (1.7 ms a row on one core, and transformers' top-p sorts every row so). Here the
    row's values are split into BUCKETS equal ranges, each range's probability summed (one scatter_add); the range
    where the mass above reaches top_p holds the cut-off, and only its few tokens are ranked (topk) and summed in
    order, after the mass of the ranges above. Same rule as top_candidates (a token is kept while the tokens above
    it hold less than top_p, ties with the last kept alike); the sums run in another order, so a token whose cut-off
    falls within float32 rounding of top_p may be decided the other way (never a different law). Reads back one
    number: the most tokens any row's cut-off range holds.
    """
    rows, vocab = scaled.shape
    scaled = scaled.float()
    probs = scaled.softmax(dim=-1)
    low, high = scaled.aminmax(dim=-1)
    if bool((low == -math.inf).any()):  # masked tokens (a grammar's, a bias'): the ranges span what is left possible
        low = scaled.masked_fill(scaled == -math.inf, math.inf).amin(dim=-1)
    spread = torch.where(high > low, BUCKETS / (high - low), 0.0)  # a row of equal values: one range, all kept
    # The range of each value, non-decreasing in the value; masked tokens (-inf, no probability) fall into the first.
    bucket = ((scaled - low[:, None]).clamp_(min=0) * spread[:, None]).clamp_(max=BUCKETS - 1).long()
    mass = torch.zeros((rows, BUCKETS), dtype=probs.dtype, device=scaled.device).scatter_add_(1, bucket, probs)
    at_or_above = mass.flip(-1).cumsum(dim=-1).flip(-1)  # the mass of each range and those above it
    cut_range = ((at_or_above >= top_p[:, None]).sum(dim=-1) - 1).clamp(min=0)  # never grows along a row
    above = torch.where(
        cut_range + 1 < BUCKETS, at_or_above.gather(-1, (cut_range + 1).clamp(max=BUCKETS - 1)[:, None])[:, 0], 0.0
    )
    inside = bucket == cut_range[:, None]
    width = int(inside.sum(dim=-1).max())
    values = scaled.masked_fill(~inside, -math.inf).topk(width, dim=-1).values  # the range's tokens, descending
    p = (values - scaled.logsumexp(dim=-1, keepdim=True)).exp()
    before = above[:, None] + p.cumsum(dim=-1) - p  # the mass of the tokens above each
    last = ((before < top_p[:, None]) & (values > -math.inf)).sum(dim=-1, keepdim=True).clamp(min=1) - 1
    cut = torch.where(top_p >= 1.0, -math.inf, values.gather(-1, last)[:, 0])  # ties with the last kept are kept
    kept = scaled >= cut[:, None]
    if min_p is not None:
        kept &= min_keeps(scaled, high[:, None], min_p)
    return kept


def sample_kept(scaled: Tensor, kept: Tensor, uniform: Tensor) -> Tensor:
    """Inverse-CDF sampling in token-id order among the tokens kept marks (bool (rows, vocab)) of scaled logits
    (rows, vocab): the same numbers, so the same token, as sample_candidates given the same kept tokens."""
    weights = (scaled - scaled.max(dim=-1, keepdim=True).values).exp().masked_fill(~kept, 0.0)
    cdf = weights.double().cumsum(dim=-1)  # adding the zeros of tokens not kept changes no sum
    total = cdf[:, -1:]
    target = torch.minimum(uniform.to(cdf.device, torch.float64)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


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
    """One uniform number per row from that row's generator; 0 for rows without one (greedy rows). Drawn on the
    host (the generators are CPU generators, so a seed gives the same text on every device) and sent, never read."""
    draws = torch.zeros(len(generators), dtype=torch.float64)
    for i, generator in enumerate(generators):
        if generator is not None:
            draws[i] = torch.rand((), generator=generator, dtype=torch.float64)
    return sent(draws, device)


def next_tokens(
    logits: Tensor, params: RowParams, seen: Tensor | None, uniform: Tensor, groups: SamplingGroups | None = None,
    sort_free: bool = False,
) -> Tensor:
    """The next token of every row: the argmax for greedy rows (temperature 0), a sample for the others.

    seen: bool (rows, vocab) of the tokens already in each row, or None when no row has a repetition penalty.
    groups: which rows take which path (None: read from params). Rows with top-k or top-p draw among the tokens
    they keep: found by ranking a few candidates (top_candidates), or, sort_free, by kept_by_threshold and an
    inverse-CDF draw over the vocabulary (nothing sorted, nothing read back: what a GPU step wants).
    """
    groups = SamplingGroups.of_params(params) if groups is None else groups
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    if groups.greedy is not None:
        tokens.index_copy_(0, groups.greedy, logits.index_select(0, groups.greedy).argmax(dim=-1))
    if groups.filtered is not None:
        if sort_free:
            rows = groups.filtered
            p = params.select(rows)
            scaled = logits.index_select(0, rows) / p.temperature[:, None]
            kept = kept_by_threshold(scaled, p.top_k, p.top_p, p.min_p, groups.filters)
            drawn = sample(scaled.masked_fill(~kept, -math.inf), uniform.index_select(0, rows))
            tokens.index_copy_(0, rows, drawn)
        else:
            _ranked(tokens, logits, params, uniform, groups)
    if groups.plain is not None:
        rows = groups.plain
        tokens.index_copy_(0, rows, sample(logits.index_select(0, rows) / params.temperature[rows, None], uniform.index_select(0, rows)))
    return tokens


def sort_free_tokens(logits: Tensor, params: RowParams, uniform: Tensor, filters: Filters = EVERY_FILTER) -> Tensor:
    """next_tokens' tokens, sort_free, for logits already penalised, in shapes fixed by logits' alone (no groups, no
    index): what a CUDA graph holds (workers.graphs). Every row goes through the filters and the draw, a plain
    row's keeping every token (top_k 0, top_p 1, min_p 0), so it draws as next_tokens draws it; greedy rows
    (temperature 0) take the argmax instead. filters: those some sampled row uses (none: a plain draw)."""
    assert params.min_p is not None, "a running batch's RowParams always has min_p (RowParams.build)"
    logits = logits.float()
    greedy = params.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, params.temperature)[:, None]
    if filters.top_k or filters.top_p or filters.min_p:
        scaled = scaled.masked_fill(~kept_by_threshold(scaled, params.top_k, params.top_p, params.min_p, filters), -math.inf)
    drawn = sample(scaled, uniform)
    return torch.where(greedy, logits.argmax(dim=-1), drawn)


def _ranked(tokens: Tensor, logits: Tensor, params: RowParams, uniform: Tensor, groups: SamplingGroups) -> None:
    """The CPU's draws for the filtered rows, into tokens: rows with top-k among their ranked candidates
    (top_candidates); rows without, among their first CANDIDATES ranked tokens when that is all they keep (a
    peaked row: a trained model's, mostly), else what kept_by_buckets finds over the whole vocabulary. Which way a
    row goes depends on its own logits alone, and both ways keep the same tokens."""
    if groups.with_k is not None:
        rows = groups.with_k
        p = params.select(rows)
        values, index, kept = top_candidates(
            logits.index_select(0, rows), p.temperature, p.top_k, p.top_p, min_p=p.min_p,
            max_top_k=groups.max_top_k, some_without_k=False,
        )
        tokens.index_copy_(0, rows, sample_candidates(values, index, kept, uniform.index_select(0, rows)))
    if groups.without_k is None:
        return
    rows = groups.without_k
    p = params.select(rows)
    values, index, kept = top_candidates(
        logits.index_select(0, rows), p.temperature, p.top_k, p.top_p, min_p=p.min_p, widen=False,
        max_top_k=0, some_without_k=True,
    )
    wide = kept[:, -1].tolist()
    narrow = [i for i, w in enumerate(wide) if not w]
    if narrow:
        at = torch.tensor(narrow, device=logits.device)
        drawn = sample_candidates(values[at], index[at], kept[at], uniform.index_select(0, rows[at]))
        tokens.index_copy_(0, rows[at], drawn)
    if len(narrow) < len(wide):
        at = torch.tensor([i for i, w in enumerate(wide) if w], device=logits.device)
        flat, flat_p = rows[at], p.select(at)
        scaled = logits.index_select(0, flat) / flat_p.temperature[:, None]
        kept_all = kept_by_buckets(scaled, flat_p.top_p, flat_p.min_p)
        tokens.index_copy_(0, flat, sample_kept(scaled, kept_all, uniform.index_select(0, flat)))
