"""``builtin:tiny``: the smallest task that exercises the whole PPO loop offline.

A bag-of-words language: a prompt lists a few words, a response is any sequence of words.
The reward is the fraction of response words that are "warm" (half of the vocabulary, fixed
by a seed), so a random policy scores about 0.5 and PPO can push it towards 1. Everything is
built locally and saved with ``save_pretrained``, so the roles load it back through the same
``Auto*.from_pretrained`` path a user's own model takes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

COLORS = "red orange yellow green blue purple pink brown black white gray gold".split()
ANIMALS = "cat dog fox owl bee ant cow pig hen elk yak eel".split()
THINGS = "sun moon star tree rock lake road door book cup hat box".split()
VERBS = "runs sees eats likes finds makes takes holds wants needs".split()
WORDS = COLORS + ANIMALS + THINGS + VERBS
WARM = frozenset(random.Random(1234).sample(WORDS, len(WORDS) // 2))
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        "describe : " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        for _ in range(n)
    ]


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of response words that are warm (0 for an empty response)."""
    del prompts
    out = []
    for r in responses:
        words = [w for w in r.split() if w not in SPECIAL]
        out.append(sum(w in WARM for w in words) / len(words) if words else 0.0)
    return out


def build_tokenizer(out_dir: str | Path, corpus: list[str] | None = None):
    """Train a word-level tokenizer with ``tokenizers`` on ``corpus`` (default: this task's
    text) and save it as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL)
    if corpus is None:
        corpus = make_prompts(2000, seed=1) + [" ".join(WORDS)]
    tok.train_from_iterator(corpus, trainer=trainer)
    return save_hf_tokenizer(tok, out_dir)


def save_hf_tokenizer(tok, out_dir: str | Path):
    """A ``tokenizers.Tokenizer`` wrapped as a Hugging Face fast tokenizer with this
    project's special tokens (``SPECIAL``), saved with ``save_pretrained``; returned."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        clean_up_tokenization_spaces=False,
    )
    hf.save_pretrained(out_dir)
    return hf


def build_policy(
    out_dir: str | Path,
    tokenizer,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 128,
    arch: str = "gpt2",
    seed: int = 0,
) -> int:
    """A randomly initialised decoder saved with ``save_pretrained``: ``gpt2`` (tied input and
    output embeddings) or ``llama`` (untied, rotary positions)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=n_embd,
            intermediate_size=2 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=n_positions,
            tie_word_embeddings=False,
            **ids,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown arch {arch!r}: expected 'gpt2' or 'llama'")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def build_assets(
    out_dir: str | Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 2, arch: str = "gpt2"
) -> Path:
    """Build (once) the policy+tokenizer directory and a prompt file under ``out_dir``."""
    out = Path(out_dir)
    marker = out / "policy" / "config.json"
    if not marker.exists():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "policy.tmp"
        tok = build_tokenizer(tmp)
        build_policy(tmp, tok, n_layer=n_layer, n_embd=n_embd, n_head=n_head, arch=arch)
        tmp.rename(out / "policy")
    prompts = out / "prompts.jsonl"
    if not prompts.exists():
        lines = [json.dumps({"prompt": p}) for p in make_prompts(512, seed=0)]
        prompts.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
        prompts.with_suffix(".tmp").rename(prompts)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines, written to a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def build_data_files(out: Path, files: dict[str, str], makers: dict) -> None:
    """Each ``files[kind]`` under ``out`` written from ``makers[kind]()``, unless it exists."""
    for kind, make in makers.items():
        path = out / files[kind]
        if not path.exists():
            write_jsonl(path, make())


def build_word_task(
    out_dir: str | Path,
    files: dict[str, str],
    corpus,
    make_demonstrations,
    make_prompts,
    seed: int,
    num_demonstrations: int,
    num_prompts: int,
    num_eval_prompts: int,
    **shape,
) -> Path:
    """A word-level task's assets under ``out_dir``, each built once: the base model
    (``files["model"]``, ``build_base_model`` on ``corpus``, GPT-2 ``shape``) and the
    demonstrations, prompts and held-out prompts (``files``' other kinds), each from its own
    seed (``seed``, ``seed + 2``, ``seed + 1000``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_base_model(out / files["model"], corpus, seed, **shape)
    makers = {
        "demonstrations": lambda: make_demonstrations(num_demonstrations, seed=seed),
        "prompts": lambda: make_prompts(num_prompts, seed=seed + 2),
        "eval_prompts": lambda: make_prompts(num_eval_prompts, seed=seed + 1000),
    }
    build_data_files(out, files, makers)
    return out


def build_base_model(base: Path, corpus, seed: int, **shape) -> None:
    """A word-level tokenizer trained on ``corpus()`` and a fresh GPT-2 of ``shape`` (seeded),
    saved at ``base`` once (built beside it and renamed into place)."""
    if (base / "config.json").exists():
        return
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = build_tokenizer(tmp, corpus=corpus())
    build_policy(tmp, tok, seed=seed, **shape)
    tmp.rename(base)
