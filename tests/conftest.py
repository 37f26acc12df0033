import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# wandb off unless a test turns it on (wandb.mode=offline): it adds seconds to every run
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The built-in tiny policy (GPT-2, tied embeddings) + tokenizer + prompts, built once."""
    from rlhf_dist.tasks.tiny import build_assets

    return build_assets(tmp_path_factory.mktemp("assets") / "tiny")


@pytest.fixture(scope="session")
def tiny_policy(tiny_assets):
    return str(tiny_assets / "policy")
