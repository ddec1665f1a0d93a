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

Sources (all take `limit`) are read by sources.py: easy-VQA offline, local files, hub sets. Here
easy-VQA's questions are balanced and ordered for the tiny recipe. `SOURCES` names them all for
train.py's presets and `--data`; `load_source(name_or_path, split)` also takes a local file or folder.

Batches: `collate` (chats and texts), `collate_preferences` (both sides of preference pairs) and
`collate_captions` (images and captions, for a Q-Former's contrastive stage) make padded tensors:

    samples = load_source("easy-vqa-qa", "train")
    batch = to_device(collate(samples[:32], tokenizer, image_processor, image_tokens=...), device)
    logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
"""

import inspect
import os
import random

import torch

import questions
import sources
from processing import IGNORE_INDEX, Special, build_prompt, load_image
from sources import (IMAGE_MARKER, balanced_yes_no, capitalized, chat_sample, count_image_parts,
                     easy_vqa_attributes, easy_vqa_caption, easy_vqa_split, is_negated)

# ---------------------------------------------------------------------------
# Samples: their kind (the chat builders, user_turn and chat_sample, are in sources.py)
# ---------------------------------------------------------------------------


def sample_kind(sample: dict) -> str:
    """"chat", "text" or "preference": which of the three sample shapes a dict has."""
    if "messages" in sample:
        return "chat"
    if "text" in sample:
        return "text"
    if {"prompt", "chosen", "rejected"} <= set(sample):
        return "preference"
    raise ValueError(f"not a sample: expected the keys messages, text, or prompt/chosen/rejected; got {sorted(sample)}")


# ---------------------------------------------------------------------------
# easy-VQA balanced and ordered for learning (its files and plain samples: sources.py)
# ---------------------------------------------------------------------------


def easy_vqa_qa_balanced(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """sources.easy_vqa_qa with "yes" and "no" equally likely for every yes/no wording. easy-VQA mostly asks
    about a colour or shape the image lacks (88% of "is there a COLOR shape?" are "no"), so a model
    trained on it scores 82% on its yes/no questions without looking at the image, and learns to
    answer them from the wording. Here each yes/no question asks about the image's own value or
    another by a coin flip (sources.balanced_yes_no, drawn by `seed`); VQA v2 balanced its answers for the
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
    own words, and half of them with a word put in, swapped or left out (questions.add_noise), drawn by `seed`. The
    held-out phrasings stay for evaluate.py --reworded."""
    rng = random.Random(f"reworded-{seed}")
    out = []
    for s in samples:
        question, answer = s["messages"][0]["content"][-1]["text"], s["messages"][1]["content"]
        text = questions.add_noise(questions.reword(question, answer, rng, "train", KEEP_OWN_WORDS), rng)
        out.append(chat_sample(s["images"], text, answer))
    return out


def easy_vqa_wide_text(split: str = "train", limit: int | None = None) -> list[dict]:
    """What a from-scratch tokenizer learns from: the training questions in training phrasings with their
    captions and answers, as chats (each answer starts its own line, as a reply does, so that it becomes
    one token there), and English prose (questions.prose) wide enough that a word no question uses splits
    into pieces the LM sees, not into single bytes."""
    return (easy_vqa_text_curriculum(split) + [{"text": p} for p in questions.prose()])[:limit]


def easy_vqa_curriculum(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """The balanced questions in the order to learn them (shuffling off): every question but the negated
    yes/no ones, then all, each part shuffled by `seed`. "Is there not a red shape?" is (colour matches)
    XOR (negated): mixed from the start, the gradient toward comparing cancels (README's diagnosis);
    learnt first without negations, the comparison is there for the negated questions to flip. Each
    question is then asked in a training phrasing (`reworded`)."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    plain = [s for s in everything if not is_negated(s["messages"][0]["content"][1]["text"])]
    rng.shuffle(plain)
    rng.shuffle(everything)
    return reworded((plain + everything)[:limit], seed)


def easy_vqa_open_first(split: str = "train", limit: int | None = None, seed: int = 0) -> list[dict]:
    """The tiny instruct data in order (shuffling off): the shape questions once, the colour and shape
    questions twice, then every balanced question twice, each part shuffled by `seed`. The tower learns
    shape (the harder attribute) while nothing else pays, then colour beside it, before yes/no asks to
    compare them (README's diagnosis). Each question is asked in a training phrasing (`reworded`)."""
    rng = random.Random(seed)
    everything = easy_vqa_qa_balanced(split, seed=seed)
    shapes = [s for s in everything if s["messages"][1]["content"] in sources.EASY_VQA_SHAPES]
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
    """sources.easy_vqa_preferences on the balanced questions (easy_vqa_qa_balanced), in training
    phrasings: preferring "no" to "yes" 88% of the time would teach DPO the wording's answer, not the image's."""
    rng = random.Random(seed)
    return [{"prompt": s["messages"][:1], "images": s["images"], "chosen": s["messages"][1]["content"],
             "rejected": sources.wrong_answer(s["messages"][1]["content"], rng)}
            for s in reworded(easy_vqa_qa_balanced(split, limit, seed), seed)]


# ---------------------------------------------------------------------------
# The registry train.py's presets and --data flag name
# ---------------------------------------------------------------------------

SOURCES = {
    "easy-vqa-captions": sources.easy_vqa_captions,
    "easy-vqa-qa": sources.easy_vqa_qa,
    "easy-vqa-qa-balanced": easy_vqa_qa_balanced,
    "easy-vqa-curriculum": easy_vqa_curriculum,
    "easy-vqa-open-first": easy_vqa_open_first,
    "easy-vqa-text-curriculum": easy_vqa_text_curriculum,
    "easy-vqa-words-first": easy_vqa_words_first,
    "easy-vqa-preferences": sources.easy_vqa_preferences,
    "easy-vqa-preferences-balanced": easy_vqa_preferences_balanced,
    "easy-vqa-text": sources.easy_vqa_text,
    "easy-vqa-wide-text": easy_vqa_wide_text,
    "coco-captions": sources.coco_captions,
    "flickr30k": sources.flickr30k,
    "llava-instruct": sources.llava_instruct,
    "the-cauldron": sources.the_cauldron,  # needs a subset: "the-cauldron:vqav2"
    "cosmopedia": sources.cosmopedia_text,
    "rlaif-v": sources.rlaif_v,
}


def load_source(name_or_path: str, split: str = "train", limit: int | None = None):
    """The samples of a source named in SOURCES ("the-cauldron:SUBSET" for a subset of the Cauldron),
    or of a local file or folder (sources.local_source: caption folders, LLaVA JSON, text, preferences)."""
    name, _, subset = name_or_path.partition(":")
    if name in SOURCES and not os.path.exists(name_or_path):
        if name == "the-cauldron":
            if not subset:
                raise ValueError("the-cauldron needs a subset, e.g. 'the-cauldron:vqav2'")
            return sources.the_cauldron(subset, split=split, limit=limit)
        if subset:
            raise ValueError(f"{name} takes no ':' option (got {name_or_path!r})")
        return SOURCES[name](split=split, limit=limit)
    if not os.path.exists(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"{name_or_path}: neither a source name ({', '.join(SOURCES)}) "
                                "nor an existing file or folder")
    return sources.local_source(name_or_path, split, limit)


# ---------------------------------------------------------------------------
# Collation: samples -> padded tensors
# ---------------------------------------------------------------------------


def _takes_an_argument(fn) -> bool:
    """Whether `fn` can be called with one argument (the image)."""
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


def pad(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (B, T) long: the rows filled out to the longest with pad_id on
    `side` ("left" for generation, which continues every row on the right), the mask 1 on their tokens."""
    if side not in ("right", "left"):
        raise ValueError(f"the pad side must be 'right' or 'left', not {side!r}")
    batch, length = len(rows), max(len(row) for row in rows)
    ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((batch, length), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        at = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, at] = torch.tensor(row, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def _pad_batch(rows, tokenizer, pad_side: str) -> dict:
    """input_ids, attention_mask, labels (B, T) from (ids, labels) rows, padded on `pad_side`."""
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    input_ids, attention_mask = pad([ids for ids, _ in rows], pad_id, pad_side)  # (B, T), (B, T)
    labels, _ = pad([labels for _, labels in rows], IGNORE_INDEX, pad_side)  # (B, T)
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
    return {**_pad_batch(rows, tokenizer, pad_side), "pixel_values": _pixel_values(images, image_processor)}


def caption_ids(tokenizer, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions as a Q-Former reads them: (B, T) ids starting with BOS (whose output is the text
    feature, as BERT's [CLS]; EOS for tokenizers without BOS), right-padded, and the (B, T) mask."""
    cls = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    rows = [[cls] + tokenizer.encode(c)[: max_len - 1] for c in captions]
    return pad(rows, tokenizer.pad_id or 0)  # (B, T), (B, T)


def collate_captions(samples: list[dict], tokenizer, image_processor, max_len: int) -> dict:
    """A batch for BLIP-2's contrastive stage from caption samples: pixel_values (B, 3, H, W), the
    captions as text_ids and text_mask (B, T) (caption_ids), and same (B, B) bool, which image-caption
    pairs share a caption (all of them are positives)."""
    captions = [s["messages"][-1]["content"] for s in samples]
    text_ids, text_mask = caption_ids(tokenizer, captions, max_len)  # (B, T), (B, T)
    return {"pixel_values": image_processor([s["images"][0] for s in samples]), "text_ids": text_ids,
            "text_mask": text_mask, "same": torch.tensor([[a == b for b in captions] for a in captions])}  # (B, B)


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
    return {side: {**_pad_batch(side_rows, tokenizer, pad_side), "pixel_values": pixel_values}
            for side, side_rows in rows.items()}


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to `device`, nested dicts too (collate_preferences' two sides)."""
    return {key: value.to(device) if torch.is_tensor(value) else to_device(value, device) if isinstance(value, dict)
            else value for key, value in batch.items()}
