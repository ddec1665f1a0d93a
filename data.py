"""Training data: where samples come from, and how a list of them becomes a batch of tensors.

A sample is a plain dict in one of three shapes:

    {"messages": [...], "images": [...]}     a chat about images: captions, VQA, instructions
    {"text": "..."}                            plain text, for language-model pretraining
    {"prompt": [...], "images": [...], "chosen": "...", "rejected": "..."}   a preference pair (DPO)

`messages` (and a preference pair's `prompt`) are Hugging Face style chats,

    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]},
     {"role": "assistant", "content": "blue"}]

where a content is a string or a list of parts, and `images` holds one path or PIL image for each
{"type": "image"} part, in the order the parts appear.

Sources, one function each (all take `limit`, the number of samples to keep):

    easy-VQA, offline    easy_vqa_captions, easy_vqa_qa, easy_vqa_qa_balanced, easy_vqa_curriculum,
                         easy_vqa_text_curriculum, easy_vqa_preferences, easy_vqa_text
    local files          caption_folder, llava_json, text_files, preference_jsonl
    Hugging Face hub     coco_captions, flickr30k, llava_instruct, the_cauldron, cosmopedia_text, rlaif_v

`SOURCES` names them for train.py's presets and `--data` flag; `load_source(name_or_path, split)`
also takes a local file or folder. Offline sources return lists; hub sources return a `Stream`, which
reads the dataset from the hub as it is iterated (`datasets` streaming mode, nothing downloaded
up front) and starts again from the beginning each time it is iterated.

Batches: `collate` turns chats and texts into input_ids, attention_mask, labels (-100 on padding and,
in chats, on everything but the assistant replies) and pixel_values;
`collate_preferences` does the same for the chosen and the rejected side of preference pairs.
`Batches` cuts a sample list into global batches, shuffled by seed and epoch, resumable at any
batch, each DDP rank taking its own slice.

    samples = load_source("easy-vqa-qa", "train")
    batches = Batches(samples, batch_size=32, seed=0,
                      collate_fn=lambda s: collate(s, tokenizer, image_processor, image_tokens=...))
    for step, batch in batches.forever(start=0):
        logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
"""

import functools
import inspect
import json
import os
import random
import re

import numpy as np
import torch

from processing import IGNORE_INDEX, ImageError, Special, build_prompt, load_image

# The user's request in a captioning chat (captions are the assistant's reply).
CAPTION_PROMPT = "Describe the image."

IMAGE_MARKER = "<image>"  # where LLaVA-format text puts an image

# The roles LLaVA-format data uses, as chat roles.
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file or hub row that cannot be read; the message is one line naming the file and line."""


# ---------------------------------------------------------------------------
# Chats: building user turns, counting image parts, LLaVA's "<image>" markers
# ---------------------------------------------------------------------------


def user_turn(text: str, n_images: int = 1) -> dict:
    """A user message: `n_images` image parts, then the text."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]}


def chat_sample(images: list, question: str, answer: str) -> dict:
    """The sample for one question about the images and its answer."""
    return {"messages": [user_turn(question, len(images)), {"role": "assistant", "content": answer}],
            "images": list(images)}


def count_image_parts(messages: list[dict]) -> int:
    return sum(1 for message in messages if isinstance(message.get("content"), list)
               for part in message["content"] if part.get("type") == "image")


def sample_kind(sample: dict) -> str:
    """"chat", "text" or "preference": which of the three sample shapes a dict has."""
    if "messages" in sample:
        return "chat"
    if "text" in sample:
        return "text"
    if {"prompt", "chosen", "rejected"} <= set(sample):
        return "preference"
    raise ValueError(f"not a sample: expected the keys messages, text, or prompt/chosen/rejected; got {sorted(sample)}")


def sample_text(sample: dict) -> str:
    """All the text a sample holds, one piece a line: to train a tokenizer on, or to count words."""
    if "text" in sample:
        return sample["text"]
    messages = list(sample.get("messages", sample.get("prompt", [])))
    pieces = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            pieces.append(content)
        else:
            pieces += [part["text"] for part in content or [] if part.get("type") == "text"]
    pieces += [sample[side] for side in ("chosen", "rejected") if isinstance(sample.get(side), str)]
    return "\n".join(pieces)


def split_image_markers(text: str) -> list[dict]:
    """Text with LLaVA's "<image>" markers as content parts: each marker an image part, the text
    between them text parts (stripped of the newlines that set the marker apart; empty ones dropped).

        "<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    """
    parts = []
    for i, piece in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def llava_messages(turns, n_images: int, where: str) -> list[dict]:
    """LLaVA conversations ([{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]) as chat
    messages. A turn with "<image>" markers gets a content list; without, its text stays a string.
    Data that has images but no marker at all gets them in front of the first user turn, as LLaVA
    does; any other mismatch of markers and images is an error naming `where`."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: each turn needs a string 'value', got {turn!r:.80}")
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"{where}: unknown speaker {turn.get('from')!r}; expected one of {sorted(LLAVA_ROLES)}")
        value = turn["value"]
        content = split_image_markers(value) if IMAGE_MARKER in value else value
        messages.append({"role": role, "content": content})
    markers = count_image_parts(messages)
    if markers == 0 and n_images > 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise DataError(f"{where}: {n_images} image(s) but no user turn to put them in")
        images = [{"type": "image"} for _ in range(n_images)]
        first_user["content"] = images + split_image_markers(first_user["content"])
    elif markers != n_images:
        raise DataError(f"{where}: {markers} {IMAGE_MARKER} marker(s) in the conversation but {n_images} image(s)")
    return messages


# ---------------------------------------------------------------------------
# easy-VQA: 64x64 images of one coloured shape, with questions about it (offline, PyPI `easy-vqa`)
# ---------------------------------------------------------------------------

EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
# The shape colours, as easy-VQA's generator (its color.py) paints them.
EASY_VQA_COLORS = {"black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
                   "blue": (0, 0, 255), "yellow": (255, 255, 0), "teal": (0, 128, 128), "brown": (165, 42, 42)}


def easy_vqa_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """easy-VQA's official split: (questions, answers, image ids) one per question, and {image id: path}.
    "train": 4,000 images and 38,575 questions; "test": 1,000 images and 9,673 questions."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-VQA sources need the easy-vqa package: pip install easy-vqa") from None
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA has the splits 'train' and 'test', not {split!r}")
    return questions, answers, image_ids, paths


