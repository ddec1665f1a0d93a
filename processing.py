"""Turning raw inputs into what a glimpse model reads: pixel values and token ids.

Images: `load_image` opens a file safely (a size limit before decoding, the EXIF orientation, any
Pillow mode to RGB, one-line `ImageError`s naming the file). `ImageProcessor` (SigLIP, CLIP, DINOv2)
resizes, crops and normalizes exactly as transformers does, by the checkpoint's
preprocessor_config.json; `SmolVLMImageProcessor` also cuts each image into tiles.

    pixel_values = ImageProcessor.from_pretrained("google/siglip-base-patch16-224")(["cat.jpg"])  # (1, 3, 224, 224)
    pixel_values, grids = SmolVLMImageProcessor.from_pretrained("HuggingFaceTB/SmolVLM-256M-Instruct")(["cat.jpg"])
    # a 3:2 photo: (13, 3, 512, 512), [(3, 4)]

Text: a `Tokenizer` (over Hugging Face `tokenizers`: a folder, a hub id or a llama.cpp `.gguf` file),
and `build_prompt`, which renders a chat into ids as the model's chat template does. Image parts
become the tokens the image embeddings go into; labels can mask all but the assistant's replies:

    tokenizer = Tokenizer.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A cat."}]
    ids, labels = build_prompt(tokenizer, messages, template="smolvlm", add_generation_prompt=False,
                               image_tokens=[smolvlm_image_tokens(3, 4, 64)], return_labels=True)

One rule runs through this file: text a user typed is always plain text. Writing "<|im_start|>"
(or "<image>") in a message gives the ids of those characters, never the special token, so a
prompt's structure comes only from the chat template.
"""

import functools
import itertools
import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import tokenizers
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import AddedToken

from checkpoints import (CheckpointError, build_processor, check_side, read_preprocessor_config, read_tokenizer,
                         write_json, write_tokenizer)

# ---------------------------------------------------------------------------
# Images: loading a file safely, then resize, crop and normalize as preprocessor_config.json says
# ---------------------------------------------------------------------------

# A small PNG or JPEG can claim a size that takes gigabytes to decode (a "decompression bomb"), so
# images over this many pixels are refused from their header, before any pixel is decoded. Pillow's
# own check (Image.MAX_IMAGE_PIXELS, about 89M) is a second net behind this one.
MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """An image that cannot be loaded; the message is one line naming the file and the problem."""


