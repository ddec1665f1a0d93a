"""Vision towers: one Vision Transformer (Dosovitskiy et al. 2021) that loads three families.

    VisionConfig -> VisionAttention, VisionMLP -> VisionBlock -> VisionTower (patch embedding,
                 positions, n_layers blocks, final LayerNorm) -> configs and key maps of SigLIP, CLIP, DINOv2

The families differ only in flags:
  SigLIP (Zhai et al. 2023; HF `modeling_siglip.py`): no class token, tanh-GELU, LayerNorm on every
      output token.
  CLIP (Radford et al. 2021; HF `modeling_clip.py`): a class token, a LayerNorm before the first
      layer ("pre_layrnorm"), quick-GELU, the final LayerNorm only on the pooled class token.
  DINOv2 (Oquab et al. 2023; HF `modeling_dinov2.py`): a class token, layer scale on both
      residual branches, exact GELU, LayerNorm on every output token.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoints import WEIGHT_FILES, checkpoint_folder, load_state, read_json, read_safetensors
from configs import ACTIVATIONS, build_config, check_memory, check_side, vision_settings


@dataclass
class VisionConfig:
    family: str = "siglip"  # "siglip" | "clip" | "dinov2": the checkpoint layout (key names) to read
    image_size: int = 224  # the size the position embeddings were trained for
    patch_size: int = 16
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # MLP inner size
    norm_eps: float = 1e-6
    act: str = "gelu_tanh"  # "gelu_tanh" (SigLIP), "quick_gelu" (CLIP), "gelu" (DINOv2): configs.ACTIVATIONS
    cls_token: bool = False  # a learned class token before the patches (CLIP, DINOv2)
    patch_bias: bool = True  # CLIP's patch convolution has no bias
    pre_norm: bool = False  # CLIP: LayerNorm on the embeddings before the first layer
    post_norm: str = "all"  # "all": final LayerNorm on every token; "cls": only on the pooled class token (CLIP)
    layer_scale: bool = False  # DINOv2: learned per-channel scale on each residual branch
    conv_stem: bool = False  # from-scratch towers: early convolutions (ConvStem) in place of the patch convolution

    def __post_init__(self):
        check_side("image_size", self.image_size)
        check_side("patch_size", self.patch_size)
        if self.conv_stem and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"conv_stem needs a power-of-two patch_size, not {self.patch_size}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act {self.act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if self.family not in ("siglip", "clip", "dinov2"):
            raise ValueError(f"family {self.family!r} is not supported; supported: clip, dinov2, siglip")
        check_memory("this vision config", self.n_layers * (4 * self.dim ** 2 + 2 * self.dim * self.hidden_dim))

    @property
    def grid(self) -> int:  # patches per side at image_size
        return self.image_size // self.patch_size


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


class ConvStem(nn.Sequential):
    """Early convolutions (Xiao et al. 2021): log2(p) 3x3 stride-2 convolutions with BatchNorm and ReLU,
    then a 1x1 to the width, in place of one p x p convolution: the same patch grid, and a from-scratch
    tower that learns shapes through the LM's loss (the README's diagnosis of the tiny model)."""

    def __init__(self, cfg: VisionConfig):
        n = cfg.patch_size.bit_length() - 1
        widths = [3] + [cfg.dim >> (n - 1 - i) for i in range(n)]  # 3 -> D/4 -> D/2 -> D for p = 8
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        super().__init__(*layers, nn.Conv2d(widths[-1], cfg.dim, 1))


class VisionAttention(nn.Module):
    """Full (unmasked) multi-head self-attention with biases (HF `SiglipAttention`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2)  # 3 x (B, H, N, hd)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.dim)

    def forward(self, x):  # (B, N, D)
        return self.fc2(self.act(self.fc1(x)))  # (B, N, D)


