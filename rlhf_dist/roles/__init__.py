"""Role classes. Plain Python, no ``ray`` import: they run in-process in tests and are wrapped
with ``ray.remote`` from outside (``rlhf_dist.pools``) in a job. Their public methods are
their remote API."""

from rlhf_dist.roles.generator import Generator
from rlhf_dist.roles.learner import Learner
from rlhf_dist.roles.scorers import ReferenceScorer, RewardScorer

__all__ = ["Generator", "Learner", "ReferenceScorer", "RewardScorer"]
