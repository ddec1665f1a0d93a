"""Tests for easyvqa.py: the easy-VQA sources against the package's own questions and pixels, the
balanced questions, the curricula, and the tiny tokenizer's text. No network."""

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import data
import easyvqa
import presets
import sources

easy_vqa = pytest.importorskip("easy_vqa", reason="the easy-VQA sources need `pip install easy-vqa`")

SHAPES, COLORS = ("circle", "rectangle", "triangle"), {
    "black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}


# ---------------------------------------------------------------------------
# easy-VQA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split, images, questions", [("train", 4000, 38575), ("test", 1000, 9673)])
def test_easy_vqa_official_split_sizes(split, images, questions):
    assert len(easyvqa.easy_vqa_captions(split)) == images
    assert len(easyvqa.easy_vqa_qa(split)) == questions
    assert len(easyvqa.easy_vqa_preferences(split)) == questions
    assert len(easyvqa.easy_vqa_text(split)) == images
    assert len(easyvqa.easy_vqa_qa(split, limit=7)) == 7 and len(easyvqa.easy_vqa_captions(split, limit=3)) == 3
    with pytest.raises(ValueError, match="'train' and 'test'"):
        easyvqa.easy_vqa_qa("validation")


def answer_from(question: str, shape: str, color: str) -> str:
    """How easy-VQA answers a question about an image of a `color` `shape` (the test's own reading)."""
    words = re.findall(r"[a-z]+", question)
    if words[0] == "what":
        return color if "color" in words else shape
    named = next(w for w in words if w in SHAPES or w in COLORS)
    present = named in (shape, color)
    return "yes" if present != ("not" in words or "no" in words) else "no"


@pytest.mark.parametrize("split", ["train", "test"])
def test_easy_vqa_captions_match_each_images_shape_and_color(split):
    questions, answers, image_ids, paths = (
        (*easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()) if split == "train"
        else (*easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()))
    captions = {}
    for sample in easyvqa.easy_vqa_captions(split):
        [path] = sample["images"]
        match = re.fullmatch(r"A (\w+) (\w+)\.", sample["messages"][1]["content"])
        assert match and match[1] in COLORS and match[2] in SHAPES
        captions[path] = (match[2], match[1])
    assert set(captions) == set(paths.values())
    # Every official question, answered from the caption alone, gets the official answer.
    for question, answer, image_id in zip(questions, answers, image_ids):
        assert answer_from(question, *captions[paths[image_id]]) == answer, (question, image_id)
    # And the caption's colour is the shape colour the pixels show most.
    for image_id in list(paths)[::25]:
        pixels = np.asarray(Image.open(paths[image_id]).convert("RGB")).reshape(-1, 3)
        counts = {name: int((pixels == rgb).all(1).sum()) for name, rgb in COLORS.items()}
        assert max(counts, key=counts.get) == captions[paths[image_id]][1]


def test_easy_vqa_qa_samples():
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    samples = easyvqa.easy_vqa_qa("test")
    for sample, q, a, i in zip(samples, questions, answers, image_ids):
        user, assistant = sample["messages"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert user["content"][1]["text"].lower() == q and assistant == {"role": "assistant", "content": a}
        assert sample["images"] == [paths[i]]


def test_easy_vqa_qa_balanced_says_yes_and_no_equally_often_and_truly():
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    truth = {s["images"][0]: re.fullmatch(r"A (\w+) (\w+)\.", s["messages"][1]["content"]).groups()
             for s in easyvqa.easy_vqa_captions("train")}  # path -> (color, shape)
    samples = easyvqa.easy_vqa_qa_balanced("train")
    assert len(samples) == len(questions)
    yes = {}  # wording -> [yes count, questions]
    for sample, q, a, i in zip(samples, questions, answers, image_ids):
        assert sample["images"] == [paths[i]]
        question, answer = sample["messages"][0]["content"][1]["text"].lower(), sample["messages"][1]["content"]
        color, shape = truth[paths[i]]
        assert answer_from(question, shape, color) == answer, (question, answer, paths[i])
        if a in ("yes", "no"):
            wording = re.sub(rf"\b({'|'.join((*SHAPES, *COLORS))})\b", "X", question)
            counts = yes.setdefault(wording, [0, 0])
            counts[0] += answer == "yes"
            counts[1] += 1
        else:
            assert (question, answer) == (q, a)  # shape and colour questions stay as they are
    # easy-VQA's own wordings lean 64-88% to one answer; here each is near half yes.
    assert len(yes) == 16 and all(0.45 < n_yes / n < 0.55 for n_yes, n in yes.values()), yes
    assert easyvqa.easy_vqa_qa_balanced("train", limit=300) == samples[:300]  # the same seed, the same draw
    assert data.load_source("easy-vqa-qa-balanced", "test", limit=3) == easyvqa.easy_vqa_qa_balanced("test", limit=3)


def key(sample):
    """A sample as (answer, images): the curricula reword each question (tests/test_questions.py checks the words)."""
    return sample["messages"][1]["content"], tuple(sample["images"])


def test_easy_vqa_curriculum_starts_without_negated_questions_then_gives_all_and_says_it_in_words():
    balanced = easyvqa.easy_vqa_qa_balanced("train")
    plain = [s for s in balanced if not easyvqa.is_negated(s["messages"][0]["content"][-1]["text"])]
    samples = easyvqa.easy_vqa_curriculum("train")
    assert len(plain) > easyvqa.PLAIN_FIRST
    first, then = samples[:easyvqa.PLAIN_FIRST], samples[easyvqa.PLAIN_FIRST:]
    negated = [s for s in balanced if easyvqa.is_negated(s["messages"][0]["content"][-1]["text"])]
    assert len(negated) > 10_000 and all(s["messages"][1]["content"] in ("yes", "no") for s in negated)
    assert not Counter(map(key, first)) - Counter(map(key, plain))  # questions without negation...
    assert not any(re.search(r"\b(not|no)\b|n't", s["messages"][0]["content"][-1]["text"].lower()) for s in first)
    assert sorted(map(key, then)) == sorted(map(key, balanced))  # ...then all of them
    assert [key(s) for s in then] != [key(s) for s in balanced]  # shuffled
    in_words = easyvqa.easy_vqa_text_curriculum("train", limit=500)
    captions = {s["images"][0]: s["messages"][1]["content"] for s in easyvqa.easy_vqa_captions("train")}
    for picture, words in zip(samples, in_words):  # the same questions, the image given as its caption
        assert words["images"] == [] and words["messages"][1] == picture["messages"][1]
        text = f"{captions[picture['images'][0]]} {picture['messages'][0]['content'][-1]['text']}"
        assert words["messages"][0]["content"] == [{"type": "text", "text": text}]


def test_easy_vqa_open_first_gives_the_shape_questions_then_colour_and_shape_twice_then_all_twice():
    balanced = easyvqa.easy_vqa_qa_balanced("train")
    shapes = [s for s in balanced if s["messages"][1]["content"] in SHAPES]
    opens = [s for s in balanced if s["messages"][1]["content"] not in ("yes", "no")]
    assert {s["messages"][1]["content"] for s in opens} == set(SHAPES) | set(COLORS)
    samples = easyvqa.easy_vqa_open_first("train")
    assert len(samples) == len(shapes) + 2 * len(opens) + 2 * len(balanced)
    first, samples = samples[:len(shapes)], samples[len(shapes):]
    assert sorted(map(key, first)) == sorted(map(key, shapes))  # the shape questions...
    second, rest = samples[:2 * len(opens)], samples[2 * len(opens):]
    assert sorted(map(key, second)) == sorted(map(key, opens * 2))  # ...the colour and shape questions, twice...
    once, twice = rest[:len(balanced)], rest[len(balanced):]
    assert sorted(map(key, once)) == sorted(map(key, twice)) == sorted(map(key, balanced))  # ...then all, twice
    assert [key(s) for s in once] != [key(s) for s in twice]  # each pass in its own order
    assert data.load_source("easy-vqa-open-first", limit=5) == easyvqa.easy_vqa_open_first("train")[:5]


def test_easy_vqa_words_first_gives_questions_in_words_then_colour_and_shape_then_all_with_images():
    balanced = easyvqa.easy_vqa_qa_balanced("train")
    captions = {s["images"][0]: s["messages"][1]["content"] for s in easyvqa.easy_vqa_captions("train")}
    told = {(s["messages"][1]["content"], captions[s["images"][0]]) for s in balanced}
    samples = easyvqa.easy_vqa_words_first("train", words=300, open_ended=200)
    assert len(samples) == 300 + 200 + len(balanced)
    words, opens, rest = samples[:300], samples[300:500], samples[500:]
    assert all(s["images"] == [] for s in words)  # in words, no image: the caption, then the question
    assert {(s["messages"][1]["content"], s["messages"][0]["content"][-1]["text"].split(". ")[0] + ".")
            for s in words} <= told
    assert all(len(s["images"]) == 1 and s["messages"][1]["content"] in (*SHAPES, *COLORS) for s in opens)
    assert sorted(map(key, rest)) == sorted(map(key, balanced))  # then every balanced question...
    assert [key(s) for s in rest] != [key(s) for s in balanced]  # ...shuffled
    assert data.load_source("easy-vqa-words-first", limit=5) == easyvqa.easy_vqa_words_first("train")[:5]
    assert len(easyvqa.easy_vqa_words_first("train")) == 4800 + 1600 + len(balanced)


def test_the_tiny_tokenizer_makes_every_answer_one_token_and_unseen_words_pieces_not_bytes():
    """The tiny preset's tokenizer (lower-cased, learned from easy_vqa_wide_text): a reply's first word is
    one token (learned from "rectangle" after a space only, a reply once began "re"+"ct"+..., sharing "re"
    with "red"), and words no training phrasing uses split into pieces of several letters."""
    texts = easyvqa.easy_vqa_wide_text("train")
    assert any("text" in s for s in texts) and any("messages" in s for s in texts)
    tok = data.train_tokenizer(texts, presets.PRESETS["tiny"]["tokenizer_vocab"], True)
    for answer in ("yes", "no", *SHAPES, *COLORS):
        assert len(tok.encode(answer)) == 1, answer
    for word in (" depicted", " anywhere", " painted", " appears", " include"):  # held-out words only
        assert len(tok.encode(word)) <= len(word) // 2, [tok.decode([i]) for i in tok.encode(word)]


def test_easy_vqa_preferences_reject_a_wrong_answer_of_the_same_kind():
    samples = easyvqa.easy_vqa_preferences("train")
    _, answers, _ = easy_vqa.get_train_questions()
    kinds = [set(SHAPES), set(COLORS), {"yes", "no"}]
    for sample, answer in zip(samples, answers):
        assert sample["chosen"] == answer != sample["rejected"]
        assert any(sample["chosen"] in kind and sample["rejected"] in kind for kind in kinds)
        assert sources.count_image_parts(sample["prompt"]) == len(sample["images"]) == 1
    assert [s["rejected"] for s in easyvqa.easy_vqa_preferences("train", limit=500)] == \
        [s["rejected"] for s in samples[:500]]  # the same seed, the same pairs
    assert [s["rejected"] for s in easyvqa.easy_vqa_preferences("train", limit=500, seed=1)] != \
        [s["rejected"] for s in samples[:500]]


def test_easy_vqa_preferences_balanced_pair_the_balanced_answers_with_a_wrong_one():
    balanced = easyvqa.easy_vqa_qa_balanced("test")
    samples = easyvqa.easy_vqa_preferences_balanced("test")
    assert len(samples) == len(balanced)
    for sample, question in zip(samples, easyvqa.reworded(balanced)):  # in training phrasings
        assert sample["prompt"] == question["messages"][:1] and sample["images"] == question["images"]
        assert sample["chosen"] == question["messages"][1]["content"] != sample["rejected"]
        assert any(sample["chosen"] in kind and sample["rejected"] in kind
                   for kind in (set(SHAPES), set(COLORS), {"yes", "no"}))  # a wrong answer of the same kind
    yes_no = [s["chosen"] for s in samples if s["chosen"] in ("yes", "no")]
    assert abs(yes_no.count("yes") / len(yes_no) - 0.5) < 0.02  # the wording no longer tells
    assert data.load_source("easy-vqa-preferences-balanced", "test", limit=3) == samples[:3]


def test_easy_vqa_text_documents():
    questions, answers, image_ids = easy_vqa.get_test_questions()
    docs = easyvqa.easy_vqa_text("test")
    lines = docs[0]["text"].split("\n")
    assert re.fullmatch(r"A \w+ \w+\.", lines[0])
    first_image = [(q, a) for q, a, i in zip(questions, answers, image_ids) if i == 0]
    assert lines[1:] == [f"Q: {q[0].upper() + q[1:]} A: {a}" for q, a in first_image]
    assert sum(len(d["text"].split("\n")) - 1 for d in docs) == len(questions)
