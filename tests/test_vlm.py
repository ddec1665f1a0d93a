"""The VLM: SmolVLM parity with transformers, connectors, and the merging of image embeddings."""

import json

import pytest
import torch

import layouts

from generate import generate
from checkpoints import CheckpointError
from model import LMConfig
from siglip import VisionConfig
from vlm import VLM, VLMConfig, merge_image_embeddings, pixel_shuffle

transformers = pytest.importorskip("transformers")

IMAGE = 150  # the <image> id of the tiny SmolVLM


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def tiny_smolvlm(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": 200, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2},
        scale_factor=2, image_token_id=IMAGE)
    hf = transformers.SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random everything: default LayerNorm/bias values would hide mistakes
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    hf.generation_config.eos_token_id = None
    return hf, VLM.from_pretrained(str(tmp_path))


def test_smolvlm_parity_logits_and_greedy(tmp_path):
    hf, ours = tiny_smolvlm(tmp_path)
    n = ours.config.tokens_per_image()
    assert n == 4  # (32 / 8)^2 patches, 2 x 2 pixel shuffle
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * n + [4, 5] + [IMAGE] * n + [6, 7]])
    pixels = torch.randn(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        mine = ours(ids, pixel_values=pixels[0])
        other = ours(ids, pixel_values=pixels[0].flip(0))  # the images matter, and their order too
    assert max_diff(theirs, mine) <= 1e-4
    assert max_diff(mine, other) > 1e-3
    new = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                      max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, 20, pixel_values=pixels[0]), new)


def test_vlm_save_and_load_round_trip(tmp_path):
    _, ours = tiny_smolvlm(tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    again = VLM.from_pretrained(str(tmp_path / "ours"))
    assert again.config == ours.config
    ids = torch.tensor([[1] + [IMAGE] * 4 + [2]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(again(ids, pixel_values=pixels), ours(ids, pixel_values=pixels)) == 0


def test_a_conv_stem_tower_saves_and_loads_with_its_batchnorm_statistics(tmp_path):
    torch.manual_seed(0)
    vision = VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=4, hidden_dim=64, conv_stem=True)
    lm = LMConfig(vocab_size=50, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    model = VLM(VLMConfig(vision=vision, lm=lm, connector="pixel_shuffle", image_token_id=49, scale_factor=2,
                          image_size=32))
    pixels = torch.randn(4, 3, 32, 32)
    model.train()
    model.vision(pixels)  # training moves the running statistics away from (0, 1)
    model.eval()
    model.save_pretrained(str(tmp_path))
    again = VLM.from_pretrained(str(tmp_path))
    stem = dict(again.vision.patch_embed.named_buffers())
    assert stem["1.num_batches_tracked"].dtype == torch.long and stem["1.num_batches_tracked"].item() == 1
    assert not torch.equal(stem["1.running_mean"], torch.zeros_like(stem["1.running_mean"]))
    ids = torch.tensor([[1] + [49] * 4 + [2]])
    with torch.no_grad():
        assert max_diff(again(ids, pixel_values=pixels[:1]), model(ids, pixel_values=pixels[:1])) <= 1e-6
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VisionConfig(image_size=36, patch_size=6, conv_stem=True)


# --- connectors ----------------------------------------------------------------------------------

def test_pixel_shuffle_equals_smolvlm_connector():
    cfg = transformers.SmolVLMConfig(vision_config={"hidden_size": 8, "num_attention_heads": 2},
                                     text_config={"hidden_size": 16, "num_attention_heads": 2}, scale_factor=4)
    x = torch.randn(3, 64, 8)  # an 8 x 8 grid
    theirs = transformers.models.smolvlm.modeling_smolvlm.SmolVLMConnector(cfg).pixel_shuffle(x, 4)
    assert torch.equal(pixel_shuffle(x, 4), theirs)
    assert pixel_shuffle(x, 4).shape == (3, 4, 8 * 16)


def test_mlp_connector_equals_llava_projector():
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = VLMConfig(vision=VisionConfig(dim=24), lm=LMConfig(dim=32, n_heads=4, n_kv_heads=4), connector="mlp")
    ours = VLM(cfg).connector
    theirs = LlavaMultiModalProjector(transformers.LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 24},
        text_config={"model_type": "llama", "hidden_size": 32}, projector_hidden_act="gelu",
        vision_feature_layer=-2))
    theirs.load_state_dict({"linear_1.weight": ours.fc1.weight, "linear_1.bias": ours.fc1.bias,
                            "linear_2.weight": ours.fc2.weight, "linear_2.bias": ours.fc2.bias})
    x = torch.randn(2, 7, 24)
    assert max_diff(ours(x), theirs(x)) <= 1e-6


TINY_VISION = VisionConfig(family="clip", image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                           act="quick_gelu", cls_token=True, patch_bias=False, pre_norm=True, post_norm="cls")
TINY_LM = LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)


