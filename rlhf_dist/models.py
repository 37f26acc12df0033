"""Loading models with ``transformers`` ``Auto*`` classes and the forward passes the roles share."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_dist.algo import entropy_from_logits, logprobs_from_logits
from rlhf_dist.batch import position_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side=padding_side)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(tokenizer, model) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS and every EOS of the model's
    generation config. Chat models end a turn with a token of their template (e.g. Qwen's
    ``<|im_end|>``) that their ``generation_config.json`` lists as an EOS while the tokenizer's
    ``eos_token`` may be another; stopping at the tokenizer's alone would run every response
    to ``rollout.max_new_tokens``."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, (list, tuple)) else [extra]
    return sorted({int(i) for i in ids if i is not None})


def load_policy(path: str, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])


def load_critic(path: str, dtype: str = "float32"):
    """A value model: the policy's backbone with a fresh one-output token head."""
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(path, num_labels=1, dtype=DTYPES[dtype])


def load_reward_model(path: str, dtype: str = "float32", new_head: bool = False):
    """A sequence classifier with one output. ``new_head`` starts one from a causal LM (e.g. the
    SFT policy, as InstructGPT does) with a freshly initialised scalar head."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": 1} if new_head else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[dtype], **kwargs)
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {path!r} has num_labels={model.config.num_labels}; expected 1"
        )
    return model


def reward_text(prompt: str, response: str) -> str:
    """What a reward model reads: the same text in reward-model training and in PPO scoring."""
    return f"{prompt} {response}"


def response_logprobs(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (B, R) of the response tokens under ``softmax(logits / temperature)``."""
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).logits[:, prompt_len - 1 : -1]
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, sequences[:, prompt_len:])
    return logp, entropy_from_logits(logits) if with_entropy else None


def response_values(critic, sequences: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """Values (B, R): V at the state that emits each response token."""
    out = critic(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    ).logits
    return out[:, prompt_len - 1 : -1, 0].float()