def is_negated(question: str) -> bool:
    """A yes/no question whose "yes" says the shape or colour is absent: "is there not a ...", "is no ... present?"."""
    words = re.findall(r"[a-z]+", question.lower())
    return "not" in words or "no" in words


def question_facts(question: str, answer: str) -> list[tuple[str, str, bool]]:
    """What one easy-VQA question and its answer say about the image, as (attribute, value, holds):

        "what color is the circle?" "red"       -> shape is circle, color is red
        "is there not a blue shape?" "yes"      -> color is not blue
        "does the image contain a triangle?" "no" -> shape is not triangle
    """
    words = re.findall(r"[a-z]+", question.lower())
    negated = is_negated(question)
    yes_no = answer in ("yes", "no")
    holds = (answer == "yes") != negated if yes_no else True
    facts = [("shape", w, holds) for w in words if w in EASY_VQA_SHAPES]
    facts += [("color", w, holds) for w in words if w in EASY_VQA_COLORS]
    if answer in EASY_VQA_SHAPES:
        facts.append(("shape", answer, True))
    elif answer in EASY_VQA_COLORS:
        facts.append(("color", answer, True))
    return facts


def read_shape_and_color(path) -> tuple[str, str]:
    """The shape and colour an easy-VQA image shows, read from its pixels. The colour is the palette
    colour most pixels have exactly (the background is near-white noise, 230-255 per channel); the
    shape is how much of its bounding box the shape fills: a rectangle all of it, a circle pi/4, the
    generator's triangle (sides at 0 and 60 degrees) half. Over all 5,000 images these fills are
    0.96-1 for rectangles, 0.74-0.91 for circles, 0.50-0.66 for triangles."""
    pixels = np.asarray(load_image(path), dtype=np.int64)  # (H, W, 3)
    packed = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]  # (H, W)
    counts = {name: int((packed == r * 65536 + g * 256 + b).sum()) for name, (r, g, b) in EASY_VQA_COLORS.items()}
    color = max(counts, key=counts.get)
    values, n = np.unique(packed, return_counts=True)
    most = int(values[n.argmax()])  # the background's colour: it covers at least 3/4 of the image
    background = np.array([most >> 16, (most >> 8) & 255, most & 255])
    shade = np.array(EASY_VQA_COLORS[color])
    inside = ((pixels - shade) ** 2).sum(-1) < ((pixels - background) ** 2).sum(-1)  # (H, W), edges included
    rows, cols = np.nonzero(inside)
    fill = inside.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "rectangle" if fill > 0.93 else "circle" if fill > 0.7 else "triangle"
    return shape, color


@functools.cache
def easy_vqa_attributes(split: str) -> dict[int, tuple[str, str]]:
    """{image id: (shape, color)} for every image of the split. Each image's own questions and answers
    settle its shape and colour where they can ("what color is the shape?" "blue", or "is there a red
    shape?" "no" ruling red out); for about 10% of the images they leave one open (no question
    about the colour, say), and the pixels decide, within what the questions allow."""
    questions, answers, image_ids, paths = easy_vqa_split(split)
    allowed = {i: {"shape": set(EASY_VQA_SHAPES), "color": set(EASY_VQA_COLORS)} for i in paths}
    for question, answer, image_id in zip(questions, answers, image_ids):
        for attribute, value, holds in question_facts(question, answer):
            if holds:
                allowed[image_id][attribute] &= {value}
            else:
                allowed[image_id][attribute].discard(value)
    attributes = {}
    for image_id in sorted(paths):
        shapes, colors = allowed[image_id]["shape"], allowed[image_id]["color"]
        if len(shapes) != 1 or len(colors) != 1:
            seen = read_shape_and_color(paths[image_id])
            if seen[0] not in shapes or seen[1] not in colors:
                raise DataError(f"{paths[image_id]}: the pixels show a {seen[1]} {seen[0]}, which its questions "
                                f"rule out (shape in {sorted(shapes)}, color in {sorted(colors)})")
            shapes, colors = {seen[0]}, {seen[1]}
        attributes[image_id] = (shapes.pop(), colors.pop())
    return attributes


def easy_vqa_caption(shape: str, color: str) -> str:
    return f"A {color} {shape}."


def easy_vqa_captions(split: str = "train", limit: int | None = None, prompt: str = CAPTION_PROMPT) -> list[dict]:
    """One captioning chat per image, by image id: user = image + `prompt`, assistant = "A blue rectangle."."""
    paths = easy_vqa_split(split)[3]
    return [chat_sample([paths[i]], prompt, easy_vqa_caption(shape, color))
            for i, (shape, color) in easy_vqa_attributes(split).items()][:limit]


def _sentence(question: str) -> str:
    return question[:1].upper() + question[1:]


def easy_vqa_qa(split: str = "train", limit: int | None = None) -> list[dict]:
    """One chat per question, in the dataset's order: user = image + question, assistant = answer
    (one of the 13 answer words: a shape, a colour, yes or no)."""
    questions, answers, image_ids, paths = easy_vqa_split(split)
    return [chat_sample([paths[i]], _sentence(q), a) for q, a, i in zip(questions, answers, image_ids)][:limit]


