import pytest
import torch

from rlhf_dist.algo import gae_advantages


def _gae_loop(rewards, values, mask, gamma, lam):
    """Row by row, backwards over the valid positions only, with plain floats."""
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    adv = [[0.0] * len(row) for row in m]
    ret = [[0.0] * len(row) for row in m]
    for b, row in enumerate(m):
        next_v, next_a = 0.0, 0.0
        for t in reversed([t for t in range(len(row)) if row[t]]):
            delta = r[b][t] + gamma * next_v - v[b][t]
            a = delta + gamma * lam * next_a
            adv[b][t], ret[b][t] = a, a + v[b][t]
            next_v, next_a = v[b][t], a
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def _random(seed, shape=(5, 8)):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(*shape, generator=g, dtype=torch.float64)
    values = torch.randn(*shape, generator=g, dtype=torch.float64)
    return rewards, values


MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0, 0, 0],  # right padded
        [0, 0, 0, 1, 1, 1, 1, 1],  # left padded
        [1, 0, 1, 1, 0, 1, 0, 0],  # holes
        [0, 0, 0, 0, 0, 0, 0, 0],  # empty
        [0, 0, 0, 0, 1, 0, 0, 0],  # one token
    ]
)


def test_hand_case():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72):
    # t=2: delta = 2 + 0 - 1.5 = 0.5;              A = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35;      A = 0.35 + 0.72 * 0.5 = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;       A = 1.4 + 0.72 * 0.71 = 1.9112
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([1.9112, 0.71, 0.5])
    assert ret[0].tolist() == pytest.approx([2.4112, 1.71, 2.0])


def test_hand_case_with_hole():
    # Same tokens with a padded slot between t=0 and t=1: the hole is skipped, so identical
    # results on the valid tokens and 0 in the hole (its reward/value 99 are ignored).
    rewards = torch.tensor([[1.0, 99.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 99.0, 1.0, 1.5]])
    mask = torch.tensor([[1, 0, 1, 1]])
    adv, ret = gae_advantages(rewards, values, mask, 0.9, 0.8)
    assert adv[0].tolist() == pytest.approx([1.9112, 0.0, 0.71, 0.5])
    assert ret[0].tolist() == pytest.approx([2.4112, 0.0, 1.71, 2.0])


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_matches_loop_reference(gamma, lam):
    rewards, values = _random(0)
    adv, ret = gae_advantages(rewards, values, MASK, gamma, lam)
    exp_adv, exp_ret = _gae_loop(rewards, values, MASK, gamma, lam)
    assert torch.allclose(adv, exp_adv, atol=1e-12)
    assert torch.allclose(ret, exp_ret, atol=1e-12)


def test_masked_positions_and_empty_row_are_zero():
    rewards, values = _random(1)
    adv, ret = gae_advantages(rewards, values, MASK.bool(), 0.99, 0.95)
    assert torch.all(adv[MASK == 0] == 0) and torch.all(ret[MASK == 0] == 0)
    assert torch.all(adv[3] == 0) and torch.all(ret[3] == 0)
    assert torch.isfinite(adv).all()


def test_one_token_response():
    # A single token: A = r - V, return = r.
    adv, ret = gae_advantages(
        torch.tensor([[0.0, 3.0]]), torch.tensor([[5.0, 1.0]]), torch.tensor([[0, 1]]), 0.99, 0.95
    )
    assert adv[0].tolist() == pytest.approx([0.0, 2.0])
    assert ret[0].tolist() == pytest.approx([0.0, 3.0])


def test_gamma_lam_one_is_monte_carlo_return_minus_value():
    rewards, values = _random(2)
    adv, ret = gae_advantages(rewards, values, MASK, 1.0, 1.0)
    for b, row in enumerate(MASK.tolist()):
        valid = [t for t in range(len(row)) if row[t]]
        for i, t in enumerate(valid):
            mc_return = sum(rewards[b, s].item() for s in valid[i:])
            assert adv[b, t].item() == pytest.approx(mc_return - values[b, t].item())
            assert ret[b, t].item() == pytest.approx(mc_return)


def test_lam_zero_is_one_step_td_error():
    rewards, values = _random(3)
    gamma = 0.9
    adv, _ = gae_advantages(rewards, values, MASK, gamma, 0.0)
    for b, row in enumerate(MASK.tolist()):
        valid = [t for t in range(len(row)) if row[t]]
        for i, t in enumerate(valid):
            v_next = values[b, valid[i + 1]].item() if i + 1 < len(valid) else 0.0
            td = rewards[b, t].item() + gamma * v_next - values[b, t].item()
            assert adv[b, t].item() == pytest.approx(td)


def test_left_and_right_padding_agree():
    g = torch.Generator().manual_seed(4)
    lengths = [5, 1, 3]
    width = 6
    right_r, right_v, right_m = (torch.zeros(3, width) for _ in range(3))
    left_r, left_v, left_m = (torch.zeros(3, width) for _ in range(3))
    # Garbage in the padding must not matter.
    right_r.fill_(7.0), right_v.fill_(-7.0), left_r.fill_(7.0), left_v.fill_(-7.0)
    for b, n in enumerate(lengths):
        r, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
        right_r[b, :n], right_v[b, :n], right_m[b, :n] = r, v, 1
        left_r[b, width - n :], left_v[b, width - n :], left_m[b, width - n :] = r, v, 1
    adv_r, ret_r = gae_advantages(right_r, right_v, right_m, 0.97, 0.9)
    adv_l, ret_l = gae_advantages(left_r, left_v, left_m, 0.97, 0.9)
    for b, n in enumerate(lengths):
        assert torch.allclose(adv_r[b, :n], adv_l[b, width - n :])
        assert torch.allclose(ret_r[b, :n], ret_l[b, width - n :])
        assert torch.all(adv_r[b, n:] == 0) and torch.all(adv_l[b, : width - n] == 0)
