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
        # sync mode, one full-precision ZeRO-0 rank: the generators read its own parameters
        shares = backend in ("auto", "shm") and zero_stage == 0 and dtype == "float32"
        assert orch.generators.sync.zero_copy == shares
        manifest = orch.generators.sync.manifest
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
    def corrupt_what_this_worker_receives(self):
        original = self.weights.loaded

        def loaded(manifest, bucket_bytes):
            original(manifest, bucket_bytes)
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] += 1.0

        self.weights.loaded = loaded

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
        tiny_assets,
        tmp_path,
        "rollout.num_workers=2",
        "run.steps=2",
        "sync.backend=shm",
        "sync.zero_copy=false",  # the two alternating slots
    )

    def where_weights_live(self):
        from rlhf_dist import weight_sync

        handles, maps = self.receiver.channel.info["handles"], self.receiver.maps
        ptr = next(p for _, p in weight_sync.sync_params(self.model)).data_ptr()
        # which mapped slot the first synced parameter lies in, and the file behind it
        slot = [m is not None and m.data_ptr() <= ptr < m.data_ptr() + m.numel() for m in maps]
        return slot.index(True), (handles[0].dev, handles[0].ino)

    # Defined here so Ray pickles it by value: this one generator attaches to the slot the
    # learner did not write (a stand-in for a transport fault: stale weights).
    def attach_to_the_other_slot(self):
        original = self.receiver.receive

        def receive(target, version, verify, handoff=None):
            return original(target, version, verify, 1 - handoff)

        self.receiver.receive = receive

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


@pytest.mark.parametrize("backend, zero_copy", [("auto", True), ("auto", False), ("shm", True)])
def test_a_generator_that_cannot_attach_moves_auto_to_gloo(
    ray_cluster, tiny_assets, tmp_path, backend, zero_copy
):
    """``auto`` chose shared memory (a one-machine cluster); a generator that cannot open the
    learner's slot, as one placed on another machine later could not, moves the group to gloo
    and the run goes on with every generator holding the learner's weights. A set
    ``sync.backend=shm`` stops with the reason instead. (Simulated: this test has one
    machine.)"""
    cfg, orch = _orchestrator(
        tiny_assets,
        tmp_path,
        "rollout.num_workers=2",
        "run.steps=1",
        f"sync.backend={backend}",
        f"sync.zero_copy={zero_copy}",
    )

    def cannot_open_slots(self):
        from rlhf_dist import weight_sync
        from rlhf_dist.weight_sync import shm

        def refuse(handle):
            raise weight_sync.ShmError(f"weight sync: cannot open {handle.path} (simulated)")

        shm.map_slot = refuse
        self.receiver.maps = [None] * len(self.receiver.maps)  # the next push maps again

    try:
        assert orch.generators.sync.backend == "shm"
        assert orch.generators.sync.zero_copy == zero_copy
        ray.get(orch.generators.actors[1].__ray_call__.remote(cannot_open_slots))
        if backend == "shm":
            with pytest.raises(WeightSyncError, match=r"cannot open /proc/\d+/fd/\d+ \(simulated"):
                orch.run(log=lambda _: None)
            return
        with pytest.warns(RuntimeWarning, match="sync.backend=auto goes on over gloo"):
            rows = orch.run(log=lambda _: None)
        assert orch.generators.sync.backend == "gloo"
        assert orch.generators.sync.backend == "gloo" and not orch.generators.sync.zero_copy
        # shm tried (moving nothing with zero copy), then gloo
        assert rows[0]["sync/bytes"] == (1 if zero_copy else 2) * orch.generators.sync.nbytes
        _check_generators_hold_learner_weights(orch, cfg, str(tiny_assets / "policy"), 1)
    finally:
        orch.shutdown()