def balanced_yes_no(question: str, shape: str, color: str, rng: random.Random) -> tuple[str, str]:
    """A yes/no question about an image showing a `color` `shape`, with the colour (or shape) it asks
    about redrawn so that "yes" and "no" are equally likely, and its answer:

        "is there a green shape?" (red circle) -> "is there a red shape?" "yes", or "... a blue ..." "no"
    """
    words = re.findall(r"[a-z]+", question.lower())
    asked = [w for w in words if w in EASY_VQA_SHAPES or w in EASY_VQA_COLORS]
    if len(asked) != 1:
        raise ValueError(f"{question!r} does not ask about exactly one shape or colour")
    values, truth = (EASY_VQA_SHAPES, shape) if asked[0] in EASY_VQA_SHAPES else (tuple(EASY_VQA_COLORS), color)
    holds = rng.random() < 0.5
    value = truth if holds else rng.choice([v for v in values if v != truth])
    negated = is_negated(question)
    return re.sub(rf"\b{asked[0]}\b", value, question), "yes" if holds != negated else "no"


def easy_vqa_qa_balanced(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy_vqa_qa with "yes" and "no" equally likely for every yes/no wording. easy-VQA mostly asks
    about a colour or shape the image lacks (88% of "is there a COLOR shape?" are "no"), so a model
    trained on it scores 82% on its yes/no questions without looking at the image, and learns to
    answer them from the wording. Here each yes/no question asks about the image's own value or
    another by a coin flip (`balanced_yes_no`, drawn by `seed`); VQA v2 balanced its answers for the
    same reason (Goyal et al. 2017). Shape and colour questions are kept as they are."""
    rng = random.Random(seed)
    questions, answers, image_ids, paths = easy_vqa_split(split)
    attributes = easy_vqa_attributes(split)
    samples = []
    for q, a, i in zip(questions[:limit], answers, image_ids):
        if a in ("yes", "no"):
            q, a = balanced_yes_no(q, *attributes[i], rng)
        samples.append(chat_sample([paths[i]], _sentence(q), a))
    return samples


def easy_vqa_curriculum(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """The balanced questions in the order to learn them (train with shuffling off): first every
    question but the negated yes/no ones, then all of them, each part shuffled by `seed`.
    On balanced questions the answer of "is there not a red shape?" is (the colour matches) XOR
    (negated): with both kinds mixed from the start, a match means "yes" as often as "no" and the
    gradient toward comparing cancels (the README's diagnosis). Learnt first without negations, the
    comparison is there for the negated questions to flip."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    plain = [s for s in everything if not is_negated(s["messages"][0]["content"][1]["text"])]
    rng.shuffle(plain)
    rng.shuffle(everything)
    return (plain + everything)[:limit]


def easy_vqa_text_curriculum(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy_vqa_curriculum in words, for pretraining the LM: each image replaced by its caption, as
    user: "A red circle. Is there a blue shape?", assistant: "no". The LM learns to compare the
    question with what the picture shows while it is written out, before it must read it from pixels."""
    paths = easy_vqa_split(split)[3]
    captions = {paths[i]: easy_vqa_caption(*shape_color) for i, shape_color in easy_vqa_attributes(split).items()}
    return [chat_sample([], f"{captions[s['images'][0]]} {s['messages'][0]['content'][1]['text']}",
                        s["messages"][1]["content"]) for s in easy_vqa_curriculum(split, limit, seed)]


def wrong_answer(answer: str, rng: random.Random) -> str:
    """A wrong easy-VQA answer of the same kind: another shape, another colour, or the other of yes/no."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer in EASY_VQA_SHAPES:
        return rng.choice([s for s in EASY_VQA_SHAPES if s != answer])
    if answer in EASY_VQA_COLORS:
        return rng.choice([c for c in EASY_VQA_COLORS if c != answer])
    raise ValueError(f"{answer!r} is not an easy-VQA answer")


def easy_vqa_preferences(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """One preference pair per question: chosen = the right answer, rejected = a wrong one of the same
    kind, drawn by `seed` (the same pairs every time)."""
    rng = random.Random(seed)
    questions, answers, image_ids, paths = easy_vqa_split(split)
    samples = []
    for q, a, i in zip(questions[:limit], answers, image_ids):
        samples.append({"prompt": [user_turn(_sentence(q))], "images": [paths[i]],
                        "chosen": a, "rejected": wrong_answer(a, rng)})
    return samples


def easy_vqa_text(split: str = "train", limit: int | None = None) -> list[dict]:
    """Plain text for language-model pretraining, one document per image: its caption, then a
    "Q: ... A: ..." line for each of its questions."""
    questions, answers, image_ids, _ = easy_vqa_split(split)
    lines = {i: [easy_vqa_caption(shape, color)] for i, (shape, color) in easy_vqa_attributes(split).items()}
    for q, a, i in zip(questions, answers, image_ids):
        lines[i].append(f"Q: {_sentence(q)} A: {a}")
    return [{"text": "\n".join(document)} for document in lines.values()][:limit]


# ---------------------------------------------------------------------------
# Local files: caption folders, LLaVA JSON, text files, preference JSONL
# ---------------------------------------------------------------------------


def _read_jsonl(path: str):
    """(line number, object) for each non-blank line of a JSONL file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
                yield number, obj
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None


def _field(obj: dict, key: str, where: str, optional: bool = False):
    """obj[key], a string (None if optional and absent); otherwise a DataError naming `where`."""
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        found = "missing" if key not in obj else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} is {found}")
    return value


def _image_files(obj: dict, folder: str, where: str) -> list[str]:
    """The image paths a record names ("image": file, or "images": [files]), each checked to exist."""
    names = obj.get("images", obj.get("image"))
    if names is None:
        return []
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{where}: 'image' must be a file name (or 'images' a list of them), got {names!r:.80}")
    paths = [os.path.join(folder, name) for name in names]
    root = os.path.realpath(folder)
    for name, path in zip(names, paths):
        if os.path.commonpath([root, os.path.realpath(path)]) != root:  # "../../etc/passwd", "/etc/hostname"
            raise DataError(f"{where}: image {name!r} lies outside {folder}; a data file names images inside its folder")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image {name!r} not found in {folder}")
    return paths


def caption_folder(folder: str, jsonl: str = "captions.jsonl", limit: int | None = None,
                   prompt: str = CAPTION_PROMPT) -> list[dict]:
    """A folder of images and a JSONL file of {"image": file name in the folder, "caption": text}
    lines; a line's "caption" may also be a list, one sample per caption."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    path = os.path.join(folder, jsonl)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a caption folder needs {jsonl}, "
                                'with {"image": ..., "caption": ...} lines')
    samples = []
    for number, obj in _read_jsonl(path):
        where = f"{path}:{number}"
        images = _image_files(obj, folder, where)
        if len(images) != 1:
            raise DataError(f"{where}: needs one 'image'")
        captions = obj.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: 'caption' must be a string or a list of strings")
        samples += [chat_sample(images, prompt, caption) for caption in captions]
        if limit is not None and len(samples) >= limit:
            break
    return samples[:limit]


def llava_json(path: str, image_folder: str | None = None, limit: int | None = None) -> list[dict]:
    """LLaVA-Instruct data: a JSON list (or JSONL) of {"image": file, "conversations": [{"from": "human",
    "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}. Each "<image>" marker
    becomes an image part where it stands; entries without "image" are text-only chats. Images are
    looked up in `image_folder` (default: the JSON file's folder)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    folder = os.path.dirname(path) if image_folder is None else os.path.expanduser(image_folder)
    if path.endswith(".jsonl"):
        entries = ((f"{path}:{number}", obj) for number, obj in _read_jsonl(path))
    else:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of LLaVA entries, got {type(data).__name__}")
        entries = ((f"{path}: entry {i}", obj) for i, obj in enumerate(data))
    samples = []
    for where, entry in entries:
        if limit is not None and len(samples) >= limit:
            break
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        images = _image_files(entry, folder, where)
        samples.append({"messages": llava_messages(entry.get("conversations"), len(images), where), "images": images})
    return samples


def text_files(paths, limit: int | None = None) -> list[dict]:
    """Plain text files (a path or a list of them), one document per paragraph: text between blank lines."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    samples = []
    for path in paths:
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        samples += [{"text": p.strip()} for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]
    return samples[:limit]


def preference_jsonl(path: str, image_folder: str | None = None, limit: int | None = None) -> list[dict]:
    """Preference pairs, one JSONL line each: {"image": file (optional), "prompt": text, "chosen": text,
    "rejected": text}. The prompt may place the image with an "<image>" marker; without one the image
    comes first. Images are looked up in `image_folder` (default: the file's folder)."""
    path = os.path.expanduser(path)
    folder = os.path.dirname(path) if image_folder is None else os.path.expanduser(image_folder)
    samples = []
    for number, obj in _read_jsonl(path):
        if limit is not None and len(samples) >= limit:
            break
        where = f"{path}:{number}"
        prompt, chosen, rejected = (_field(obj, key, where) for key in ("prompt", "chosen", "rejected"))
        images = _image_files(obj, folder, where)
        messages = llava_messages([{"from": "human", "value": prompt}], len(images), where)
        samples.append({"prompt": messages, "images": images, "chosen": chosen, "rejected": rejected})
    return samples


# ---------------------------------------------------------------------------
# The Hugging Face hub, streamed with the `datasets` library
# ---------------------------------------------------------------------------

COCO_CAPTIONS_REPO = "jxie/coco_captions"  # COCO 2014, Karpathy splits train/validation/test, one row per caption
FLICKR30K_REPO = "umaru97/flickr30k_train_val_test"  # Flickr30k, Karpathy splits train/val/test, 5 captions a row
LLAVA_INSTRUCT_REPO = "HuggingFaceH4/llava-instruct-mix-vsft"  # LLaVA-Instruct mix as chats with images, train/test
THE_CAULDRON_REPO = "HuggingFaceM4/the_cauldron"  # 50 subsets (vqav2, ai2d, chartqa, ...), train only
SMOLLM_CORPUS_REPO = "HuggingFaceTB/smollm-corpus"  # config "cosmopedia-v2": synthetic textbooks, train only
RLAIF_V_REPO = "HuggingFaceH4/rlaif-v_formatted"  # RLAIF-V preference pairs as chats, train/test


class Stream:
    """A sample source read as it is iterated; each `iter()` starts again from the beginning."""

    def __init__(self, make, description: str):
        self.make, self.description = make, description

    def __iter__(self):
        return iter(self.make())

    def __len__(self):
        raise TypeError(f"{self.description} is a stream from the hub and has no length: iterate it, use "
                        "data.Batches, or hold a part in memory with list(source(..., limit=N))")

    def __repr__(self):
        return f"Stream({self.description})"


def _unreachable(e: Exception) -> bool:
    """Whether an exception means the hub could not be reached (offline, DNS, timeouts, HF_HUB_OFFLINE)."""
    names = {cls.__name__ for cls in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        word in name for name in names for word in ("Connect", "Timeout", "Offline", "LocalEntryNotFound"))


def hub_rows(repo: str, config: str | None = None, split: str = "train", limit: int | None = None):
    """The rows of a hub dataset, streamed (`datasets.load_dataset(..., streaming=True)`), at most `limit`."""
    what = f"{repo}" + (f" ({config})" if config else "") + f", split {split!r}"
    try:
        import datasets
    except ImportError:
        raise ImportError(f"streaming {repo} from the Hugging Face hub needs the datasets library: "
                          "pip install datasets") from None
    rows, count = None, 0
    while limit is None or count < limit:
        try:
            if rows is None:
                args = (repo, config) if config else (repo,)
                rows = iter(datasets.load_dataset(*args, split=split, streaming=True))
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # everything the hub and `datasets` raise: turned into one sentence
            if _unreachable(e):
                raise ConnectionError(f"Cannot reach the Hugging Face hub to stream {what} ({type(e).__name__}); "
                                      "check the network (and HF_HUB_OFFLINE), or use an offline source "
                                      "such as easy-vqa-qa or a local folder.") from None
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"could not stream {what} from the Hugging Face hub: "
                            f"{type(e).__name__}: {message}") from None
        yield row
        count += 1


def _part(part, where: str) -> dict:
    """A hub content part ({"type", "text", "index", ...}, unused keys None) as ours."""
    if not isinstance(part, dict) or part.get("type") not in ("image", "text"):
        raise DataError(f"{where}: content parts must be {{'type': 'image' | 'text', ...}}, got {part!r:.80}")
    if part["type"] == "image":
        return {"type": "image"}
    return {"type": "text", "text": (part.get("text") or "").strip()}


def hub_messages(messages, where: str) -> list[dict]:
    """Hub-style chat messages (content a string or a list of parts) as ours: image parts bare, text
    parts stripped (some sets pad them with newlines), a content of text parts only as one string."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: messages must be a list, got {type(messages).__name__}")
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise DataError(f"{where}: each message needs a role and a content, got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, list):
            parts = [p for p in (_part(p, where) for p in content) if p["type"] == "image" or p["text"]]
            if not any(p["type"] == "image" for p in parts):
                content = "\n".join(p["text"] for p in parts)
            else:
                content = parts
        elif not isinstance(content, str):
            raise DataError(f"{where}: message content must be a string or a list of parts")
        out.append({"role": message["role"], "content": content})
    return out


def _images(value) -> list:
    """A hub row's images: one image, a list of them, or None."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _chat_row(row: dict, where: str) -> dict:
    """A hub chat row, HF style ("messages" + "images") or LLaVA style ("conversations" + "image")."""
    images = _images(row.get("images", row.get("image")))
    if "conversations" in row:
        return {"messages": llava_messages(row["conversations"], len(images), where), "images": images}
    messages = hub_messages(row.get("messages"), where)
    if count_image_parts(messages) != len(images):
        raise DataError(f"{where}: {count_image_parts(messages)} image part(s) but {len(images)} image(s)")
    return {"messages": messages, "images": images}


def _captions(value, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not captions or not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise DataError(f"{where}: caption must be a string or a list of strings, got {value!r:.80}")
    return captions


def coco_captions(split: str = "train", limit: int | None = None, prompt: str = CAPTION_PROMPT) -> Stream:
    """COCO captions (jxie/coco_captions: splits train/validation/test, one row per caption, so each
    image comes five times in a row): captioning chats."""
    def samples():
        for i, row in enumerate(hub_rows(COCO_CAPTIONS_REPO, None, split, limit)):
            where = f"{COCO_CAPTIONS_REPO} {split} row {i}"
            for caption in _captions(row.get("caption"), where):
                yield chat_sample([row["image"]], prompt, caption)
    return Stream(lambda: _take(samples(), limit), f"coco_captions {split}")


FLICKR30K_SPLITS = {"train": "train", "validation": "val", "val": "val", "test": "test"}


def flickr30k(split: str = "train", limit: int | None = None, prompt: str = CAPTION_PROMPT,
              repo: str = FLICKR30K_REPO) -> Stream:
    """Flickr30k captions (Karpathy splits: train 29,000 images, val 1,014, test 1,000; five captions
    each): one captioning chat per caption."""
    hub_split = FLICKR30K_SPLITS.get(split, split) if repo == FLICKR30K_REPO else split

    def samples():
        for i, row in enumerate(hub_rows(repo, None, hub_split)):
            captions = row.get("caption", row.get("captions"))
            for caption in _captions(captions, f"{repo} {hub_split} row {i}"):
                yield chat_sample([row["image"]], prompt, caption)
    return Stream(lambda: _take(samples(), limit), f"flickr30k {split}")


def llava_instruct(split: str = "train", limit: int | None = None, repo: str = LLAVA_INSTRUCT_REPO) -> Stream:
    """LLaVA-Instruct conversations with their images (by default HuggingFaceH4/llava-instruct-mix-vsft,
    HF-style "messages" + "images"; a repo in LLaVA's own "conversations" + "image" layout works too)."""
    def samples():
        for i, row in enumerate(hub_rows(repo, None, split, limit)):
            yield _chat_row(row, f"{repo} {split} row {i}")
    return Stream(samples, f"llava_instruct {split}")


def the_cauldron(subset: str, split: str = "train", limit: int | None = None) -> Stream:
    """One subset of HuggingFaceM4/the_cauldron (e.g. "vqav2", "ai2d", "chartqa"): rows of images and
    texts [{"user", "assistant"}, ...], as chats with all the images in front of the first question."""
    def samples():
        for i, row in enumerate(hub_rows(THE_CAULDRON_REPO, subset, split, limit)):
            where = f"{THE_CAULDRON_REPO} ({subset}) {split} row {i}"
            images, texts = _images(row.get("images")), row.get("texts")
            if not isinstance(texts, list) or not texts:
                raise DataError(f"{where}: 'texts' must be a non-empty list of {{user, assistant}} turns")
            messages = []
            for turn in texts:
                if not isinstance(turn, dict):
                    raise DataError(f"{where}: each of 'texts' must be {{user, assistant}}, got {turn!r:.80}")
                user, assistant = _field(turn, "user", where), _field(turn, "assistant", where)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            if images:
                messages[0] = user_turn(messages[0]["content"], len(images))
            yield {"messages": messages, "images": images}
    return Stream(samples, f"the_cauldron {subset} {split}")


def cosmopedia_text(split: str = "train", limit: int | None = None) -> Stream:
    """Cosmopedia v2 (HuggingFaceTB/smollm-corpus, config "cosmopedia-v2"): synthetic textbooks and
    stories, plain text for language-model pretraining."""
    def samples():
        for i, row in enumerate(hub_rows(SMOLLM_CORPUS_REPO, "cosmopedia-v2", split, limit)):
            yield {"text": _field(row, "text", f"{SMOLLM_CORPUS_REPO} (cosmopedia-v2) {split} row {i}")}
    return Stream(samples, f"cosmopedia_text {split}")


def _reply_text(value, where: str) -> str:
    """A preference side: a string, or chat messages whose assistant turn holds the reply."""
    if isinstance(value, str):
        return value
    messages = hub_messages(value, where)
    replies = [m["content"] for m in messages if m["role"] == "assistant" and isinstance(m["content"], str)]
    if not replies:
        raise DataError(f"{where}: chosen/rejected must be a string or messages with an assistant reply")
    return "\n".join(replies)


def rlaif_v(split: str = "train", limit: int | None = None) -> Stream:
    """RLAIF-V preference pairs (HuggingFaceH4/rlaif-v_formatted, train 78,975 / test 4,157): "images",
    a "prompt" chat with an image part, and "chosen"/"rejected" assistant turns."""
    def samples():
        for i, row in enumerate(hub_rows(RLAIF_V_REPO, None, split, limit)):
            where = f"{RLAIF_V_REPO} {split} row {i}"
            images = _images(row.get("images", row.get("image")))
            prompt = row.get("prompt", row.get("question"))
            prompt = [user_turn(prompt, len(images))] if isinstance(prompt, str) else hub_messages(prompt, where)
            if count_image_parts(prompt) != len(images):
                raise DataError(f"{where}: {count_image_parts(prompt)} image part(s) but {len(images)} image(s)")
            yield {"prompt": prompt, "images": images, "chosen": _reply_text(row.get("chosen"), where),
                   "rejected": _reply_text(row.get("rejected"), where)}
    return Stream(samples, f"rlaif_v {split}")


def _take(iterator, limit):
    for i, item in enumerate(iterator):
        if limit is not None and i >= limit:
            return
        yield item


# ---------------------------------------------------------------------------
# The registry train.py's presets and --data flag name
# ---------------------------------------------------------------------------

SOURCES = {
    "easy-vqa-captions": easy_vqa_captions,
    "easy-vqa-qa": easy_vqa_qa,
    "easy-vqa-qa-balanced": easy_vqa_qa_balanced,
    "easy-vqa-curriculum": easy_vqa_curriculum,
    "easy-vqa-text-curriculum": easy_vqa_text_curriculum,
    "easy-vqa-preferences": easy_vqa_preferences,
    "easy-vqa-text": easy_vqa_text,
    "coco-captions": coco_captions,
    "flickr30k": flickr30k,
    "llava-instruct": llava_instruct,
    "the-cauldron": the_cauldron,  # needs a subset: "the-cauldron:vqav2"
    "cosmopedia": cosmopedia_text,
    "rlaif-v": rlaif_v,
}


def load_source(name_or_path: str, split: str = "train", limit: int | None = None):
    """The samples of a source named in SOURCES ("the-cauldron:SUBSET" for a subset of the Cauldron),
    or of a local path:

        a folder with captions.jsonl (or SPLIT/captions.jsonl)   caption_folder
        a folder of .txt files, or a .txt file                     text_files
        a .json file                                               llava_json (images beside it)
        a .jsonl file: by its first line's keys                    preference_jsonl ("chosen"),
                                                                   llava_json ("conversations"),
                                                                   caption_folder ("caption")
    """
    name, _, subset = name_or_path.partition(":")
    if name in SOURCES and not os.path.exists(name_or_path):
        if name == "the-cauldron":
            if not subset:
                raise ValueError("the-cauldron needs a subset, e.g. 'the-cauldron:vqav2'")
            return the_cauldron(subset, split=split, limit=limit)
        if subset:
            raise ValueError(f"{name} takes no ':' option (got {name_or_path!r})")
        return SOURCES[name](split=split, limit=limit)
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, split)):
            if os.path.isfile(os.path.join(folder, "captions.jsonl")):
                return caption_folder(folder, limit=limit)
        texts = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".txt"))
        if texts:
            return text_files(texts, limit=limit)
        raise DataError(f"{path}: a data folder needs captions.jsonl (or {split}/captions.jsonl) or .txt files")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name_or_path}: neither a source name ({', '.join(SOURCES)}) "
                                "nor an existing file or folder")
    if path.endswith(".txt"):
        return text_files([path], limit=limit)
    if path.endswith(".json"):
        return llava_json(path, limit=limit)
    if path.endswith(".jsonl"):
        keys = next((set(obj) for _, obj in _read_jsonl(path)), set())
        if "chosen" in keys:
            return preference_jsonl(path, limit=limit)
        if "conversations" in keys:
            return llava_json(path, limit=limit)
        if "caption" in keys:
            return caption_folder(os.path.dirname(path) or ".", jsonl=os.path.basename(path), limit=limit)
        raise DataError(f"{path}: cannot tell what the lines hold (keys {sorted(keys)}); expected "
                        "chosen/rejected, conversations, or image/caption")
    raise DataError(f"{path}: unknown data file type; expected .json, .jsonl, .txt or a folder")


