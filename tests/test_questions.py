"""Tests for questions.py: easy-VQA's questions read into their meaning and said again, every phrasing
keeping what is asked (and so the answer), the held-out phrasings apart from the training ones, and the
surface forms; easyvqa.reworded, which the curricula read through."""
import itertools
import random
import re
from collections import Counter

import pytest

import easyvqa
import questions
from questions import HELD_OUT, OPENINGS, TRAIN, Question, fill, read_question, reword, say

easy_vqa = pytest.importorskip("easy_vqa", reason="the easy-VQA questions need `pip install easy-vqa`")

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "gray", "red", "green", "blue", "yellow", "teal", "brown")
NEGATION = re.compile(r"\b(not|no|absent|missing|lack|without)\b|n't\b")


def test_every_easy_vqa_question_is_read_into_its_meaning():
    qs, answers, _ = easy_vqa.get_train_questions()
    read = [read_question(q, a) for q, a in zip(qs, answers)]
    assert Counter(r.kind for r in read) == Counter(
        "color" if a in COLORS else "shape" if a in SHAPES else
        "has_shape" if any(s in q for s in SHAPES) else "has_color" for q, a in zip(qs, answers))
    assert read_question("is there not a red shape?", "yes") == Question("has_color", "red", None, True)
    assert read_question("What color is the circle?", "red") == Question("color", None, "circle")
    assert read_question("what is the blue shape?", "circle") == Question("shape", None, "blue")
    assert read_question("Is no triangle present?", "no") == Question("has_shape", "triangle", None, True)
    assert questions.question_kind(read_question("does the image not contain a triangle?", "no")) == "yes/no negated"
    with pytest.raises(ValueError, match="not one of easy-VQA's"):
        read_question("is there a red circle?", "yes")  # two values: not a template


@pytest.mark.parametrize("phrasings", ["train", "held_out"])
def test_every_phrasing_asks_what_the_question_asks(phrasings):
    """The asked value, the colour noun of a colour question and a negation iff negated: what the answer
    rests on survives every rewording (2,000 train questions, each said 3 times)."""
    qs, answers, _ = easy_vqa.get_train_questions()
    rng = random.Random(0)
    for q, a in list(zip(qs, answers))[:2000]:
        meaning = read_question(q, a)
        for _ in range(3):
            text = say(meaning, rng, phrasings).lower()
            assert bool(NEGATION.search(text)) == meaning.negated, text
            if meaning.kind == "color":
                assert "colo" in text and not any(c in text.split() for c in COLORS), text
            elif meaning.kind == "shape":
                assert not any(s in text for s in SHAPES), text
            else:
                assert meaning.value in text, text
                others = [v for v in (*SHAPES, *COLORS) if v != meaning.value]
                assert not any(re.search(rf"\b{v}\b", text) for v in others), text


def all_fillings(templates: list[str], q: Question) -> set[str]:
    """Every text a list of templates can give for `q`, over all synonyms."""
    out = set()
    for template, c, p, noun, stance in itertools.product(templates, questions.COLOR_NOUNS, questions.PICTURE_NOUNS,
                                                          questions.THING_NOUNS, questions.STANCES):
        class Fixed:  # a rng whose choices are fixed, for one synonym each
            def choice(self, options):
                return {questions.COLOR_NOUNS: c, questions.PICTURE_NOUNS: p, questions.THING_NOUNS: noun,
                        questions.STANCES: stance}[tuple(options)]
        out.add(fill(template, q, Fixed()))
    return out


@pytest.mark.parametrize("q", [Question("color"), Question("color", mention="circle"), Question("shape"),
                               Question("shape", mention="red"), Question("has_color", "red"),
                               Question("has_shape", "circle"), Question("has_color", "red", negated=True),
                               Question("has_shape", "circle", negated=True)])
def test_held_out_phrasings_are_never_said_in_training(q):
    train = all_fillings(questions.templates(q, "train"), q)
    held_out = all_fillings(questions.templates(q, "held_out"), q)
    assert len(held_out) >= 8 and len(train) >= 20
    assert not train & held_out
    assert not set(OPENINGS["train"]) & set(OPENINGS["held_out"])
    rng = random.Random(1)  # and say(..., "train") only ever draws training templates
    for _ in range(300):
        text = say(q, rng, "train").lower()
        assert not any(h.lower().rstrip("?.") in text for h in held_out), text


# The words that only held-out phrasings say. A training phrasing, stance, opening, closing or filler
# that says one of them leaks it (the stance "as far as you can tell," once said "as": docs/tiny-recipe.md,
# "No held-out words").
HELD_OUT_ONLY = {"anywhere", "appears", "as", "been", "call", "depicted", "drawn", "excuse", "find", "got", "has",
                 "include", "lot", "painted", "seen", "so", "sort", "thing", "we", "wonder", "would"}
