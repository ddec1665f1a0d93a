"""Turning raw inputs into what a glimpse model reads: pixel values and token ids.

Images: `load_image` opens a file safely (a size limit before decoding, the EXIF orientation, any
Pillow mode to RGB, one-line `ImageError`s naming the file), and an `ImageProcessor` built from a
checkpoint's `preprocessor_config.json` resizes, crops and normalizes exactly as transformers does.

    processor = ImageProcessor.from_pretrained("google/siglip-base-patch16-224")
    pixel_values = processor(["cat.jpg", "dog.png"])  # (2, 3, 224, 224)

Text: a `Tokenizer` (a thin wrapper over Hugging Face `tokenizers`) loaded from a folder with a
`tokenizer.json`, a Hugging Face Hub id, or a llama.cpp `.gguf` file, and `build_prompt`, which
renders a chat into ids the way the model's chat template does.

    tokenizer = Tokenizer.from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = build_prompt(tokenizer, [{"role": "user", "content": "What is in this picture?"}])

One rule runs through this file: text a user typed is always plain text. Writing "<|im_start|>"
in a message gives the ids of those characters, never the special token, so a prompt's structure
comes only from the chat template.
"""

import json
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass

import gguf
import numpy as np
import safetensors
import safetensors.torch
import tokenizers
import torch
from huggingface_hub import snapshot_download
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import AddedToken, decoders, models, pre_tokenizers

# ---------------------------------------------------------------------------
# Checkpoint files: a local folder or a hub download, JSON and safetensors in and out
# ---------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint or file that cannot be loaded; the message is one line naming the problem."""


def checkpoint_folder(name_or_path: str, patterns) -> str:
    """A local folder as it is, or a hub id ("org/name") downloaded into the HF cache, only the
    files matching `patterns`, with a progress bar."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise CheckpointError(f"{name_or_path}: no such folder (and not a hub id like 'org/name')")
    try:
        return snapshot_download(name_or_path, allow_patterns=list(patterns))
    except Exception as e:  # offline, no such repository, gated, HTTP error: all end here
        raise CheckpointError(f"could not get {name_or_path} from the Hugging Face hub and it is not cached "
                              f"({type(e).__name__}); pass a local folder instead") from None


def read_json(path: str, default: dict | None = None) -> dict:
    """The JSON object in `path`; `default` (or an error if None) when there is no such file."""
    if not os.path.isfile(path):
        if default is not None:
            return default
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(folder: str, keep=None) -> dict:
    """The tensors of a folder's model.safetensors, or of the shards its index names; with `keep`
    (a test on the name) only those tensors are read, and only the shards that hold them opened:
    the vision half of a SigLIP checkpoint, the Q-Former of a BLIP-2 one."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index)["weight_map"]
        files = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard named in the index is missing")
        try:
            with safetensors.safe_open(path, "pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k)})
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt? ({e})") from None
    return state


def write_json(obj: dict, path: str):
    """Write to a temporary name, then rename: a crash never leaves half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def write_safetensors(state: dict, path: str):
    """Like write_json: a temporary file renamed into place."""
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


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
        if isinstance(self.size, int):
            self.size = {"shortest_edge": self.size}
        if isinstance(self.crop_size, int):
            self.crop_size = {"height": self.crop_size, "width": self.crop_size}
        if self.do_resize and set(self.size) not in ({"height", "width"}, {"shortest_edge"}):
            raise ValueError(f"size must have the keys height and width, or shortest_edge; got {self.size}")
        if self.do_center_crop and set(self.crop_size or ()) != {"height", "width"}:
            raise ValueError(f"crop_size must have the keys height and width; got {self.crop_size}")
        if self.resample not in set(Image.Resampling):
            raise ValueError(f"resample must be a Pillow filter number 0-5; got {self.resample!r}")
        for values in (self.image_mean, self.image_std):
            if self.do_normalize and len(values) != 3:
                raise ValueError(f"image_mean and image_std need 3 values, one per RGB channel; got {values}")

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "ImageProcessor":
        """Read preprocessor_config.json from a local folder or a hub id like
        "google/siglip-base-patch16-224" (only that file is downloaded)."""
        folder = checkpoint_folder(name_or_path, ["preprocessor_config.json"])
        path = os.path.join(folder, "preprocessor_config.json")
        config = read_json(path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        # The class, as transformers' AutoImageProcessor finds it: older files only name a feature
        # extractor, files saved by transformers 4's fast processors end in "Fast".
        kind = config.get("image_processor_type") or (config.get("feature_extractor_type") or "").replace(
            "FeatureExtractor", "ImageProcessor")
        kind = kind.removesuffix("Fast")
        if kind not in IMAGE_PROCESSOR_DEFAULTS:
            raise CheckpointError(f"{path}: image processor {kind!r} is not supported; "
                                  f"supported: {sorted(IMAGE_PROCESSOR_DEFAULTS)}")
        # A key set to null takes the default, as in transformers.
        settings = {key: value for key, value in config.items()
                    if key in cls.__dataclass_fields__ and value is not None}
        try:
            return cls(**deepcopy({**IMAGE_PROCESSOR_DEFAULTS[kind], **settings}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None

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
        if self.do_rescale:  # image_transforms.rescale: multiply in float64, then round to float32
            pixels = pixels.astype(np.float64) * self.rescale_factor
        pixels = pixels.astype(np.float32)  # (3, H, W)
        if self.do_normalize:  # image_transforms.normalize: in float32
            mean = np.array(self.image_mean, dtype=np.float32).reshape(3, 1, 1)
            std = np.array(self.image_std, dtype=np.float32).reshape(3, 1, 1)
            pixels = (pixels - mean) / std
        return pixels

    def resize_output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after resizing: `size` itself, or the short side to size["shortest_edge"]
        and the long side in proportion, rounded down (image_transforms.get_resize_output_image_size,
        default_to_square=False)."""
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


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


# ---------------------------------------------------------------------------
# Text: tokenizer and chat prompts
# ---------------------------------------------------------------------------

# The files a Hub download fetches: the tokenizer and what names its special tokens, no weights.
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "chat_template.jinja",
]

