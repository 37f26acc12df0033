"""KL-coefficient controllers for the RLHF KL penalty.

Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2;
same interface and update rule as TRL's ``FixedKLController`` / ``AdaptiveKLController``.
"""

from __future__ import annotations

from typing import Any


def _check_coef(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


class FixedKLController:
    """Constant KL coefficient: ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = _check_coef("kl_coef", kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; the signature matches ``AdaptiveKLController.update``."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _check_coef("value", state["value"])


class AdaptiveKLController:
    """Proportional controller steering the measured KL towards ``target``.

    Formula (Ziegler et al. 2019, eq. in section 2.2):
        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon
    The clip bounds the relative change per update, so one noisy KL reading cannot swing the
    coefficient. ``n_steps`` is the number of samples (or steps) the KL was measured over.
    ``state_dict`` holds only the adapted ``value``; ``target``/``horizon`` are configuration and
    come from the constructor on resume.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = _check_coef("init_kl_coef", init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)
        if not self.target > 0:
            raise ValueError(f"target must be positive, got {target}")
        if not self.horizon > 0:
            raise ValueError(f"horizon must be positive, got {horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = _check_coef("value", state["value"])
