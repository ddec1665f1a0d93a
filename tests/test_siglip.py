"""Vision towers against transformers' SigLIP, CLIP and DINOv2 on tiny random checkpoints, and the
real DINOv2-S weights in the shared assets."""

import json
import os

import pytest
import torch

from checkpoints import CheckpointError
from siglip import VisionTower

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8}


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def randomize(model):
    """Random values everywhere (HF initialises LayerNorms to 1/0 and layer scale to 1, which
    would hide a swapped or dropped tensor)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() < 2 else p.normal_(0, 0.1)
    return model.eval()


def build(family, tmp_path):
    if family == "siglip":
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY))
    elif family == "siglip-full":
        cfg = transformers.SiglipConfig(vision_config=TINY, text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 100})
        hf = transformers.SiglipModel(cfg)
    elif family == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY))
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    randomize(hf).save_pretrained(tmp_path)
    hf = hf.vision_model if family == "siglip-full" else hf
    return hf, VisionTower.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("family", ["siglip", "siglip-full", "clip", "dinov2"])
@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["checkpoint-size", "interpolated"])
def test_vision_parity(tmp_path, family, size):
    hf, ours = build(family, tmp_path)
    pixels = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True, **kwargs)
        mine = ours(pixels)
        assert mine.shape == out.last_hidden_state.shape
        assert max_diff(out.last_hidden_state, mine) <= 1e-4
        assert max_diff(out.hidden_states[0], ours.embed(pixels)) <= 1e-4
        for layer in (1, -2, -1):  # LLaVA takes hidden_states[-2]
            assert max_diff(out.hidden_states[layer], ours(pixels, layer=layer)) <= 1e-4
        if family in ("clip", "dinov2"):
            assert max_diff(out.pooler_output, ours.pool(mine)) <= 1e-4


def test_bad_vision_checkpoints(tmp_path):
    build("clip", tmp_path / "clip")
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "clip" / "model.safetensors")
    del state["pre_layrnorm.weight"]
    state["surprise.weight"] = torch.zeros(1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "clip" / "config.json").read_text())
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['pre_layrnorm.weight'\], unexpected keys \['surprise.weight'\]"):
        VisionTower.from_pretrained(str(broken))
    (broken / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="'llama' model"):
        VisionTower.from_pretrained(str(broken))


@pytest.mark.parametrize("family, change, message", [
    ("siglip", lambda cfg: [cfg], r"expected a JSON object \{...\}, got a list"),
    ("siglip", lambda cfg: cfg.update(image_size=100_000), "image_size must be a whole number of pixels from 1 to"),
    ("clip", lambda cfg: cfg.update(patch_size=0), "patch_size must be a whole number of pixels from 1 to 8192"),
    ("siglip", lambda cfg: cfg.update(patch_size="8"), 'patch_size must be int, not "8"'),
    ("clip", lambda cfg: cfg.update(hidden_size=None), "dim must be int, not null"),
    ("siglip", lambda cfg: cfg.update(hidden_act="swish"), "act 'swish' is not supported"),
    ("dinov2", lambda cfg: cfg.update(hidden_act="swish"), "act 'swish' is not supported"),
    ("dinov2", lambda cfg: cfg.update(hidden_size=None), "hidden_size and mlp_ratio must be numbers"),
])
def test_malformed_vision_config_is_one_line(tmp_path, family, change, message):
    build(family, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(change(cfg) or cfg))
    with pytest.raises(CheckpointError, match=message) as e:
        VisionTower.from_pretrained(str(tmp_path))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def assets():
    path = os.environ.get("GLIMPSE_ASSETS")
    if not path:
        pytest.skip("GLIMPSE_ASSETS is unset: the real DINOv2-S weights live in ../shared/assets")
    return path


def test_real_dinov2_small_on_the_cat():
    folder = os.path.join(assets(), "dinov2-small")
    from processing import ImageProcessor, load_image

    hf = transformers.Dinov2Model.from_pretrained(folder).eval()
    ours = VisionTower.from_pretrained(folder)
    pixels = ImageProcessor.from_pretrained(folder)(load_image(os.path.join(assets(), "images", "chelsea.png")))
    with torch.no_grad():
        theirs, mine = hf(pixel_values=pixels).last_hidden_state, ours(pixels)
    assert mine.shape == (1, 1 + 16 * 16, 384)
    assert max_diff(theirs, mine) <= 1e-4
