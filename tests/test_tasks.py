"""The synthetic sentiment task: grammar, oracle, judges, and the pretrained tiny model's cache."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter

import pytest

from alignkit.tasks import sentiment as S


def test_oracle_ranks_clearly_positive_over_clearly_negative():
    pos = "the film was brilliant and I loved the music. It was a masterpiece."
    neg = "the film was awful and I hated the music. It was a disaster."
    assert S.score(pos) > 0.9
    assert S.score(neg) < -0.9
    assert S.score(pos) > S.score("the film was good.") > S.score("the film was long.") == 0.0 > S.score(neg)
    assert S.oracle_judge("the film was", pos, neg) == "a"
    assert S.oracle_judge("the film was", neg, pos) == "b"
    assert S.oracle_judge("the film was", "it was long.", "it was short.") == "tie"


def test_oracle_counts_words_not_substrings_and_ignores_case_and_garbage():
    assert S.raw_score("GOOD good Good") == 3
    assert S.raw_score("goodness badly") == 0  # whole words only
    assert S.raw_score("") == 0 and S.score("") == 0.0
    for junk in ["\x00\x01<|eos|>", "ÿ" * 1000, "1234 !!! ???", "<script>alert('x')</script>", "pl\ufffd"]:
        assert S.score(junk) == 0.0
    assert -1.0 <= S.score(" ".join(["awful"] * 500)) < 0 < S.score(" ".join(["brilliant"] * 500)) <= 1.0
    with pytest.raises(TypeError):
        S.score(None)


def test_oracle_is_bounded_and_monotone_in_lexicon_weight():
    values = [S.score(" ".join(["good"] * k)) for k in range(0, 12)]
    assert values == sorted(values) and all(-1 < v < 1 for v in values)


def test_lexicon_groups_are_disjoint_from_neutral_words():
    neutral = set(S.NEUTRAL_ADJECTIVES) | set(S.NEUTRAL_VERBS) | set(S.NEUTRAL_NOUNS)
    neutral |= {w for phrase in S.ASPECTS + S.WHEN + S.PEOPLE + S.MEDIA + S.INTENSIFIERS for w in phrase.split()}
    assert not (set(S.LEXICON) & neutral)
    assert all(v > 0 for d in (S.POSITIVE_ADJECTIVES, S.POSITIVE_VERBS, S.POSITIVE_NOUNS) for v in d.values())
    assert all(v < 0 for d in (S.NEGATIVE_ADJECTIVES, S.NEGATIVE_VERBS, S.NEGATIVE_NOUNS) for v in d.values())


def test_grammar_is_deterministic_for_a_seed():
    assert S.corpus(300, seed=1) == S.corpus(300, seed=1)
    assert S.corpus(300, seed=1) != S.corpus(300, seed=2)
    assert S.sft_rows(50, seed=3) == S.sft_rows(50, seed=3)
    assert S.prompts("train") == S.prompts("train")


def test_corpus_has_mixed_sentiment_centred_on_zero():
    texts = S.corpus(4000)
    raw = [S.raw_score(t) for t in texts]
    share_pos = sum(r > 0 for r in raw) / len(raw)
    share_neg = sum(r < 0 for r in raw) / len(raw)
    assert 0.3 < share_pos < 0.5 and 0.3 < share_neg < 0.5
    assert abs(sum(raw) / len(raw)) < 0.3
    # mixed reviews exist: both a positive and a negative word in one text
    mixed = [t for t in texts if any(S.LEXICON.get(w, 0) > 0 for w in t.lower().replace(".", " ").split())
             and any(S.LEXICON.get(w, 0) < 0 for w in t.lower().replace(".", " ").split())]
    assert len(mixed) > 0.1 * len(texts)


def test_prompts_split_is_disjoint_and_stable():
    train, evals = S.prompts("train"), S.prompts("eval")
    assert not set(train) & set(evals)
    assert sorted(train + evals) == sorted(S.prompts("all"))
    assert len(evals) >= 300 and len(train) >= 1000
    assert len(set(S.prompts("all"))) == len(S.prompts("all"))


def test_sft_rows_continue_their_prompt_and_are_balanced():
    rows = S.sft_rows(400)
    assert all(r["prompt"] in set(S.prompts("train")) for r in rows)
    assert all(r["completion"].startswith(" ") and r["completion"].endswith(".") for r in rows)
    mean = sum(S.score(r["completion"]) for r in rows) / len(rows)
    assert abs(mean) < 0.1
    json.dumps(rows)  # JSONL-ready


def test_noisy_annotator_error_rate_and_side_symmetry():
    good, bad = "the film was brilliant.", "the film was awful."
    judge = S.noisy_judge(noise=0.2, seed=0)
    votes = Counter(judge(f"prompt {i}", good, bad) for i in range(4000))
    # a coin flip replaces 20% of votes, so about 10% are wrong
    assert 0.07 < votes["b"] / 4000 < 0.13 and votes["tie"] == 0
    # the k-th vote on a pair is the same whichever side each response is shown on
    j1, j2 = S.noisy_judge(0.3, seed=5), S.noisy_judge(0.3, seed=5)
    flip = {"a": "b", "b": "a", "tie": "tie"}
    for i in range(200):
        assert j1(f"p{i}", good, bad) == flip[j2(f"p{i}", bad, good)]
    assert S.noisy_judge(0.0)("p", good, bad) == "a"
    assert S.noisy_judge(0.0)("p", "it was long.", "it was short.") == "tie"
    assert S.noisy_judge(0.0, tie_rate=0.0)("p", "it was long.", "it was short.") in ("a", "b")
    with pytest.raises(ValueError):
        S.noisy_judge(1.5)


def test_noisy_annotator_is_reproducible_across_threads():
    pairs = [(f"p{i}", f"the film was good {'and fun ' * (i % 3)}.", f"the film was bad{' and dull' * (i % 2)}.")
             for i in range(300)]

    def run(threads: int) -> list[str]:
        judge = S.noisy_judge(0.3, seed=7)
        out: dict[int, str] = {}
        order = list(range(len(pairs)))
        random.Random(threads).shuffle(order)
        chunks = [order[k::threads] for k in range(threads)]

        def work(chunk):
            for i in chunk:
                out[i] = judge(*pairs[i])

        ts = [threading.Thread(target=work, args=(c,)) for c in chunks]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return [out[i] for i in range(len(pairs))]

    assert run(1) == run(4)


def test_pretrained_model_cache_key_changes_with_settings():
    from alignkit.tasks.pretrain import PretrainSettings

    assert PretrainSettings().key() == PretrainSettings().key()
    assert PretrainSettings().key() != PretrainSettings(steps=7).key()
    assert PretrainSettings().key() != PretrainSettings(corpus_seed=1).key()


@pytest.mark.slow
def test_pretrained_tiny_model_writes_reviews_and_is_reused():
    import torch

    from alignkit.generation import SamplingParams, generate_batch
    from alignkit.modeling import load_model_for_inference
    from alignkit.tasks.pretrain import MARKER, PretrainSettings, pretrained_tiny_model

    # The demo's settings in the session's cache: after the demo test this is a cache hit, and
    # the marker still holds the losses of the run that trained it.
    settings = PretrainSettings()
    torch.set_num_threads(1)
    path = pretrained_tiny_model(None, settings, log=lambda *_: None)
    marker = json.loads((path / MARKER).read_text())
    assert marker["stats"]["final_loss"] < 0.6 * marker["stats"]["first_loss"]
    mtime = (path / "model.safetensors").stat().st_mtime
    assert pretrained_tiny_model(None, settings, log=lambda *_: None) == path
    assert (path / "model.safetensors").stat().st_mtime == mtime  # reused, not retrained

    model, tok, _ = load_model_for_inference(str(path))
    prompts = S.prompts("eval")[:32]
    out = generate_batch(model, tok, prompts, SamplingParams(max_new_tokens=32, temperature=1.0, seed=0))
    known = {w for t in S.corpus(settings.corpus_size) for w in S._WORD.findall(t.lower())}
    words = [w for t in out.texts for w in S._WORD.findall(t.lower())]
    assert words and sum(w in known for w in words) / len(words) > 0.9
    assert sum(out.finished) / len(out.finished) > 0.7
