"""The real SmolLM2-135M-Instruct through the real system (``configs/smollm2-grpo.yaml`` in a
short form): its BPE tokenizer and chat template render the prompts, its end-of-turn token ends
the responses, and it goes through generate -> score -> update -> weight sync on Ray, with the
generators holding the learner's weights after each step (``run_checked``)."""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_dist import metric_keys as K
from rlhf_dist.config import load_config
from rlhf_dist.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
from ppo_runs import run_checked  # noqa: E402
from smollm2_assets import assets_dir, converted  # noqa: E402


def test_the_real_model_generates_scores_trains_and_syncs(ray_cluster, tmp_path_factory):
    converted(tmp_path_factory)  # once per session (tests/test_smollm2.py shares it)
    run_dir = tmp_path_factory.mktemp("smollm2_run")
    cfg = load_config(
        ROOT / "configs/smollm2-grpo.yaml",
        [
            f"model.assets_dir={assets_dir(tmp_path_factory)}",
            f"run.dir={run_dir}",
            "run.steps=2",
            "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2",
            "rollout.max_new_tokens=8",
            "rollout.num_cpus=0.5",
            "ppo.minibatch_size=4",
            "ppo.micro_batch_size=2",
            "eval.gold=",
            "wandb.enabled=false",
        ],
    )
    rows = run_checked(cfg, run_dir)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1][K.VERSION] == 2
    for r in rows:
        assert r[K.GRAD_NORM] > 0 and r[K.OPTIMIZER_STEPS] == 1
        assert 0 < r[K.RESPONSE_LENGTH_MEAN] <= 8
        assert r[K.LOGPROB_DIFF_MEAN] < 1e-3  # the HF engine: the trainer's own forward
    ledger = read_ledger(run_dir)
    assert len(ledger) == 8 and all(x["updates"] == 1 for x in ledger)
    # the rows' answers reached the reward, and the chat template rendered the prompts
    assert all(x["fields"]["answer"] for x in ledger)