def load_image(image) -> Image.Image:
    """An RGB image from a path, a binary file object or a PIL image, every pixel decoded and turned
    upright by its EXIF orientation (as transformers' image_utils.load_image turns files).

    Raises ImageError for a missing, empty, truncated or non-image file, an image over MAX_PIXELS,
    and a mode that has no RGB conversion.
    """
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
            if isinstance(image, Image.Image):
                return _upright_rgb(image, name)
            with Image.open(image) as opened:  # reads the header only
                return _upright_rgb(opened, name)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image, or in a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow's decoders raise on bad data
        raise ImageError(f"{name}: truncated or corrupt image ({e})") from None


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    """Check the header's size, decode every pixel, apply the EXIF orientation, convert to RGB."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of "
                         f"{MAX_PIXELS:,} (processing.MAX_PIXELS)")
    image.load()  # decode it all now: a truncated file fails here, not halfway through a batch
    image = ImageOps.exif_transpose(image)  # always a new image, so the file can be closed
    return _to_rgb(image, name)


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode as RGB. Transparency (RGBA, LA, PA, a palette's or a color's "transparency")
    is composited on white, as transformers' image_transforms.convert_to_rgb does; 16-bit and float
    grayscale are scaled to 8 bits first (Pillow's own convert clips them at 255)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8_bit(image)
    try:
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return image.convert("RGB")
    except ValueError as e:  # e.g. "conversion from La to L not supported"
        raise ImageError(f"{name}: unsupported image mode {image.mode} ({e})") from None


def _to_8_bit(image: Image.Image) -> Image.Image:
    """Mode I;16* or I (read as 16-bit, 65535 -> 255) or F (floats in [0, 1], or else already 0..255)
    as mode L, rounded and clipped."""
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))  # (H, W)
    if image.mode != "F":
        pixels = pixels / 257
    elif pixels.max(initial=0) <= 1:
        pixels = pixels * 255
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


# Normalization constants (transformers' image_utils.py).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# What transformers' PIL image processors use for the keys a preprocessor_config.json leaves out:
# the class attributes of models/siglip/image_processing_pil_siglip.py, models/clip/
# image_processing_pil_clip.py and models/bit/image_processing_pil_bit.py (DINOv2 checkpoints name
# BitImageProcessor). All three also default to bicubic resizing and rescale, normalize, RGB on.
CLIP_DEFAULTS = {"size": {"shortest_edge": 224}, "do_center_crop": True,
                 "crop_size": {"height": 224, "width": 224},
                 "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
IMAGE_PROCESSOR_DEFAULTS = {
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "do_center_crop": False,
                             "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD},
    "CLIPImageProcessor": CLIP_DEFAULTS,
    "BitImageProcessor": CLIP_DEFAULTS,
}


@dataclass
class ImageProcessor:
    """Images -> pixel_values, by the steps of transformers' PIL image processors in their order
    (PilBackend._preprocess in image_processing_backends.py): resize, center crop, rescale,
    normalize. The same class covers SigLIP, CLIP and DINOv2; only the settings differ.

    Sizes are dicts as in preprocessor_config.json: `size` {"height", "width"} (SigLIP: squash to
    that size) or {"shortest_edge"} (CLIP, DINOv2: keep the aspect ratio); `crop_size` {"height",
    "width"}. An int `size` means {"shortest_edge": size}, an int `crop_size` a square, as
    transformers' get_size_dict reads these processors' older configs.
    """

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
        """Read preprocessor_config.json from a local folder or a hub id like
        "google/siglip-base-patch16-224" (only that file is downloaded)."""
        path, config, kind = read_preprocessor_config(name_or_path)
        if kind not in IMAGE_PROCESSOR_DEFAULTS:
            hint = "; use SmolVLMImageProcessor" if kind in SMOLVLM_IMAGE_PROCESSORS else ""
            raise CheckpointError(f"{path}: image processor {kind!r} is not supported; "
                                  f"supported: {sorted(IMAGE_PROCESSOR_DEFAULTS)}{hint}")
        return build_processor(cls, path, config, IMAGE_PROCESSOR_DEFAULTS[kind])

    def save(self, folder: str):
        """Write a preprocessor_config.json that `from_pretrained(folder)` reads back as this processor."""
        kind = "SiglipImageProcessor" if "height" in self.size else "CLIPImageProcessor"
        config = {"image_processor_type": kind, **asdict(self), "resample": int(self.resample)}
        write_json(config, os.path.join(folder, "preprocessor_config.json"))

    def __call__(self, images) -> torch.Tensor:
        """pixel_values (B, 3, H, W) float32 for one image or a list of them: paths, binary file
        objects or PIL images, each read by `load_image`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
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
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return rescale_and_normalize(pixels, self)

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: `size` itself, or the short side to size["shortest_edge"]
        and the long side in proportion, rounded down (image_transforms.get_resize_output_image_size,
        default_to_square=False)."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


def check_sizes(name: str, sizes, keys: tuple) -> None:
    """A size setting: a dict with one of the key sets in `keys`, every side within checkpoints.MAX_IMAGE_SIDE."""
    if not isinstance(sizes, dict) or set(sizes) not in keys:
        wanted = ", or ".join(" and ".join(sorted(k)) for k in keys)
        raise ValueError(f"{name} must have the keys {wanted}; got {sizes}")
    for key, side in sizes.items():
        check_side(f"{name}.{key}", side)


def check_resample_and_normalize(settings):
    """The checks every image processor's settings share."""
    if settings.resample not in set(Image.Resampling):
        raise ValueError(f"resample must be a Pillow filter number 0-5; got {settings.resample!r}")
    for values in (settings.image_mean, settings.image_std):
        if settings.do_normalize and len(values) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, one per RGB channel; got {values}")


