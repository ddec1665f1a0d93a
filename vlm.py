"""The vision-language model: a vision tower and a connector in front of the LM, read top to bottom.

    VLMConfig -> connectors (MLP, pixel shuffle, class-token gate, Q-Former) -> merge_image_embeddings
    -> VLM -> loading: our config.json, or SmolVLM/Idefics3 and LLaVA ones (layouts.py)

The tower (siglip.py) gives patch features; the connector makes them LM-wide embeddings for the prompt's
`<image>` placeholders, read by the LM (model.py). LLaVA (Liu 2023), SmolVLM (Marafioti 2025), BLIP-2 (Li 2023).
"""

import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import (ADAPTER_CONFIG, WEIGHT_FILES, CheckpointError, checkpoint_folder, load_state, read_json,
                         read_safetensors, write_checkpoint)
from configs import build_config, check_side
from layouts import LLAVA_UNREAD, hf_vlm_settings, llava_names
from lora import load_adapter, merge_lora
from model import KVCache, LanguageModel, LMConfig, finish_loading, tied_copy
from qformer import QFormer, QFormerConfig
from siglip import VisionConfig, VisionTower


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    connector: str = "mlp"  # "mlp" (LLaVA) | "pixel_shuffle" (SmolVLM) | "cls_gate" (one token) | "qformer" (BLIP-2)
    image_token_id: int = 49190  # the <image> placeholder's id (49190: SmolVLM's; a new VLM takes its tokenizer's)
    vision_layer: int = 0  # the tower's output the connector reads: 0 the last layer, normed; k HF's hidden_states[k]
    scale_factor: int = 2  # pixel_shuffle: r x r neighbouring patches become one token
    gate_dim: int = 512  # cls_gate: width between the projector and the gate
    image_size: int = 0  # pixels per side of the images fed in (0: the tower's own image_size)
    qformer: QFormerConfig | None = None  # the qformer connector's Q-Former

    def __post_init__(self):
        if self.image_size:
            check_side("image_size", self.image_size)
        if self.connector == "qformer" and self.qformer is None:
            raise ValueError("connector 'qformer' needs a qformer config")
        n = self.vision.n_layers
        if not -n - 1 <= self.vision_layer <= n:
            raise ValueError(f"vision_layer {self.vision_layer}: the tower has {n} layers (hidden states {-n - 1} to {n})")
        grid = (self.image_size or self.vision.image_size) // self.vision.patch_size  # patches per side
        if self.connector == "pixel_shuffle" and grid % self.scale_factor:
            raise ValueError(f"pixel_shuffle with scale_factor {self.scale_factor} needs a patch grid divisible by "
                             f"it; the images make {grid} x {grid} patches")

    def tokens_per_image(self) -> int:
        """How many <image> placeholders one image (or one SmolVLM tile) fills."""
        if self.connector == "cls_gate":
            return 1
        if self.connector == "qformer":
            return self.qformer.n_queries
        n = ((self.image_size or self.vision.image_size) // self.vision.patch_size) ** 2
        return n // self.scale_factor**2 if self.connector == "pixel_shuffle" else n


# ---------------------------------------------------------------------------------------------
# Connectors: patch features (N, P, Dv) -> LM-wide image embeddings (N, n, D)
# ---------------------------------------------------------------------------------------------


class MLPConnector(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear on every patch (HF `LlavaMultiModalProjector`)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vision.dim, cfg.lm.dim)
        self.fc2 = nn.Linear(cfg.lm.dim, cfg.lm.dim)

    def forward(self, x):  # (N, P, Dv) patches, class token dropped -> (N, P, D)
        return self.fc2(F.gelu(self.fc1(x)))  # (N, P, D)


def pixel_shuffle(x, r: int):  # (N, P, Dv) on a square grid -> (N, P / r^2, Dv * r^2)
    """Merge each r x r block of neighbouring patches into one token (HF `SmolVLMConnector.pixel_shuffle`)."""
    N, P, D = x.shape
    side = math.isqrt(P)
    x = x.view(N, side, side // r, D * r)  # fold r columns into the channels
    x = x.permute(0, 2, 1, 3).reshape(N, side // r, side // r, D * r * r)  # then r rows
    return x.permute(0, 2, 1, 3).reshape(N, P // (r * r), D * r * r)  # (N, P / r^2, D * r^2)


class PixelShuffleConnector(nn.Module):
    """SmolVLM / nanoVLM: pixel shuffle, then one linear map without bias."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.r = cfg.scale_factor
        self.proj = nn.Linear(cfg.vision.dim * self.r**2, cfg.lm.dim, bias=False)

    def forward(self, x):  # (N, P, Dv) -> (N, P / r^2, D)
        return self.proj(pixel_shuffle(x, self.r))  # (N, P / r^2, D)


class ClsGateConnector(nn.Module):
    """One vision token: the pooled class embedding through a projector (Dv -> 512) and a gate
    (512 -> LM width), as the TinyLlama-VLM design does with CLIP."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.projector = nn.Linear(cfg.vision.dim, cfg.gate_dim)
        self.gate = nn.Linear(cfg.gate_dim, cfg.lm.dim)

    def forward(self, cls):  # (N, Dv) -> (N, 1, D)
        return self.gate(self.projector(cls))[:, None]  # (N, 1, D)


class QFormerConnector(nn.Module):
    """BLIP-2: learned queries read the patch features (qformer.py); their outputs go through a
    linear map into the LM (`language_projection` in HF `Blip2ForConditionalGeneration`)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.qformer = QFormer(cfg.qformer)
        self.proj = nn.Linear(cfg.qformer.dim, cfg.lm.dim)

    def forward(self, x):  # (N, P, Dv) every token, class token included -> (N, n_queries, D)
        return self.proj(self.qformer(x))  # (N, n_queries, D)


CONNECTORS = {"mlp": MLPConnector, "pixel_shuffle": PixelShuffleConnector, "cls_gate": ClsGateConnector,
              "qformer": QFormerConnector}


def merge_image_embeddings(embeds, placeholders, image_embeds):
    """Put the image embeddings, in order, where the placeholders are.
    embeds (B, T, D), placeholders (B, T) bool, image_embeds (N, n, D): N images of n tokens each,
    in the order their placeholders appear reading the batch row by row."""
    have, need = int(placeholders.sum()), image_embeds.shape[0] * image_embeds.shape[1]
    if have != need:
        raise ValueError(f"the prompt has {have} <image> placeholders but the images give {need} embeddings "
                         f"({image_embeds.shape[0]} images x {image_embeds.shape[1]})")
    return embeds.masked_scatter(placeholders[..., None], image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VLM(nn.Module):
    """Vision tower -> connector -> image embeddings merged at the <image> placeholders -> LM."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.config = cfg
        self.vision = VisionTower(cfg.vision)
        if cfg.connector not in CONNECTORS:
            raise ValueError(f"unknown connector {cfg.connector!r}; choose one of {sorted(CONNECTORS)}")
        self.connector = CONNECTORS[cfg.connector](cfg)
        if cfg.connector != "qformer":  # (the Q-Former initialises itself, BERT style)
            self.connector.apply(LanguageModel._init_weights)  # normal(0, 0.02), as HF initialises LLaVA's projector
        self.lm = LanguageModel(cfg.lm)

    @property
    def max_seq_len(self) -> int:
        return self.config.lm.max_seq_len

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.lm.new_cache(batch_size, max_len)

    def image_embeddings(self, pixel_values=None, hidden=None):  # (N, 3, H, W) -> (N, n, D)
        """Each image (or tile) as the LM-wide embeddings that fill its placeholders; from the pixels,
        or from the tower's output at vision_layer (hidden: a frozen tower's, computed once and kept)."""
        if hidden is None:
            hidden = self.vision(pixel_values, layer=self.config.vision_layer)  # (N, [1 +] P, Dv)
        if self.config.connector == "cls_gate":
            return self.connector(self.vision.pool(hidden))  # (N, 1, D)
        if self.vision.cls_token is not None and self.config.connector != "qformer":
            hidden = hidden[:, 1:]  # patches only (LLaVA's "default" feature selection)
        return self.connector(hidden)  # (N, n, D)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, cache: KVCache | None = None,
                last_only: bool = False, return_aux: bool = False, logits_at=None, image_features=None):
        """input_ids (B, T) with <image> placeholders, pixel_values (N, 3, H, W) for the N images
        they stand for, in order (or their image_features, the tower's output) -> logits (B, T, V).
        With a cache, pass the images with the prefill only; decoding steps feed text tokens."""
        placeholders = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.lm.embed(input_ids.masked_fill(placeholders, 0))  # (B, T, D)
        if pixel_values is not None or image_features is not None:
            image_embeds = self.image_embeddings(pixel_values, image_features)  # (N, n, D)
            embeds = merge_image_embeddings(embeds, placeholders, image_embeds)  # (B, T, D)
        elif bool(placeholders.any()):
            raise ValueError("the prompt has <image> placeholders but no pixel_values were given")
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache, last_only=last_only,
                       return_aux=return_aux, logits_at=logits_at)

    @classmethod
    def join(cls, vision: VisionTower, lm: LanguageModel, cfg: VLMConfig) -> "VLM":
        """A whole tower and a whole LM (pretrained, or new) joined by a new connector, as LLaVA starts."""
        with torch.device("meta"):  # the tower and LM come in whole; only the connector is new
            vlm = cls(cfg)
        vlm.vision, vlm.lm = vision, lm
        vlm.connector = CONNECTORS[cfg.connector](cfg)  # built for real: cls() above was on the meta device
        if cfg.connector != "qformer":
            vlm.connector.apply(LanguageModel._init_weights)
        return vlm

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=torch.float32, device="cpu", adapter: bool = True) -> "VLM":
        """A SmolVLM / Idefics3 or LLaVA checkpoint (hub id or folder), or a folder `save_pretrained` wrote.
        A LoRA adapter saved beside the weights (PEFT's files) is loaded and merged unless adapter=False."""
        folder = checkpoint_folder(name_or_path, WEIGHT_FILES)
        hf = read_json(os.path.join(folder, "config.json"))
        cfg, key_map = vlm_config_from_hf(hf)
        state, ignore = read_safetensors(folder), tied_copy(cfg.lm)  # a tied LM's stored head is not read
        if hf.get("model_type") == "llava":
            state, ignore = llava_names(state), LLAVA_UNREAD + tuple(f"language_model.{k}" for k in ignore)
        model = load_state(cls, cfg, state, key_map, dtype, device, folder, ignore=ignore)
        finish_loading(model.lm, device)
        if adapter and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            merge_lora(load_adapter(model, folder))
        return model

    def save_pretrained(self, folder: str, state_dict: dict | None = None):
        """Our config (vision, connector, LM) and every weight under our own names (or `state_dict`,
        e.g. the base weights of a model with LoRA adapters)."""
        write_checkpoint(folder, {"model_type": "glimpse_vlm", **asdict(self.config)},
                         self.state_dict() if state_dict is None else state_dict)


# ---------------------------------------------------------------------------------------------
# Loading: our own config.json, or a transformers layout's (layouts.py)
# ---------------------------------------------------------------------------------------------


def vlm_config_from_hf(hf: dict) -> tuple[VLMConfig, dict | None]:
    """Our VLM config from the config.json our save_pretrained wrote (names already ours: no key map),
    or from a SmolVLM/Idefics3 or LLaVA one, with its key map."""
    if hf.get("model_type") != "glimpse_vlm":
        try:
            settings, key_map = hf_vlm_settings(hf)
        except ValueError as e:
            raise CheckpointError(e) from None
        cfg = build_config(VLMConfig, settings)
        return cfg, key_map(cfg)
    settings = dict(hf)
    for part in ("vision", "lm"):
        if part not in settings:
            raise CheckpointError(f"config.json lacks {part!r}, the {part} config of this glimpse VLM")
    if "vision_layer" in settings and settings["vision_layer"] is None:  # older folders' "last, normed"
        settings["vision_layer"] = 0
    return build_config(VLMConfig, settings), None
