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

Sources (all take `limit`) are read by easyvqa.py (easy-VQA offline, balanced and ordered for the
tiny recipe) and sources.py (local files, hub sets). `SOURCES` names them all for train.py's presets
and `--data`; `load_source(name_or_path, split)` also takes a local file or folder.

Batches: `collate` (chats and texts), `collate_preferences` (both sides of preference pairs) and
`collate_captions` (images and captions, for a Q-Former's contrastive stage) make padded tensors;
`KeptFeatures` stands in for a frozen tower, computing each image's features once:

    samples = load_source("easy-vqa-qa", "train")
    batch = to_device(collate(samples[:32], tokenizer, image_processor, image_tokens=...), device)
    logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
"""

import hashlib
import inspect
import os

import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import easyvqa
import sources
from processing import IGNORE_INDEX, Special, Tokenizer, build_prompt, load_image
from sources import IMAGE_MARKER, count_image_parts

# ---------------------------------------------------------------------------
# Samples: their kind, their text, a tokenizer learned from it (sources.py builds chats: chat_sample)
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


CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]  # a learned tokenizer's special tokens


def train_tokenizer(samples, vocab_size: int, lowercase: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer learned from the samples' text (sample_text), with ChatML's special
    tokens: what a from-scratch preset speaks (the `tokenizers` library's BpeTrainer). lowercase: text
    is lower-cased before it is split (as BERT's uncased tokenizers do), so letter case alone never
    changes a token, and "n't" is written " not" ("isn't" is "is not"), so that a negation is always the
    word "not", never a piece such as "n" that other words ("drawn") split into."""
    backend = tokenizers.Tokenizer(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace("can't", "can not"),
                                                   normalizers.Replace("n't", " not"), normalizers.Replace("n’t", " not")])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((sample_text(s) for s in samples), trainer)
    return Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ---------------------------------------------------------------------------
# Which samples make a step's batch, and the image size a batch has
# ---------------------------------------------------------------------------


def global_batch(n_samples: int, step: int, cfg) -> list[int]:
    """Sample indices of optimizer step `step`: epochs are seeded permutations (or, without shuffling, the
    data's own order) end to end, so any step's batch is known without replaying the ones before."""
    out, start = [], step * cfg.batch_size
    while len(out) < cfg.batch_size:
        epoch, offset = divmod(start + len(out), n_samples)
        seeded = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        order = torch.randperm(n_samples, generator=seeded) if cfg.shuffle else torch.arange(n_samples)
        out.extend(order[offset: offset + cfg.batch_size - len(out)].tolist())
    return out


def processor_size(processor) -> int:
    """Pixels per side of the square images the processor makes."""
    size = processor.crop_size if processor.do_center_crop else processor.size
    if size.get("height") != size.get("width", size.get("height")) or "shortest_edge" in size:
        raise ValueError(f"training needs square images of one size; this image processor gives {size}")
    return size["height"]


# ---------------------------------------------------------------------------
# The registry train.py's presets and --data flag name
# ---------------------------------------------------------------------------

SOURCES = {
    "easy-vqa-captions": easyvqa.easy_vqa_captions,
    "easy-vqa-qa": easyvqa.easy_vqa_qa,
    "easy-vqa-qa-balanced": easyvqa.easy_vqa_qa_balanced,
    "easy-vqa-curriculum": easyvqa.easy_vqa_curriculum,
    "easy-vqa-open-first": easyvqa.easy_vqa_open_first,
    "easy-vqa-text-curriculum": easyvqa.easy_vqa_text_curriculum,
    "easy-vqa-words-first": easyvqa.easy_vqa_words_first,
    "easy-vqa-preferences": easyvqa.easy_vqa_preferences,
    "easy-vqa-preferences-balanced": easyvqa.easy_vqa_preferences_balanced,
    "easy-vqa-text": easyvqa.easy_vqa_text,
    "easy-vqa-wide-text": easyvqa.easy_vqa_wide_text,
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


# --- a frozen tower's features, computed once per image (train.py's chat batches carry them) ---


class KeptFeatures:
    """A frozen tower's output (vision_layer) per image, computed the first time the image comes and
    kept in memory, so later epochs skip the tower. Keyed by the pixels the processor made; one image
    at a time, so that a resumed run, its memory empty, computes the very same numbers."""

    def __init__(self, model):  # a VLM
        self.model, self.kept = model, {}

    @torch.no_grad()
    def __call__(self, pixel_values):  # (N, 3, H, W) -> (N, [1 +] P, Dv)
        keys = [hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() for image in pixel_values]
        for image, key in zip(pixel_values, keys):
            if key not in self.kept:
                hidden = self.model.vision(image[None], layer=self.model.config.vision_layer)  # (1, [1 +] P, Dv)
                self.kept[key] = hidden[0]
        return torch.stack([self.kept[key] for key in keys])


def to_device(batch: dict, device) -> dict:
    """The batch with every tensor moved to `device`, nested dicts too (collate_preferences' two sides)."""
    return {key: value.to(device) if torch.is_tensor(value) else to_device(value, device) if isinstance(value, dict)
            else value for key, value in batch.items()}
