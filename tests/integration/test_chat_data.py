"""Chat data end to end, short: SFT on whole conversations saved with ``save_to_disk``, a
reward model (its tokenizer's template differs from the policy's) on HH-style comparisons in
parquet, then PPO on chat prompts in parquet, through ``launch.train`` on a real Ray cluster.
The gold scorer checks that every held-out sample came with its own row's fields."""

import json
import sys
from pathlib import Path

import datasets
import pytest

from rlhf_dist.config import load_config
from rlhf_dist.launch import train
from rlhf_dist.models import load_tokenizer
from rlhf_dist.tasks.tiny import COLORS, THINGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from chat_models import (  # noqa: E402
    POLICY_TEMPLATE,
    REWARD_TEMPLATE,
    build_chat_policy,
    build_chat_reward_model,
)

STEPS = 2


def _user(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"describe : {THINGS[i % len(THINGS)]}"},
    ]


@pytest.fixture(scope="module")
def chat_run(ray_cluster, tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    policy = build_chat_policy(d / "policy")
    reward = build_chat_reward_model(d / "reward")
    convs = [
        {"messages": _user(i) + [{"role": "assistant", "content": COLORS[i % len(COLORS)]}]}
        for i in range(64)
    ]
    datasets.Dataset.from_list(convs).save_to_disk(str(d / "sft"))
    pairs = [
        {
            "chosen": _user(i) + [{"role": "assistant", "content": "red sun"}],
            "rejected": _user(i) + [{"role": "assistant", "content": "black rock"}],
        }
        for i in range(64)
    ]
    datasets.Dataset.from_list(pairs).to_parquet(str(d / "pairs.parquet"))
    prompts = [{"prompt": _user(i), "id": THINGS[i % len(THINGS)], "answer": 3} for i in range(24)]
    datasets.Dataset.from_list(prompts).to_parquet(str(d / "prompts.parquet"))
    cfg = load_config(
        None,
        [
            "run.stage=all",
            f"run.dir={d / 'run'}",
            f"model.assets_dir={d / 'assets'}",
            f"sft.init={policy}",
            f"sft.data={d / 'sft'}",
            "sft.epochs=1",
            "sft.batch_size=16",
            "sft.micro_batch_size=16",
            f"rm.init={reward}",
            f"rm.data={d / 'pairs.parquet'}",
            "rm.epochs=1",
            "rm.batch_size=16",
            "rm.micro_batch_size=16",
            "model.policy=run:sft",
            "reward.model=run:rm",
            f"data.prompts={d / 'prompts.parquet'}",
            "eval.gold=chat_models:checked_gold",
            f"eval.prompts={d / 'prompts.parquet'}",
            "eval.num_prompts=8",
            f"eval.every={STEPS}",
            f"run.steps={STEPS}",
            "rollout.num_workers=1",
            "rollout.prompts_per_step=8",
            "rollout.max_prompt_tokens=16",
            "rollout.max_new_tokens=6",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=8",
            "wandb.enabled=false",
        ],
    )
    run_dir = train(cfg, log=lambda _: None)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows


def test_every_stage_trains_on_chat_data(chat_run):
    run_dir, rows = chat_run
    assert {r["stage"] for r in rows} == {"sft", "rm", "ppo"}
    ppo = [r for r in rows if r["stage"] == "ppo" and r["step"] > 0]
    assert [r["step"] for r in ppo] == list(range(1, STEPS + 1))
    assert ppo[-1]["data/prompts_trained"] == STEPS * 8
    # the gold scorer ran on the held-out rows (it raises on a sample with another row's fields)
    assert any("eval/gold_score" in r for r in rows)
    # each exported model keeps its own tokenizer's template
    assert load_tokenizer(str(run_dir / "sft" / "policy")).chat_template == POLICY_TEMPLATE
    assert load_tokenizer(str(run_dir / "rm" / "model")).chat_template == REWARD_TEMPLATE
    ledger = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(ledger) == STEPS * 8 and all(0 <= s["row"] < 24 for s in ledger)
    # each sample record carries its own row's other fields
    assert all(s["fields"] == {"id": THINGS[s["row"] % len(THINGS)], "answer": 3} for s in ledger)
