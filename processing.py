"""Raw inputs -> what a glimpse model reads: pixel values (`load_image`, `ImageProcessor` for SigLIP,
CLIP and DINOv2; SmolVLM's tiles are layouts.SmolVLMImageProcessor) and token ids (`Tokenizer`, chat
templates, `build_prompt` with image tokens and labels on the replies), exactly as transformers computes them:

    pixel_values, grids = SmolVLMImageProcessor.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")(["cat.jpg"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    tokenizer = Tokenizer.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")
    ids = build_prompt(tokenizer, messages, template="smolvlm", image_tokens=[smolvlm_image_tokens(*grids[0], 64)])
    # (SmolVLMImageProcessor and smolvlm_image_tokens: layouts.py)

Typed text is always plain text: "<|im_start|>" or "<image>" in a message never becomes a special
token. File formats are read and written in checkpoints.py.
"""

import functools
import itertools
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import tokenizers
import torch
from PIL import Image, UnidentifiedImageError
from tokenizers import AddedToken

from checkpoints import (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, ImageError, decode_image, load_image_processor,
                         read_tokenizer, write_image_processor, write_tokenizer)
from configs import check_resample_and_normalize, check_sizes

# ---------------------------------------------------------------------------
# Images: loading a file safely, then resize, crop and normalize as preprocessor_config.json says
# ---------------------------------------------------------------------------