# A held-out template one synonym away from a training one, found after the preset's runs and disclosed
# in docs/tiny-recipe.md; the next recipe drops the training one. No other pair may appear.
KNOWN_TWINS = {("is the thing in the {p} {t}?", "is the shape in the {p} {t}?")}


def words(text: str) -> list[str]:
    return re.findall(r"\{\w+\}|[a-z]+", text.lower())


def test_held_out_phrasings_are_new_in_word_order_and_in_words():
    """A held-out template may not be a training template's words in another order ("is the {o} in the
    {p} {x}?" against "is the {o} {x} in the {p}?"), a synonym counted as its slot ("thing", "shape" as
    {o}; "image" as {p}; "colour" as {c}), and no word of HELD_OUT_ONLY is ever said in training."""
    slot = {**{w: "{o}" for w in ("thing", *questions.THING_NOUNS)}, **{w: "{p}" for w in questions.PICTURE_NOUNS},
            **{w: "{c}" for w in questions.COLOR_NOUNS}}

    def bag(template):
        return sorted(slot.get(w, w) for w in words(template))
    trained = [t for group in TRAIN.values() for t in group]
    twins = {(h, t) for group in HELD_OUT.values() for h in group for t in trained if bag(h) == bag(t)}
    assert twins == KNOWN_TWINS
    said = trained + list(questions.STANCES) + OPENINGS["train"] + questions.CLOSINGS["train"]
    said_words = {w for text in said for w in words(text)} | set(questions.filler_words())
    assert not HELD_OUT_ONLY & said_words
    held_out = [t for group in HELD_OUT.values() for t in group] + OPENINGS["held_out"] + questions.CLOSINGS["held_out"]
    held_out_words = {w for text in held_out for w in words(text) if not w.startswith("{")}
    assert HELD_OUT_ONLY == held_out_words - said_words


def test_phrasings_cover_the_kinds_the_issue_names():
    assert {"color", "shape", "has", "has_color", "has_shape", "not", "not_color", "not_shape"} == set(TRAIN) == set(HELD_OUT)
    joined = " ".join(t for group in TRAIN.values() for t in group)
    for words in ("{c}", "{p}", "{o}", "can you", "tell me", "do you see"):
        assert words in joined


def test_surface_forms_letter_case_contractions_punctuation_openings():
    rng = random.Random(0)
    q = read_question("is there not a red shape in the image?", "yes")
    texts = [say(q, rng) for _ in range(2000)]
    assert any(t.isupper() for t in texts) and any(t[:1].isupper() and not t.isupper() for t in texts)
    assert any(t == t.lower() for t in texts)
    assert any("isn't there" in t.lower() for t in texts) and any("is there not" in t.lower() for t in texts)
    assert any(not t.endswith(("?", ".")) for t in texts) and any(t.endswith("?") for t in texts)
    assert any(t.lower().startswith(tuple(OPENINGS["train"])) for t in texts)
    assert [say(q, random.Random(5)) for _ in range(3)] == [say(q, random.Random(5)) for _ in range(3)]


def test_reword_keeps_the_own_words_when_asked_to():
    rng = random.Random(0)
    kept = [reword("what color is the shape?", "red", rng, keep=1.0) for _ in range(50)]
    assert set(kept) == {"what color is the shape?", "What color is the shape?"}


def test_filler_words_ask_nothing():
    words = questions.filler_words()
    assert len(words) == 2000 and not set(words) & questions.MEANINGFUL and all(len(w) >= 3 for w in words)
    assert not set(words) & questions.held_out_words() and {"would", "painted", "drawn"} <= questions.held_out_words()
    rng = random.Random(0)
    texts = [questions.insert_filler("is there a red shape?", rng, p=1.0) for _ in range(100)]
    assert all(len(t.split()) in (6, 7, 8) for t in texts) and len(set(texts)) > 50


def test_reworded_samples_keep_answers_and_images_and_some_own_words():
    balanced = easyvqa.easy_vqa_qa_balanced("train", limit=2000)
    out = easyvqa.reworded(balanced, seed=0)
    assert [(s["messages"][1], s["images"]) for s in out] == [(s["messages"][1], s["images"]) for s in balanced]
    own = {s["messages"][0]["content"][-1]["text"].lower() for s in balanced}
    share = sum(s["messages"][0]["content"][-1]["text"].lower() in own for s in out) / len(out)
    assert 0.2 < share < 0.45  # KEEP_OWN_WORDS (0.3), give or take a filler word and a coincidence
    assert out == easyvqa.reworded(balanced, seed=0) != easyvqa.reworded(balanced, seed=1)