# ---------------------------------------------------------------------------
# Collation: samples -> padded tensors
# ---------------------------------------------------------------------------


def unreadable_images(samples: list[dict]) -> list[tuple[int, str]]:
    """(sample index, "file: problem") for each sample with an image that cannot be decoded, every
    file opened once: a bad image is found before training starts, not at step 900."""
    problems, bad = {}, []
    for i, sample in enumerate(samples):
        for image in sample.get("images", []):
            key = image if isinstance(image, str) else id(image)
            if key not in problems:
                try:
                    load_image(image)
                    problems[key] = None
                except ImageError as e:
                    problems[key] = str(e)
            if problems[key]:
                bad.append((i, problems[key]))
                break
    return bad


def _takes_an_argument(fn) -> bool:
    try:
        inspect.signature(fn).bind(None)
        return True
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume it takes the image
        return True


def image_parts(image_tokens, image) -> list:
    """The prompt parts (Special tokens and text) one image expands into: `image_tokens(image)` (or
    `image_tokens()` for a function of no argument), one Special("<image>") when it is None."""
    if image_tokens is None:
        return [Special(IMAGE_MARKER)]
    parts = list(image_tokens(image) if _takes_an_argument(image_tokens) else image_tokens())
    if not any(isinstance(p, Special) for p in parts) or not all(isinstance(p, (str, Special)) for p in parts):
        raise ValueError(f"image_tokens must give a list of Special tokens and strings, with at least one "
                         f"Special token; got {parts!r:.120}")
    return parts


