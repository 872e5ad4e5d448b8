"""The sort-free filters (workers.sampling.kept_by_threshold) keep exactly what the ranked candidates keep, and a
sort-free draw follows the law transformers' warpers and an inverse CDF in token order give."""
from __future__ import annotations

import math

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tests.test_engine import warped_draw
from workers.sampling import RowParams, SamplingGroups, kept_by_threshold, next_tokens, ordered_keys, top_candidates


def kept_by_ranking(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_candidates' kept tokens as a (rows, vocab) mask (temperature already applied)."""
    _, index, kept = top_candidates(scaled, torch.ones(len(scaled)), top_k, top_p, candidates=2)
    return torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, index, kept)


def exact_margin(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """For each token, how far from top_p the probability of the tokens above it is, in float64 (inf for a row
    without top-p, where no sum decides anything)."""
    x = scaled.double()
    kth = x.sort(dim=-1, descending=True).values.gather(-1, (top_k.clamp(min=1, max=x.shape[-1]) - 1)[:, None])
    in_k = (x >= kth) | (top_k <= 0)[:, None]
    probs = x.masked_fill(~in_k, -math.inf).softmax(dim=-1)
    above = ((x[:, None, :] > x[:, :, None]) * probs[:, None, :]).sum(dim=-1)
    return torch.where((top_p < 1.0)[:, None], (above - top_p[:, None].double()).abs(), math.inf)


def test_ordered_keys_keep_the_order_of_floats():
    x = torch.tensor([-math.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.0, 3e38, math.inf])
    keys = ordered_keys(x)
    assert keys.tolist() == sorted(keys.tolist())
    assert keys[5] == keys[6]  # -0.0 equals 0.0, as the comparisons of top_candidates have it
    assert len(set(keys.tolist())) == len(x) - 1


def test_what_is_kept_equals_the_ranked_candidates_on_many_shapes_of_logits():
    torch.manual_seed(5)
    vocab = 1000
    peaked, flat, spread = torch.randn(8, vocab) * 8, torch.randn(8, vocab) * 0.05, torch.randn(8, vocab) * 2
    tied = torch.randint(0, 4, (8, vocab)).float()  # many exact ties
    masked = spread.clone()
    masked[:, ::3] = -math.inf
    for logits in (peaked, flat, spread, tied, masked):
        for top_k, top_p in (([0] * 8, [0.5, 0.9, 0.95, 0.99, 0.1, 0.7, 0.999, 0.3]),
                             ([1, 5, 50, 999, 1000, 2000, 3, 40], [1.0] * 8),
                             ([1, 5, 50, 999, 0, 2000, 3, 40], [0.5, 0.9, 1.0, 0.99, 0.8, 0.7, 0.95, 0.3])):
            k, p = torch.tensor(top_k), torch.tensor(top_p)
            differ = kept_by_threshold(logits, k, p) != kept_by_ranking(logits, k, p)
            # The two sum probabilities in different orders: only a token whose top-p cut-off lies within float32
            # rounding of top_p may be decided differently.
            assert (exact_margin(logits, k, p)[differ] < 1e-5).all(), (top_k, top_p, differ.sum())
            assert differ.sum() <= 2


def test_each_row_keeps_what_it_keeps_alone():
    torch.manual_seed(6)
    logits = torch.randn(6, 500) * 3
    k, p = torch.tensor([0, 10, 0, 3, 0, 100]), torch.tensor([0.9, 1.0, 0.5, 0.99, 0.999, 0.8])
    whole = kept_by_threshold(logits, k, p)
    for row in range(6):
        assert torch.equal(kept_by_threshold(logits[row : row + 1], k[row : row + 1], p[row : row + 1])[0], whole[row])


def test_the_filters_agree_with_transformers_warpers():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    inf = -math.inf
    for k in (1, 5, 50, 80):
        expected = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(logits.masked_fill(~kept_by_threshold(logits, torch.full((4,), k), torch.ones(4)), inf), expected)
    for p in (0.1, 0.5, 0.9):
        expected = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(logits.masked_fill(~kept_by_threshold(logits, torch.zeros(4, dtype=torch.long), torch.full((4,), p)), inf), expected)
    for k, p in ((5, 0.5), (20, 0.9), (3, 0.99)):
        expected = TopPLogitsWarper(p)(None, TopKLogitsWarper(k)(None, logits.clone()))
        got = logits.masked_fill(~kept_by_threshold(logits, torch.full((4,), k), torch.full((4,), p)), inf)
        assert torch.equal(got, expected)


def test_a_sort_free_draw_is_the_inverse_cdf_of_the_warped_distribution_in_token_order():
    torch.manual_seed(4)
    logits = torch.randn(8, 300) * 3
    params = RowParams.build([0.7, 1.0, 1.3, 0.5] * 2, [0, 20, 0, 5, 0, 0, 50, 1], [0.9, 1.0, 0.5, 0.95, 1.0, 0.99, 0.8, 1.0],
                             [1.0] * 8, torch.device("cpu"))
    groups = SamplingGroups.of_params(params)
    for trial in range(20):
        uniform = torch.rand(8, dtype=torch.float64)
        got = next_tokens(logits, params, None, uniform, groups, sort_free=True)
        ranked = next_tokens(logits, params, None, uniform, groups)
        for row in range(8):
            assert int(got[row]) == warped_draw(logits, params, row, float(uniform[row])) == int(ranked[row]), (trial, row)


def test_a_flat_distribution_under_top_p_needs_no_wider_ranking():
    """A random-weight model's flat logits keep most of the vocabulary under top_p 0.95: the ranked path widens
    to the whole row (a full sort); the threshold path does the same passes as for any other row."""
    torch.manual_seed(7)
    logits = torch.randn(4, 49152) * 0.01
    k, p = torch.zeros(4, dtype=torch.long), torch.full((4,), 0.95)
    kept = kept_by_threshold(logits, k, p)
    assert torch.equal(kept, kept_by_ranking(logits, k, p))
    assert 0.9 * 49152 < kept.sum(dim=-1).float().mean() < 0.97 * 49152