@pytest.mark.parametrize("connector, tokens", [("mlp", 4), ("pixel_shuffle", 1), ("cls_gate", 1)])
def test_each_connector_fills_its_placeholders(connector, tokens):
    torch.manual_seed(0)
    cfg = VLMConfig(vision=TINY_VISION, lm=TINY_LM, connector=connector, image_token_id=63)
    vlm = VLM(cfg).eval()
    assert cfg.tokens_per_image() == tokens
    pixels = torch.randn(1, 3, 16, 16)
    assert vlm.image_embeddings(pixels).shape == (1, tokens, 32)
    ids = torch.tensor([[1, 2] + [63] * tokens + [3]])
    with torch.no_grad():
        a, b = vlm(ids, pixel_values=pixels), vlm(ids, pixel_values=pixels + 1)
    assert a.shape == (1, tokens + 3, 64) and max_diff(a[:, -1], b[:, -1]) > 0  # the image reaches the answer
    assert max_diff(a[:, :2], b[:, :2]) == 0  # causal: text before the image cannot see it


@pytest.mark.parametrize("change, message", [
    (lambda cfg: [cfg], r"expected a JSON object \{...\}, got a list"),
    (lambda cfg: cfg["vision"].update(patch=8), "unknown key 'vision.patch'"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "vision"}, "config.json lacks 'vision'"),
    (lambda cfg: cfg["vision"].update(patch_size="8"), 'vision.patch_size must be int, not "8"'),
    (lambda cfg: cfg["lm"].update(dim=None), "lm.dim must be int, not null"),
    (lambda cfg: cfg.update(vision_layer="-2"), 'vision_layer must be int, not "-2"'),
    (lambda cfg: cfg["vision"].update(act="swish"), "vision.act 'swish' is not supported"),
    (lambda cfg: cfg["vision"].update(image_size=100_000), "vision.image_size must be a whole number of pixels"),
    (lambda cfg: cfg.update(image_size=100_000), "image_size must be a whole number of pixels from 1 to 8192"),
    (lambda cfg: cfg.update(connector="qformer"), "connector 'qformer' needs a qformer config"),
])
def test_malformed_glimpse_config_is_one_line(tmp_path, change, message):
    """A config.json that VLM.save_pretrained wrote, then broken: one CheckpointError line naming the field."""
    VLM(VLMConfig(vision=TINY_VISION, lm=TINY_LM, connector="mlp", image_token_id=63)).save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(change(cfg) or cfg))
    with pytest.raises(CheckpointError, match=message) as e:
        VLM.from_pretrained(str(tmp_path))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


# --- merging -------------------------------------------------------------------------------------

def test_merge_places_images_in_order_across_a_padded_batch():
    embeds = torch.zeros(2, 6, 3)
    ids = torch.tensor([[0, 9, 9, 5, 9, 9],  # two images of 2 tokens in row 0
                        [0, 0, 7, 9, 9, 8]])  # left padding, then one image in row 1
    images = torch.arange(3 * 2 * 3, dtype=torch.float).view(3, 2, 3) + 1  # (N=3, n=2, D=3)
    out = merge_image_embeddings(embeds, ids == 9, images)
    assert torch.equal(out[0, 1:3], images[0]) and torch.equal(out[0, 4:6], images[1])
    assert torch.equal(out[1, 3:5], images[2])
    assert out[ids != 9].abs().sum() == 0  # text positions untouched
    with pytest.raises(ValueError, match="6 <image> placeholders but the images give 4 embeddings"):
        merge_image_embeddings(embeds, ids == 9, torch.ones(2, 2, 3))


