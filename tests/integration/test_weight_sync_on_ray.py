"""Weight sync on a real Ray cluster across ZeRO stages, learner world sizes, generator counts,
tied/untied models, fp32/bf16 and every CPU transport (gloo, shared memory, the object store):
every generator ends up holding the learner's weights bit for bit, and samples exactly what a
plain model holding them samples."""

import pytest
import ray
import torch

from rlhf_dist.config import load_config
from rlhf_dist.orchestrator import Orchestrator, WeightSyncError
from rlhf_dist.preflight import resolve_inputs
from rlhf_dist.roles import Generator
from rlhf_dist.tasks.tiny import build_assets

PROMPTS = ["describe : red cat", "describe : sun moon", "describe : owl"]


@pytest.fixture(scope="module")
def llama_assets(tmp_path_factory):
    """An untied (Llama-style) policy next to the tied GPT-2 of ``tiny_assets``."""
    return build_assets(tmp_path_factory.mktemp("llama"), arch="llama")


def _orchestrator(assets, tmp_path, *overrides):
    cfg = load_config(
        None,
        [
            f"model.policy={assets / 'policy'}",
            f"data.prompts={assets / 'prompts.jsonl'}",
            "rollout.prompts_per_step=6",
            "rollout.max_new_tokens=6",
            "ppo.minibatch_size=6",
            "ppo.micro_batch_size=3",
            "learner.lr=1e-3",
            "sync.bucket_mb=0.01",  # many buckets even for a tiny model
            *overrides,
        ],
    )
    return cfg, Orchestrator(cfg, resolve_inputs(cfg), tmp_path / "run")


def _check_generators_hold_learner_weights(orch, cfg, policy_path, version):
    checksum = ray.get(orch.learners.call("policy_checksum"))[0]
    status = ray.get(orch.generators.call("status"))
    assert [s["version"] for s in status] == [version] * len(status)
    assert [s["checksum"] for s in status] == [checksum] * len(status)
    # Sampling with a fixed seed equals an in-process model loaded with the learner's weights.
    state = ray.get(orch.learners.call("policy_state"))[0]
    plain = Generator(policy_path, dtype=cfg.model.dtype, max_new_tokens=6)
    plain.model.load_state_dict(state, strict=False)
    expected = plain.generate(PROMPTS, [0, 1, 2], seed=5).sequences
    for gen in orch.generators.actors:
        got = ray.get(gen.generate.remote(PROMPTS, [0, 1, 2], 1, 5)).sequences
        assert torch.equal(got, expected)
    return checksum


@pytest.mark.parametrize(
    "arch, zero_stage, world_size, generators, dtype, backend",
    [
        ("gpt2", 0, 1, 1, "float32", "gloo"),
        ("llama", 2, 2, 3, "float32", "gloo"),
        ("gpt2", 3, 2, 3, "bfloat16", "gloo"),
        ("llama", 3, 1, 1, "bfloat16", "gloo"),
        ("gpt2", 2, 2, 2, "float32", "object_store"),
        ("llama", 3, 2, 3, "bfloat16", "shm"),
        ("gpt2", 0, 1, 2, "float32", "auto"),  # a one-node cluster on CPUs: shm
    ],
)
def test_sync_after_a_ppo_step(
    ray_cluster,
    tiny_assets,
    llama_assets,
    tmp_path,
    arch,
    zero_stage,
    world_size,
    generators,
    dtype,
    backend,
):
    assets = tiny_assets if arch == "gpt2" else llama_assets
    cfg, orch = _orchestrator(
        assets,
        tmp_path,
        f"learner.zero_stage={zero_stage}",
        f"learner.num_workers={world_size}",
        f"rollout.num_workers={generators}",
        f"rollout.prompts_per_step={2 * generators}",
        f"ppo.minibatch_size={2 * generators}",
        f"ppo.micro_batch_size={2 * generators // world_size}",
        f"model.dtype={dtype}",
        f"sync.backend={backend}",
        "run.steps=1",
    )
    try:
        assert orch.generators.sync.backend == ("shm" if backend == "auto" else backend)
        manifest = ray.get(orch.generators.sync.manifest)
        assert all(str(s.dtype) == f"torch.{dtype}" for s in manifest)
        names = [s.name for s in manifest]
        # tied weights travel once; untied ones both travel
        assert ("lm_head.weight" in names) == (arch == "llama")
        before = _check_generators_hold_learner_weights(orch, cfg, str(assets / "policy"), 0)
        orch.run(log=lambda _: None)
        after = _check_generators_hold_learner_weights(orch, cfg, str(assets / "policy"), 1)
        assert after != before
    finally:
        orch.shutdown()


