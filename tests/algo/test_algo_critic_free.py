"""Critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++ and its baseline variant) against
plain Python loops over groups and tokens."""

import math

import pytest
import torch

from rlhf_dist.algo import (
    CRITIC_FREE_ESTIMATORS,
    GROUP_ESTIMATORS,
    discounted_returns,
    gae_advantages,
    group_relative_scores,
    kl_estimate,
    kl_penalized_rewards,
    leave_one_out_scores,
    shaped_scores,
    uniform_groups,
)


def _group_loop(scores, G, mode, eps=1e-6):
    """Group by group with plain floats: mode grpo (mean, Bessel std), centre, or rloo."""
    out = []
    for start in range(0, len(scores), G):
        group = scores[start : start + G]
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        for i, r in enumerate(group):
            if mode == "grpo":
                out.append((r - mean) / (std + eps))
            elif mode == "centre":
                out.append(r - mean)
            else:  # rloo: the mean of the other samples
                others = [x for j, x in enumerate(group) if j != i]
                out.append(r - sum(others) / len(others))
    return out


def _returns_loop(rewards, mask, gamma):
    out = [[0.0] * len(row) for row in mask]
    for b, row in enumerate(mask):
        running = 0.0
        for t in reversed([t for t in range(len(row)) if row[t]]):
            running = rewards[b][t] + gamma * running
            out[b][t] = running
    return out


MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0, 0, 0],  # right padded
        [0, 0, 0, 1, 1, 1, 1, 1],  # left padded
        [1, 0, 1, 1, 0, 1, 0, 0],  # holes
        [0, 0, 0, 0, 1, 0, 0, 0],  # one token
        [1, 1, 1, 1, 1, 1, 1, 1],  # full
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
)


def _scores(seed, n=12):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_grpo_hand_case():
    # group [1, 2, 3]: mean 2, Bessel std 1 -> (-1, 0, 1) / (1 + eps)
    # group [0, 0, 4]: mean 4/3, std sqrt(((4/3)^2 * 2 + (8/3)^2) / 2) = sqrt(16/3)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0], dtype=torch.float64)
    out = group_relative_scores(scores, 3, eps=0.0)
    s = math.sqrt(16 / 3)
    assert out.tolist() == pytest.approx([-1, 0, 1, -4 / 3 / s, -4 / 3 / s, 8 / 3 / s])
    # Dr. GRPO: the same without the division
    out = group_relative_scores(scores, 3, scale_by_std=False)
    assert out.tolist() == pytest.approx([-1, 0, 1, -4 / 3, -4 / 3, 8 / 3])


@pytest.mark.parametrize("G", [2, 3, 4, 6])
def test_group_scores_match_loop(G):
    scores = _scores(G)
    for scale, mode in ((True, "grpo"), (False, "centre")):
        got = group_relative_scores(scores, G, scale_by_std=scale)
        assert got.tolist() == pytest.approx(_group_loop(scores.tolist(), G, mode), abs=1e-12)
    got = leave_one_out_scores(scores, G)
    assert got.tolist() == pytest.approx(_group_loop(scores.tolist(), G, "rloo"), abs=1e-12)


def test_rloo_is_scaled_centring_and_groups_are_contiguous():
    scores = _scores(7)
    G = 4
    centred = group_relative_scores(scores, G, scale_by_std=False)
    assert torch.allclose(leave_one_out_scores(scores, G), centred * G / (G - 1))
    # each group's advantages sum to zero; changing one group leaves the others alone
    assert torch.allclose(centred.reshape(-1, G).sum(-1), torch.zeros(3, dtype=torch.float64))
    moved = scores.clone()
    moved[4:8] += 10.0
    assert torch.equal(leave_one_out_scores(moved, G)[:4], leave_one_out_scores(scores, G)[:4])


