"""The ``lang`` task: a small scene-description language with a hidden gold labeler."""

import random
import statistics

import pytest

from rlhf_dist.tasks import lang

PROMPT = "describe : red fox big tree blue lake"
IDEAL = "the red fox sits quietly near the big tree and the blue lake ."
N_STATS = 3000


def _score(response: str, prompt: str = PROMPT) -> float:
    return lang.gold_score(prompt, response)


# --------------------------------------------------------------------------- determinism


def test_generators_are_deterministic_per_seed():
    assert lang.make_prompts(50, seed=3) == lang.make_prompts(50, seed=3)
    assert lang.make_demonstrations(50, seed=3) == lang.make_demonstrations(50, seed=3)
    assert lang.make_preference_pairs(50, seed=3) == lang.make_preference_pairs(50, seed=3)
    assert lang.corpus_text(3) == lang.corpus_text(3)
    assert lang.make_prompts(50, seed=3) != lang.make_prompts(50, seed=4)
    assert lang.make_demonstrations(50, seed=3) != lang.make_demonstrations(50, seed=4)
    assert lang.make_preference_pairs(50, seed=3) != lang.make_preference_pairs(50, seed=4)
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [lang.demonstrate(PROMPT, rng_a) for _ in range(20)] == [
        lang.demonstrate(PROMPT, rng_b) for _ in range(20)
    ]


def test_prompt_sets_are_diverse_and_held_out_sets_differ():
    train, held_out = lang.make_prompts(1000, seed=0), lang.make_prompts(1000, seed=1)
    assert len(set(train)) > 950
    assert len(set(train) & set(held_out)) < 50


# --------------------------------------------------------------------------- vocabulary


def test_vocab_and_lengths():
    vocab = set(lang.VOCAB)
    assert len(vocab) == len(lang.VOCAB)
    assert 60 <= len(vocab) <= 120
    assert not vocab & set(lang.SPECIAL_TOKENS)
    assert lang.SPECIAL_TOKENS == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    for ex in lang.make_demonstrations(500, seed=0):
        prompt, response = ex["prompt"], ex["response"]
        ideal = lang.ideal_response(prompt)
        for text in (prompt, response, ideal):
            assert set(text.split()) <= vocab, text
        assert 2 + 2 * 2 - 2 <= len(prompt.split()) <= lang.MAX_PROMPT_WORDS
        assert 2 <= len(lang.parse_prompt(prompt)) <= 4
        assert 1 <= len(response.split()) <= lang.MAX_RESPONSE_WORDS
        assert len(ideal.split()) <= lang.MAX_RESPONSE_WORDS
    for p in lang.make_prompts(500, seed=5):
        assert set(p.split()) <= vocab and len(p.split()) <= lang.MAX_PROMPT_WORDS


def test_corpus_covers_vocab_and_trains_a_word_level_tokenizer():
    corpus = lang.corpus_text(0)
    assert {w for line in corpus for w in line.split()} == set(lang.VOCAB)
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=lang.SPECIAL_TOKENS)
    tok.train_from_iterator(corpus, trainer=trainer)
    assert tok.get_vocab_size() == len(lang.VOCAB) + len(lang.SPECIAL_TOKENS)
    unk = tok.token_to_id("[UNK]")
    for ex in lang.make_demonstrations(50, seed=9):
        text = ex["prompt"] + " " + ex["response"]
        enc = tok.encode(text)
        assert unk not in enc.ids and len(enc.ids) == len(text.split())


# --------------------------------------------------------------------------- gold labeler


def test_ideal_response_scores_the_maximum():
    assert lang.ideal_response(PROMPT) == IDEAL
    assert _score(IDEAL) == pytest.approx(1.0)
    assert sum(lang.WEIGHTS.values()) == pytest.approx(1.0)
    for p in lang.make_prompts(300, seed=2):
        assert lang.gold_score(p, lang.ideal_response(p)) == pytest.approx(1.0)


