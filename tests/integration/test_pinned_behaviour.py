"""The driver's behaviour, pinned: fixed-seed runs of configs/smoke.yaml, configs/tiny.yaml and
smoke in async mode at max_staleness=0 write the very metrics they wrote before the driver
redesign (tests/fixtures/pinned_metrics.json), every non-timing key of every row."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from pinned_runs import FIXTURE, RUNS, run  # noqa: E402

RECORDED = json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_fixed_seed_run_writes_the_recorded_metrics(ray_cluster, tiny_assets, tmp_path, name):
    got = run(name, tiny_assets.parent, tmp_path / name)
    want = RECORDED[name]
    assert [r.get("step") for r in got] == [r.get("step") for r in want]
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w), f"step {w.get('step')}: keys differ"
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (w.get("step"), key)
            else:
                assert g[key] == value, (w.get("step"), key)
    # the run ended as launch.train ends a run: the final policy exported
    policy = tmp_path / name / "ppo" / "policy"
    assert (policy / "config.json").is_file() and (policy / "model.safetensors").is_file()