def test_degenerate_group_gets_zero_not_nan():
    scores = torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0])
    for scale in (True, False):
        out = group_relative_scores(scores, 3, scale_by_std=scale)
        assert torch.isfinite(out).all() and out[:3].tolist() == [0.0, 0.0, 0.0]
    assert leave_one_out_scores(scores, 3)[:3].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("scores", "G", "match"),
    [
        (torch.zeros(6), 1, "group_size must be >= 2"),
        (torch.zeros(7), 2, "do not split into whole groups of 2"),
        (torch.zeros(2, 3), 3, r"scores must be \(B,\)"),
    ],
)
def test_bad_groups_refused(scores, G, match):
    for fn in (group_relative_scores, leave_one_out_scores):
        with pytest.raises(ValueError, match=match):
            fn(scores, G)


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_match_loop_and_gae(gamma):
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(6, 8, generator=g, dtype=torch.float64)
    got = discounted_returns(rewards, MASK, gamma)
    want = torch.tensor(_returns_loop(rewards.tolist(), MASK.tolist(), gamma), dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.all(got[MASK == 0] == 0)
    # REINFORCE's return is GAE with a zero critic and lambda = 1
    adv, _ = gae_advantages(rewards, torch.zeros_like(rewards), MASK, gamma, 1.0)
    assert torch.allclose(got, adv, atol=1e-12)


def _estimator_loop(estimator, scores, logp, ref, mask, kl_coef, gamma, G):
    """The whole critic-free advantage, plainly: shaped score on the last valid token, minus
    kl_coef * k1 on every valid token, summed backwards with gamma; REINFORCE++ variants are
    returned before whitening (the learner whitens across ranks)."""
    if estimator == "grpo":
        seq = _group_loop(scores, G, "grpo")
    elif estimator in ("dr_grpo", "reinforce_pp_baseline"):
        seq = _group_loop(scores, G, "centre")
    elif estimator == "rloo":
        seq = _group_loop(scores, G, "rloo")
    else:
        seq = list(scores)
    rewards = [[0.0] * len(row) for row in mask]
    for b, row in enumerate(mask):
        valid = [t for t in range(len(row)) if row[t]]
        for t in valid:
            rewards[b][t] = -kl_coef * (logp[b][t] - ref[b][t])
        if valid:
            rewards[b][valid[-1]] += seq[b]
    return _returns_loop(rewards, mask, gamma)


@pytest.mark.parametrize("estimator", CRITIC_FREE_ESTIMATORS)
@pytest.mark.parametrize(("kl_coef", "gamma"), [(0.0, 1.0), (0.1, 1.0), (0.1, 0.95)])
def test_estimator_advantages_match_loop(estimator, kl_coef, gamma):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    logp = -torch.rand(6, 8, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    shaped = shaped_scores(estimator, scores, 3)
    rewards, kl = kl_penalized_rewards(shaped, logp, ref, MASK, kl_coef, "k1")
    got = discounted_returns(rewards, MASK, gamma)
    want = _estimator_loop(
        estimator, scores.tolist(), logp.tolist(), ref.tolist(), MASK.tolist(), kl_coef, gamma, 3
    )
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert torch.equal(kl, torch.where(MASK.bool(), kl_estimate(logp, ref), 0.0))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_advantage_is_broadcast_over_the_response_without_kl(estimator):
    scores = _scores(3, 6)
    shaped = shaped_scores(estimator, scores, 2)
    zeros = torch.zeros(6, 8, dtype=torch.float64)
    rewards, _ = kl_penalized_rewards(shaped, zeros, zeros, MASK, 0.0)
    adv = discounted_returns(rewards, MASK, 1.0)
    assert torch.allclose(adv, shaped[:, None] * MASK, atol=1e-12)


def test_estimator_lists():
    assert set(GROUP_ESTIMATORS) < set(CRITIC_FREE_ESTIMATORS)
    assert "reinforce_pp" not in GROUP_ESTIMATORS
    scores = _scores(4, 4)
    assert torch.equal(shaped_scores("reinforce_pp", scores, 1), scores)
    assert torch.equal(
        shaped_scores("reinforce_pp_baseline", scores, 2), shaped_scores("dr_grpo", scores, 2)
    )
    with pytest.raises(ValueError, match="unknown critic-free estimator 'gae'"):
        shaped_scores("gae", scores, 2)


@pytest.mark.parametrize("G", [2, 3, 4])
def test_uniform_groups_against_a_loop(G):
    g = torch.Generator().manual_seed(G)
    # scores from a few values, so that some groups come out all equal
    scores = torch.randint(0, 2, (12 * G,), generator=g).float()
    scores[:G] = 0.5  # the first group surely uniform
    scores[G] = 0.25  # the second surely not (its other samples are 0 or 1)
    expected = []
    for start in range(0, len(scores), G):
        group = scores[start : start + G].tolist()
        expected.append(all(x == group[0] for x in group))
    got = uniform_groups(scores, G)
    assert got.dtype == torch.bool and got.tolist() == expected
    assert expected[0] and not expected[1] and 0 < sum(expected) < len(expected)
    # such a group gets no advantage under any group baseline
    adv = group_relative_scores(scores, G).reshape(-1, G)
    assert torch.all(adv[got] == 0)


def test_uniform_groups_refuses_split_groups():
    with pytest.raises(ValueError, match="whole groups of 4"):
        uniform_groups(torch.zeros(6), 4)
