"""Tests for data.py and the adapters it reads through (sources.py): the easy-VQA sources against the
package's own questions and pixels, local files (and their errors), the hub sources through a fake
`datasets.load_dataset`, and collation with SmolLM2's tokenizer and a SigLIP image processor; also
cli.py's checks of training samples (unreadable images, sample text). No network."""

import json
import re
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import sources
from processing import IGNORE_INDEX, ImageProcessor, Special, build_prompt
from sources import DataError

easy_vqa = pytest.importorskip("easy_vqa", reason="the easy-VQA sources need `pip install easy-vqa`")

SHAPES, COLORS = ("circle", "rectangle", "triangle"), {
    "black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
    "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}


# ---------------------------------------------------------------------------
# easy-VQA
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("split, images, questions", [("train", 4000, 38575), ("test", 1000, 9673)])
def test_easy_vqa_official_split_sizes(split, images, questions):
    assert len(sources.easy_vqa_captions(split)) == images
    assert len(sources.easy_vqa_qa(split)) == questions
    assert len(sources.easy_vqa_preferences(split)) == questions
    assert len(sources.easy_vqa_text(split)) == images
    assert len(sources.easy_vqa_qa(split, limit=7)) == 7 and len(sources.easy_vqa_captions(split, limit=3)) == 3
    with pytest.raises(ValueError, match="'train' and 'test'"):
        sources.easy_vqa_qa("validation")


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
    for sample in sources.easy_vqa_captions(split):
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
    samples = sources.easy_vqa_qa("test")
    for sample, q, a, i in zip(samples, questions, answers, image_ids):
        user, assistant = sample["messages"]
        assert user["role"] == "user" and user["content"][0] == {"type": "image"}
        assert user["content"][1]["text"].lower() == q and assistant == {"role": "assistant", "content": a}
        assert sample["images"] == [paths[i]]


def test_easy_vqa_qa_balanced_says_yes_and_no_equally_often_and_truly():
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    truth = {s["images"][0]: re.fullmatch(r"A (\w+) (\w+)\.", s["messages"][1]["content"]).groups()
             for s in sources.easy_vqa_captions("train")}  # path -> (color, shape)
    samples = data.easy_vqa_qa_balanced("train")
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
    assert data.easy_vqa_qa_balanced("train", limit=300) == samples[:300]  # the same seed, the same draw
    assert data.load_source("easy-vqa-qa-balanced", "test", limit=3) == data.easy_vqa_qa_balanced("test", limit=3)


def key(sample):
    """A sample as (answer, images): the curricula reword each question (tests/test_questions.py checks the words)."""
    return sample["messages"][1]["content"], tuple(sample["images"])


def test_easy_vqa_curriculum_holds_back_the_negated_questions_then_gives_all_and_says_it_in_words():
    balanced = data.easy_vqa_qa_balanced("train")
    plain = [s for s in balanced if not sources.is_negated(s["messages"][0]["content"][-1]["text"])]
    samples = data.easy_vqa_curriculum("train")
    first, then = samples[:len(plain)], samples[len(plain):]
    negated = [s for s in balanced if sources.is_negated(s["messages"][0]["content"][-1]["text"])]
    assert len(negated) > 10_000 and all(s["messages"][1]["content"] in ("yes", "no") for s in negated)
    assert sorted(map(key, first)) == sorted(map(key, plain))  # every question but the negated ones...
    assert sorted(map(key, then)) == sorted(map(key, balanced))  # ...then all of them
    assert [key(s) for s in then] != [key(s) for s in balanced]  # shuffled
    in_words = data.easy_vqa_text_curriculum("train", limit=500)
    captions = {s["images"][0]: s["messages"][1]["content"] for s in sources.easy_vqa_captions("train")}
    for picture, words in zip(samples, in_words):  # the same questions, the image given as its caption
        assert words["images"] == [] and words["messages"][1] == picture["messages"][1]
        text = f"{captions[picture['images'][0]]} {picture['messages'][0]['content'][-1]['text']}"
        assert words["messages"][0]["content"] == [{"type": "text", "text": text}]


def test_easy_vqa_open_first_gives_the_shape_questions_then_colour_and_shape_twice_then_all_twice():
    balanced = data.easy_vqa_qa_balanced("train")
    shapes = [s for s in balanced if s["messages"][1]["content"] in SHAPES]
    opens = [s for s in balanced if s["messages"][1]["content"] not in ("yes", "no")]
    assert {s["messages"][1]["content"] for s in opens} == set(SHAPES) | set(COLORS)
    samples = data.easy_vqa_open_first("train")
    assert len(samples) == len(shapes) + 2 * len(opens) + 2 * len(balanced)
    first, samples = samples[:len(shapes)], samples[len(shapes):]
    assert sorted(map(key, first)) == sorted(map(key, shapes))  # the shape questions...
    second, rest = samples[:2 * len(opens)], samples[2 * len(opens):]
    assert sorted(map(key, second)) == sorted(map(key, opens * 2))  # ...the colour and shape questions, twice...
    once, twice = rest[:len(balanced)], rest[len(balanced):]
    assert sorted(map(key, once)) == sorted(map(key, twice)) == sorted(map(key, balanced))  # ...then all, twice
    assert [key(s) for s in once] != [key(s) for s in twice]  # each pass in its own order
    assert data.load_source("easy-vqa-open-first", limit=5) == data.easy_vqa_open_first("train")[:5]


def test_easy_vqa_words_first_gives_questions_in_words_then_colour_and_shape_then_all_with_images():
    balanced = data.easy_vqa_qa_balanced("train")
    captions = {s["images"][0]: s["messages"][1]["content"] for s in sources.easy_vqa_captions("train")}
    told = {(s["messages"][1]["content"], captions[s["images"][0]]) for s in balanced}
    samples = data.easy_vqa_words_first("train", words=300, open_ended=200)
    assert len(samples) == 300 + 200 + len(balanced)
    words, opens, rest = samples[:300], samples[300:500], samples[500:]
    assert all(s["images"] == [] for s in words)  # in words, no image: the caption, then the question
    assert {(s["messages"][1]["content"], s["messages"][0]["content"][-1]["text"].split(". ")[0] + ".")
            for s in words} <= told
    assert all(len(s["images"]) == 1 and s["messages"][1]["content"] in (*SHAPES, *COLORS) for s in opens)
    assert sorted(map(key, rest)) == sorted(map(key, balanced))  # then every balanced question...
    assert [key(s) for s in rest] != [key(s) for s in balanced]  # ...shuffled
    assert data.load_source("easy-vqa-words-first", limit=5) == data.easy_vqa_words_first("train")[:5]
    assert len(data.easy_vqa_words_first("train")) == 4800 + 1600 + len(balanced)


def test_the_tiny_tokenizer_makes_every_answer_one_token_and_unseen_words_pieces_not_bytes():
    """The tiny preset's tokenizer (lower-cased, learned from easy_vqa_wide_text): a reply's first word is
    one token (learned from "rectangle" after a space only, a reply once began "re"+"ct"+..., sharing "re"
    with "red"), and words no training phrasing uses split into pieces of several letters."""
    import train

    texts = data.easy_vqa_wide_text("train")
    assert any("text" in s for s in texts) and any("messages" in s for s in texts)
    tok = cli.train_tokenizer((cli.sample_text(s) for s in texts), train.PRESETS["tiny"]["tokenizer_vocab"], True)
    for answer in ("yes", "no", *SHAPES, *COLORS):
        assert len(tok.encode(answer)) == 1, answer
    for word in (" depicted", " anywhere", " painted", " appears", " include"):  # held-out words only
        assert len(tok.encode(word)) <= len(word) // 2, [tok.decode([i]) for i in tok.encode(word)]


def test_easy_vqa_preferences_reject_a_wrong_answer_of_the_same_kind():
    samples = sources.easy_vqa_preferences("train")
    _, answers, _ = easy_vqa.get_train_questions()
    kinds = [set(SHAPES), set(COLORS), {"yes", "no"}]
    for sample, answer in zip(samples, answers):
        assert sample["chosen"] == answer != sample["rejected"]
        assert any(sample["chosen"] in kind and sample["rejected"] in kind for kind in kinds)
        assert sources.count_image_parts(sample["prompt"]) == len(sample["images"]) == 1
    assert [s["rejected"] for s in sources.easy_vqa_preferences("train", limit=500)] == \
        [s["rejected"] for s in samples[:500]]  # the same seed, the same pairs
    assert [s["rejected"] for s in sources.easy_vqa_preferences("train", limit=500, seed=1)] != \
        [s["rejected"] for s in samples[:500]]


def test_easy_vqa_preferences_balanced_pair_the_balanced_answers_with_a_wrong_one():
    balanced = data.easy_vqa_qa_balanced("test")
    samples = data.easy_vqa_preferences_balanced("test")
    assert len(samples) == len(balanced)
    for sample, question in zip(samples, data.reworded(balanced)):  # in training phrasings
        assert sample["prompt"] == question["messages"][:1] and sample["images"] == question["images"]
        assert sample["chosen"] == question["messages"][1]["content"] != sample["rejected"]
        assert any(sample["chosen"] in kind and sample["rejected"] in kind
                   for kind in (set(SHAPES), set(COLORS), {"yes", "no"}))  # a wrong answer of the same kind
    yes_no = [s["chosen"] for s in samples if s["chosen"] in ("yes", "no")]
    assert abs(yes_no.count("yes") / len(yes_no) - 0.5) < 0.02  # the wording no longer tells
    assert data.load_source("easy-vqa-preferences-balanced", "test", limit=3) == samples[:3]


def test_easy_vqa_text_documents():
    questions, answers, image_ids = easy_vqa.get_test_questions()
    docs = sources.easy_vqa_text("test")
    lines = docs[0]["text"].split("\n")
    assert re.fullmatch(r"A \w+ \w+\.", lines[0])
    first_image = [(q, a) for q, a, i in zip(questions, answers, image_ids) if i == 0]
    assert lines[1:] == [f"Q: {q[0].upper() + q[1:]} A: {a}" for q, a in first_image]
    assert sum(len(d["text"].split("\n")) - 1 for d in docs) == len(questions)


# ---------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------


def write_image(path, color=(255, 0, 0), size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def test_llava_json(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    entries = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                             {"from": "gpt", "value": "A red square."},
                                             {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "Look: <image>\nand say"},
                                             {"from": "gpt", "value": "ok"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "No marker here."},
                                             {"from": "gpt", "value": "fine"}]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    samples = sources.llava_json(str(path))
    first, second, third, fourth = samples
    assert first["images"] == [str(tmp_path / "a.png")]
    assert first["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    assert second["messages"][0]["content"] == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                                {"type": "text", "text": "and say"}]
    assert third["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "No marker here."}]
    assert fourth == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}], "images": []}
    assert len(sources.llava_json(str(path), limit=2)) == 2
    # The same entries as JSONL, images in another folder.
    (tmp_path / "img").mkdir()
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png")
    jsonl = write_jsonl(tmp_path / "llava.jsonl", entries)
    in_img = sources.llava_json(jsonl, image_folder=str(tmp_path / "img"))
    assert in_img[1]["images"] == [str(tmp_path / "img" / "b.png")]


@pytest.mark.parametrize("content, error, message", [
    ("[{]", DataError, r"bad\.json:1: not valid JSON"),
    ('{"image": "a.png"}', DataError, "expected a JSON list"),
    ('[{"image": "missing.png", "conversations": [{"from": "human", "value": "<image>"}]}]',
     FileNotFoundError, r"bad\.json: entry 0: image 'missing.png' not found"),
    ('[{"conversations": []}, {"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>x"}]}]',
     DataError, "entry 0: 'conversations' must be a non-empty list"),
    ('[{"image": "a.png", "conversations": [{"from": "human", "value": "<image><image>x"}]}]',
     DataError, r"entry 0: 2 <image> marker\(s\) in the conversation but 1 image"),
    ('[{"conversations": [{"from": "robot", "value": "x"}]}]', DataError, "entry 0: unknown speaker 'robot'"),
    ('[{"conversations": [{"from": "human"}]}]', DataError, "entry 0: each turn needs a string 'value'"),
])
def test_llava_json_errors(tmp_path, content, error, message):
    write_image(tmp_path / "a.png")
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(error, match=message) as info:
        sources.llava_json(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.json: no such file"):
        sources.llava_json(str(tmp_path / "nope.json"))


def test_caption_folder(tmp_path):
    write_image(tmp_path / "cat.png")
    write_image(tmp_path / "dog.jpg", (0, 0, 255))
    write_jsonl(tmp_path / "captions.jsonl", [{"image": "cat.png", "caption": "A cat."}, "",
                                              {"image": "dog.jpg", "caption": ["A dog.", "A blue dog."]}])
    samples = sources.caption_folder(str(tmp_path))
    assert [s["messages"][1]["content"] for s in samples] == ["A cat.", "A dog.", "A blue dog."]
    assert samples[0] == sources.chat_sample([str(tmp_path / "cat.png")], sources.CAPTION_PROMPT, "A cat.")
    prompted = sources.caption_folder(str(tmp_path), prompt="Caption:")
    assert prompted[2]["messages"][0]["content"][1]["text"] == "Caption:"


@pytest.mark.parametrize("lines, error, message", [
    ([{"image": "cat.png", "caption": "ok"}, "{not json"], DataError, r"captions\.jsonl:2: not valid JSON"),
    ([{"image": "cat.png"}], DataError, r"captions\.jsonl:1: 'caption' must be a string"),
    ([{"caption": "x"}], DataError, r"captions\.jsonl:1: needs one 'image'"),
    ([{"image": "cat.png", "caption": "x"}, "", {"image": "gone.png", "caption": "y"}],
     FileNotFoundError, r"captions\.jsonl:3: image 'gone.png' not found"),
    (["[1, 2]"], DataError, r"captions\.jsonl:1: expected a JSON object"),
])
def test_caption_folder_errors(tmp_path, lines, error, message):
    write_image(tmp_path / "cat.png")
    write_jsonl(tmp_path / "captions.jsonl", lines)
    with pytest.raises(error, match=message):
        sources.caption_folder(str(tmp_path))


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/hostname", "sub/../../outside.png"])
def test_image_paths_may_not_leave_the_data_folder(tmp_path, name):
    folder = tmp_path / "data"
    folder.mkdir()
    write_image(tmp_path / "outside.png")
    write_jsonl(folder / "captions.jsonl", [{"image": "cat.png", "caption": "x"}, {"image": name, "caption": "y"}])
    write_image(folder / "cat.png")
    with pytest.raises(DataError, match=r"captions\.jsonl:2: image .* lies outside"):
        sources.caption_folder(str(folder))
    (folder / "chat.json").write_text(json.dumps([{"image": name, "conversations": [
        {"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}]}]))
    with pytest.raises(DataError, match=r"chat\.json.*lies outside"):
        sources.llava_json(str(folder / "chat.json"))


def test_unreadable_images_are_all_named_each_file_opened_once(tmp_path):
    good = write_image(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes(open(good, "rb").read()[:40])
    (tmp_path / "text.png").write_text("not an image")
    samples = [sources.chat_sample([good], "q", "a"), sources.chat_sample([str(tmp_path / "truncated.png")], "q", "a"),
               sources.chat_sample([], "q", "a"), sources.chat_sample([good, str(tmp_path / "text.png")], "q", "a"),
               sources.chat_sample([str(tmp_path / "truncated.png")], "q", "a")]
    bad = cli.unreadable_images(samples)
    assert [i for i, _ in bad] == [1, 3, 4]
    assert "truncated.png" in bad[0][1] and "text.png" in bad[1][1]


def test_caption_folder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions.jsonl: missing"):
        sources.caption_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        sources.caption_folder(str(tmp_path / "nowhere"))


def test_text_files_and_preference_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\n\n  \nSecond one.\n")
    (tmp_path / "b.txt").write_text("Third.")
    assert sources.text_files([tmp_path / "a.txt", str(tmp_path / "b.txt")]) == [
        {"text": "First paragraph\nstill first."}, {"text": "Second one."}, {"text": "Third."}]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match=r"bad\.txt: not UTF-8"):
        sources.text_files(str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError, match=r"none\.txt: no such file"):
        sources.text_files(str(tmp_path / "none.txt"))

    write_image(tmp_path / "x.png")
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"image": "x.png", "prompt": "What color?", "chosen": "red", "rejected": "blue"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    with_image, text_only = sources.preference_jsonl(path)
    assert with_image == {"prompt": [sources.user_turn("What color?")], "images": [str(tmp_path / "x.png")],
                          "chosen": "red", "rejected": "blue"}
    assert text_only["prompt"] == [{"role": "user", "content": "2+2?"}] and text_only["images"] == []
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'rejected' is missing"):
        sources.preference_jsonl(bad)


def test_load_source_names_and_paths(tmp_path):
    assert len(data.load_source("easy-vqa-qa", "test", limit=5)) == 5
    assert data.load_source("easy-vqa-captions", "test", limit=2) == sources.easy_vqa_captions("test", limit=2)
    assert set(data.SOURCES) >= {"easy-vqa-captions", "easy-vqa-qa", "easy-vqa-preferences", "easy-vqa-text",
                                 "coco-captions", "flickr30k", "llava-instruct", "the-cauldron", "cosmopedia",
                                 "rlaif-v"}
    write_image(tmp_path / "cat.png")
    write_jsonl(tmp_path / "captions.jsonl", [{"image": "cat.png", "caption": "A cat."}])
    assert data.load_source(str(tmp_path))[0]["messages"][1]["content"] == "A cat."
    (tmp_path / "split").mkdir()
    write_image(tmp_path / "split" / "cat.png")
    (tmp_path / "split" / "test").mkdir()
    write_image(tmp_path / "split" / "test" / "cat.png")
    write_jsonl(tmp_path / "split" / "test" / "captions.jsonl", [{"image": "cat.png", "caption": "Test cat."}])
    assert data.load_source(str(tmp_path / "split"), "test")[0]["messages"][1]["content"] == "Test cat."
    (tmp_path / "llava.json").write_text(json.dumps([{"image": "cat.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}]))
    assert data.load_source(str(tmp_path / "llava.json"))[0]["images"] == [str(tmp_path / "cat.png")]
    write_jsonl(tmp_path / "prefs.jsonl",
                [{"image": "cat.png", "prompt": "Animal?", "chosen": "cat", "rejected": "dog"}])
    assert data.sample_kind(data.load_source(str(tmp_path / "prefs.jsonl"))[0]) == "preference"
    write_jsonl(tmp_path / "more.jsonl", [{"image": "cat.png", "caption": "Another cat."}])
    assert data.load_source(str(tmp_path / "more.jsonl"))[0]["messages"][1]["content"] == "Another cat."
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "one.txt").write_text("Hello.\n\nWorld.")
    assert data.load_source(str(texts)) == [{"text": "Hello."}, {"text": "World."}]
    assert data.load_source(str(texts / "one.txt"), limit=1) == [{"text": "Hello."}]
    with pytest.raises(FileNotFoundError, match="neither a source name"):
        data.load_source("no-such-source")
    with pytest.raises(ValueError, match="the-cauldron needs a subset"):
        data.load_source("the-cauldron")
    (tmp_path / "odd.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="cannot tell what the lines hold"):
        data.load_source(str(tmp_path / "odd.jsonl"))


def test_sample_text():
    [qa] = sources.easy_vqa_qa("test", limit=1)
    assert cli.sample_text(qa) == "What is the red shape?\ntriangle"
    assert cli.sample_text({"text": "hi"}) == "hi"
    [pair] = sources.easy_vqa_preferences("test", limit=1)
    assert cli.sample_text(pair) == f"What is the red shape?\n{pair['chosen']}\n{pair['rejected']}"


# ---------------------------------------------------------------------------
# Hub sources, through a fake datasets.load_dataset
# ---------------------------------------------------------------------------


class FakeHub:
    """A `datasets` module whose load_dataset streams rows from a dict, recording each call."""

    def __init__(self, rows: dict, error: Exception | None = None):
        self.rows, self.error, self.calls = rows, error, []
        self.module = types.ModuleType("datasets")
        self.module.load_dataset = self.load_dataset

    def load_dataset(self, path, name=None, split=None, streaming=False):
        self.calls.append((path, name, split, streaming))
        if self.error is not None:
            raise self.error
        if (path, name, split) not in self.rows:
            raise ValueError(f"Bad split: {split}. Available splits: ['train']")
        return iter(self.rows[(path, name, split)])


@pytest.fixture
def fake_hub(monkeypatch):
    def install(rows, error=None):
        hub = FakeHub(rows, error)
        monkeypatch.setitem(sys.modules, "datasets", hub.module)
        return hub
    return install


def image(color=(200, 30, 30)):
    return Image.new("RGB", (32, 24), color)


def test_hub_sources_with_a_fake_load_dataset(fake_hub):
    cat, dog = image(), image((0, 0, 255))
    hub = fake_hub({
        ("jxie/coco_captions", None, "validation"): [{"image": cat, "caption": "A cat.", "cocoid": 1},
                                                     {"image": cat, "caption": "A red cat.", "cocoid": 1}],
        (sources.FLICKR30K_REPO, None, "val"): [{"image": dog, "caption": ["A dog.", "Blue dog."], "split": "val"}],
        (sources.LLAVA_INSTRUCT_REPO, None, "train"): [{
            "messages": [
                {"role": "user", "content": [{"index": None, "text": "\nWhat is it?", "type": "text"},
                                             {"index": 0, "text": None, "type": "image"}]},
                {"role": "assistant", "content": [{"index": None, "text": "A cat.\n", "type": "text"}]}],
            "images": [cat]}],
        ("HuggingFaceM4/the_cauldron", "vqav2", "train"): [{
            "images": [cat, dog], "texts": [{"user": "Which is blue?", "assistant": "The second.", "source": "x"},
                                            {"user": "And red?", "assistant": "The first.", "source": "x"}]}],
        ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train"): [{"text": f"Document {i}."} for i in range(5)],
        ("HuggingFaceH4/rlaif-v_formatted", None, "test"): [{
            "images": [dog],
            "prompt": [{"role": "user", "content": [{"text": None, "type": "image"},
                                                    {"text": "What color is it?", "type": "text"}]}],
            "chosen": [{"role": "assistant", "content": [{"text": "Blue.", "type": "text"}]}],
            "rejected": [{"role": "assistant", "content": [{"text": "Red.", "type": "text"}]}]}],
    })
    coco = sources.coco_captions("validation")
    assert isinstance(coco, sources.Stream)
    assert list(coco) == [sources.chat_sample([cat], sources.CAPTION_PROMPT, "A cat."),
                          sources.chat_sample([cat], sources.CAPTION_PROMPT, "A red cat.")]
    assert len(list(coco)) == 2  # a Stream starts again each time it is iterated
    assert [s["messages"][1]["content"] for s in sources.flickr30k("validation")] == ["A dog.", "Blue dog."]
    assert len(list(sources.flickr30k("validation", limit=1))) == 1
    [llava] = sources.llava_instruct("train")
    assert llava == {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A cat."}], "images": [cat]}
    [cauldron] = data.load_source("the-cauldron:vqav2", "train")
    assert cauldron["images"] == [cat, dog]
    assert cauldron["messages"] == [
        sources.user_turn("Which is blue?", 2), {"role": "assistant", "content": "The second."},
        {"role": "user", "content": "And red?"}, {"role": "assistant", "content": "The first."}]
    assert list(sources.cosmopedia_text(limit=3)) == [{"text": f"Document {i}."} for i in range(3)]
    [pair] = sources.rlaif_v("test")
    assert pair == {"prompt": [sources.user_turn("What color is it?")], "images": [dog],
                    "chosen": "Blue.", "rejected": "Red."}
    assert all(streaming for *_, streaming in hub.calls)
    assert ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", True) in hub.calls
    with pytest.raises(DataError, match="could not stream jxie/coco_captions, split 'nope'.*Bad split"):
        list(sources.coco_captions("nope"))


def test_hub_sources_collate(fake_hub, tokenizer, processor):
    fake_hub({(sources.LLAVA_INSTRUCT_REPO, None, "train"): [{
        "messages": [{"role": "user", "content": [{"text": None, "type": "image"}, {"text": "Hi?", "type": "text"}]},
                     {"role": "assistant", "content": [{"text": "Hello.", "type": "text"}]}],
        "images": [image()]}]})
    batch = data.collate(list(sources.llava_instruct()), tokenizer, processor)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == "Hello."


def test_hub_unreachable_and_datasets_missing(fake_hub, monkeypatch):
    fake_hub({}, error=ConnectionError("Couldn't reach 'jxie/coco_captions' on the Hub (LocalEntryNotFoundError)"))
    with pytest.raises(ConnectionError, match="Cannot reach the Hugging Face hub to stream jxie/coco_captions") as info:
        next(iter(sources.coco_captions()))
    assert "\n" not in str(info.value) and str(info.value).count(". ") == 0  # one sentence
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    with pytest.raises(ImportError, match="pip install datasets"):
        list(sources.rlaif_v())


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": 64, "width": 64}}))
    return ImageProcessor.from_pretrained(str(folder))


N = 3  # placeholders per image in these tests


def image_tokens():
    return [Special("<image>")] * N


def assistant_runs(labels) -> list[list[int]]:
    """The runs of consecutive labelled positions, as lists of their ids."""
    runs, run = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    return runs


def test_collate_ids_labels_masks_and_pixels(tokenizer, processor, tmp_path):
    qa = sources.easy_vqa_qa("test", limit=2)
    two_images = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": "Both red."}, {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes."}],
        "images": [write_image(tmp_path / "blue.png", (0, 0, 255)), Image.new("RGB", (50, 70), (0, 255, 0))]}
    text = {"text": "Plain text to pretrain on."}
    samples = [qa[0], two_images, text, qa[1]]
    batch = data.collate(samples, tokenizer, processor, image_tokens=image_tokens, max_len=512)
    image_id, pad = tokenizer.token_to_id("<image>"), tokenizer.pad_id
    lengths = batch["attention_mask"].sum(1).tolist()
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, max(lengths))

    # Row by row: the unpadded ids are the prompt build_prompt makes; padding on the right.
    for i, sample in enumerate(samples):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        n = lengths[i]
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == pad).all() and (labels[n:] == IGNORE_INDEX).all()
        if "text" in sample:
            expected = tokenizer.encode(sample["text"]) + [tokenizer.eos_id]
            assert ids[:n].tolist() == labels[:n].tolist() == expected  # pretraining: every token a label
            continue
        expected = build_prompt(tokenizer, sample["messages"], add_generation_prompt=False,
                                image_tokens=[image_tokens()] * len(sample["images"]))
        assert ids[:n].tolist() == expected
        assert (ids == image_id).sum() == N * len(sample["images"])
        # Labels: exactly the assistant replies (and their <|im_end|>), right after "<|im_start|>assistant\n".
        replies = [m["content"] for m in sample["messages"] if m["role"] == "assistant"]
        runs = assistant_runs(labels)
        assert [tokenizer.decode(run) for run in runs] == replies
        assert all(tokenizer.decode(run, skip_special_tokens=False).endswith("<|im_end|>") for run in runs)
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        header = tokenizer.decode(ids[:first].tolist(), skip_special_tokens=False)
        assert header.endswith("<|im_start|>assistant\n")
        assert (labels[:n][labels[:n] != IGNORE_INDEX] == ids[:n][labels[:n] != IGNORE_INDEX]).all()

    # pixel_values: every image of the batch, in the order of their placeholders.
    in_order = qa[0]["images"] + two_images["images"] + qa[1]["images"]
    assert torch.equal(batch["pixel_values"], processor(in_order))
    assert batch["pixel_values"].shape == (4, 3, 64, 64)

    left = data.collate(samples, tokenizer, processor, image_tokens=image_tokens, pad_side="left")
    width = left["input_ids"].shape[1]
    for i, n in enumerate(lengths):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(left[key][i, width - n:], batch[key][i, :n])
        assert not left["attention_mask"][i, :width - n].any() and (left["input_ids"][i, :width - n] == pad).all()

    text_only = data.collate([text], tokenizer)
    assert text_only["pixel_values"] is None
    with pytest.raises(ValueError, match="no image_processor"):
        data.collate(qa, tokenizer)
    with pytest.raises(ValueError, match="1 image part"):
        data.collate([{**qa[0], "images": []}], tokenizer, processor)


def test_collate_default_and_image_dependent_tokens(tokenizer, processor):
    qa = sources.easy_vqa_qa("test", limit=1)
    batch = data.collate(qa, tokenizer, processor)  # one <image> per image by default
    assert (batch["input_ids"] == tokenizer.token_to_id("<image>")).sum() == 1
    sizes = []

    def per_image(im):  # a function of the image (SmolVLM's tiles depend on its size)
        sizes.append(im.size)
        return [Special("<image>")] * 2

    batch = data.collate(qa, tokenizer, processor, image_tokens=per_image)
    assert sizes == [(64, 64)] and (batch["input_ids"] == tokenizer.token_to_id("<image>")).sum() == 2


def test_collate_smolvlm_tiles(tokenizer):
    """Expansions that differ by image (SmolVLM's tiles) and an image processor returning (pixel_values, grids)."""
    import processing

    if not hasattr(processing, "smolvlm_image_tokens"):
        pytest.skip("processing.py has no SmolVLM image processing")
    tokenizer.add_special_tokens(processing.SMOLVLM_SPECIAL_TOKENS)
    smolvlm = processing.SmolVLMImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})

    def tiles(im):
        return processing.smolvlm_image_tokens(*smolvlm.tiles(im)[1], 2)

    wide, small = Image.new("RGB", (100, 40), (255, 0, 0)), Image.new("RGB", (30, 30))
    sample = sources.chat_sample([wide, small], "Two images?", "Yes.")
    batch = data.collate([sample], tokenizer, smolvlm, template="smolvlm", image_tokens=tiles)
    pixel_values, grids = smolvlm([wide, small])
    assert grids == [(1, 2), (2, 2)] and torch.equal(batch["pixel_values"], pixel_values)  # 3 + 5 tiles
    expected = build_prompt(tokenizer, sample["messages"], template="smolvlm", add_generation_prompt=False,
                            image_tokens=[tiles(wide), tiles(small)])
    assert batch["input_ids"][0].tolist() == expected
    labels = batch["labels"][0]
    reply = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist(), skip_special_tokens=False)
    assert reply == " Yes.<end_of_utterance>"
    # Cut inside the second image: the first image's 3 tiles stay, the second's go.
    row_1_col_1 = tokenizer.token_to_id("<row_1_col_1>")
    second = max(i for i, t in enumerate(expected) if t == row_1_col_1) - 1  # its <fake_token_around_image>
    cut = data.collate([sample], tokenizer, smolvlm, template="smolvlm", image_tokens=tiles, max_len=second + 5)
    assert cut["input_ids"][0].tolist() == expected[:second] and cut["pixel_values"].shape[0] == 3


def test_collate_truncation_keeps_images_whole(tokenizer, processor, tmp_path):
    image_id = tokenizer.token_to_id("<image>")
    a, b = write_image(tmp_path / "a.png"), write_image(tmp_path / "b.png", (0, 0, 255))
    sample = {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "One."}]},
        {"role": "assistant", "content": "First reply, somewhat long."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Two."}]},
        {"role": "assistant", "content": "Second."}], "images": [a, b]}
    full = data.collate([sample], tokenizer, processor, image_tokens=image_tokens)["input_ids"][0].tolist()
    positions = [i for i, t in enumerate(full) if t == image_id]
    first_end, second_start = positions[N - 1] + 1, positions[N]

    # A cut in the text between the images keeps the first image, drops the second.
    cut = data.collate([sample], tokenizer, processor, image_tokens=image_tokens, max_len=second_start - 2)
    assert cut["input_ids"][0].tolist() == full[:second_start - 2] and cut["pixel_values"].shape[0] == 1
    # A cut inside the second image's placeholders cuts before them.
    inside = data.collate([sample], tokenizer, processor, image_tokens=image_tokens, max_len=second_start + 1)
    assert inside["input_ids"][0].tolist() == full[:second_start] and inside["pixel_values"].shape[0] == 1
    # A cut after both keeps both; labels are cut with the ids.
    after = data.collate([sample], tokenizer, processor, image_tokens=image_tokens, max_len=len(full) - 3)
    assert after["input_ids"].shape[1] == len(full) - 3 and after["pixel_values"].shape[0] == 2
    # The first image itself not fitting is an error.
    with pytest.raises(ValueError, match="first image's placeholders end at token"):
        data.collate([sample], tokenizer, processor, image_tokens=image_tokens, max_len=first_end - 1)
    text = data.collate([{"text": "word " * 50}], tokenizer, max_len=10)
    assert text["input_ids"].shape == (1, 10) and torch.equal(text["labels"], text["input_ids"])


def test_collate_preferences(tokenizer, processor):
    pairs = sources.easy_vqa_preferences("test", limit=3)
    pairs[1] = {**pairs[1], "chosen": "It is a red triangle, I think."}
    batch = data.collate_preferences(pairs, tokenizer, processor, image_tokens=image_tokens)
    chosen, rejected = batch["chosen"], batch["rejected"]
    assert chosen["pixel_values"] is rejected["pixel_values"]
    assert torch.equal(chosen["pixel_values"], processor([p["images"][0] for p in pairs]))
    for i, pair in enumerate(pairs):
        prompt = build_prompt(tokenizer, pair["prompt"], image_tokens=[image_tokens()])
        for side, batch_side in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = batch_side["input_ids"][i], batch_side["labels"][i]
            assert ids[:len(prompt)].tolist() == prompt  # the same prompt on both sides
            assert (labels[:len(prompt)] == IGNORE_INDEX).all()
            [run] = assistant_runs(labels)
            assert tokenizer.decode(run) == pair[side]
    # Earlier assistant turns in a multi-turn prompt get no labels: only the response does.
    multi = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                        {"role": "user", "content": "2+2?"}], "images": [], "chosen": "4", "rejected": "5"}
    batch = data.collate_preferences([multi], tokenizer)
    assert [tokenizer.decode(run) for run in assistant_runs(batch["chosen"]["labels"][0])] == ["4"]
    assert batch["chosen"]["pixel_values"] is None
    with pytest.raises(ValueError, match="leaves no room"):
        data.collate_preferences(pairs[:1], tokenizer, processor, image_tokens=image_tokens, max_len=10)