def image_spans(ids: list[int], expansions: list[list], tokenizer) -> list[tuple[int, int]]:
    """[start, end) of each image's placeholders in `ids`, in order: where the special tokens of its
    expansion appear in turn (text typed in a message can never produce a special token), widened
    by the ids of any text at the expansion's ends."""
    spans, position = [], 0
    for k, parts in enumerate(expansions):
        specials = [tokenizer.token_to_id(p.token) for p in parts if isinstance(p, Special)]
        start = end = None
        for token_id in specials:
            while position < len(ids) and ids[position] != token_id:
                position += 1
            if position == len(ids):
                names = [p.token for p in parts if isinstance(p, Special)]
                raise ValueError(f"image {k}'s placeholders {names[:3]}... are not in the prompt build_prompt made")
            start = position if start is None else start
            position = end = position + 1
        leading = next(i for i, p in enumerate(parts) if isinstance(p, Special))
        trailing = next(i for i, p in enumerate(reversed(parts)) if isinstance(p, Special))
        start -= sum(len(tokenizer.encode(p)) for p in parts[:leading])
        end += sum(len(tokenizer.encode(p)) for p in parts[len(parts) - trailing:])
        spans.append((start, end))
        position = end
    return spans


def _expansions(messages, images, image_tokens, index) -> list[list]:
    """Each (loaded) image's prompt parts, after checking there is one image per image part."""
    n_parts = count_image_parts(messages)
    if n_parts != len(images):
        raise ValueError(f"sample {index}: {n_parts} image part(s) in the messages but {len(images)} image(s)")
    return [image_parts(image_tokens, image) for image in images]


