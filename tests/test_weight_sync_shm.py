"""The shared-memory weight-sync transport (``sync.backend=shm``) in one process: what a
generator attaches to is the learner's weights bit for bit, one copy for every generator, the
two slots alternate without touching the weights in use, and what cannot work is refused with
a clear error. Across processes it runs in ``tests/integration/test_weight_sync_on_ray.py``."""

import errno
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_dist import weight_sync as ws

BUCKET = 4096  # bytes: many buckets for a tiny model


def _gpt2(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def attach(model, manifest, bucket_bytes, handles, slot, zero_copy=False):
    """Point ``model``'s parameters at slot ``slot`` as a generator's shared-memory receiver
    does (one receiver per model, as each generator keeps one: it maps each slot once);
    returns whether any parameter moved there (a fresh attach)."""
    receiver, target = RECEIVERS.setdefault(id(model), (ws.ShmReceiver(), ws.ModuleWeights(model)))
    info = {"handles": handles, "zero_copy": zero_copy}
    receiver.open(ws.Channel("shm", bucket_bytes, manifest, info))
    return receiver.receive(target, 1, False, slot).fresh


RECEIVERS: dict = {}


def _write(slots, model, manifest):
    params = [p for _, p in ws.sync_params(model)]
    buckets = ((b, params[b.start : b.stop]) for b in ws.plan_buckets(manifest, BUCKET))
    return slots.write(buckets, verify=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generators_attach_to_one_copy_of_the_learner_weights(tmp_path, dtype):
    learner, gens = _gpt2(0, dtype), [_gpt2(1, dtype), _gpt2(2, dtype)]
    manifest = ws.manifest_of(learner)
    slots = ws.ShmSlots(manifest, BUCKET, directory=str(tmp_path))
    slot, digest = _write(slots, learner, manifest)
    assert slot == 0
    x = torch.randint(0, 50, (3, 7))
    for g in gens:
        attach(g, manifest, BUCKET, slots.handles, slot)
        assert ws.model_checksum(g) == digest == ws.model_checksum(learner)
        assert torch.equal(g(x).logits, learner(x).logits)
        # tied weights stay one tensor
        assert g.lm_head.weight.data_ptr() == g.transformer.wte.weight.data_ptr()
    # both generators read the same memory (each through its own mapping): one copy in all
    w0, w1 = (g.transformer.h[0].mlp.c_fc.weight for g in gens)
    with torch.no_grad():
        w0[0, 0] += 1
        assert torch.equal(w0, w1)
        w0[0, 0] -= 1
    # the files were unlinked at once: nothing is left to clean up
    assert list(tmp_path.iterdir()) == []


def test_a_write_goes_to_the_other_slot_and_leaves_the_weights_in_use_alone(tmp_path):
    learner, gen = _gpt2(0), _gpt2(1)
    manifest = ws.manifest_of(learner)
    slots = ws.ShmSlots(manifest, BUCKET, directory=str(tmp_path))
    slot, v1 = _write(slots, learner, manifest)
    attach(gen, manifest, BUCKET, slots.handles, slot)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.01)
    slot2, v2 = _write(slots, learner, manifest)
    assert (slot, slot2) == (0, 1) and v2 != v1
    assert ws.model_checksum(gen) == v1  # still on slot 0, untouched by the write
    attach(gen, manifest, BUCKET, slots.handles, slot2)
    assert ws.model_checksum(gen) == v2 == ws.model_checksum(learner)
    assert _write(slots, learner, manifest)[0] == 0  # and back


def test_a_handle_that_is_not_the_slot_is_refused(tmp_path):
    learner, gen = _gpt2(0), _gpt2(1)
    manifest = ws.manifest_of(learner)
    slots = ws.ShmSlots(manifest, BUCKET, directory=str(tmp_path))
    h = slots.handles[0]
    # the path opens, but is another file: as on another machine or in another PID namespace
    other = ws.ShmHandle(h.pid, h.fd, h.dev, h.ino + 1, h.nbytes)
    with pytest.raises(ws.ShmError, match="not the learner's shared-memory slot.*sync.backend"):
        attach(gen, manifest, BUCKET, [other, other], 0)
    gone = ws.ShmHandle(2**22 + 7, h.fd, h.dev, h.ino, h.nbytes)  # beyond any pid_max default
    with pytest.raises(ws.ShmError, match="cannot open the learner's shared-memory slot"):
        attach(gen, manifest, BUCKET, [gone, gone], 0)
    # a generator whose model differs is named as such, before anything is attached
    with pytest.raises(ValueError, match="the generator and learner models differ"):
        attach(_gpt2(0, torch.bfloat16), manifest, BUCKET, slots.handles, 0)


def test_no_room_for_the_slots_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    manifest = ws.manifest_of(_gpt2(0))

    def full(fd, offset, length):  # what a full /dev/shm answers (docker's 64 MiB default)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ws.ShmError, match=r"cannot hold two .* MiB slots .*sync.backend=gloo"):
        ws.ShmSlots(manifest, BUCKET, directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def _learner_with_live_weights(tmp_path):
    """A learner model whose synced parameters were moved into a zero-copy slot."""
    learner = _gpt2(0)
    manifest = ws.manifest_of(learner)
    params = [p for _, p in ws.sync_params(learner)]
    return learner, manifest, ws.ShmLive(params, manifest, BUCKET, directory=str(tmp_path))


def test_zero_copy_generators_read_the_parameters_the_optimizer_steps(tmp_path):
    """``sync.zero_copy``: the learner's parameters move into the slot unchanged, an optimizer
    step on them is what every attached generator reads next, with no write and no copy."""
    x = torch.randint(0, 50, (3, 7))
    learner = _gpt2(0)
    before = learner(x).logits
    learner, manifest, live = _learner_with_live_weights(tmp_path)
    slot = live.slots.slots[0]
    inside = [
        slot.data_ptr() <= p.data_ptr() < slot.data_ptr() + slot.numel()
        for p in learner.parameters()
    ]
    assert all(inside) and torch.equal(learner(x).logits, before)
    assert learner.lm_head.weight.data_ptr() == learner.transformer.wte.weight.data_ptr()
    gens = [_gpt2(1), _gpt2(2)]
    for g in gens:
        assert attach(g, manifest, BUCKET, live.handles, 0)  # fresh
        assert ws.model_checksum(g) == live.checksum() == ws.model_checksum(learner)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-2)
    learner.train()
    learner(x, labels=x).loss.backward()
    opt.step()
    learner.eval()
    assert live.home() == 0  # the optimizer stepped the parameters where they are
    assert ws.model_checksum(learner) != ws.model_checksum(_gpt2(0))
    for g in gens:
        assert not attach(g, manifest, BUCKET, live.handles, 0)  # nothing to re-point
        assert ws.model_checksum(g) == ws.model_checksum(learner)
        assert torch.equal(g(x).logits, learner(x).logits)
    assert list(tmp_path.iterdir()) == []  # unlinked at once


def test_zero_copy_a_parameter_moved_out_of_the_slot_is_brought_back(tmp_path):
    """Something replaced a learner parameter's ``.data`` (the generators would go on reading
    the slot's stale bytes): ``home`` copies the new values in and re-points it; a generator
    parameter moved away is re-pointed at its next attach, which then counts as fresh."""
    learner, manifest, live = _learner_with_live_weights(tmp_path)
    gen = _gpt2(1)
    attach(gen, manifest, BUCKET, live.handles, 0)
    w = learner.transformer.h[1].attn.c_attn.weight
    with torch.no_grad():
        w.data = w.data + 0.5
    assert ws.model_checksum(gen) != ws.model_checksum(learner)
    assert live.home() == 1 and live.home() == 0
    assert ws.model_checksum(gen) == ws.model_checksum(learner)
    g = gen.transformer.h[0].mlp.c_proj.weight
    g.data = torch.zeros_like(g)
    assert attach(gen, manifest, BUCKET, live.handles, 0)
    assert ws.model_checksum(gen) == ws.model_checksum(learner)


def test_zero_copy_parameters_save_and_load_as_a_plain_state_dict(tmp_path):
    """A checkpoint of parameters that are views of the slot holds their values, and loads
    (``weights_only``) into a plain model, and back into the slot in place."""
    (tmp_path / "shm").mkdir()
    learner, manifest, live = _learner_with_live_weights(tmp_path / "shm")
    path = tmp_path / "model.pt"
    torch.save(learner.state_dict(), path)
    plain = _gpt2(3)
    plain.load_state_dict(torch.load(path, weights_only=True))
    assert ws.model_checksum(plain) == ws.model_checksum(learner)
    other = _gpt2(4).state_dict()
    learner.load_state_dict(other)  # in place: the parameters stay in the slot
    assert live.home() == 0 and live.checksum() == ws.model_checksum(_gpt2(4))