def test_count_mismatch_and_missing_images_are_clear_errors(tmp_path):
    _, ours = tiny_smolvlm(tmp_path)
    ids = torch.tensor([[1] + [IMAGE] * 3 + [2]])  # 3 placeholders, one image gives 4
    with pytest.raises(ValueError, match="3 <image> placeholders but the images give 4 embeddings"):
        ours(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_typed_image_text_stays_text(tokenizer):
    tok = tokenizer
    image_id = tok.token_to_id("<image>")
    ids = tok.encode("look: <image> and <image>")
    assert image_id not in ids and "<image>" in tok.decode(ids)


def test_smolvlm_end_to_end_with_its_processor_on_a_real_photo(tmp_path, monkeypatch, smollm2_gguf):
    """transformers' SmolVLMProcessor + SmolVLMForConditionalGeneration against our image processor,
    prompt and VLM, on the cat photo: same input_ids and pixel_values, logits, 20 greedy tokens."""
    import json
    import os

    import processing
    from layouts import SmolVLMImageProcessor, smolvlm_image_tokens
    from processing import Tokenizer, build_prompt

    assets = os.environ.get("GLIMPSE_ASSETS")
    if not assets:
        pytest.skip("needs GLIMPSE_ASSETS (the cat photo)")
    psm = pytest.importorskip("transformers.models.smolvlm.processing_smolvlm")
    if psm.num2words is None:  # only videos use it
        monkeypatch.setattr(psm, "num2words", str)
    gguf_dir, gguf_name = os.path.split(smollm2_gguf)
    tok = Tokenizer.from_pretrained(smollm2_gguf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tok.add_special_tokens(layouts.SMOLVLM_SPECIAL_TOKENS)
    hf_tok.add_special_tokens({"additional_special_tokens": layouts.SMOLVLM_SPECIAL_TOKENS})
    image_id = tok.token_to_id("<image>")
    assert image_id == hf_tok.convert_tokens_to_ids("<image>")

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({  # SmolVLM's settings, small tiles
        "image_processor_type": "SmolVLMImageProcessor", "size": {"longest_edge": 128},
        "max_image_size": {"longest_edge": 64}, "resample": 1}))

    class NoVideoProcessor(transformers.SmolVLMProcessor):  # its video processor needs torchvision
        def check_argument_for_proper_class(self, name, argument):
            if name != "video_processor":
                return super().check_argument_for_proper_class(name, argument)

    seq_len = 16  # (64 / 8)^2 patches per tile, 2 x 2 pixel shuffle
    hf_processor = NoVideoProcessor(
        image_processor=transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil"),
        tokenizer=hf_tok, video_processor=None, image_seq_len=seq_len)
    torch.manual_seed(0)
    cfg = transformers.SmolVLMConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 64, "patch_size": 8},
        text_config={"vocab_size": tok.vocab_size, "hidden_size": 48, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        scale_factor=2, image_token_id=image_id)
    hf = transformers.SmolVLMForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / "model")
    hf.generation_config.eos_token_id = None
    ours = VLM.from_pretrained(str(tmp_path / "model"))

    photo = processing.load_image(os.path.join(assets, "images", "chelsea.png"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]}]
    pixel_values, grids = SmolVLMImageProcessor.from_pretrained(str(tmp_path))(photo)
    ids = torch.tensor([build_prompt(tok, messages, template="smolvlm",
                                     image_tokens=[smolvlm_image_tokens(r, c, seq_len) for r, c in grids])])
    text = "<|im_start|>User:<image>What animal is this?<end_of_utterance>\nAssistant:"  # SmolVLM's template
    expected = hf_processor(text=[text], images=[[photo]], return_tensors="pt")
    assert torch.equal(ids, expected["input_ids"])
    assert max_diff(pixel_values, expected["pixel_values"].flatten(0, 1)) <= 1e-5
    assert grids == [(2, 2)] and len(pixel_values) == 5  # 451 x 300 -> 128 x 85 -> 2 x 2 tiles + global
    with torch.no_grad():
        theirs = hf(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
        mine = ours(ids, pixel_values=pixel_values)
    assert max_diff(theirs, mine) <= 1e-4
    new = hf.generate(**expected, max_new_tokens=20, do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, 20, pixel_values=pixel_values), new)


def test_attention_maps_over_image_tokens_equal_transformers(tmp_path):
    from generate import attention_maps

    hf, ours = tiny_smolvlm(tmp_path)
    hf.set_attn_implementation("eager")  # the attention implementation that returns its probabilities
    ids = torch.tensor([[1, 2, 3] + [IMAGE] * 4 + [4, 5, 6]])
    pixels = torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = torch.stack(hf(input_ids=ids, pixel_values=pixels, output_attentions=True).attentions)[:, 0]
    mine = attention_maps(ours, ids, pixel_values=pixels[0])  # (L, H, T, T)
    assert mine.shape == theirs.shape and max_diff(mine, theirs) <= 1e-5


def test_vision_layer_and_family_out_of_range_are_refused():
    from siglip import VisionTower

    vision = VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=4, n_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match="family 'vit' is not supported"):
        VisionConfig(family="vit")
    for layer in (5, 99, -6):
        with pytest.raises(ValueError, match="the tower has 4 layers"):
            VLMConfig(vision=vision, lm=LMConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                                 hidden_dim=64), vision_layer=layer)
        with pytest.raises(ValueError, match="this tower has 4 layers"):
            VisionTower(vision)(torch.zeros(1, 3, 16, 16), layer=layer)
    assert VisionTower(vision)(torch.zeros(1, 3, 16, 16), layer=-5).shape == (1, 4, 32)  # the patch embeddings



@pytest.mark.parametrize("build", [lambda: LMConfig(n_layers=10 ** 6), lambda: LMConfig(n_experts=10 ** 6),
                                   lambda: VisionConfig(n_layers=10 ** 6)], ids=["lm-layers", "experts", "vision"])
def test_configs_beyond_the_machines_memory_are_refused_before_anything_is_built(build):
    with pytest.raises(ValueError, match="more than this machine's"):
        build()
