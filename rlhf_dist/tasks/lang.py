"""``lang``: a tiny "describe the scene" language with a hidden gold labeler, for full RLHF.

This task carries the whole RLHF recipe of InstructGPT (Ouyang et al. 2022, "Training language
models to follow instructions with human feedback") and of Stiennon et al. 2020 ("Learning to
summarize from human feedback") at a size a CPU trains in minutes, offline: supervised
fine-tuning (SFT) on demonstrations, a reward model (RM) fitted to pairwise comparisons, then PPO
against the learned reward with a KL penalty. The human is replaced by a hidden *gold* labeler,
which also scores the policy during PPO, so a run shows the proxy (RM) reward, the gold score and
the KL side by side: the reward-model over-optimisation of Gao et al. 2022 ("Scaling laws for
reward model overoptimization"), in miniature.

Language
--------
Word level: every token is a whitespace-separated word (``.`` and ``:`` are words of their own),
about 80 words in all (``VOCAB``). A *prompt* asks for a scene of 2-4 distinct items, each a noun
with an optional colour or size attribute (attributes are distinct too)::

    describe : red fox big tree blue lake        (at most 2 + 2 * 4 = 10 words)

A *response* is at most 20 words; a good one follows the little grammar::

    the ATTR NOUN VERB [STYLE] PREP the ATTR NOUN { and the ATTR NOUN } .
    the red fox sits quietly near the big tree and the blue lake .

Gold labeler (``gold_score``)
-----------------------------
A weighted sum of six components, each in [0, 1]; the weights sum to 1 and ``ideal_response``
scores exactly 1.0. The components differ in how hard they are for a small reward model: the
local ones (fluency, style, repetition) are learnt from a bag of bigrams, length needs to count
the prompt's words, and coverage / hallucination need attention from the response back into the
prompt, including attribute *binding* (``blue fox`` for a prompt's ``red fox`` is wrong).

=============  ======  ====================================================================
component      weight  score
=============  ======  ====================================================================
coverage        0.35   mean over prompt items: noun mentioned -> 0.5, with the prompt's
                       attribute right before it -> 1.0 (an item without attribute: noun
                       mentioned -> 1.0)
hallucination   0.20   1 - 0.4 per error (floored at 0); errors are the distinct nouns absent
                       from the prompt, attribute words absent from the prompt, and prompt
                       attributes put before another prompt noun; 0 when no prompt noun is
                       mentioned at all (so saying nothing is not "clean")
length          0.10   target = the ideal length ``3 * k + a + 2`` for ``k`` prompt items and
                       ``a`` prompt attributes; full within +-2 words, then -1/6 per further
                       word (floored at 0); 0 for an empty response
repetition      0.10   1 - 1/3 per repeat (floored at 0): each extra occurrence of a word other
                       than ``the a and``, and any word repeated back-to-back; 0 when no
                       prompt noun is mentioned at all
style           0.10   exactly one "liked" manner word (``quietly gently calmly softly
                       slowly``) -> 1.0, two or more -> 0.5, none -> 0, any "disliked" one
                       (``loudly rudely wildly badly angrily``) -> 0
fluency         0.15   1 - 0.25 per word transition the grammar above does not allow (floored
                       at 0), counting the start (a response must begin with ``the`` or
                       ``a``) and the end (it must end with ``.``); 0 for an empty response
=============  ======  ====================================================================

Several components are not monotone in what is easy to learn: more style words, more words, or
more mentions stop paying off, which is where a policy optimised hard against a learned proxy can
raise the proxy reward while the gold score falls. Model outputs are scored as they come: text
after the first ``[EOS]`` is dropped, ``[PAD]`` and ``[BOS]`` are ignored, and ``[UNK]`` or any
word outside the grammar just counts as ungrammatical. An empty response scores 0.

Noise model (``gold_prefers``)
------------------------------
Bradley-Terry annotators: response ``a`` is preferred over ``b`` with probability
``sigmoid((gold(a) - gold(b)) / noise)``; the default ``noise`` (temperature) ``DEFAULT_NOISE =
0.1`` makes the labels on demonstrator pairs agree with the gold order about 83% of the time,
like real annotators. ``noise = 0`` gives the noiseless gold order (ties broken at random).

Demonstrator (``demonstrate``)
------------------------------
A mediocre writer, so that SFT yields a policy with a middling gold score that RL can improve:
it mentions each prompt item with probability 0.5, often drops or swaps attributes, adds 0-2
hallucinated items, picks liked, disliked, doubled or no style words, and now and then repeats a
word, rambles (``so um well ...``), truncates, swaps two words or forgets the final ``.``. Its
mean gold score is about 0.50 (the ideal scores 1.0); see ``tests/tasks/test_task_lang.py``.
"""