def _encode_chat(messages, expansions, tokenizer, template):
    """(ids, labels, spans) of a chat: labels -100 but on the assistant replies, spans those of the images."""
    ids, labels = build_prompt(tokenizer, messages, template=template, add_generation_prompt=False,
                               image_tokens=expansions, return_labels=True)
    return list(ids), list(labels), image_spans(ids, expansions, tokenizer)


def _truncate(ids, labels, images, spans, max_len, index):
    """Cut a sequence to max_len tokens from the right, never inside an image's placeholders: a cut that
    would split an image cuts before it (dropping it, and any later image, from the sample); the
    first image not fitting at all is an error."""
    if len(ids) <= max_len:
        return ids, labels, images
    cut = max_len
    for k, (start, end) in enumerate(spans):
        if start < cut < end:
            if k == 0:
                raise ValueError(f"sample {index}: its first image's placeholders end at token {end}, past "
                                 f"max_len={max_len}; raise max_len or use fewer tokens per image")
            cut = start
            break
    kept = sum(1 for _, end in spans if end <= cut)
    return ids[:cut], labels[:cut], images[:kept]


def encode_sample(sample: dict, tokenizer, template: str = "chatml", image_tokens=None,
                  max_len: int | None = None, index: int = 0):
    """(ids, labels, images) of one chat or text sample, cut to max_len: a chat's labels are -100 but on
    the assistant replies; a text's ids end with EOS and every token is a label. `images` are the
    loaded PIL images whose placeholders survived the cut."""
    kind = sample_kind(sample)
    if kind == "text":
        ids = tokenizer.encode(sample["text"]) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        ids = ids[:max_len]
        return ids, list(ids), []
    if kind != "chat":
        raise ValueError(f"sample {index} is a preference pair; use collate_preferences")
    images = [load_image(image) for image in sample.get("images", [])]
    expansions = _expansions(sample["messages"], images, image_tokens, index)
    ids, labels, spans = _encode_chat(sample["messages"], expansions, tokenizer, template)
    if max_len is not None:
        ids, labels, images = _truncate(ids, labels, images, spans, max_len, index)
    return ids, labels, images


