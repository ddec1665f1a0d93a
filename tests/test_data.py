"""Tests for data.py: a sample's text, and collation with SmolLM2's tokenizer and a SigLIP image
processor (chats, tiles, truncation, preference pairs, captions). No network."""

import pytest
import torch
from PIL import Image

import data
import easyvqa
import layouts
import sources
from processing import IGNORE_INDEX, Special, build_prompt


def write_image(path, color=(255, 0, 0), size=(40, 30)):
    Image.new("RGB", size, color).save(path)
    return str(path)



def test_sample_text():
    [qa] = easyvqa.easy_vqa_qa("test", limit=1)
    assert data.sample_text(qa) == "What is the red shape?\ntriangle"
    assert data.sample_text({"text": "hi"}) == "hi"
    [pair] = easyvqa.easy_vqa_preferences("test", limit=1)
    assert data.sample_text(pair) == f"What is the red shape?\n{pair['chosen']}\n{pair['rejected']}"




def test_a_lowercase_tokenizer_gives_the_same_tokens_whatever_the_letter_case():
    tok = data.train_tokenizer([{"text": "what color is the shape?"}, {"text": "is there a red circle?"}] * 20, 300, lowercase=True)
    assert tok.encode("WHAT Color is the SHAPE?") == tok.encode("what color is the shape?")
    assert tok.encode("<IMAGE>") != [tok.token_to_id("<image>")]  # typed text still never forges a special token
    assert tok.encode("Isn't there a red circle?") == tok.encode("is not there a red circle?")  # negation: "not"
    assert tok.encode("DOESN'T it") == tok.encode("does not it") and tok.encode("can't") == tok.encode("can not")
    cased = data.train_tokenizer([{"text": "what color is the shape?"}] * 20, 300)
    assert cased.encode("WHAT") != cased.encode("what")

# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------

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
    qa = easyvqa.easy_vqa_qa("test", limit=2)
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
    qa = easyvqa.easy_vqa_qa("test", limit=1)
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
    tokenizer.add_special_tokens(layouts.SMOLVLM_SPECIAL_TOKENS)
    smolvlm = layouts.SmolVLMImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})

    def tiles(im):
        return layouts.smolvlm_image_tokens(*smolvlm.tiles(im)[1], 2)

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
    pairs = easyvqa.easy_vqa_preferences("test", limit=3)
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