def rescale_and_normalize(pixels: np.ndarray, settings) -> np.ndarray:
    """(3, H, W) uint8 -> float32, rescaled and normalized as `settings` (an image processor) says,
    each step in NumPy as transformers' PIL backend does it."""
    if settings.do_rescale:  # image_transforms.rescale: multiply in float64, then round to float32
        pixels = pixels.astype(np.float64) * settings.rescale_factor
    pixels = pixels.astype(np.float32)  # (3, H, W)
    if settings.do_normalize:  # image_transforms.normalize: in float32
        mean = np.array(settings.image_mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.array(settings.image_std, dtype=np.float32).reshape(3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (C, height, width) middle of (C, H, W) pixels, as transformers' image_transforms.center_crop:
    the crop starts at (H - height) // 2, so an odd surplus leaves its extra row at the bottom (column
    at the right); a side shorter than the crop is padded with zeros, an odd padding's extra row at
    the top (column at the left)."""
    _, h, w = pixels.shape
    top, left = (h - height) // 2, (w - width) // 2  # negative where the image is the smaller
    rows, cols = min(h, height), min(w, width)
    out = np.zeros((pixels.shape[0], height, width), pixels.dtype)  # (C, height, width)
    out[:, max(-top, 0):max(-top, 0) + rows, max(-left, 0):max(-left, 0) + cols] = \
        pixels[:, max(top, 0):max(top, 0) + rows, max(left, 0):max(left, 0) + cols]
    return out


# --- SmolVLM: a big image cut into square tiles, plus the whole image shrunk to one tile ---
#
# SmolVLM (like Idefics3, whose image processor it copies) sees an image as several tiles of the
# vision tower's size S (max_image_size, 512 for SmolVLM-256M): the image is resized so its longest
# edge is size["longest_edge"] (2048: small images are enlarged), then its sides are rounded up to
# multiples of S, cut into rows x cols tiles, row by row, and followed by a "global" tile, the whole
# image squashed to S x S. An image that fits in one tile is just that tile, with (rows, cols) = (0, 0).

SMOLVLM_IMAGE_PROCESSORS = ("SmolVLMImageProcessor", "Idefics3ImageProcessor")
SMOLVLM_MAX_IMAGE_SIZE = 4096  # transformers' MAX_IMAGE_SIZE: no side is resized beyond this


@dataclass
class SmolVLMImageProcessor:
    """Images -> (pixel_values, grids) as transformers' SmolVLM / Idefics3 image processors cut and
    scale them (models/smolvlm/image_processing_pil_smolvlm.py, the PIL/NumPy one). Defaults are
    that class's; the checkpoint's preprocessor_config.json overrides them.

    `size` is {"longest_edge": N} (or {"height", "width"}: squash to that), `max_image_size`
    {"longest_edge": S}, the tile side. `do_pad` is read and has nothing to do: every tile comes out
    S x S (see __call__).
    """

    size: dict = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict = field(default_factory=lambda: {"longest_edge": 364})
    resample: int = Image.Resampling.LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = IMAGENET_STANDARD_MEAN
    image_std: tuple = IMAGENET_STANDARD_STD
    do_pad: bool = True

    def __post_init__(self):
        if self.do_resize:
            check_sizes("size", self.size, ({"longest_edge"}, {"height", "width"}))
        check_sizes("max_image_size", self.max_image_size, ({"longest_edge"},))
        check_resample_and_normalize(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "SmolVLMImageProcessor":
        """Read preprocessor_config.json (image_processor_type SmolVLMImageProcessor or
        Idefics3ImageProcessor) from a local folder or a hub id like
        "HuggingFaceTB/SmolVLM-256M-Instruct" (only that file is downloaded)."""
        path, config, kind = read_preprocessor_config(name_or_path)
        if kind not in SMOLVLM_IMAGE_PROCESSORS:
            raise CheckpointError(f"{path}: image processor {kind!r} is not a SmolVLM one "
                                  f"{SMOLVLM_IMAGE_PROCESSORS}; use ImageProcessor")
        return build_processor(cls, path, config)

    def __call__(self, images) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """(pixel_values, grids) for one image or a list of them (paths, binary file objects or
        PIL images, each read by `load_image`).

        pixel_values: (N_tiles, 3, S, S) float32, every tile of every image: each image's tiles row
        by row, then its global tile (transformers' order, its (B, N, 3, S, S) flattened).
        grids: (rows, cols) per image; an image has rows * cols + 1 tiles, or 1 when (0, 0). Its
        prompt tokens are `smolvlm_image_tokens(rows, cols, image_seq_len)`.

        No pixel_attention_mask, which transformers also returns: every tile here is a full S x S,
        and its zeros only mark the padding tiles that stack samples into one (B, N, ...) tensor.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("SmolVLMImageProcessor got an empty list of images")
        tiles, grids = [], []
        for image in images:
            image_tiles, grid = self.tiles(load_image(image))
            tiles += [rescale_and_normalize(np.array(tile).transpose(2, 0, 1), self) for tile in image_tiles]
            grids.append(grid)
        return torch.from_numpy(np.stack(tiles)), grids  # (N_tiles, 3, S, S)

    def tiles(self, image: Image.Image) -> tuple[list[Image.Image], tuple[int, int]]:
        """One RGB image -> its S x S tiles (row by row, then the global tile) and (rows, cols).
        Every resize is Pillow's on the uint8 image, as transformers' PIL backend does it."""
        tile = self.max_image_size["longest_edge"]
        if self.do_resize:
            image = self.resize(image, *self.resize_output_size(image.height, image.width))
        if not self.do_image_splitting:
            return [self.resize(image, tile, tile)], (0, 0)
        image = self.resize(image, *tile_multiple_size(image.height, image.width, tile))
        if image.height <= tile and image.width <= tile:
            return [image], (0, 0)  # exactly one tile
        rows, cols = image.height // tile, image.width // tile
        crops = [image.crop((col * tile, row * tile, (col + 1) * tile, (row + 1) * tile))
                 for row in range(rows) for col in range(cols)]
        return crops + [self.resize(image, tile, tile)], (rows, cols)

    def resize(self, image: Image.Image, height: int, width: int) -> Image.Image:
        return image.resize((width, height), resample=self.resample)

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) for the first resize: size itself, or the longest edge to
        size["longest_edge"] (up or down) and the other in proportion, rounded down and then up to
        an even number, both kept under SMOLVLM_MAX_IMAGE_SIZE (transformers'
        get_resize_output_image_size, the float arithmetic and all)."""
        if "longest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        longest, aspect_ratio = self.size["longest_edge"], width / height
        if width >= height:
            width, height = longest, int(longest / aspect_ratio)
            height += height % 2
        else:
            height, width = longest, int(longest * aspect_ratio)
            width += width % 2
        height, width = max(height, 1), max(width, 1)
        # Then scaled down, if need be, to fit SMOLVLM_MAX_IMAGE_SIZE.
        aspect_ratio = width / height
        if width >= height and width > SMOLVLM_MAX_IMAGE_SIZE:
            width, height = SMOLVLM_MAX_IMAGE_SIZE, int(SMOLVLM_MAX_IMAGE_SIZE / aspect_ratio)
        elif height > width and height > SMOLVLM_MAX_IMAGE_SIZE:
            height, width = SMOLVLM_MAX_IMAGE_SIZE, int(SMOLVLM_MAX_IMAGE_SIZE * aspect_ratio)
        return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of the tile side (transformers'
    resize_for_vision_encoder): the longer side up, the other from it by the aspect ratio, then up."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect_ratio) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect_ratio) / tile) * tile
    return height, width


# ---------------------------------------------------------------------------
# Text: tokenizer and chat prompts
# ---------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids, over a `tokenizers.Tokenizer` (mirrors the useful core of transformers'
    `PreTrainedTokenizerFast`).

    Special tokens written in the text are not matched: `encode` sees user text as plain text and
    adds no BOS. Prompts get their special tokens from `build_prompt`, by name.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None):
        backend.encode_special_tokens = True  # "<|im_start|>" in the text stays text
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template  # the Jinja template the checkpoint ships, for reference
        self.bos_id = self.token_to_id(bos_token) if bos_token is not None else None
        self.eos_id = self.token_to_id(eos_token) if eos_token is not None else None
        self.pad_id = self.token_to_id(pad_token) if pad_token is not None else None
        self.special_ids = {i for i, token in backend.get_added_tokens_decoder().items() if token.special}

    def __setstate__(self, state):
        """After unpickling or copy.deepcopy (a DataLoader worker's copy): tokenizers' pickled state
        leaves out encode_special_tokens, so set it again."""
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
        """Make each of `tokens` a special token, as transformers' `add_special_tokens(
        {"additional_special_tokens": tokens})` does: one the vocabulary lacks (say "<image>" in a
        text-only checkpoint) gets the next free id, in the order given; one it has keeps its id.
        `special_ids` and `vocab_size` follow; the model's embedding table must grow to match.
        Typed text still never turns into these tokens (`encode`)."""
        if isinstance(tokens, str) or not all(isinstance(token, str) and token for token in tokens):
            raise ValueError(f"add_special_tokens takes a list of non-empty strings; got {tokens!r}")
        self.backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
        self.special_ids = {i for i, token in self.backend.get_added_tokens_decoder().items() if token.special}

    # --- loading and saving ---

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """Load from a local folder with tokenizer.json, a `.gguf` file, or a Hub id like
        "HuggingFaceTB/SmolLM2-135M-Instruct" (only the tokenizer files are downloaded; the file
        formats are read by checkpoints.read_tokenizer)."""
        return cls(*read_tokenizer(name_or_path))

    def save(self, folder: str) -> None:
        """Write tokenizer.json and a tokenizer_config.json, which `from_pretrained(folder)` reads back."""
        write_tokenizer(folder, self.backend, self.bos_token, self.eos_token, self.pad_token, self.chat_template)


# --- chat prompts ---
#
# A chat template turns messages into a list of parts:
#   "text"               plain text, tokenized;
#   Special("<|im_end|>") a special token, looked up by name;
#   ImagePlaceholder()   where an image goes: build_prompt puts that image's tokens there;
#   Target(part)         a part of an assistant's reply, which training learns (see build_prompt).
# Only the template writes Special parts, so a message can never forge one, and an image
# placeholder comes only from an {"type": "image"} part, never from "<image>" typed in text.

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
    r"""ChatML, as SmolLM2's chat template writes it:

        <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
        <|im_start|>user\nHi<|im_end|>\n
        <|im_start|>assistant\n

    one `<|im_start|>{role}\n{content}<|im_end|>\n` per message, SmolLM2's default system message
    first when the chat does not start with one, and `<|im_start|>assistant\n` to ask for a reply.
    A reply is learned from its content through its <|im_end|>. (SmolLM2's template only knows
    string content; content given as parts is written part after part.) "chatml-plain" is the
    same without a default system message, for models trained from scratch.
    """
    if messages and messages[0]["role"] != "system" and default_system:
        messages = [{"role": "system", "content": [default_system]}, *messages]
    parts = []
    for message in messages:
        parts += [Special("<|im_start|>"), f"{message['role']}\n"]
        parts += reply_parts(message, [*message["content"], Special("<|im_end|>")])
        parts.append("\n")
    if add_generation_prompt:
        parts += [Special("<|im_start|>"), "assistant\n"]
    return parts


def render_smolvlm(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""SmolVLM-Instruct's template (the chat_template of HuggingFaceTB/SmolVLM-256M-Instruct):

        <|im_start|>User:<image>What is this?<end_of_utterance>\n
        Assistant: A cat.<end_of_utterance>\n
        Assistant:

    one `<|im_start|>` for the whole chat, then per message the role capitalized ("User",
    "Assistant", "System") and ":", a space unless the content starts with an image, the content,
    `<end_of_utterance>\n`; `Assistant:` (no space) asks for a reply. No default system message.
    A reply is learned from the space after "Assistant:" (the model writes " A cat.") through its
    <end_of_utterance>.
    """
    parts = [Special("<|im_start|>")]
    for message in messages:
        content = message["content"]
        space = [] if content and isinstance(content[0], ImagePlaceholder) else [" "]
        parts.append(message["role"].capitalize() + ":")  # Jinja's capitalize is Python's
        parts += reply_parts(message, [*space, *content, Special("<end_of_utterance>")])
        parts.append("\n")
    if add_generation_prompt:
        parts.append("Assistant:")
    return parts


def render_zephyr(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""Zephyr's template, as TinyLlama/TinyLlama-1.1B-Chat-v1.0 ships it:

        <|system|>\nBe brief.</s>\n
        <|user|>\nHi</s>\n
        <|assistant|>\n

    one `<|{role}|>\n{content}</s>\n` per message (the role markers are plain text, "</s>" is the
    end-of-sequence token), and `<|assistant|>\n` to ask for a reply, written only after a last
    message. A reply is learned from its content through its </s>.
    """
    parts = []
    for message in messages:
        parts.append(f"<|{message['role']}|>\n")
        parts += reply_parts(message, [*message["content"], Special("</s>")])
        parts.append("\n")
    if add_generation_prompt and messages:
        parts.append("<|assistant|>\n")
    return parts


CHAT_TEMPLATES = {
    "chatml": render_chatml,
    "smolvlm": render_smolvlm,
    "zephyr": render_zephyr,
    "chatml-plain": functools.partial(render_chatml, default_system=None),
}


def end_of_turn(template: str) -> str:
    """The special token that ends a reply in `template` ("<|im_end|>" for ChatML): the last special
    token the template writes after an assistant's message, so each template names it once."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(CHAT_TEMPLATES)}")
    parts = CHAT_TEMPLATES[template]([{"role": "assistant", "content": []}], False)
    return next(untargeted(p).token for p in reversed(parts) if isinstance(untargeted(p), Special))

# The SmolVLM tokenizer's special tokens for images and turns; a text-only tokenizer (SmolLM2's)
# needs them added: tokenizer.add_special_tokens(SMOLVLM_SPECIAL_TOKENS).
SMOLVLM_SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>",
                          *[f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)],
                          "<end_of_utterance>"]


def smolvlm_image_tokens(rows: int, cols: int, image_seq_len: int) -> list:
    r"""The parts one SmolVLM image stands for in a prompt, as transformers' SmolVLM/Idefics3
    processors write them (_prompt_single_image, _prompt_split_image). `image_seq_len` is the number
    of embeddings per tile (64 for SmolVLM-256M); (rows, cols) is the image's grid from
    SmolVLMImageProcessor. In the order of the tiles:

        unsplit, (0, 0):  <fake_token_around_image><global-img><image>*n<fake_token_around_image>
        split:            <fake_token_around_image><row_1_col_1><image>*n ... per tile, "\n" after
                          each row, then "\n" and the global tile as above
    """
    around, image = Special("<fake_token_around_image>"), [Special("<image>")] * image_seq_len
    global_tile = [around, Special("<global-img>"), *image, around]
    if rows == 0 and cols == 0:
        return global_tile
    parts = []
    for row in range(1, rows + 1):
        for col in range(1, cols + 1):
            parts += [around, Special(f"<row_{row}_col_{col}>"), *image]
        parts.append("\n")
    return [*parts, "\n", *global_tile]


def content_parts(message: dict) -> list:
    """A message's content as parts: a string is one text part; HF-style parts
    [{"type": "image"}, {"type": "text", "text": "..."}] become ImagePlaceholder()s and text (other
    keys, like the image itself, are ignored)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(content, (str, list)):
        raise ValueError(f"A message needs a role in {ROLES} and content, a string or a list of parts; "
                         f"got {message!r}")
    if isinstance(content, str):
        return [content]
    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            parts.append(ImagePlaceholder())
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            raise ValueError(f'A content part is {{"type": "image"}} or {{"type": "text", "text": str}}; '
                             f"got {part!r}")
    return parts


def expand_images(parts: list, image_tokens: list | None) -> list:
    """`parts` with the i-th image placeholder replaced by the parts of image_tokens[i]. Image
    tokens are the model's input, never its answer, so they are never Targets."""
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
    expanded = []
    for part in parts:
        if isinstance(untargeted(part), ImagePlaceholder):
            expanded += next(entries)
        else:
            expanded.append(part)
    return expanded


def build_prompt(tokenizer: Tokenizer, messages: list[dict], template: str = "chatml",
                 add_generation_prompt: bool = True, image_tokens: list | None = None,
                 return_labels: bool = False) -> list[int] | tuple[list[int], list[int]]:
    """Token ids of a chat, rendered by `CHAT_TEMPLATES[template]` (the same ids as transformers'
    `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`, and with images the
    same as its processor's, except that special tokens typed in a message stay text).

    messages: [{"role": "system" | "user" | "assistant", "content": str | parts}, ...], parts in HF
        style: [{"type": "image"}, {"type": "text", "text": "What is this?"}].
    image_tokens: one entry per image part, in order: the list of parts (Special tokens and text)
        the image stands for: smolvlm_image_tokens(rows, cols, image_seq_len) for SmolVLM,
        [Special("<image>")] * n for a model with one token per image embedding (LLaVA).
    return_labels: also return labels, one per id: IGNORE_INDEX (-100) everywhere except the
        tokens of the assistant's replies (their content and end-of-turn token, not the header
        before them), which keep their ids, so training learns only the answers. Labels are not
        shifted: position i's label is ids[i], as transformers' models expect.

    Adjacent text parts are tokenized together, as one string, so the ids are those of the whole
    rendered text; a token is learned when it starts inside a reply.
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(CHAT_TEMPLATES)}")
    chat = []
    for message in messages:
        parts = content_parts(message)  # checks the message first
        chat.append({"role": message["role"], "content": parts})
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