from __future__ import annotations

import math
import random

# --------------------------------------------------------------------------- vocabulary

NOUNS = (
    "fox cat dog owl bird fish frog horse tree rock lake hill house boat car ball cup flower "
    "cloud bridge"
).split()
COLORS = "red blue green yellow white black brown gray pink orange".split()
SIZES = "big small tall tiny old young long round".split()
ATTRS = COLORS + SIZES
VERBS = "sits stands rests waits sleeps plays hides shines".split()
PREPS = "near by under behind beside above".split()
LIKED_STYLE = "quietly gently calmly softly slowly".split()
DISLIKED_STYLE = "loudly rudely wildly badly angrily".split()
STYLE = LIKED_STYLE + DISLIKED_STYLE
DETS = ["the", "a"]
CONJ = ["and"]
INTENSIFIERS = ["very", "really"]
RAMBLE = "so um well then also maybe like just".split()
PROMPT_WORDS = ["describe", ":"]
END = "."

VOCAB: list[str] = (
    PROMPT_WORDS
    + DETS
    + CONJ
    + [END]
    + NOUNS
    + ATTRS
    + VERBS
    + PREPS
    + STYLE
    + INTENSIFIERS
    + RAMBLE
)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]

MAX_PROMPT_WORDS = 16
MAX_RESPONSE_WORDS = 20
MIN_ITEMS, MAX_ITEMS = 2, 4

WEIGHTS = {
    "coverage": 0.35,
    "hallucination": 0.20,
    "length": 0.10,
    "repetition": 0.10,
    "style": 0.10,
    "fluency": 0.15,
}
HALLUCINATION_PENALTY = 0.4  # per hallucinated noun or attribute
FLUENCY_PENALTY = 0.25  # per ungrammatical word transition
DEFAULT_NOISE = 0.1  # Bradley-Terry temperature of gold_prefers

_NOUN_SET = frozenset(NOUNS)
_ATTR_SET = frozenset(ATTRS)
_LIKED_SET = frozenset(LIKED_STYLE)
_DISLIKED_SET = frozenset(DISLIKED_STYLE)
_FREE_REPEAT = frozenset(DETS + CONJ)

# Word categories and the grammar's allowed transitions ("^" = start, "$" = end).
_CATEGORY: dict[str, str] = {}
for _cat, _words in (
    ("DET", DETS),
    ("CONJ", CONJ),
    ("END", [END]),
    ("NOUN", NOUNS),
    ("ATTR", ATTRS),
    ("VERB", VERBS),
    ("PREP", PREPS),
    ("STYLE", STYLE),
    ("INT", INTENSIFIERS),
):
    for _w in _words:
        _CATEGORY[_w] = _cat
_ALLOWED = {
    "^": {"DET"},
    "DET": {"ATTR", "NOUN", "INT"},
    "INT": {"ATTR"},
    "ATTR": {"NOUN"},
    "NOUN": {"VERB", "PREP", "CONJ", "END"},
    "VERB": {"STYLE", "PREP", "END"},
    "STYLE": {"PREP", "CONJ", "END"},
    "PREP": {"DET"},
    "CONJ": {"DET"},
    "END": {"$"},
}


def _rng(seed: int, salt: str) -> random.Random:
    """An independent, reproducible stream per (generator, seed)."""
    return random.Random(f"lang:{salt}:{int(seed)}")


# --------------------------------------------------------------------------- prompts


def parse_prompt(prompt: str) -> list[tuple[str | None, str]]:
    """The prompt's items as ``(attribute or None, noun)``; tolerant of malformed prompts."""
    words = prompt.split()
    if ":" in words:
        words = words[words.index(":") + 1 :]
    items: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    pending: str | None = None
    for w in words:
        if w in _ATTR_SET:
            pending = w
        elif w in _NOUN_SET:
            if w not in seen:
                items.append((pending, w))
                seen.add(w)
            pending = None
        else:
            pending = None
    return items