def _pad(rows, tokenizer, pad_side: str) -> dict:
    """input_ids, attention_mask, labels (B, T) from (ids, labels) rows, padded on `pad_side`."""
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', not {pad_side!r}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    batch, length = len(rows), max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (ids, row_labels) in enumerate(rows):
        at = slice(0, len(ids)) if pad_side == "right" else slice(length - len(ids), length)
        input_ids[i, at] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, at] = 1
        labels[i, at] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pixel_values(images, image_processor):
    """(N, 3, H, W) for the batch's images in order, or None without images. An image processor that
    returns (pixel_values, extra), as SmolVLMImageProcessor does (pixel_values, grids), gives its
    pixel_values: each image's tiles, in order."""
    if not images:
        return None
    if image_processor is None:
        raise ValueError(f"the batch has {len(images)} image(s) but collate got no image_processor")
    out = image_processor(images)
    return out[0] if isinstance(out, tuple) else out


def collate(samples: list[dict], tokenizer, image_processor=None, template: str = "chatml", image_tokens=None,
            max_len: int = 512, pad_side: str = "right") -> dict:
    """A batch from chat and text samples:

        input_ids       (B, T) long, padded with tokenizer.pad_id (EOS when it has none)
        attention_mask  (B, T) long, 1 on tokens, 0 on padding
        labels          (B, T) long, aligned with input_ids (the loss shifts them): -100 on padding
                        and, in chats, on everything but the assistant replies; a text sample's
                        tokens (ids + EOS) are all labels
        pixel_values    (N, 3, H, W) float, the batch's N images in the order their placeholders
                        appear (sample by sample), by `image_processor`; None without images

    image_tokens: the prompt parts one image expands into, a function of the (loaded PIL) image or
    of nothing, e.g. `lambda: [Special("<image>")] * 64`; None: one Special("<image>") per image.
    A sequence longer than max_len is cut from the right, never inside an image's placeholders."""
    if not samples:
        raise ValueError("collate got no samples")
    rows, images = [], []
    for index, sample in enumerate(samples):
        ids, labels, sample_images = encode_sample(sample, tokenizer, template, image_tokens, max_len, index)
        rows.append((ids, labels))
        images += sample_images
    return {**_pad(rows, tokenizer, pad_side), "pixel_values": _pixel_values(images, image_processor)}


