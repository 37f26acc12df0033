"""``builtin:describe``: the built-in RLHF task, built locally from :mod:`rlhf_dist.tasks.lang`.

``build_assets(dir)`` writes, once:

- ``base/``: a word-level tokenizer trained with ``tokenizers`` on the language and a randomly
  initialised GPT-2, both saved with ``save_pretrained`` (SFT starts here);
- ``sft.jsonl``: demonstrations ``{"prompt", "response"}`` from the mediocre demonstrator;
- ``pairs.jsonl``: comparisons ``{"prompt", "chosen", "rejected"}`` labelled by the noisy gold
  labeler (the only way training ever sees it);
- ``prompts.jsonl`` and ``eval_prompts.jsonl``: PPO prompts and held-out evaluation prompts.

They are the same file formats a user brings, loaded by the same code.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_dist.tasks import lang
from rlhf_dist.tasks.tiny import build_base_model, build_data_files

FILES = {
    "model": "base",
    "demonstrations": "sft.jsonl",
    "pairs": "pairs.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
}


def build_assets(
    out_dir: str | Path,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    num_demonstrations: int = 4000,
    num_pairs: int = 4000,
    num_prompts: int = 2000,
    num_eval_prompts: int = 1024,
    seed: int = 0,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = lambda: lang.corpus_text(seed)  # noqa: E731 (only built when missing)
    shape = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head)
    build_base_model(out / FILES["model"], corpus, seed, **shape)
    makers = {
        "demonstrations": lambda: lang.make_demonstrations(num_demonstrations, seed=seed),
        "pairs": lambda: lang.make_preference_pairs(num_pairs, seed=seed + 1),
        "prompts": lambda: [{"prompt": p} for p in lang.make_prompts(num_prompts, seed=seed + 2)],
        "eval_prompts": lambda: [
            {"prompt": p} for p in lang.make_prompts(num_eval_prompts, seed=seed + 1000)
        ],
    }
    build_data_files(out, FILES, makers)
    return out
