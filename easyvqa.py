"""easy-VQA in one place (its words, the phrasings, are in questions.py): the data set's files (PyPI
`easy-vqa`: 64x64 images of one coloured shape, 4,000 for training and 1,000 for test, with 48k
questions), each image's shape and colour, which the package does not list, and the samples they make:

    captions, its own questions, preference pairs, text     easy_vqa_captions, easy_vqa_qa, ...
    balanced yes/no: as many "yes" as "no"                  easy_vqa_qa_balanced
    in training phrasings, now and then a filler word       reworded
    in the order the tiny and offline recipes learn them     easy_vqa_open_first, easy_vqa_words_first
    the picture written out in words, for the LM alone      in_words, easy_vqa_text_curriculum

data.SOURCES names them for train.py's presets and --data. (Not named easy_vqa.py: that would shadow
the package.)
"""

import functools
import random
import re

import numpy as np
from PIL import Image

import questions
from questions import EASY_VQA_COLORS, EASY_VQA_SHAPES, is_negated
from sources import CAPTION_PROMPT, DataError, chat_sample, user_turn

# ---------------------------------------------------------------------------
# The data set's files, each image's shape and colour, and the samples they make
# ---------------------------------------------------------------------------

# The shape colours, as easy-VQA's generator (its color.py) paints them.
PAINT = {"black": (0, 0, 0), "gray": (128, 128, 128), "red": (255, 0, 0), "green": (0, 255, 0),
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


def read_shape_and_color(path) -> tuple[str, str]:
    """The shape and colour an easy-VQA image shows, read from its pixels. The colour is the palette
    colour most pixels have exactly (the background is near-white noise, 230-255 per channel); the
    shape is how much of its bounding box the shape fills: a rectangle all of it, a circle pi/4, the
    generator's triangle (sides at 0 and 60 degrees) half. Over all 5,000 images these fills are
    0.96-1 for rectangles, 0.74-0.91 for circles, 0.50-0.66 for triangles."""
    with Image.open(path) as image:  # the package's own 64x64 PNGs
        pixels = np.asarray(image.convert("RGB"), dtype=np.int64)  # (H, W, 3)
    packed = pixels[..., 0] * 65536 + pixels[..., 1] * 256 + pixels[..., 2]  # (H, W)
    counts = {name: int((packed == r * 65536 + g * 256 + b).sum()) for name, (r, g, b) in PAINT.items()}
    color = max(counts, key=counts.get)
    values, n = np.unique(packed, return_counts=True)
    most = int(values[n.argmax()])  # the background's colour: it covers at least 3/4 of the image
    background = np.array([most >> 16, (most >> 8) & 255, most & 255])
    shade = np.array(PAINT[color])
    inside = ((pixels - shade) ** 2).sum(-1) < ((pixels - background) ** 2).sum(-1)  # (H, W), edges included
    rows, cols = np.nonzero(inside)
    fill = inside.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
    shape = "rectangle" if fill > 0.93 else "circle" if fill > 0.7 else "triangle"
    return shape, color


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


def balanced_yes_no(question: str, shape: str, color: str, rng: random.Random) -> tuple[str, str]:
    """A yes/no question about an image showing a `color` `shape`, with the colour (or shape) it asks
    about redrawn so that "yes" and "no" are equally likely, and its answer:

        "is there a green shape?" (red circle) -> "is there a red shape?" "yes", or "... a blue ..." "no"
    """
    words = re.findall(r"[a-z]+", question.lower())
    asked = [w for w in words if w in EASY_VQA_SHAPES or w in EASY_VQA_COLORS]
    if len(asked) != 1:
        raise ValueError(f"{question!r} does not ask about exactly one shape or colour")
    values, truth = (EASY_VQA_SHAPES, shape) if asked[0] in EASY_VQA_SHAPES else (EASY_VQA_COLORS, color)
    holds = rng.random() < 0.5
    value = truth if holds else rng.choice([v for v in values if v != truth])
    negated = is_negated(question)
    return re.sub(rf"\b{asked[0]}\b", value, question), "yes" if holds != negated else "no"


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


def capitalized(question: str) -> str:
    return question[:1].upper() + question[1:]


def easy_vqa_qa(split: str = "train", limit: int | None = None) -> list[dict]:
    """One chat per question, in the dataset's order: user = image + question, assistant = answer
    (one of the 13 answer words: a shape, a colour, yes or no)."""
    questions, answers, image_ids, paths = easy_vqa_split(split)
    return [chat_sample([paths[i]], capitalized(q), a) for q, a, i in zip(questions, answers, image_ids)][:limit]


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
        samples.append({"prompt": [user_turn(capitalized(q))], "images": [paths[i]],
                        "chosen": a, "rejected": wrong_answer(a, rng)})
    return samples


def easy_vqa_text(split: str = "train", limit: int | None = None) -> list[dict]:
    """Plain text for language-model pretraining, one document per image: its caption, then a
    "Q: ... A: ..." line for each of its questions."""
    questions, answers, image_ids, _ = easy_vqa_split(split)
    lines = {i: [easy_vqa_caption(shape, color)] for i, (shape, color) in easy_vqa_attributes(split).items()}
    for q, a, i in zip(questions, answers, image_ids):
        lines[i].append(f"Q: {capitalized(q)} A: {a}")
    return [{"text": "\n".join(document)} for document in lines.values()][:limit]


# ---------------------------------------------------------------------------
# Balanced and ordered for learning
# ---------------------------------------------------------------------------


def easy_vqa_qa_balanced(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy_vqa_qa with "yes" and "no" equally likely for every yes/no wording. easy-VQA mostly asks
    about a colour or shape the image lacks (88% of "is there a COLOR shape?" are "no"), so a model
    trained on it scores 82% on its yes/no questions without looking at the image, and learns to
    answer them from the wording. Here each yes/no question asks about the image's own value or
    another by a coin flip (balanced_yes_no, drawn by `seed`); VQA v2 balanced its answers for the
    same reason (Goyal et al. 2017). Shape and colour questions are kept as they are."""
    rng = random.Random(seed)
    questions, answers, image_ids, paths = easy_vqa_split(split)
    attributes = easy_vqa_attributes(split)
    samples = []
    for q, a, i in zip(questions[:limit], answers, image_ids):
        if a in ("yes", "no"):
            q, a = balanced_yes_no(q, *attributes[i], rng)
        samples.append(chat_sample([paths[i]], capitalized(q), a))
    return samples


KEEP_OWN_WORDS = 0.3  # the share of training questions asked in easy-VQA's own words (its 24 templates)


def reworded(samples: list[dict], seed: int = 0) -> list[dict]:
    """easy-VQA chats with each question asked again in a training phrasing (questions.reword: synonyms,
    word orders, contractions, letter case, a polite opening), KEEP_OWN_WORDS of them in the data set's
    own words, and now and then a filler word put in (questions.insert_filler), drawn by `seed`. The
    held-out phrasings stay for evaluate.py --reworded."""
    rng = random.Random(f"reworded-{seed}")
    out = []
    for s in samples:
        question, answer = s["messages"][0]["content"][-1]["text"], s["messages"][1]["content"]
        text = questions.insert_filler(questions.reword(question, answer, rng, "train", KEEP_OWN_WORDS), rng)
        out.append(chat_sample(s["images"], text, answer))
    return out


def easy_vqa_wide_text(split: str = "train", limit: int | None = None) -> list[dict]:
    """What a from-scratch tokenizer learns from: the training questions in training phrasings with their
    captions and answers, as chats (each answer starts its own line, as a reply does, so that it becomes
    one token there), and English prose (questions.prose) wide enough that a word no question uses splits
    into pieces the LM sees, not into single bytes."""
    return (easy_vqa_text_curriculum(split) + [{"text": p} for p in questions.prose()])[:limit]


# Questions without negation that come first: 500 steps of 32, by which the comparison is learnt. The
# negated ones then get the rest of pretraining while the learning rate is high (docs/tiny-recipe.md:
# after every plain question, 761 steps, negation was learnt at a step that varied by seed, or never).
PLAIN_FIRST = 16000


def easy_vqa_curriculum(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """The balanced questions in the order to learn them (shuffling off): PLAIN_FIRST questions without
    negation, then all, each part shuffled by `seed`. "Is there not a red shape?" is (colour matches)
    XOR (negated): mixed from the start, the gradient toward comparing cancels (README's diagnosis);
    learnt first without negations, the comparison is there for the negated questions to flip. Each
    question is then asked in a training phrasing (`reworded`)."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    plain = [s for s in everything if not is_negated(s["messages"][0]["content"][1]["text"])]
    rng.shuffle(plain)
    rng.shuffle(everything)
    return reworded((plain[:PLAIN_FIRST] + everything)[:limit], seed)


def easy_vqa_open_first(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """The tiny instruct data in order (shuffling off): the shape questions once, the colour and shape
    questions twice, then every balanced question twice, each part shuffled by `seed`. The tower learns
    shape (the harder attribute) while nothing else pays, then colour beside it, before yes/no asks to
    compare them (README's diagnosis). Each question is asked in a training phrasing (`reworded`)."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    shapes = [s for s in everything if s["messages"][1]["content"] in EASY_VQA_SHAPES]
    open_ended = [s for s in everything if s["messages"][1]["content"] not in ("yes", "no")] * 2
    for part in (shapes, open_ended, everything):
        rng.shuffle(part)
    return reworded((shapes + open_ended + everything + rng.sample(everything, len(everything)))[:limit], seed)


def in_words(samples: list[dict], split: str = "train") -> list[dict]:
    """easy-VQA questions with their image written out instead of shown: user "A red circle. Is there a
    blue shape?", assistant "no" (no image)."""
    paths = easy_vqa_split(split)[3]
    captions = {paths[i]: easy_vqa_caption(*shape_color) for i, shape_color in easy_vqa_attributes(split).items()}
    return [chat_sample([], f"{captions[s['images'][0]]} {s['messages'][0]['content'][1]['text']}",
                        s["messages"][1]["content"]) for s in samples]


def easy_vqa_text_curriculum(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy_vqa_curriculum in words, for pretraining the LM: it learns to compare while the picture is
    written out, before reading pixels."""
    return in_words(easy_vqa_curriculum(split, limit, seed), split)


def easy_vqa_words_first(split: str = "train", limit: int | None = None, seed: int = 0,
                         words: int = 4800, open_ended: int = 1600) -> list[dict]:
    """The offline instruct data in order (shuffling off): `words` balanced questions in words, then
    `open_ended` colour and shape questions about images, then every balanced question (each part
    shuffled by `seed`). SmolLM2-135M answers "A red circle. Is there a blue shape?" at chance: taught
    the comparison in words first (300 steps of 16), it learns to read the image's colour and shape
    (100 steps) into the words it already compares (README, "The words first"). Each question is asked in
    a training phrasing (`reworded`)."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    words_part = rng.sample(everything, min(words, len(everything)))
    open_part = [s for s in everything if s["messages"][1]["content"] not in ("yes", "no")]
    open_part = rng.sample(open_part, min(open_ended, len(open_part)))
    rng.shuffle(everything)
    ordered = reworded(words_part + open_part + everything, seed)
    return (in_words(ordered[:len(words_part)], split) + ordered[len(words_part):])[:limit]


def easy_vqa_preferences_balanced(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """easy_vqa_preferences on the balanced questions (easy_vqa_qa_balanced), in training
    phrasings: preferring "no" to "yes" 88% of the time would teach DPO the wording's answer, not the image's."""
    rng = random.Random(seed)
    return [{"prompt": s["messages"][:1], "images": s["images"], "chosen": s["messages"][1]["content"],
             "rejected": wrong_answer(s["messages"][1]["content"], rng)}
            for s in reworded(easy_vqa_qa_balanced(split, limit, seed), seed)]