def caption_ids(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as a Q-Former reads them: (B, T) ids starting with BOS (whose output is the text
    feature, as BERT's [CLS]; EOS for tokenizers without BOS), right-padded, and the (B, T) mask."""
    cls = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    rows = [[cls] + tokenizer.encode(c)[: max_len - 1] for c in captions]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tokenizer.pad_id or 0] * (T - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])


def collate_preferences(samples: list[dict], tokenizer, image_processor=None, template: str = "chatml",
                        image_tokens=None, max_len: int = 512, pad_side: str = "right") -> dict:
    """{"chosen": batch, "rejected": batch} from preference pairs, each batch as `collate` makes it:
    row i of both holds pair i's prompt (the same ids) and one reply, labels only on the reply's
    tokens; both share one pixel_values tensor. A reply longer than max_len allows is cut; a prompt
    that leaves no room for a reply is an error."""
    if not samples:
        raise ValueError("collate_preferences got no samples")
    rows = {"chosen": [], "rejected": []}
    images = []
    for index, sample in enumerate(samples):
        if sample_kind(sample) != "preference":
            raise ValueError(f"sample {index} is not a preference pair (prompt, chosen, rejected)")
        prompt = sample["prompt"]
        loaded = [load_image(image) for image in sample.get("images", [])]
        expansions = _expansions(prompt, loaded, image_tokens, index)
        prompt_ids = build_prompt(tokenizer, prompt, template=template, add_generation_prompt=True,
                                  image_tokens=expansions)
        if len(prompt_ids) >= max_len:
            raise ValueError(f"sample {index}: the prompt is {len(prompt_ids)} tokens, which leaves no room "
                             f"for a reply in max_len={max_len}")
        for side in ("chosen", "rejected"):
            if not isinstance(sample[side], str):
                raise TypeError(f"sample {index}: {side} must be a string, got {type(sample[side]).__name__}")
            messages = list(prompt) + [{"role": "assistant", "content": sample[side]}]
            ids, labels, _ = _encode_chat(messages, expansions, tokenizer, template)
            # Only the reply is learned: no labels on the prompt (earlier assistant turns included).
            shared = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b),
                          min(len(ids), len(prompt_ids)))
            labels = [IGNORE_INDEX] * shared + labels[shared:]
            rows[side].append((ids[:max_len], labels[:max_len]))
        images += loaded
    pixel_values = _pixel_values(images, image_processor)
    return {side: {**_pad(side_rows, tokenizer, pad_side), "pixel_values": pixel_values}
            for side, side_rows in rows.items()}


# ---------------------------------------------------------------------------
# Batches: shuffling by seed and epoch, exact resume, DDP ranks
# ---------------------------------------------------------------------------


class Batches:
    """Global batches of `batch_size` samples, each DDP rank taking its own contiguous slice
    (batch_size // world_size samples; together the ranks cover every global batch exactly once).

    A list is shuffled anew each epoch, by (seed, epoch) only, so every rank and every resumed run
    sees the same order; a Stream (or other iterable without a length) is read in its own order.
    `epoch(e, skip=k)` starts at global batch k of epoch e; `forever(start)` runs epoch after
    epoch from global batch number `start` (what a checkpoint saves to resume exactly).
    With drop_last, a final partial batch is dropped; otherwise it is kept if every rank gets a sample.
    """

    def __init__(self, samples, batch_size: int, collate_fn=None, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch_size {batch_size} must divide among {world_size} ranks")
        self.samples, self.batch_size, self.collate_fn = samples, batch_size, collate_fn
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.sized = hasattr(samples, "__len__") and hasattr(samples, "__getitem__")

    def __len__(self) -> int:
        """Global batches per epoch (lists only)."""
        if not self.sized:
            raise TypeError("a stream has no length; iterate with epoch() or forever()")
        n = len(self.samples)
        if self.drop_last or n % self.batch_size < self.world_size:
            return n // self.batch_size
        return n // self.batch_size + 1

    def order(self, epoch: int) -> list[int]:
        """The sample indices of an epoch, in order."""
        n = len(self.samples)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def global_batches(self, epoch: int = 0, skip: int = 0):
        """The epoch's global batches (lists of samples), from batch number `skip`."""
        if self.sized:
            order = self.order(epoch)
            for b in range(skip, len(self)):
                yield [self.samples[i] for i in order[b * self.batch_size:(b + 1) * self.batch_size]]
            return
        batch, number = [], 0
        for sample in self.samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                if number >= skip:
                    yield batch
                batch, number = [], number + 1
        if batch and not self.drop_last and len(batch) >= self.world_size and number >= skip:
            yield batch

    def local(self, batch: list) -> list:
        """This rank's slice of a global batch."""
        bounds = [len(batch) * r // self.world_size for r in range(self.world_size + 1)]
        return batch[bounds[self.rank]:bounds[self.rank + 1]]

    def epoch(self, epoch: int = 0, skip: int = 0):
        """This rank's batches (collated if a collate_fn was given) of an epoch, from global batch `skip`."""
        for batch in self.global_batches(epoch, skip):
            mine = self.local(batch)
            yield self.collate_fn(mine) if self.collate_fn is not None else mine

    def __iter__(self):
        return self.epoch(0)

    def forever(self, start: int = 0):
        """(global batch number, batch) pairs from number `start`, epoch after epoch, without end."""
        if self.sized:
            per_epoch = len(self)
            if per_epoch == 0:
                raise ValueError(f"{len(self.samples)} samples make no batch of {self.batch_size}")
            number = start
            while True:
                for batch in self.epoch(number // per_epoch, skip=number % per_epoch):
                    yield number, batch
                    number += 1
        number, epoch = 0, 0
        while True:  # a stream: pass after pass, the first `start` batches read but not collated
            produced = False
            for batch in self.global_batches(epoch):
                produced = True
                if number >= start:
                    mine = self.local(batch)
                    yield number, self.collate_fn(mine) if self.collate_fn is not None else mine
                number += 1
            if not produced:
                raise ValueError("the stream gave no full batch")
            epoch += 1