# How a byte-level BPE GGUF splits text before the merges run, by its `tokenizer.ggml.pre` name
# (the `regex_exprs` in llama.cpp's llama-vocab.cpp). `ByteLevel(use_regex=True)` is GPT-2's split
# followed by GPT-2's mapping of bytes to printable characters.
def _digits_then_gpt2_split():
    """Every digit on its own (llama.cpp's `\\p{N}`), then GPT-2's split: SmolLM's tokenizer.json."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])


def _gpt2_split():
    """GPT-2's split alone."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


GGUF_PRE_TOKENIZERS = {
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split,
    "gpt-2": _gpt2_split,
}

# llama.cpp's token types (`tokenizer.ggml.token_type`): CONTROL tokens like <|im_start|> and
# USER_DEFINED ones are matched whole, never cut into pieces, so they become added special tokens.
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


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

    # --- loading and saving ---

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "Tokenizer":
        """Load from a local folder with tokenizer.json, a `.gguf` file, or a Hub id like
        "HuggingFaceTB/SmolLM2-135M-Instruct" (only the tokenizer files are downloaded)."""
        path = os.path.expanduser(name_or_path)
        if path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: no such GGUF file")
            return cls.from_gguf(path)
        if os.path.isfile(path):
            raise CheckpointError(f"{path}: expected a folder with tokenizer.json or a .gguf file")
        folder = checkpoint_folder(name_or_path, TOKENIZER_FILES)
        return cls.from_folder(folder)

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        """Load a Hugging Face tokenizer folder: tokenizer.json, with bos/eos/pad named by
        tokenizer_config.json, else special_tokens_map.json, else config.json's token ids."""
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise CheckpointError(f"{folder}: no tokenizer.json")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)

        names = {}  # "bos" -> "<|im_start|>"; later files override earlier ones
        model_config = read_json(os.path.join(folder, "config.json"), {})
        for role in ("bos", "eos", "pad"):
            token_id = model_config.get(f"{role}_token_id")
            if isinstance(token_id, list):  # some models list several EOS ids; the first is the main one
                token_id = token_id[0]
            if token_id is not None:
                names[role] = backend.id_to_token(token_id)
        for file in ("special_tokens_map.json", "tokenizer_config.json"):
            config = read_json(os.path.join(folder, file), {})
            for role in ("bos", "eos", "pad"):
                token = config.get(f"{role}_token")
                if token is not None:  # a string, or {"content": ...} in older files
                    names[role] = token["content"] if isinstance(token, dict) else token

        chat_template = read_json(os.path.join(folder, "tokenizer_config.json"), {}).get("chat_template")
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                chat_template = f.read()
        return cls(backend, names.get("bos"), names.get("eos"), names.get("pad"), chat_template)

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """Rebuild the tokenizer a llama.cpp GGUF file describes in its `tokenizer.*` metadata.

        Only byte-level BPE (`tokenizer.ggml.model` "gpt2", as GPT-2 and SmolLM use) is
        supported: the vocabulary and merges go into a BPE model, split and decoded byte-level
        (mirrors transformers' GGUF tokenizer conversion and llama.cpp's llama-vocab.cpp).
        """
        fields = gguf.GGUFReader(path).fields

        def read(key, default=None):
            return fields[key].contents() if key in fields else default

        model_type = read("tokenizer.ggml.model")
        if model_type != "gpt2":
            raise ValueError(f"{path} has tokenizer model {model_type!r}; only byte-level BPE ('gpt2') "
                             "GGUF tokenizers are supported, use a folder with tokenizer.json instead")
        # Files from before `tokenizer.ggml.pre` existed get GPT-2's split, as in transformers.
        pre = read("tokenizer.ggml.pre", "gpt-2")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ValueError(f"{path} has pre-tokenizer {pre!r}; supported: {sorted(GGUF_PRE_TOKENIZERS)}")

        if "tokenizer.ggml.merges" not in fields:  # llama.cpp refuses these too
            raise ValueError(f"{path} has no tokenizer.ggml.merges, which a byte-level BPE tokenizer needs")
        tokens = read("tokenizer.ggml.tokens")
        merges = [tuple(merge.split(" ")) for merge in read("tokenizer.ggml.merges")]
        backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, read("tokenizer.ggml.token_type"))
            if kind in (GGUF_CONTROL, GGUF_USER_DEFINED)
        ])

        def token(key):
            token_id = read(key)
            return tokens[token_id] if token_id is not None else None

        return cls(backend, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                   token("tokenizer.ggml.padding_token_id"), read("tokenizer.chat_template"))

    def save(self, folder: str) -> None:
        """Write tokenizer.json and a tokenizer_config.json naming bos/eos/pad, which
        `from_pretrained(folder)` reads back."""
        os.makedirs(folder, exist_ok=True)
        self.backend.save(os.path.join(folder, "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "chat_template": self.chat_template}
        write_json(config, os.path.join(folder, "tokenizer_config.json"))


# --- chat prompts ---
#
# A chat template turns messages into a list of parts: plain text, which is tokenized, and
# `Special` tokens, which are looked up by name. Only the template writes `Special` parts, so a
# message can never forge one.

ROLES = ("system", "user", "assistant")

SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class Special:
    """A special token in a rendered prompt, e.g. Special("<|im_start|>")."""
    token: str


def render_chatml(messages: list[dict], add_generation_prompt: bool) -> list:
    r"""ChatML, as SmolLM2's chat template writes it:

        <|im_start|>system\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\n
        <|im_start|>user\nHi<|im_end|>\n
        <|im_start|>assistant\n

    one `<|im_start|>{role}\n{content}<|im_end|>\n` per message, SmolLM2's default system message
    first when the chat does not start with one, and `<|im_start|>assistant\n` to ask for a reply.
    """
    if messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": SMOLLM2_SYSTEM_PROMPT}, *messages]
    parts = []
    for message in messages:
        turn = f"{message['role']}\n{message['content']}"
        parts += [Special("<|im_start|>"), turn, Special("<|im_end|>"), "\n"]
    if add_generation_prompt:
        parts += [Special("<|im_start|>"), "assistant\n"]
    return parts


CHAT_TEMPLATES = {
    "chatml": render_chatml,
}


def build_prompt(tokenizer: Tokenizer, messages: list[dict], template: str = "chatml",
                 add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat, rendered by `CHAT_TEMPLATES[template]` (the same ids as transformers'
    `apply_chat_template(messages, add_generation_prompt=..., tokenize=True)`, except that special
    tokens typed in a message stay text).

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]
    """
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown chat template {template!r}; available: {sorted(CHAT_TEMPLATES)}")
    for message in messages:
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise ValueError(f"A message needs a role in {ROLES} and string content, got {message!r}")
    ids = []
    for part in CHAT_TEMPLATES[template](messages, add_generation_prompt):
        if isinstance(part, Special):
            token_id = tokenizer.token_to_id(part.token)
            if token_id not in tokenizer.special_ids:
                raise ValueError(f"Chat template {template!r} needs the special token {part.token!r}, "
                                 "which this tokenizer does not have")
            ids.append(token_id)
        else:
            ids += tokenizer.encode(part)
    return ids