def load_image(image) -> Image.Image:
    """An upright RGB image, every pixel decoded, from a path, a binary file object or a PIL image
    (as transformers' image_utils.load_image); any problem is one ImageError line. The decoding itself
    (the pixel limit, the EXIF orientation, any mode to RGB) is checkpoints.decode_image."""
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "<PIL image>"
    elif isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if not os.path.isfile(name):
            raise ImageError(f"{name}: no such file")
        if os.path.getsize(name) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
    else:
        name = getattr(image, "name", "<file object>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with nullcontext(image) if isinstance(image, Image.Image) else Image.open(image) as opened:
                return decode_image(opened, name)  # Image.open reads the header only
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or in a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow's decoders raise on bad data
        raise ImageError(f"{name}: truncated or corrupt image ({e})") from None


@dataclass
class ImageProcessor:
    """Images -> pixel_values as transformers' SiglipImageProcessor, CLIPImageProcessor and BitImageProcessor
    (DINOv2) make them (PilBackend._preprocess). `size` {"height", "width"} squashes, {"shortest_edge"}
    (or an int) keeps the aspect ratio."""

    size: dict
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = False
    crop_size: dict | None = None
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD_MEAN
    image_std: tuple = IMAGENET_STANDARD_STD

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)  # JSON gives lists
        if isinstance(self.size, int):
            self.size = {"shortest_edge": self.size}
        if isinstance(self.crop_size, int):
            self.crop_size = {"height": self.crop_size, "width": self.crop_size}
        if self.do_resize:
            check_sizes("size", self.size, ({"height", "width"}, {"shortest_edge"}))
        if self.do_center_crop:
            check_sizes("crop_size", self.crop_size, ({"height", "width"},))
        check_resample_and_normalize(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ImageProcessor":
        """From preprocessor_config.json in a folder or a hub id like "google/siglip-base-patch16-224"."""
        return load_image_processor(cls, name_or_path)

    def save(self, folder: str):
        """Write a preprocessor_config.json that `from_pretrained(folder)` reads back as this processor."""
        write_image_processor(self, folder)

    def __call__(self, images) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float32 for one image or a list (anything `load_image` reads)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("ImageProcessor got an empty list of images")
        pixel_values = [self.preprocess(load_image(image)) for image in images]  # B x (3, H, W)
        if len({p.shape for p in pixel_values}) > 1:
            raise ValueError(f"images came out in different sizes {sorted({p.shape for p in pixel_values})}; "
                             "a batch needs a center crop or a {height, width} size")
        return torch.from_numpy(np.stack(pixel_values))  # (B, 3, H, W)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> (3, H, W) float32, each step in NumPy as transformers' PIL backend does it."""
        if self.do_resize:
            height, width = self.resize_output_size(image.height, image.width)
            # image_transforms.resize: Pillow resizes the uint8 image, reducing_gap=None.
            image = image.resize((width, height), resample=self.resample)
        pixels = np.array(image).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])  # (3, h, w)
        return rescale_and_normalize(pixels, self)  # (3, H, W) float32

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """`size` itself, or the short side to size["shortest_edge"] and the long one in proportion,
        rounded down (image_transforms.get_resize_output_image_size, default_to_square=False)."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def rescale_and_normalize(pixels: np.ndarray, settings) -> np.ndarray:
    """(3, H, W) uint8 -> float32, rescaled and normalized as transformers' PIL backend does it."""
    if settings.do_rescale:  # image_transforms.rescale: multiply in float64, then round to float32
        pixels = pixels.astype(np.float64) * settings.rescale_factor  # (3, H, W)
    pixels = pixels.astype(np.float32)  # (3, H, W)
    if settings.do_normalize:  # image_transforms.normalize: in float32
        mean = np.array(settings.image_mean, dtype=np.float32).reshape(3, 1, 1)  # (3, 1, 1)
        std = np.array(settings.image_std, dtype=np.float32).reshape(3, 1, 1)  # (3, 1, 1)
        pixels = (pixels - mean) / std  # (3, H, W)
    return pixels


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (C, height, width) middle of (C, H, W) pixels, zero-padded where the image is smaller
    (transformers' image_transforms.center_crop, its rounding of odd margins included)."""
    _, h, w = pixels.shape
    top, left = (h - height) // 2, (w - width) // 2  # negative where the image is the smaller
    rows, cols = min(h, height), min(w, width)
    out = np.zeros((pixels.shape[0], height, width), pixels.dtype)  # (C, height, width)
    out[:, max(-top, 0):max(-top, 0) + rows, max(-left, 0):max(-left, 0) + cols] = \
        pixels[:, max(top, 0):max(top, 0) + rows, max(left, 0):max(left, 0) + cols]  # (C, rows, cols)
    return out


# ---------------------------------------------------------------------------
# Text: tokenizer and chat prompts
# ---------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids over a `tokenizers.Tokenizer` (the core of transformers' PreTrainedTokenizerFast);
    typed text never becomes a special token: prompts get theirs from `build_prompt`, by name."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None):
        backend.encode_special_tokens = True  # "<|im_start|>" in the text stays text
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template  # the Jinja template the checkpoint ships, for reference
        self.bos_id, self.eos_id, self.pad_id = (None if token is None else self.token_to_id(token)
                                                 for token in (bos_token, eos_token, pad_token))
        self.special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}

    def __setstate__(self, state):
        """Unpickled (a DataLoader worker's copy): tokenizers' pickle forgets encode_special_tokens."""
        self.__dict__.update(state)
        self.backend.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no BOS/EOS added, no special tokens matched."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Make each of `tokens` special, a new one at the next free id (transformers'
        add_special_tokens({"additional_special_tokens": tokens})); the embeddings must grow to match."""
        if isinstance(tokens, str) or not all(isinstance(token, str) and token for token in tokens):
            raise ValueError(f"add_special_tokens takes a list of non-empty strings; got {tokens!r}")
        self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
        self.special_ids = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """From a folder with tokenizer.json, a `.gguf` file or a hub id (checkpoints.read_tokenizer)."""
        return cls(*read_tokenizer(name_or_path))

    def save(self, folder: str) -> None:
        """Write tokenizer.json and a tokenizer_config.json, which `from_pretrained(folder)` reads back."""
        write_tokenizer(folder, self.backend, self.bos_token, self.eos_token, self.pad_token, self.chat_template)


# --- chat prompts ---
# A chat template turns messages into a list of parts: "text" (tokenized), Special("<|im_end|>") (a
# special token, by name), ImagePlaceholder() (where an image's tokens go) and Target(part) (a part
# of a reply, which training learns). Only templates write Special parts, and placeholders come only
# from {"type": "image"} parts, so typed text can never forge either.

ROLES = ("system", "user", "assistant")
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
IGNORE_INDEX = -100  # the label of a token training does not learn (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Special:
    """A special token in a rendered prompt, e.g. Special("<|im_start|>")."""
    token: str


@dataclass(frozen=True)
class ImagePlaceholder:
    """Where an image part of a message goes in a rendered prompt."""


@dataclass(frozen=True)
class Target:
    """A part (text or Special) of an assistant's reply: its tokens keep their ids as labels."""
    part: str | Special