def test_zero_copy_generators_read_the_learner_parameters_and_train_the_same(
    ray_cluster, tiny_assets, tmp_path
):
    """``sync.zero_copy`` (sync mode, one fp32 ZeRO-0 learner rank, shared memory): every
    generator's parameters are views of the very memory the learner's optimizer steps, a sync
    moves nothing, and training is bit for bit that of the two-slot transport. A parameter
    moved out of the shared memory on either side is brought back at the next sync, and a
    generator holding other bytes than the learner's is caught by the checksum."""
    runs = {}
    for zero_copy in (True, False):
        cfg, orch = _orchestrator(
            tiny_assets,
            tmp_path / str(zero_copy),
            "rollout.num_workers=2",
            "run.steps=2",
            "sync.backend=shm",
            f"sync.zero_copy={zero_copy}",
        )
        try:
            assert orch.generators.sync.zero_copy == zero_copy
            rows = orch.run(log=lambda _: None)
            checksum = _check_generators_hold_learner_weights(
                orch, cfg, str(tiny_assets / "policy"), 2
            )
            runs[zero_copy] = (rows, checksum)
            if zero_copy:
                assert [r["sync/bytes"] for r in rows] == [0, 0]
                _zero_copy_faults(orch, cfg, tiny_assets)
        finally:
            orch.shutdown()
    (rows, checksum), (want_rows, want_checksum) = runs[True], runs[False]
    assert checksum == want_checksum
    keys = [k for k in want_rows[0] if k.startswith(("train/", "reward/", "rollout/"))]
    assert len(keys) > 5
    assert [[r[k] for k in keys] for r in rows] == [[r[k] for k in keys] for r in want_rows]


def _zero_copy_faults(orch, cfg, tiny_assets):
    def learner_params_in_its_slot(self):
        from rlhf_dist import weight_sync

        slot = self.sender.live.slots.slots[0]
        start, end = slot.data_ptr(), slot.data_ptr() + slot.numel()
        return all(
            start <= p.data_ptr() < end for _, p in weight_sync.sync_params(self.policy.module)
        )

    # the generators' parameters lie in the learner's slot (as mapped by each process: the
    # addresses differ, so compare each generator's mapping with the handle's file instead)
    def generator_maps_learner_file(self):
        import os

        handles, maps = self.receiver.channel.info["handles"], self.receiver.maps
        fd = os.open(handles[0].path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        m = maps[0]
        return (st.st_dev, st.st_ino) == (handles[0].dev, handles[0].ino) and all(
            m.data_ptr() <= p.data_ptr() < m.data_ptr() + m.numel() for p in self.model.parameters()
        )

    rank0 = orch.learners.actors[0]
    assert ray.get(rank0.__ray_call__.remote(learner_params_in_its_slot))
    gens = orch.generators.actors
    assert all(ray.get([g.__ray_call__.remote(generator_maps_learner_file) for g in gens]))

    # Defined here so Ray pickles them by value. The learner's parameter moved out of the
    # slot (a stand-in for an engine replacing ``.data``), then trained: without the move
    # back, the generators would sample the stale slot.
    def move_out_and_step(self):
        import torch

        p = next(self.policy.module.parameters())
        with torch.no_grad():
            p.data = p.data + 0.25

    def move_out(self):
        import torch

        p = next(self.model.parameters())
        p.data = torch.zeros_like(p)

    ray.get(rank0.__ray_call__.remote(move_out_and_step))
    ray.get(gens[1].__ray_call__.remote(move_out))
    with pytest.warns(RuntimeWarning, match="1 of the learner's parameters had left the shared"):
        orch.sync_weights(3)
    _check_generators_hold_learner_weights(orch, cfg, str(tiny_assets / "policy"), 3)

    # a generator whose attach leaves it holding a private copy: caught at once
    def attach_to_a_copy(self):
        original = self.weights.adopt

        def adopt(manifest, regions, bucket_bytes):
            original(manifest, regions, bucket_bytes)
            p = next(self.model.parameters())
            p.data = p.data.clone()
            p.data.view(-1)[0] += 1.0
            return True

        self.weights.adopt = adopt

    ray.get(gens[0].__ray_call__.remote(attach_to_a_copy))
    with pytest.raises(WeightSyncError, match="generator 0 holds version 4 checksum"):
        orch.sync_weights(4)
