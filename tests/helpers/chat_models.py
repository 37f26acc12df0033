"""Tiny models whose tokenizers carry different chat templates, built locally for the chat
tests: a policy (causal LM) and a reward model (sequence classifier, one output)."""

from __future__ import annotations

from pathlib import Path

from rlhf_dist.tasks.tiny import WORDS, build_policy, build_tokenizer, make_prompts

# the policy's template ends an assistant turn with its EOS, so generation stops there
POLICY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}[EOS] {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# the reward model's template renders the same conversation quite differently
REWARD_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | upper }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT : {% endif %}"
)
MARKERS = [f"<|{r}|>" for r in ("system", "user", "assistant", "tool")]
MARKERS += ["###", ":"] + [r.upper() for r in ("system", "user", "assistant", "tool")]


def corpus() -> list[str]:
    return make_prompts(500, seed=1) + [" ".join(WORDS + MARKERS)]


def build_chat_tokenizer(out_dir: Path, template: str | None):
    """A word-level tokenizer knowing the templates' markers, with ``template`` (None: no
    chat template at all)."""
    tok = build_tokenizer(out_dir, corpus=corpus())
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(out_dir)
    return tok


def build_chat_policy(out_dir: Path, template: str | None = POLICY_TEMPLATE) -> str:
    if not (out_dir / "config.json").exists():
        tok = build_chat_tokenizer(out_dir, template)
        build_policy(out_dir, tok, n_layer=1, n_embd=32, n_head=2)
    return str(out_dir)


def build_chat_reward_model(out_dir: Path, template: str | None = REWARD_TEMPLATE) -> str:
    """A randomly initialised GPT-2 sequence classifier with one output."""
    if not (out_dir / "config.json").exists():
        import torch
        from transformers import GPT2Config, GPT2ForSequenceClassification

        tok = build_chat_tokenizer(out_dir, template)
        torch.manual_seed(1)
        config = GPT2Config(
            vocab_size=len(tok),
            n_positions=128,
            n_embd=32,
            n_layer=1,
            n_head=2,
            num_labels=1,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        GPT2ForSequenceClassification(config).save_pretrained(out_dir)
    return str(out_dir)


def checked_gold(prompts: list[str], responses: list[str], id, answer) -> list[float]:
    """A gold scorer that checks each held-out sample arrived with its own row's fields:
    the row's ``answer`` is the word count of its user turn, and ``id`` names the turn."""
    for p, i, a in zip(prompts, id, answer):
        content = f"describe : {i}"
        if content not in p or a != len(content.split()):
            raise AssertionError(f"sample of prompt {p!r} got the fields id={i!r}, answer={a!r}")
    return [float(len(r.split())) for r in responses]
