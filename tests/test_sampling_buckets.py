"""The CPU's draw for a row that keeps more than its first ranked candidates (workers.sampling.kept_by_buckets and
sample_kept): the same tokens kept as ranking the whole row, the same token drawn for the same uniform number, each
row alone as in a batch, and the law of transformers' warpers."""
from __future__ import annotations

import math

import torch

from tests.test_engine import warped_draw
from tests.test_sampling_sort_free import exact_margin
from workers.sampling import (
    RowParams, SamplingGroups, kept_by_buckets, min_keeps, next_tokens, sample_candidates, sample_kept, top_candidates,
)


def ranked(scaled: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """What the ranked candidates keep (ranked as wide as they need), as a (rows, vocab) mask."""
    rows = len(scaled)
    _, index, kept = top_candidates(scaled, torch.ones(rows), torch.zeros(rows, dtype=torch.long), top_p, candidates=2, min_p=min_p)
    return torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, index, kept)


def shapes_of_logits(vocab: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    spread = torch.randn(8, vocab) * 2
    masked = spread.clone()
    masked[:, ::3] = -math.inf  # what a grammar or a logit bias leaves out
    one_left = torch.full((8, vocab), -math.inf)
    one_left[:, 7] = 0.5
    return {
        "peaked": torch.randn(8, vocab) * 8,
        "flat": torch.randn(8, vocab) * 0.05,
        "random model": torch.randn(8, vocab) * 0.5,
        "spread": spread,
        "tied": torch.randint(0, 4, (8, vocab)).float(),
        "masked": masked,
        "equal": torch.zeros(8, vocab),
        "one left": one_left,
        "long tail": torch.cat([torch.randn(8, 20) * 3 + 10, torch.randn(8, vocab - 20) * 0.1], dim=-1),
    }


def test_what_is_kept_equals_ranking_the_whole_row():
    top_p = torch.tensor([0.5, 0.9, 0.95, 0.99, 0.1, 0.7, 0.999, 1.0])
    for name, logits in shapes_of_logits(3000).items():
        differ = kept_by_buckets(logits, top_p) != ranked(logits, top_p)
        # Sums in another order: only a token whose cut-off lies within float32 rounding of top_p may differ.
        assert (exact_margin(logits, torch.zeros(8, dtype=torch.long), top_p)[differ] < 1e-5).all(), name
        assert differ.sum() <= 2, (name, differ.sum())
        assert kept_by_buckets(logits, top_p).any(dim=-1).all(), name


def test_min_p_is_applied_after_top_p():
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.99, 1.0, 0.8, 0.95, 1.0])
    min_p = torch.tensor([0.05, 0.1, 0.0, 0.5, 0.9, 0.01, 0.2, 0.0])
    for name, logits in shapes_of_logits(2000).items():
        got = kept_by_buckets(logits, top_p, min_p)
        assert torch.equal(got, kept_by_buckets(logits, top_p) & min_keeps(logits, logits.max(-1, keepdim=True).values, min_p)), name
        differ = got != ranked(logits, top_p, min_p)
        assert differ.sum() <= 2, (name, differ.sum())


def test_each_row_keeps_what_it_keeps_alone():
    logits = torch.cat(list(shapes_of_logits(1000).values()))
    top_p = torch.rand(len(logits)) * 0.98 + 0.01
    whole = kept_by_buckets(logits, top_p)
    for row in range(len(logits)):
        assert torch.equal(kept_by_buckets(logits[row : row + 1], top_p[row : row + 1])[0], whole[row]), row


def test_a_kept_draw_is_the_ranked_draw():
    """Given the same kept tokens, sample_kept and sample_candidates draw the same token for every uniform number:
    a flat row's text does not change with the way its kept tokens were found."""
    torch.manual_seed(12)
    logits = torch.randn(16, 5000) * 0.3
    rows = len(logits)
    temperature, top_p = torch.full((rows,), 0.8), torch.full((rows,), 0.9)
    values, index, kept = top_candidates(logits, temperature, torch.zeros(rows, dtype=torch.long), top_p)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, index, kept)
    for _ in range(50):
        uniform = torch.rand(rows, dtype=torch.float64)
        assert torch.equal(sample_kept(logits / temperature[:, None], mask, uniform), sample_candidates(values, index, kept, uniform))
    edges = torch.tensor([0.0, 1 - 1e-16] * (rows // 2), dtype=torch.float64)
    drawn = sample_kept(logits / temperature[:, None], mask, edges)
    assert mask.gather(-1, drawn[:, None]).all()  # never a token outside the kept ones, at either end


def test_wide_and_narrow_rows_draw_what_the_warpers_draw():
    """next_tokens on the CPU: peaked rows draw among their first candidates, flat ones through kept_by_buckets;
    both as transformers' warpers and an inverse CDF in token order, and each row alone as in the batch."""
    torch.manual_seed(13)
    vocab = 4000
    logits = torch.cat([torch.randn(4, vocab) * 8, torch.randn(4, vocab) * 0.2])  # 4 peaked rows, 4 flat
    params = RowParams.build([0.7, 1.0, 1.3, 0.5] * 2, [0, 0, 20, 0, 0, 0, 50, 0], [0.9, 0.95, 0.9, 0.5, 0.9, 0.99, 0.8, 0.3],
                             [1.0] * 8, torch.device("cpu"))
    groups = SamplingGroups.of_params(params)
    scaled = logits / params.temperature[:, None]
    wide = top_candidates(scaled, torch.ones(8), params.top_k, params.top_p, widen=False)[2][:, -1]
    assert not wide[:4].any() and wide[[4, 5, 7]].all()  # both ways are taken
    for trial in range(20):
        uniform = torch.rand(8, dtype=torch.float64)
        got = next_tokens(logits, params, None, uniform, groups)
        for row in range(8):
            assert int(got[row]) == warped_draw(logits, params, row, float(uniform[row])), (trial, row)
            alone = next_tokens(logits[row : row + 1], params.select(torch.tensor([row])), None, uniform[row : row + 1])
            assert int(alone[0]) == int(got[row]), (trial, row)