def test_ideal_beats_every_demonstration():
    # The demonstrator now and then writes a perfect answer of its own (another word order or
    # style word): those tie with the ideal, nothing beats it.
    rng = random.Random(0)
    strictly_below = 0
    for p in lang.make_prompts(100, seed=11):
        ideal = lang.gold_score(p, lang.ideal_response(p))
        for _ in range(10):
            demo = lang.gold_score(p, lang.demonstrate(p, rng))
            assert demo <= ideal
            strictly_below += demo < ideal
    assert strictly_below >= 980


@pytest.mark.parametrize(
    ("response", "component"),
    [
        # a prompt item left out
        ("the red fox sits quietly near the big tree .", "coverage"),
        # an attribute left out
        ("the fox sits quietly near the big tree and the blue lake .", "coverage"),
        # a wrong attribute (absent from the prompt)
        ("the green fox sits quietly near the big tree and the blue lake .", "hallucination"),
        # an attribute bound to the wrong item
        ("the big fox sits quietly near the red tree and the blue lake .", "hallucination"),
        # an item absent from the prompt
        (
            "the red fox sits quietly near the big tree and the blue lake and the dog .",
            "hallucination",
        ),
        # a repeated word
        ("the red fox sits quietly near the big tree and the blue lake fox .", "repetition"),
        # no style word, a disliked one, two liked ones
        ("the red fox sits near the big tree and the blue lake .", "style"),
        ("the red fox sits loudly near the big tree and the blue lake .", "style"),
        ("the red fox sits quietly gently near the big tree and the blue lake .", "style"),
        # no final full stop, a bad start, scrambled order
        ("the red fox sits quietly near the big tree and the blue lake", "fluency"),
        ("red fox sits quietly near the big tree and the blue lake .", "fluency"),
        ("the fox red sits quietly near the tree big and the lake blue .", "fluency"),
        # rambling on
        (
            "the red fox sits quietly near the big tree and the blue lake so um well then maybe .",
            "length",
        ),
    ],
)
def test_each_component_moves_the_score_down(response, component):
    ideal_comps = lang.gold_components(PROMPT, IDEAL)
    comps = lang.gold_components(PROMPT, response)
    assert comps[component] < ideal_comps[component] == 1.0
    assert _score(response) < _score(IDEAL)


def test_style_and_length_are_not_monotone():
    one = "the red fox sits quietly near the big tree and the blue lake ."
    two = "the red fox sits quietly gently near the big tree and the blue lake ."
    none = "the red fox sits near the big tree and the blue lake ."
    comps = [lang.gold_components(PROMPT, r)["style"] for r in (none, one, two)]
    assert comps[0] < comps[2] < comps[1]
    # a short but correct answer beats a very long one that says more
    long = (
        "the red fox sits quietly near the big tree and the blue lake and the big tree "
        "and the red fox ."
    )
    assert _score(long) < _score(IDEAL)
    assert lang.gold_components(PROMPT, long)["length"] < 1.0


def test_more_errors_cost_more():
    one = "the red fox sits quietly near the big tree and the blue lake and the dog ."
    two = "the red fox sits quietly near the big tree and the blue lake and the dog and the cat ."
    assert _score(two) < _score(one) < _score(IDEAL)


@pytest.mark.parametrize(
    "response",
    ["", "   ", "[PAD] [PAD]", "[EOS]", "[BOS]", "[UNK] [UNK] [UNK]", "[EOS] the red fox", "."],
)
def test_degenerate_responses_score_low_without_error(response):
    score = _score(response)
    assert 0.0 <= score <= 0.15
    assert lang.gold_reward([PROMPT], [response]) == [score]


def test_special_tokens_around_a_response_are_ignored():
    assert _score("[BOS] " + IDEAL + " [EOS] [PAD] [PAD]") == pytest.approx(1.0)
    assert _score(IDEAL + " [EOS] loudly loudly") == pytest.approx(1.0)
    assert _score(IDEAL.replace("quietly", "[UNK]")) < _score(IDEAL)


