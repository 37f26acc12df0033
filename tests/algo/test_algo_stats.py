import math

import pytest
import torch

from rlhf_dist.algo import masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
M = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])


@pytest.mark.parametrize("mask", [M, M.bool(), M.float()])
def test_masked_sum_and_mean_hand_case(mask):
    # selected: 1, 2, 6, 7, 8 -> sum 24, mean 24 / 5 = 4.8
    assert masked_sum(X, mask).item() == pytest.approx(24.0)
    assert masked_mean(X, mask).item() == pytest.approx(4.8)
    # per row: [1+2, 6+7+8, nothing] -> sums [3, 21, 0], means [1.5, 7, 0 (empty row)]
    assert masked_sum(X, mask, dim=1).tolist() == pytest.approx([3.0, 21.0, 0.0])
    assert masked_mean(X, mask, dim=1).tolist() == pytest.approx([1.5, 7.0, 0.0])
    # per column: [1, 2+6, 7, 8]
    assert masked_mean(X, mask, dim=0).tolist() == pytest.approx([1.0, 4.0, 7.0, 8.0])


def test_masked_mean_matches_torch_on_selected_elements():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g)
    mask = torch.rand(6, 9, generator=g) > 0.4
    assert torch.allclose(masked_sum(x, mask), x[mask].sum())
    assert torch.allclose(masked_mean(x, mask), x[mask].mean())
    for b in range(6):
        expected = x[b][mask[b]].mean() if mask[b].any() else torch.tensor(0.0)
        assert torch.allclose(masked_mean(x, mask, dim=1)[b], expected)


def test_empty_mask_gives_zero_not_nan():
    x = torch.randn(2, 3)
    empty = torch.zeros(2, 3)
    assert masked_mean(x, empty).item() == 0.0
    assert masked_mean(x, empty, dim=1).tolist() == [0.0, 0.0]
    assert masked_var(x, empty).item() == 0.0
    out = masked_whiten(x, empty)
    assert torch.equal(out, torch.zeros(2, 3))


def test_masked_positions_with_inf_or_nan_do_not_leak():
    x = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [0, 1]])
    mean = masked_mean(x, mask)
    assert mean.item() == pytest.approx(2.0)
    mean.backward()
    assert torch.equal(x.grad, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))


def test_masked_var_matches_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) > 0.3
    assert torch.allclose(masked_var(x, mask), x[mask].var(unbiased=True))
    assert torch.allclose(masked_var(x, mask, unbiased=False), x[mask].var(unbiased=False))


def test_masked_var_hand_case_and_small_counts():
    # selected 1, 2, 6, 7, 8: mean 4.8, squared deviations 14.44 + 7.84 + 1.44 + 4.84 + 10.24 = 38.8
    assert masked_var(X, M).item() == pytest.approx(38.8 / 4)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(38.8 / 5)
    one = torch.zeros_like(M)
    one[1, 2] = 1
    assert masked_var(X, one).item() == 0.0
    assert masked_var(X, one, unbiased=False).item() == 0.0


def test_whiten_zero_mean_unit_var_and_zero_padding():
    g = torch.Generator().manual_seed(2)
    x = 3.0 + 5.0 * torch.randn(4, 10, generator=g)
    mask = torch.rand(4, 10, generator=g) > 0.3
    out = masked_whiten(x, mask)
    assert abs(out[mask].mean().item()) < 1e-5
    assert out[mask].var(unbiased=True).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(out[~mask] == 0)


def test_whiten_without_shift_keeps_mean():
    g = torch.Generator().manual_seed(3)
    x = 3.0 + 5.0 * torch.randn(4, 10, generator=g)
    mask = torch.rand(4, 10, generator=g) > 0.3
    out = masked_whiten(x, mask, shift_mean=False)
    assert out[mask].mean().item() == pytest.approx(x[mask].mean().item(), abs=1e-5)
    assert out[mask].var().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(out[~mask] == 0)


def test_whiten_with_given_statistics():
    # (x - mean) / sqrt(var + eps) with mean=2, var=4: [1, 3, 5] -> [-0.5, 0.5, 1.5]
    x = torch.tensor([[1.0, 3.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(x, mask, mean=torch.tensor(2.0), var=torch.tensor(4.0), eps=0.0)
    assert out[0].tolist() == pytest.approx([-0.5, 0.5, 1.5, 0.0])
    out = masked_whiten(x, mask, mean=2.0, var=4.0, eps=0.0, shift_mean=False)
    assert out[0].tolist() == pytest.approx([1.5, 2.5, 3.5, 0.0])
    # only var given: mean comes from x (3), so [-2, 0, 2] / 2
    out = masked_whiten(x, mask, var=4.0, eps=0.0)
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    assert not math.isnan(masked_whiten(x, mask, var=0.0).sum().item())
