"""The pure scoring functions against direct, loop-by-loop formulas."""

import math

import pytest
import torch

from transprune import scoring


def _direct_ttv(x_in, x_out, direction):
    rows = []
    for xi, xo in zip(x_in.tolist(), x_out.tolist()):
        norm_i = math.sqrt(sum(v * v for v in xi))
        norm_o = math.sqrt(sum(v * v for v in xo))
        cos = sum(a * b for a, b in zip(xi, xo)) / (norm_i * norm_o)
        rows.append((norm_o / norm_i, 1 - cos if direction == "one_minus_cos" else 1 - abs(cos)))
    total = sum(math.exp(g) for _, g in rows)
    return torch.tensor([m * math.exp(g) / total for m, g in rows])


@pytest.mark.parametrize("direction", ["one_minus_cos", "one_minus_abs_cos"])
def test_ttv_matches_direct_formula(direction):
    torch.manual_seed(0)
    x_in, x_out = torch.randn(2, 7, 5), torch.randn(2, 7, 5)
    result = scoring.ttv(x_in, x_out, direction=direction)
    for b in range(2):
        torch.testing.assert_close(result[b], _direct_ttv(x_in[b], x_out[b], direction).float(), rtol=1e-5, atol=1e-7)


def test_ttv_softmax_ignores_padding():
    torch.manual_seed(1)
    x_in, x_out = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    valid = torch.tensor([[False, False, True, True, True, True]])
    padded = scoring.ttv(x_in, x_out, valid)
    alone = scoring.ttv(x_in[:, 2:], x_out[:, 2:])
    assert torch.equal(padded[0, :2], torch.zeros(2))
    torch.testing.assert_close(padded[:, 2:], alone)


def test_iga_matches_direct_loops():
    torch.manual_seed(2)
    heads, kv_heads, n, dim = 4, 2, 9, 3
    q, k = torch.randn(heads, n, dim), torch.randn(kv_heads, n, dim)
    instruction = torch.tensor([6, 7, 8])
    candidates = torch.tensor([1, 2, 4])
    valid = torch.ones(n, dtype=torch.bool)
    valid[0] = False
    scaling = dim ** -0.5
    result = scoring.iga(q, k, instruction, valid, candidates, scaling)
    per_candidate = []
    for c in candidates.tolist():
        total = 0.0
        for h in range(heads):
            kh = h // (heads // kv_heads)
            for i in instruction.tolist():
                logits = {j: float(q[h, i] @ k[kh, j]) * scaling for j in range(n) if j <= i and valid[j]}
                z = sum(math.exp(v) for v in logits.values())
                total += math.exp(logits[c]) / z
        per_candidate.append(total / (heads * len(instruction)))
    expected = torch.tensor(per_candidate)
    torch.testing.assert_close(result, (expected / (expected.sum() + 1e-8)).float(), rtol=1e-5, atol=1e-7)


def test_combine_and_alpha_extremes():
    ttv, iga = torch.tensor([1.0, 3.0]), torch.tensor([0.9, 0.1])
    torch.testing.assert_close(scoring.combine(ttv, iga, 0.5), torch.tensor([0.5 * 0.25 + 0.45, 0.5 * 0.75 + 0.05]))
    torch.testing.assert_close(scoring.combine(ttv, iga, 1.0), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(scoring.combine(ttv, iga, 0.0), iga)


def test_topk_keep_returns_original_order():
    score = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    assert scoring.topk_keep(score, 3).tolist() == [1, 3, 5]
    assert scoring.topk_keep(score, 6).tolist() == list(range(6))
    assert scoring.topk_keep(score, 0).tolist() == []


def test_keep_count_is_floor_without_float_surprises():
    assert scoring.keep_count(576, 0.875) == 504
    assert scoring.keep_count(576, 0.625) == 360
    assert scoring.keep_count(576, 0.125) == 72
    assert scoring.keep_count(576, 0.0625) == 36
    assert scoring.keep_count(10, 0.35) == 3
