"""Reward functions that misbehave, for robustness tests (imported by Ray workers through
PYTHONPATH=tests/helpers)."""

import math

_scored = 0


def nan_after_16_responses(prompts, responses):
    """Fine for the first 16 responses (two PPO steps of configs/smoke.yaml, 8 prompts each,
    with one reward scorer, however the batch is chunked), then NaN for ever."""
    global _scored
    out = [math.nan if _scored + i >= 16 else 0.5 for i in range(len(responses))]
    _scored += len(responses)
    return out