def _sample_prompt(rng: random.Random) -> str:
    k = rng.randint(MIN_ITEMS, MAX_ITEMS)
    nouns = rng.sample(NOUNS, k)
    attrs = rng.sample(ATTRS, k)
    words = list(PROMPT_WORDS)
    for attr, noun in zip(attrs, nouns):
        if rng.random() < 0.8:
            words.append(attr)
        words.append(noun)
    return " ".join(words)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts (with repeats only by chance); another seed gives a held-out set."""
    rng = _rng(seed, "prompts")
    return [_sample_prompt(rng) for _ in range(n)]


# --------------------------------------------------------------------------- gold labeler


def _clean(response: str) -> list[str]:
    words = response.split()
    if "[EOS]" in words:
        words = words[: words.index("[EOS]")]
    return [w for w in words if w not in ("[PAD]", "[BOS]")]


def gold_components(prompt: str, response: str) -> dict[str, float]:
    """The gold labeler's six components, each in [0, 1] (see the module docstring)."""
    items = parse_prompt(prompt)
    attr_of = {noun: attr for attr, noun in items}
    words = _clean(response)
    n = len(words)

    # coverage
    mentioned = {w for w in words if w in attr_of}
    bound = {(words[i - 1], words[i]) for i in range(1, n) if words[i] in attr_of}
    per_item = []
    for attr, noun in items:
        if noun not in mentioned:
            per_item.append(0.0)
        elif attr is None or (attr, noun) in bound:
            per_item.append(1.0)
        else:
            per_item.append(0.5)
    coverage = sum(per_item) / len(per_item) if per_item else 0.0

    # hallucination: foreign nouns, wrong attributes on prompt nouns
    prompt_attrs = {attr for attr, _ in items if attr}
    foreign = {w for w in words if w in _NOUN_SET and w not in attr_of}
    stray = {w for w in words if w in _ATTR_SET and w not in prompt_attrs}
    misbound = {(a, b) for a, b in bound if a in prompt_attrs and a != attr_of[b]}
    errors = len(foreign) + len(stray) + len(misbound)
    hallucination = max(0.0, 1.0 - HALLUCINATION_PENALTY * errors) if mentioned else 0.0

    # length
    target = 3 * len(items) + len(prompt_attrs) + 2
    excess = max(0, abs(n - target) - 2)
    length = max(0.0, 1.0 - excess / 6.0) if n else 0.0

    # repetition
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    repeats = sum(c - 1 for w, c in counts.items() if w not in _FREE_REPEAT)
    repeats += sum(1 for i in range(1, n) if words[i] == words[i - 1] and words[i] in _FREE_REPEAT)
    repetition = max(0.0, 1.0 - repeats / 3.0) if mentioned else 0.0

    # style
    liked = sum(1 for w in words if w in _LIKED_SET)
    disliked = any(w in _DISLIKED_SET for w in words)
    if disliked or liked == 0:
        style = 0.0
    else:
        style = 1.0 if liked == 1 else 0.5

    # fluency
    if n:
        cats = ["^"] + [_CATEGORY.get(w, "?") for w in words] + ["$"]
        bad = sum(1 for a, b in zip(cats, cats[1:]) if b not in _ALLOWED.get(a, ()))
        fluency = max(0.0, 1.0 - FLUENCY_PENALTY * bad)
    else:
        fluency = 0.0

    return {
        "coverage": coverage,
        "hallucination": hallucination,
        "length": length,
        "repetition": repetition,
        "style": style,
        "fluency": fluency,
    }


def gold_score(prompt: str, response: str) -> float:
    """The hidden gold labeler: a weighted sum of ``gold_components``, in [0, 1]."""
    comps = gold_components(prompt, response)
    return sum(WEIGHTS[k] * v for k, v in comps.items())


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Batch gold score with the project's reward-function signature (``module:function``)."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def gold_prefers(
    prompt: str, a: str, b: str, rng: random.Random, noise: float = DEFAULT_NOISE
) -> bool:
    """A noisy Bradley-Terry annotator: True if ``a`` is preferred over ``b``.

    P(a preferred) = sigmoid((gold(a) - gold(b)) / noise); ``noise <= 0`` follows the gold order
    exactly (ties broken at random).
    """
    diff = gold_score(prompt, a) - gold_score(prompt, b)
    if noise <= 0:
        return diff > 0 or (diff == 0 and rng.random() < 0.5)
    z = diff / noise
    p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
    return rng.random() < p


def _noun_phrase(attr: str | None, noun: str, det: str = "the") -> list[str]:
    return [det] + ([attr] if attr else []) + [noun]


def ideal_response(prompt: str) -> str:
    """A response the gold labeler scores at its maximum (1.0 for a well-formed prompt)."""
    items = parse_prompt(prompt)
    if not items:
        return "the cat sits quietly ."
    words = _noun_phrase(*items[0]) + [VERBS[0], LIKED_STYLE[0]]
    if len(items) > 1:
        words += [PREPS[0]] + _noun_phrase(*items[1])
    for attr, noun in items[2:]:
        words += ["and"] + _noun_phrase(attr, noun)
    return " ".join(words + [END])


