"""rlhf_dist.metric_keys: every metric key once, each in a known namespace."""

import re
from pathlib import Path

from rlhf_dist import metric_keys as K

ROOT = Path(__file__).resolve().parents[1]
NAMESPACES = (*K.PPO_NAMESPACES, *K.SUPERVISED_STAGES)
KEYS = {
    name: v for name, v in vars(K).items() if name.isupper() and isinstance(v, str) and "/" in v
}


def test_each_key_is_defined_once_in_a_known_namespace():
    assert len(set(KEYS.values())) == len(KEYS)
    for name, key in KEYS.items():
        namespace, _, rest = key.partition("/")
        assert namespace in NAMESPACES and rest, name
    assert len(set(NAMESPACES)) == len(NAMESPACES)


def test_helpers_build_the_keys_the_constants_hold():
    assert K.TIME_PHASES == tuple(K.time_key(b) for b in K.STEP_BLOCKS)
    assert K.time_key("step") == K.STEP_TIME
    assert K.stage_key(K.RM, "eval_accuracy") == K.RM_EVAL_ACCURACY
    assert K.stage_key(K.SFT, "eval_loss") == K.SFT_EVAL_LOSS
    assert K.pool_key("learner", "rss_mb") == "pool/learner_rss_mb"
    assert K.in_namespace(K.GOLD, K.EVAL) and not K.in_namespace(K.GOLD, K.TRAIN)
    assert K.reward_part_key("accuracy") == "rollout/reward_accuracy"
    assert K.in_namespace(K.reward_part_key("format"), K.ROLLOUT)


def test_every_key_written_or_read_as_a_literal_is_one_of_the_constants():
    """A key spelled out in the package or the benchmarks must exist in metric_keys, so a new
    metric gets its constant (and a reader cannot misspell one that exists)."""
    literal = re.compile(rf"[\"']((?:{'|'.join(NAMESPACES)})/[a-z_]+)[\"']")
    files = [*(ROOT / "rlhf_dist").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    unknown = {
        f"{path.relative_to(ROOT)}: {m.group(1)}"
        for path in files
        if path.name != "metric_keys.py"
        for m in literal.finditer(path.read_text())
    }
    unknown = {u for u in unknown if u.split(": ")[1] not in KEYS.values()}
    assert not unknown, sorted(unknown)