def test_malformed_prompts_do_not_crash():
    for prompt in ["", "describe :", "hello world", "[PAD] fox", "describe : red red fox fox"]:
        score = lang.gold_score(prompt, IDEAL)
        assert 0.0 <= score <= 1.0
        assert 0.0 <= lang.gold_score(prompt, lang.ideal_response(prompt)) <= 1.0
    assert lang.parse_prompt("describe : red fox fox tree") == [("red", "fox"), (None, "tree")]


def test_gold_reward_matches_gold_score():
    demos = lang.make_demonstrations(200, seed=4)
    prompts = [d["prompt"] for d in demos]
    responses = [d["response"] for d in demos]
    assert lang.gold_reward(prompts, responses) == [
        lang.gold_score(p, r) for p, r in zip(prompts, responses)
    ]
    with pytest.raises(ValueError):
        lang.gold_reward(prompts, responses[:-1])


# --------------------------------------------------------------------------- statistics


def test_demonstrator_is_clearly_below_the_ideal():
    # Measured (seed 0, 3000 demos): demonstrator mean gold ~0.50 (sd ~0.19), ideal mean 1.00.
    demos = lang.make_demonstrations(N_STATS, seed=0)
    golds = [lang.gold_score(d["prompt"], d["response"]) for d in demos]
    ideal = [lang.gold_score(d["prompt"], lang.ideal_response(d["prompt"])) for d in demos]
    assert 0.35 < statistics.mean(golds) < 0.6
    assert statistics.mean(ideal) > 0.95
    assert statistics.mean(ideal) - statistics.mean(golds) > 0.3
    # spread: some demonstrations are good, many are poor
    assert statistics.pstdev(golds) > 0.1
    assert sum(g > 0.8 for g in golds) > 0.03 * N_STATS
    assert sum(g < 0.4 for g in golds) > 0.1 * N_STATS


def _pair_stats(pairs):
    agree = decided = longer = length_decided = 0
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected"}
        assert p["chosen"] != p["rejected"]
        gc = lang.gold_score(p["prompt"], p["chosen"])
        gr = lang.gold_score(p["prompt"], p["rejected"])
        if gc != gr:
            decided += 1
            agree += gc > gr
        lc, lr = len(p["chosen"].split()), len(p["rejected"].split())
        if lc != lr:
            length_decided += 1
            longer += lc > lr
    return agree / decided, longer / length_decided


def test_preference_labels_are_noisy_but_informative():
    # Measured (seed 0, 3000 pairs, default noise 0.1): agreement with the gold order ~0.83
    # (ties excluded); "the longer response is chosen" agrees with the labels ~0.56.
    pairs = lang.make_preference_pairs(N_STATS, seed=0)
    assert len(pairs) == N_STATS
    agreement, length_baseline = _pair_stats(pairs)
    assert 0.7 < agreement < 0.95
    assert length_baseline < 0.8


def test_noise_controls_agreement():
    exact, _ = _pair_stats(lang.make_preference_pairs(500, seed=1, noise=0.0))
    noisy, _ = _pair_stats(lang.make_preference_pairs(500, seed=1, noise=0.5))
    assert exact == 1.0
    assert 0.5 < noisy < 0.75


def test_gold_prefers_follows_bradley_terry():
    rng = random.Random(0)
    good = IDEAL
    bad = "the dog sits loudly ."
    wins = sum(lang.gold_prefers(PROMPT, good, bad, rng) for _ in range(500))
    assert wins > 480
    close = "the red fox sits near the big tree and the blue lake ."  # 0.1 below the ideal
    wins = sum(lang.gold_prefers(PROMPT, good, close, rng) for _ in range(2000))
    # sigmoid(0.1 / 0.1) = 0.73
    assert 0.66 < wins / 2000 < 0.80
    ties = sum(lang.gold_prefers(PROMPT, good, good, rng, noise=0.0) for _ in range(400))
    assert 150 < ties < 250
