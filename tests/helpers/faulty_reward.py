"""Reward functions that misbehave, for robustness tests (imported by Ray workers through
PYTHONPATH=tests/helpers)."""

import math

_calls = 0


def nan_from_third_call(prompts, responses):
    """Fine for two calls (two PPO steps with one reward scorer), then NaN for ever."""
    global _calls
    _calls += 1
    return [math.nan if _calls >= 3 else 0.5] * len(responses)
