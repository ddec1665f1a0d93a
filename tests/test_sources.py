"""Tests for sources.py, the data-set adapters: local files (and their errors, image paths that leave
their folder, unreadable images named before training) and the hub sources through a fake
`datasets.load_dataset`. No network."""

import json
import sys
import types

import pytest
from PIL import Image

import data
import easyvqa
import runs
import sources
from processing import IGNORE_INDEX
from sources import DataError


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
    bad = runs.unreadable_images(samples)
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
    assert data.load_source("easy-vqa-captions", "test", limit=2) == easyvqa.easy_vqa_captions("test", limit=2)
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


def test_hub_unreachable_and_datasets_missing(fake_hub, monkeypatch):
    fake_hub({}, error=ConnectionError("Couldn't reach 'jxie/coco_captions' on the Hub (LocalEntryNotFoundError)"))
    with pytest.raises(ConnectionError, match="Cannot reach the Hugging Face hub to stream jxie/coco_captions") as info:
        next(iter(sources.coco_captions()))
    assert "\n" not in str(info.value) and str(info.value).count(". ") == 0  # one sentence
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    with pytest.raises(ImportError, match="pip install datasets"):
        list(sources.rlaif_v())


def test_hub_sources_collate(fake_hub, tokenizer, processor):
    fake_hub({(sources.LLAVA_INSTRUCT_REPO, None, "train"): [{
        "messages": [{"role": "user", "content": [{"text": None, "type": "image"}, {"text": "Hi?", "type": "text"}]},
                     {"role": "assistant", "content": [{"text": "Hello.", "type": "text"}]}],
        "images": [image()]}]})
    batch = data.collate(list(sources.llava_instruct()), tokenizer, processor)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    labels = batch["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE_INDEX].tolist()) == "Hello."