def test_mismatch_stops_with_a_clear_error_and_added_generator_gets_current_weights(
    ray_cluster, tiny_assets, tmp_path
):
    cfg, orch = _orchestrator(
        tiny_assets,
        tmp_path,
        "rollout.num_workers=1",
        "learner.num_workers=1",
        "run.steps=1",
        "sync.backend=gloo",  # the trap below is in gloo's receive
    )

    # Defined here, not at module level, so Ray pickles it by value into the worker. It
    # corrupts what this one generator process loads (a stand-in for a transport fault).
    def corrupt_what_this_worker_receives(_self):
        from rlhf_dist import weight_sync

        original = weight_sync.receive

        def receive(group, model, manifest, bucket_bytes):
            original(group, model, manifest, bucket_bytes)
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] += 1.0

        weight_sync.receive = receive

    try:
        orch.run(log=lambda _: None)
        orch.generators.add(1)
        assert len(orch.generators) == 2
        _check_generators_hold_learner_weights(orch, cfg, str(tiny_assets / "policy"), 1)
        # the new member's samples are used by the next step
        m = orch.step()
        assert m["pool/num_generators"] == 2 and m["sync/version"] == 2

        ray.get(orch.generators.actors[1].__ray_call__.remote(corrupt_what_this_worker_receives))
        with pytest.raises(WeightSyncError, match="generator 1 holds version 3 checksum"):
            orch.sync_weights(3)
    finally:
        orch.shutdown()


def test_shm_generators_share_one_copy_and_a_stale_slot_is_caught(
    ray_cluster, tiny_assets, tmp_path
):
    """Over shared memory the generators' parameters are views of learner rank 0's slot, the
    slots alternate push by push, and a generator that attached to the other (stale) slot is
    caught by the checksum."""
    cfg, orch = _orchestrator(
        tiny_assets, tmp_path, "rollout.num_workers=2", "run.steps=2", "sync.backend=shm"
    )

    def where_weights_live(self):
        from rlhf_dist import weight_sync

        handles, maps = self.model._weight_sync_shm
        ptr = next(p for _, p in weight_sync.sync_params(self.model)).data_ptr()
        # which mapped slot the first synced parameter lies in, and the file behind it
        slot = [m is not None and m.data_ptr() <= ptr < m.data_ptr() + m.numel() for m in maps]
        return slot.index(True), (handles[0].dev, handles[0].ino)

    # Defined here so Ray pickles it by value: this one generator attaches to the slot the
    # learner did not write (a stand-in for a transport fault: stale weights).
    def attach_to_the_other_slot(_self):
        from rlhf_dist import weight_sync

        original = weight_sync.attach

        def attach(model, manifest, bucket_bytes, handles, slot):
            original(model, manifest, bucket_bytes, handles, 1 - slot)

        weight_sync.attach = attach

    try:
        # pushes so far: the initial one (slot 0)
        got = ray.get([g.__ray_call__.remote(where_weights_live) for g in orch.generators.actors])
        assert [slot for slot, _ in got] == [0, 0] and got[0][1] == got[1][1]
        orch.run(log=lambda _: None)  # two more pushes: slots 1, then 0
        got = ray.get([g.__ray_call__.remote(where_weights_live) for g in orch.generators.actors])
        assert [slot for slot, _ in got] == [0, 0]
        _check_generators_hold_learner_weights(orch, cfg, str(tiny_assets / "policy"), 2)

        ray.get(orch.generators.actors[1].__ray_call__.remote(attach_to_the_other_slot))
        with pytest.raises(WeightSyncError, match="generator 1 holds version 3 checksum"):
            orch.step()  # trains, so the slot left holds other weights than the one written
    finally:
        orch.shutdown()


@pytest.mark.parametrize("backend", ["auto", "shm"])
def test_a_generator_that_cannot_attach_moves_auto_to_gloo(
    ray_cluster, tiny_assets, tmp_path, backend
):
    """``auto`` chose shared memory (a one-machine cluster); a generator that cannot open the
    learner's slot, as one placed on another machine later could not, moves the group to gloo
    and the run goes on with every generator holding the learner's weights. A set
    ``sync.backend=shm`` stops with the reason instead. (Simulated: this test has one
    machine.)"""
    cfg, orch = _orchestrator(
        tiny_assets, tmp_path, "rollout.num_workers=2", "run.steps=1", f"sync.backend={backend}"
    )

    def cannot_open_slots(_self):
        from rlhf_dist import weight_sync

        def refuse(handle):
            raise weight_sync.ShmError(f"weight sync: cannot open {handle.path} (simulated)")

        weight_sync._map_slot = refuse  # slot 1 is not mapped yet: the next push needs it

    try:
        assert orch.generators.sync.backend == "shm"
        ray.get(orch.generators.actors[1].__ray_call__.remote(cannot_open_slots))
        if backend == "shm":
            with pytest.raises(WeightSyncError, match=r"cannot open /proc/\d+/fd/\d+ \(simulated"):
                orch.run(log=lambda _: None)
            return
        with pytest.warns(RuntimeWarning, match="sync.backend=auto goes on over gloo"):
            rows = orch.run(log=lambda _: None)
        assert orch.generators.sync.backend == "gloo"
        assert rows[0]["sync/bytes"] == 2 * orch.generators.sync.nbytes  # shm tried, then gloo
        _check_generators_hold_learner_weights(orch, cfg, str(tiny_assets / "policy"), 1)
    finally:
        orch.shutdown()
