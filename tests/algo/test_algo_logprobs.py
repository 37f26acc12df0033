import math

import pytest
import torch

import rlhf_dist.algo.logprobs as logprobs_mod
from rlhf_dist.algo import entropy_from_logits, logprobs_from_logits


def _reference_logprobs(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _reference_entropy_loop(logits):
    """Plain-Python -sum p log p per position."""
    out = []
    for row in logits.float().tolist():
        out_row = []
        for z in row:
            m = max(z)
            total = sum(math.exp(v - m) for v in z)
            p = [math.exp(v - m) / total for v in z]
            out_row.append(-sum(pi * math.log(pi) for pi in p if pi > 0))
        out.append(out_row)
    return torch.tensor(out)


def _data(seed=0, shape=(3, 5, 11), scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(*shape, generator=g)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return logits, labels


def test_logprobs_hand_case():
    # logits [0, ln 2, ln 3] -> softmax [1/6, 2/6, 3/6]
    logits = torch.log(torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]))
    labels = torch.tensor([[2, 0]])
    out = logprobs_from_logits(logits, labels)
    assert out[0].tolist() == pytest.approx([math.log(0.5), math.log(1 / 6)])


def test_logprobs_match_log_softmax_fp32():
    logits, labels = _data()
    out = logprobs_from_logits(logits, labels)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert torch.allclose(out, _reference_logprobs(logits, labels), atol=1e-6)


def test_logprobs_bf16_input_computed_in_fp32():
    logits, labels = _data(seed=1)
    logits = logits.bfloat16()
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    # The reference upcasts the same bf16 values, so only fp32 rounding differs.
    assert torch.allclose(out, _reference_logprobs(logits, labels), atol=1e-5)


def test_logprobs_gradient_matches_log_softmax():
    logits, labels = _data(seed=2)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    w = torch.randn(labels.shape)
    (logprobs_from_logits(a, labels) * w).sum().backward()
    (_reference_logprobs(b, labels) * w).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_logprobs_non_contiguous_slice():
    logits, labels = _data(seed=3, shape=(2, 6, 7))
    sliced = logits[:, :-1]
    assert not sliced.is_contiguous()
    out = logprobs_from_logits(sliced, labels[:, 1:])
    assert torch.allclose(out, _reference_logprobs(sliced, labels[:, 1:]), atol=1e-6)


def test_chunked_path_matches(monkeypatch):
    # Force chunks of 2 positions (V = 11): exercises the multi-chunk concatenation.
    monkeypatch.setattr(logprobs_mod, "_CHUNK_ELEMENTS", 22)
    logits, labels = _data(seed=4)
    assert torch.allclose(
        logprobs_from_logits(logits, labels), _reference_logprobs(logits, labels), atol=1e-6
    )
    assert torch.allclose(entropy_from_logits(logits), _reference_entropy_loop(logits), atol=1e-5)


def test_entropy_hand_cases():
    # uniform over 4 -> ln 4; one-hot-ish via -inf -> 0; [1/6, 2/6, 3/6] -> explicit sum
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, 0.0, 0.0],
                [0.0, float("-inf"), float("-inf"), float("-inf")],
                [0.0, math.log(2), math.log(3), float("-inf")],
            ]
        ]
    )
    p = [1 / 6, 2 / 6, 3 / 6]
    expected = [math.log(4), 0.0, -sum(q * math.log(q) for q in p)]
    out = entropy_from_logits(logits)
    assert out[0].tolist() == pytest.approx(expected)


def test_entropy_matches_explicit_formula_fp32_and_bf16():
    logits, _ = _data(seed=5)
    out = entropy_from_logits(logits)
    assert out.shape == logits.shape[:-1] and out.dtype == torch.float32
    assert torch.allclose(out, _reference_entropy_loop(logits), atol=1e-5)
    bf16 = logits.bfloat16()
    out16 = entropy_from_logits(bf16)
    assert out16.dtype == torch.float32
    assert torch.allclose(out16, _reference_entropy_loop(bf16), atol=1e-5)


def test_entropy_gradient_finite_with_masked_vocab():
    logits = torch.tensor([[[0.5, -1.0, float("-inf")]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