class VisionBlock(nn.Module):
    """Pre-norm layer: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)) (ls only in DINOv2)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None  # (D,)
        self.ls2 = nn.Parameter(torch.ones(cfg.dim)) if cfg.layer_scale else None  # (D,)

    def forward(self, x):  # (B, N, D)
        h = self.attn(self.norm1(x))  # (B, N, D)
        x = x + (h * self.ls1 if self.ls1 is not None else h)  # (B, N, D)
        h = self.mlp(self.norm2(x))  # (B, N, D)
        return x + (h * self.ls2 if self.ls2 is not None else h)  # (B, N, D)


# ---------------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------------


class VisionTower(nn.Module):
    """pixel_values (B, 3, H, W) -> patch features (B, [1 +] H/p * W/p, D)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = (ConvStem(cfg) if cfg.conv_stem else
                            nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias))
        self.cls_token = nn.Parameter(torch.zeros(cfg.dim)) if cfg.cls_token else None  # (D,)
        self.pos_embed = nn.Parameter(torch.randn(cfg.grid**2 + cfg.cls_token, cfg.dim) * 0.02)  # (P, D)
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pre_norm else None
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        self.post_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.checkpointing = False  # True: in training, blocks recompute their activations in the backward

    def positions(self, h: int, w: int):
        """Position embeddings for an h x w patch grid: the trained grid resized bicubically when
        the image size differs (HF `interpolate_pos_encoding`, computed in float32)."""
        cls_pos, grid_pos = self.pos_embed[: self.config.cls_token], self.pos_embed[self.config.cls_token:]
        g = self.config.grid
        if (h, w) != (g, g):
            grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
            grid_pos = F.interpolate(grid_pos.float(), size=(h, w), mode="bicubic", align_corners=False)  # (1, D, h, w)
            grid_pos = grid_pos.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(h * w, -1)  # (h*w, D)
        return torch.cat((cls_pos, grid_pos))  # (P, D)

    def embed(self, pixel_values):  # (B, 3, H, W) -> (B, P, D)
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype))  # (B, D, H/p, W/p)
        B, D, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, 1, D), x), dim=1)  # (B, 1 + h*w, D)
        x = x + self.positions(h, w)  # (B, P, D)
        return self.pre_norm(x) if self.pre_norm is not None else x  # (B, P, D)

    def forward(self, pixel_values, layer: int = 0):  # (B, 3, H, W) -> (B, P, D)
        """layer 0: the last layer, normed (HF `last_hidden_state`); k != 0: HF `hidden_states[k]`,
        unnormed (k the output of layer k, -1 the last layer, -2 the one before: LLaVA's choice).
        Layers after the one asked for are not run; `embed` gives the embeddings (hidden_states[0])."""
        x = self.embed(pixel_values)  # (B, P, D)
        if not -self.config.n_layers - 1 <= layer <= self.config.n_layers:
            raise ValueError(f"layer {layer}: this tower has {self.config.n_layers} layers (hidden states "
                             f"{-self.config.n_layers - 1} to {self.config.n_layers})")
        stop = layer % (self.config.n_layers + 1) if layer else self.config.n_layers
        recompute = self.checkpointing and self.training  # keep each block's input only, run it again in the backward
        for block in self.layers[:stop]:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)  # (B, P, D)
        return self.post_norm(x) if layer == 0 and self.config.post_norm == "all" else x  # (B, P, D)

    def pool(self, hidden):  # (B, P, D) from forward() -> (B, D)
        """The class token as HF's `pooler_output` has it (CLIP: normed here; DINOv2: already normed)."""
        if self.cls_token is None:
            raise ValueError("this tower has no class token to pool (SigLIP pools with a separate attention head)")
        cls = hidden[:, 0]  # (B, D)
        return self.post_norm(cls) if self.config.post_norm == "cls" else cls

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=torch.float32, device="cpu") -> "VisionTower":
        """The vision tower of a SigLIP or CLIP checkpoint (full or vision-only) or a DINOv2 one:
        a hub id or a local folder with config.json and safetensors."""
        folder = checkpoint_folder(name_or_path, WEIGHT_FILES)
        cfg = build_config(VisionConfig, vision_settings(read_json(f"{folder}/config.json")))
        state = read_safetensors(folder, keep=lambda k: not k.startswith(("text_model.", "logit_")))
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # the text half dropped
        return load_state(cls, cfg, state, vision_key_map(cfg), dtype, device, folder, ignore=IGNORED[cfg.family],
                          reshaped=RESHAPED)


# ---------------------------------------------------------------------------------------------
# Loading: the key maps of the three families (configs.vision_settings reads their configs)
# ---------------------------------------------------------------------------------------------

IGNORED = {  # checkpoint tensors we do not use
    "siglip": ("head.", "embeddings.position_ids"),  # the attention-pooling head
    "clip": ("embeddings.position_ids",),
    "dinov2": ("embeddings.mask_token",),  # used only in DINOv2's masked-image training
}
RESHAPED = {"embeddings.cls_token", "embeddings.position_embeddings"}  # DINOv2 stores (1, [1,] P, D)


def vision_key_map(cfg: VisionConfig) -> dict[str, str]:
    """Checkpoint tensor names (after any "vision_model." prefix) -> ours."""
    if cfg.family == "dinov2":
        m = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
             "layernorm.weight": "post_norm.weight", "layernorm.bias": "post_norm.bias"}
        for p in ("weight", "bias"):
            m[f"embeddings.patch_embeddings.projection.{p}"] = f"patch_embed.{p}"
        for i in range(cfg.n_layers):
            hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
            m[hf + "layer_scale1.lambda1"], m[hf + "layer_scale2.lambda1"] = ours + "ls1", ours + "ls2"
            for p in ("weight", "bias"):
                for theirs, mine in [("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                                     ("mlp.fc2", "mlp.fc2"), ("attention.attention.query", "attn.q_proj"),
                                     ("attention.attention.key", "attn.k_proj"),
                                     ("attention.attention.value", "attn.v_proj"),
                                     ("attention.output.dense", "attn.o_proj")]:
                    m[hf + f"{theirs}.{p}"] = ours + f"{mine}.{p}"
        return m
    m = {"embeddings.patch_embedding.weight": "patch_embed.weight",
         "embeddings.position_embedding.weight": "pos_embed",
         "post_layernorm.weight": "post_norm.weight", "post_layernorm.bias": "post_norm.bias"}
    if cfg.patch_bias:
        m["embeddings.patch_embedding.bias"] = "patch_embed.bias"
    if cfg.cls_token:
        m["embeddings.class_embedding"] = "cls_token"
    if cfg.pre_norm:
        m["pre_layrnorm.weight"], m["pre_layrnorm.bias"] = "pre_norm.weight", "pre_norm.bias"
    for i in range(cfg.n_layers):
        hf, ours = f"encoder.layers.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            for theirs, mine in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                                 ("mlp.fc2", "mlp.fc2"), ("self_attn.q_proj", "attn.q_proj"),
                                 ("self_attn.k_proj", "attn.k_proj"), ("self_attn.v_proj", "attn.v_proj"),
                                 ("self_attn.out_proj", "attn.o_proj")]:
                m[hf + f"{theirs}.{p}"] = ours + f"{mine}.{p}"
    return m
