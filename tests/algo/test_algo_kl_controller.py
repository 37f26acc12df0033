import pytest

from rlhf_dist.algo import AdaptiveKLController, FixedKLController


def test_fixed_controller_constant_and_roundtrip():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    assert all(type(v) is float for v in ctl.state_dict().values())


def test_adaptive_moves_towards_target():
    # error = clip(kl / target - 1, -0.2, 0.2); value *= 1 + error * n_steps / horizon
    up = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    up.update(current_kl=6.6, n_steps=100)  # error 0.1 -> x 1.001
    assert up.value == pytest.approx(0.1 * 1.001)
    down = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    down.update(current_kl=5.4, n_steps=100)  # error -0.1 -> x 0.999
    assert down.value == pytest.approx(0.1 * 0.999)
    same = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    same.update(current_kl=6.0, n_steps=100)
    assert same.value == pytest.approx(0.1)


def test_adaptive_error_clamped_at_20_percent():
    high = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    high.update(current_kl=60.0, n_steps=100)  # error 9 -> 0.2 -> x 1.002
    assert high.value == pytest.approx(0.1 * 1.002)
    low = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    low.update(current_kl=0.0, n_steps=100)  # error -1 -> -0.2 -> x 0.998
    assert low.value == pytest.approx(0.1 * 0.998)
    big = AdaptiveKLController(0.1, target=1.0, horizon=10)
    big.update(current_kl=2.0, n_steps=10)  # error 1 -> 0.2, n_steps == horizon -> x 1.2
    assert big.value == pytest.approx(0.12)


def test_adaptive_state_dict_roundtrip():
    ctl = AdaptiveKLController(0.2, target=3.0, horizon=500)
    for kl in (5.0, 1.0, 4.0):
        ctl.update(kl, n_steps=64)
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(0.2, target=3.0, horizon=500)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    ctl.update(3.5, 64)
    restored.update(3.5, 64)
    assert restored.value == ctl.value


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"init_kl_coef": -0.1, "target": 1.0, "horizon": 10}, "init_kl_coef"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 10}, "target"),
        ({"init_kl_coef": 0.1, "target": -1.0, "horizon": 10}, "target"),
        ({"init_kl_coef": 0.1, "target": 1.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveKLController(**kwargs)


def test_fixed_validates_argument():
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1.0)
    assert FixedKLController(0).value == 0.0
