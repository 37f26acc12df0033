"""SmolLM2-135M-Instruct's starting accuracy on builtin:wordmath's held-out prompts.

    python benchmarks/wordmath_baseline.py [--prompts 256] [--temperatures 0.7,1.0]
        [--max-new-tokens 48,64] [--batch 64] [--seed 0] [--by-template]

The model is ``builtin:smollm2-135m-instruct`` (converted once into ``--assets-dir``, the
default ``model.assets_dir``); the prompts are the first ``--prompts`` rows of the task's
held-out file (``wordmath.make_problems(n, EVAL_SEED)``), rendered by the model's chat template
as the generators render them (``chat.prompt_text``), tokenised without added special tokens,
left-padded. Sampling is the generators': HF ``generate`` with ``do_sample``, the temperature,
``top_k=0``, ``top_p=1``, stopping at ``models.stop_token_ids``; one sample per prompt,
``--batch`` prompts a batch, batch ``i`` seeded with ``seed + i``, ``--threads`` torch
threads (2).

Printed, a markdown table per (temperature, max_new_tokens): accuracy (``wordmath.reward``)
± its standard error ``sqrt(p (1 - p) / n)``, the mean response length in tokens (up to and
including the stop token; ``max_new_tokens`` for a response that never stopped), the share of
responses truncated (no stop token within ``max_new_tokens``), and the mean ``format_reward``.
``--by-template`` adds the accuracy of each template.

Measured on the 2-core machine (``--threads 1``: the machine was busy with other jobs, and two
threads contending with them were several times slower; the counts do not depend on it):

| temperature | max_new_tokens | accuracy | mean length (tokens) | truncated | format |
|---|---|---|---|---|---|
| 0.7 | 48 | 0.371 ± 0.030 | 31.1 | 0.34 | 0.41 |
| 0.7 | 64 | 0.379 ± 0.030 | 35.9 | 0.26 | 0.40 |
| 1.0 | 48 | 0.223 ± 0.026 | 36.5 | 0.54 | 0.23 |
| 1.0 | 64 | 0.211 ± 0.025 | 44.4 | 0.44 | 0.21 |

11 minutes for the four cells (about 50-70 tokens/s on the busy machine).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def sample(model, tokenizer, texts, stop_ids, temperature, max_new_tokens, seed):
    """Responses (text) and their lengths and truncation, as the generators sample."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    response = out[:, enc.input_ids.shape[1] :]
    is_stop = torch.isin(response, torch.tensor(stop_ids))
    stopped = is_stop.any(-1)
    first = torch.where(stopped, is_stop.float().argmax(-1) + 1, max_new_tokens)
    after = (is_stop.long().cumsum(-1) - is_stop.long()) > 0
    response = response.masked_fill(after, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return texts, first.tolist(), (~stopped).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--temperatures", type=_floats, default=[0.7, 1.0])
    parser.add_argument("--max-new-tokens", type=_ints, default=[48, 64])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--assets-dir", default=str(ROOT / "runs" / "_assets"))
    parser.add_argument("--by-template", action="store_true")
    parser.add_argument("--show", type=int, default=0, help="print this many responses a cell")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_dist import chat
    from rlhf_dist.models import load_tokenizer, stop_token_ids
    from rlhf_dist.tasks import smollm2, wordmath

    torch.set_num_threads(args.threads)
    path = smollm2.build_assets(Path(args.assets_dir) / smollm2.NAME)
    tokenizer = load_tokenizer(str(path), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stop_ids = stop_token_ids(tokenizer, model)
    problems = wordmath.make_problems(args.prompts, seed=wordmath.EVAL_SEED)
    rows = [p.row() for p in problems]
    texts = [chat.prompt_text(tokenizer, r["prompt"], template=True, chat=True) for r in rows]
    answers = [r["answer"] for r in rows]

    results = []
    for temperature in args.temperatures:
        for max_new in args.max_new_tokens:
            t0 = time.perf_counter()
            responses, lengths, truncated = [], [], []
            for i, start in enumerate(range(0, len(texts), args.batch)):
                got = sample(
                    model,
                    tokenizer,
                    texts[start : start + args.batch],
                    stop_ids,
                    temperature,
                    max_new,
                    args.seed + i,
                )
                responses += got[0]
                lengths += got[1]
                truncated += got[2]
            right = wordmath.reward(texts, responses, answers)
            formatted = wordmath.format_reward(texts, responses)
            n = len(right)
            acc = sum(right) / n
            results.append(
                dict(
                    temperature=temperature,
                    max_new=max_new,
                    acc=acc,
                    se=math.sqrt(acc * (1 - acc) / n),
                    length=sum(lengths) / n,
                    truncated=sum(truncated) / n,
                    formatted=sum(formatted) / n,
                    seconds=time.perf_counter() - t0,
                    tokens=sum(lengths),
                    by_template={
                        t.name: [ok for p, ok in zip(problems, right) if p.template == t.name]
                        for t in wordmath.TEMPLATES
                    },
                )
            )
            r = results[-1]
            print(
                f"T={temperature} max_new_tokens={max_new}: {r['acc']:.3f} "
                f"({r['tokens'] / r['seconds']:.0f} tokens/s)",
                file=sys.stderr,
                flush=True,
            )
            for prompt, response, ok in list(zip(rows, responses, right))[: args.show]:
                print(f"  [{int(ok)}] {prompt['prompt'][0]['content']!r} -> {response!r}")

    print(
        f"\nSmolLM2-135M-Instruct on {len(texts)} held-out builtin:wordmath prompts, "
        "one sample each\n"
    )
    print("| temperature | max_new_tokens | accuracy | mean length (tokens) | truncated | format |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['temperature']} | {r['max_new']} | {r['acc']:.3f} ± {r['se']:.3f} | "
            f"{r['length']:.1f} | {r['truncated']:.2f} | {r['formatted']:.2f} |"
        )
    if args.by_template:
        head = [f"T={r['temperature']}, {r['max_new']}" for r in results]
        print("\n| template | n | " + " | ".join(head) + " |")
        print("|---|---|" + "---|" * len(head))
        for t in wordmath.TEMPLATES:
            n = len(results[0]["by_template"][t.name])
            cells = [f"{sum(r['by_template'][t.name]) / max(1, n):.2f}" for r in results]
            print(f"| {t.name} ({t.kind}) | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