def untargeted(part):
    """The part inside a Target, or the part itself."""
    return part.part if isinstance(part, Target) else part


def reply_parts(message: dict, parts: list) -> list:
    """`parts` as they are, or all of them as Targets when `message` is the assistant's."""
    return [Target(part) for part in parts] if message["role"] == "assistant" else parts


def render_chatml(messages: list[dict], add_generation_prompt: bool,
                  default_system: str | None = SMOLLM2_SYSTEM_PROMPT) -> list:
    r"""SmolLM2's chat template: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, its default
    system message first unless the chat has one, `<|im_start|>assistant\n` to ask for a reply. A
    reply is learned from its content through <|im_end|>. "chatml-plain" has no default system."""
    if messages and messages[0]["role"] != "system" and default_system:
        messages = [{"role": "system", "content": [default_system]}, *messages]
    parts = []
    for message in messages:
        parts += [Special("<|im_start|>"), f"{message['role']}\n",
                  *reply_parts(message, [*message["content"], Special("<|im_end|>")]), "\n"]
    if add_generation_prompt:
        parts += [Special("<|im_start|>"), "assistant\n"]
    return parts


def render_smolvlm(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""SmolVLM-Instruct's chat template: `<|im_start|>User:<image>What is this?<end_of_utterance>\n
    Assistant: A cat.<end_of_utterance>\nAssistant:`, a space after the role's colon unless an image
    follows. A reply is learned from that space (the model writes " A cat.") through <end_of_utterance>."""
    parts = [Special("<|im_start|>")]
    for message in messages:
        content = message["content"]
        space = [] if content and isinstance(content[0], ImagePlaceholder) else [" "]
        parts += [message["role"].capitalize() + ":",  # Jinja's capitalize is Python's
                  *reply_parts(message, [*space, *content, Special("<end_of_utterance>")]), "\n"]
    if add_generation_prompt:
        parts.append("Assistant:")
    return parts


def render_zephyr(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""TinyLlama-1.1B-Chat's Zephyr template: `<|{role}|>\n{content}</s>\n` per message (plain-text
    roles), `<|assistant|>\n` after a last message to ask for a reply, learned through its </s>."""
    parts = []
    for message in messages:
        parts += [f"<|{message['role']}|>\n", *reply_parts(message, [*message["content"], Special("</s>")]), "\n"]
    if add_generation_prompt and messages:
        parts.append("<|assistant|>\n")
    return parts


def render_llava(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""LLaVA-1.5's chat template (llava-hf): `USER: <image>\nWhat is it? ASSISTANT:`, each message's images
    first ("\n" after each), then its texts (" " after each); a reply is learned through </s>."""
    parts = []
    for message in messages:
        role, content = message["role"], message["content"]
        images = [part for image in content if isinstance(image, ImagePlaceholder) for part in (image, "\n")]
        texts = [text + " " for text in content if isinstance(text, str)] + [Special("</s>")] * (role == "assistant")
        parts += ["" if role == "system" else f"{role.upper()}: ", *images, *reply_parts(message, texts)]
    return parts + ["ASSISTANT:"] * add_generation_prompt


CHAT_TEMPLATES = {"chatml": render_chatml, "smolvlm": render_smolvlm, "zephyr": render_zephyr, "llava": render_llava,
                  "chatml-plain": functools.partial(render_chatml, default_system=None)}


def end_of_turn(template: str) -> str:
    """The special token that ends a reply in `template`: the last one it writes after a reply."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(CHAT_TEMPLATES)}")
    parts = CHAT_TEMPLATES[template]([{"role": "assistant", "content": []}], False)
    return next(untargeted(p).token for p in reversed(parts) if isinstance(untargeted(p), Special))


def chat_message(message: dict) -> dict:
    """A checked message with its content as parts: a string is one text part, HF-style
    {"type": "image"} parts become ImagePlaceholder()s (other keys, like the image, are ignored)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(content, (str, list)):
        raise ValueError(f"A message needs a role in {ROLES} and content, a string or a list of parts; "
                         f"got {message!r}")
    parts = []
    for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        if isinstance(part, dict) and part.get("type") == "image":
            parts.append(ImagePlaceholder())
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ValueError(f'A content part is {{"type": "image"}} or {{"type": "text", "text": str}}; '
                             f"got {part!r}")
    return {"role": message["role"], "content": parts}


def expand_images(parts: list, image_tokens: list | None) -> list:
    """`parts` with the i-th image placeholder replaced by the parts of image_tokens[i] (never
    Targets: image tokens are the model's input, never its answer)."""
    placeholders = sum(isinstance(untargeted(part), ImagePlaceholder) for part in parts)
    image_tokens = [] if image_tokens is None else list(image_tokens)
    if placeholders != len(image_tokens):
        raise ValueError(f"The chat has {placeholders} image part(s) but image_tokens has {len(image_tokens)} "
                         "entries; pass one list of parts per image, in order, e.g. smolvlm_image_tokens(rows, "
                         "cols, image_seq_len) or [Special('<image>')] * n")
    for entry in image_tokens:
        if not isinstance(entry, (list, tuple)) or not all(isinstance(part, (str, Special)) for part in entry):
            raise ValueError(f"An image_tokens entry is a list of Special tokens and text; got {entry!r}")
    entries = iter(image_tokens)
    return [new for part in parts
            for new in (next(entries) if isinstance(untargeted(part), ImagePlaceholder) else [part])]


def build_prompt(tokenizer: Tokenizer, messages: list[dict], template: str = "chatml",
                 add_generation_prompt: bool = True, image_tokens: list | None = None,
                 return_labels: bool = False) -> list[int] | tuple[list[int], list[int]]:
    """Token ids of a chat rendered by `CHAT_TEMPLATES[template]`, those of transformers'
    apply_chat_template(tokenize=True) (its processor's, with images) but for typed special tokens.

    messages: [{"role": "system" | "user" | "assistant", "content": str | HF-style parts}, ...].
    image_tokens: per image part, the parts it stands for: layouts.smolvlm_image_tokens(...) or [Special("<image>")] * n.
    return_labels: also unshifted labels, IGNORE_INDEX but on the tokens of the assistant's replies
        (a token is learned when it starts inside one), so training learns only the answers.
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(CHAT_TEMPLATES)}")
    chat = [chat_message(message) for message in messages]
    parts = expand_images(CHAT_TEMPLATES[template](chat, add_generation_prompt), image_tokens)

    ids, labels = [], []
    for text_run, run in itertools.groupby(parts, key=lambda part: isinstance(untargeted(part), str)):
        if text_run:  # one string, and the character spans of its Targets
            text, spans = "", []
            for part in run:
                if isinstance(part, Target):
                    spans.append((len(text), len(text) + len(part.part)))
                text += untargeted(part)
            encoding = tokenizer.backend.encode(text, add_special_tokens=False)
            for token_id, (start, _) in zip(encoding.ids, encoding.offsets):
                ids.append(token_id)
                labels.append(token_id if any(a <= start < b for a, b in spans) else IGNORE_INDEX)
        else:  # Special tokens, one id each
            for part in run:
                token = untargeted(part).token
                token_id = tokenizer.token_to_id(token)
                if token_id not in tokenizer.special_ids:
                    raise ValueError(f"Chat template {template!r} needs the special token {token!r}, which this "
                                     "tokenizer does not have (Tokenizer.add_special_tokens adds it)")
                ids.append(token_id)
                labels.append(token_id if isinstance(part, Target) else IGNORE_INDEX)
    return (ids, labels) if return_labels else ids