# --------------------------------------------------------------------------- demonstrator


def demonstrate(prompt: str, rng: random.Random) -> str:
    """A mediocre demonstration for ``prompt`` (see the module docstring)."""
    items = parse_prompt(prompt)
    prompt_nouns = {noun for _, noun in items}
    phrases: list[tuple[str | None, str]] = []
    for attr, noun in items:
        if rng.random() >= 0.5:
            continue
        r = rng.random()
        if attr is None:
            phrases.append((None if r < 0.8 else rng.choice(ATTRS), noun))
        elif r < 0.55:
            phrases.append((attr, noun))
        elif r < 0.8:
            phrases.append((None, noun))
        else:
            phrases.append((rng.choice([a for a in ATTRS if a != attr]), noun))
    n_halluc = rng.choices([0, 1, 2], weights=[0.55, 0.3, 0.15])[0]
    others = [w for w in NOUNS if w not in prompt_nouns]
    for noun in rng.sample(others, n_halluc):
        attr = rng.choice(ATTRS) if rng.random() < 0.6 else None
        phrases.insert(rng.randint(0, len(phrases)), (attr, noun))
    if not phrases:
        pool = items if items and rng.random() < 0.5 else [(None, rng.choice(NOUNS))]
        phrases.append(rng.choice(pool))
    if rng.random() < 0.3:
        rng.shuffle(phrases)

    def np(attr: str | None, noun: str) -> list[str]:
        det = rng.choice(DETS) if rng.random() < 0.3 else "the"
        out = _noun_phrase(attr, noun, det)
        if attr and rng.random() < 0.15:
            out.insert(1, rng.choice(INTENSIFIERS))
        return out

    words = np(*phrases[0]) + [rng.choice(VERBS)]
    r = rng.random()
    if r < 0.3:
        words.append(rng.choice(LIKED_STYLE))
    elif r < 0.4:
        words += rng.sample(LIKED_STYLE, 2)
    elif r < 0.65:
        words.append(rng.choice(DISLIKED_STYLE))
    if len(phrases) > 1:
        words += [rng.choice(PREPS)] + np(*phrases[1])
    for phrase in phrases[2:]:
        words += ["and"] + np(*phrase)

    if rng.random() < 0.2:  # repeat a word or a phrase
        i = rng.randrange(len(words))
        j = min(len(words), i + rng.randint(1, 3))
        words[j:j] = words[i:j]
    if rng.random() < 0.2:  # ramble
        words += [rng.choice(RAMBLE + VERBS + ATTRS) for _ in range(rng.randint(2, 6))]
    if rng.random() < 0.1 and len(words) > 2:  # swap two neighbours
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    if rng.random() < 0.85:
        words.append(END)
    if rng.random() < 0.15 and len(words) > 3:  # truncate
        words = words[: rng.randint(2, len(words) - 1)]
    return " ".join(words[:MAX_RESPONSE_WORDS])


def make_demonstrations(n: int, seed: int = 0) -> list[dict]:
    """``n`` SFT examples ``{"prompt", "response"}`` written by the demonstrator."""
    rng = _rng(seed, "demonstrations")
    out = []
    for _ in range(n):
        prompt = _sample_prompt(rng)
        out.append({"prompt": prompt, "response": demonstrate(prompt, rng)})
    return out


def make_preference_pairs(n: int, seed: int = 0, noise: float = DEFAULT_NOISE) -> list[dict]:
    """``n`` comparisons ``{"prompt", "chosen", "rejected"}``: two different demonstrations
    for the same prompt, labelled by the noisy gold annotator ``gold_prefers``."""
    rng = _rng(seed, "preferences")
    out: list[dict] = []
    while len(out) < n:
        prompt = _sample_prompt(rng)
        a = demonstrate(prompt, rng)
        b = a
        for _ in range(50):
            b = demonstrate(prompt, rng)
            if b != a:
                break
        if b == a:
            continue
        if gold_prefers(prompt, a, b, rng, noise):
            out.append({"prompt": prompt, "chosen": a, "rejected": b})
        else:
            out.append({"prompt": prompt, "chosen": b, "rejected": a})
    return out


def corpus_text(seed: int = 0) -> list[str]:
    """Lines for training a word-level tokenizer: prompts, demonstrations, ideal responses and
    one line with every word of ``VOCAB`` (so nothing is left out)."""
    lines = []
    for ex in make_demonstrations(500, seed):
        lines += [ex["prompt"], ex["response"], ideal_response(ex["prompt"])]
    lines.append(" ".join(VOCAB))
    return lines
