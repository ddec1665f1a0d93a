"""layouts.py: transformers' VLM layouts both ways. A tiny random LlavaForConditionalGeneration (CLIP or
SigLIP tower, Llama LM) loads in glimpse with its logits and greedy tokens, in either spelling of its
tensor names; a glimpse VLM exported as LLaVA or Idefics3 loads in transformers with the logits of the
model it came from; parts without a transformers counterpart are refused by name."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
from export import write_transformers
from generate import generate
from layouts import hf_vlm_layout
from model import LMConfig
from processing import ImageProcessor
from siglip import VisionConfig
from vlm import VLM, VLMConfig

transformers = pytest.importorskip("transformers")
IMAGE = 310
TEXT = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
          "image_size": 28, "patch_size": 14}


def randomize(model):
    with torch.no_grad():  # random everything: default LayerNorm/bias values would hide mistakes
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def tiny_llava(folder, tower="clip"):
    torch.manual_seed(0)
    vision = (transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig)(**VISION)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=transformers.LlamaConfig(**TEXT),
                                   image_token_id=IMAGE, vision_feature_layer=-2,
                                   vision_feature_select_strategy="default" if tower == "clip" else "full")
    hf = randomize(transformers.LlavaForConditionalGeneration(cfg))
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None
    return hf


def prompt(n):
    return torch.tensor([[1, 2, 3] + [IMAGE] * n + [4, 5] + [IMAGE] * n + [6, 7]])


@pytest.mark.parametrize("tower, tokens", [("clip", 4), ("siglip", 4)])  # (28 / 14)^2 patches, CLIP's class token dropped
def test_llava_parity_logits_and_greedy(tmp_path, tower, tokens):
    hf = tiny_llava(tmp_path, tower)
    ours = VLM.from_pretrained(str(tmp_path))
    assert ours.config.connector == "mlp" and ours.config.vision_layer == -2 and ours.config.tokens_per_image() == tokens
    ids, pixels = prompt(tokens), torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = hf(input_ids=ids, pixel_values=pixels).logits, ours(ids, pixel_values=pixels)
        other = ours(ids, pixel_values=pixels.flip(0))  # the images matter, and their order too
    assert (theirs - mine).abs().max() <= 1e-4 and (mine - other).abs().max() > 1e-3
    new = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=12,
                      do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(generate(ours, ids, 12, pixel_values=pixels), new)


def test_llava_in_its_module_names_spelling_loads_the_same(tmp_path):
    hf = tiny_llava(tmp_path / "hub")
    state = load_file(str(tmp_path / "hub" / "model.safetensors"))
    spelled = {}  # the names of transformers' modules: model.language_model.*, model.vision_tower.vision_model.*
    for k, v in state.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.").replace("multi_modal_projector.",
                                                                                   "model.multi_modal_projector.")
        spelled[k] = v
    os.makedirs(tmp_path / "modules")
    save_file(spelled, str(tmp_path / "modules" / "model.safetensors"))
    (tmp_path / "modules" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    ids, pixels = prompt(4), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = VLM.from_pretrained(str(tmp_path / "modules"))(ids, pixel_values=pixels)
        assert (a - hf(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-4


def test_llava_options_glimpse_does_not_compute_are_refused(tmp_path):
    from checkpoints import CheckpointError
    tiny_llava(tmp_path)
    config = (tmp_path / "config.json").read_text()
    for old, new, said in [('"vision_feature_select_strategy": "default"', '"vision_feature_select_strategy": "full"',
                            "vision_feature_select_strategy 'full'"),
                           ('"vision_feature_layer": -2', '"vision_feature_layer": [-2, -1]', "vision_feature_layer")]:
        (tmp_path / "config.json").write_text(config.replace(old, new))
        with pytest.raises(CheckpointError, match=said):
            VLM.from_pretrained(str(tmp_path))


def export_and_reload(model, tmp_path, size):
    tokenizer = data.train_tokenizer([{"text": "what color is the shape? blue. is there a circle? yes."}] * 8, 300)
    tokenizer.add_special_tokens(["<image>"])
    out = str(tmp_path / "exported")
    write_transformers(model, tokenizer, ImageProcessor(size={"height": size, "width": size}), out)
    assert not os.path.exists(out + ".tmp")
    return transformers.AutoModelForImageTextToText.from_pretrained(out).eval()


def test_llava_round_trip_transformers_glimpse_export_transformers(tmp_path):
    hf = tiny_llava(tmp_path / "original")
    ours = VLM.from_pretrained(str(tmp_path / "original"))
    ours.save_pretrained(str(tmp_path / "glimpse"))  # a glimpse checkpoint, as train.py writes one
    back = export_and_reload(VLM.from_pretrained(str(tmp_path / "glimpse")), tmp_path, 28)
    assert type(back).__name__ == "LlavaForConditionalGeneration"
    ids, pixels = prompt(4), torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits
                ).abs().max() <= 1e-4
    back.generation_config.eos_token_id = None
    assert torch.equal(back.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False),
                       hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False))
    from PIL import Image  # transformers' own processor expands an <image> into the model's 4 tokens
    processor = transformers.AutoProcessor.from_pretrained(str(tmp_path / "exported"))
    ids = processor(images=Image.new("RGB", (40, 30), "red"), text="<image>\nwhat color?", return_tensors="pt")["input_ids"]
    assert (ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4


def test_idefics3_round_trip_transformers_glimpse_export_transformers(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Idefics3Config(vision_config={**VISION, "image_size": 32, "patch_size": 8}, text_config=TEXT,
                                      scale_factor=2, image_token_id=IMAGE)
    hf = randomize(transformers.Idefics3ForConditionalGeneration(cfg))
    hf.save_pretrained(tmp_path / "original")
    ours = VLM.from_pretrained(str(tmp_path / "original"))
    ours.save_pretrained(str(tmp_path / "glimpse"))
    back = export_and_reload(VLM.from_pretrained(str(tmp_path / "glimpse")), tmp_path, 32)
    assert type(back).__name__ == "Idefics3ForConditionalGeneration"
    ids, pixels = prompt(4), torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits
                ).abs().max() <= 1e-4
    hf.generation_config.eos_token_id = back.generation_config.eos_token_id = None
    assert torch.equal(back.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False),
                       hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False))
    from PIL import Image
    photo = Image.fromarray((torch.rand(40, 56, 3) * 255).byte().numpy())
    theirs = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "exported"))(photo, return_tensors="pt")
    assert theirs["pixel_values"].shape == (1, 1, 3, 32, 32)  # one tile, no global one
    mine = ImageProcessor(size={"height": 32, "width": 32})([photo])  # (1, 3, 32, 32)
    assert (theirs["pixel_values"][0] - mine).abs().max() <= 1e-4


@pytest.mark.parametrize("change, said", [
    ({"vision": VisionConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2, hidden_dim=32, conv_stem=True)},
     "ConvStem"),
    ({"connector": "cls_gate"}, "'cls_gate' connector"),
    ({"vision": VisionConfig(family="dinov2", image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2,
                             hidden_dim=32, cls_token=True)}, "dinov2 tower"),
    ({"vision_layer": 0}, "normed last layer"),
    ({"lm": LMConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, n_experts=2)},
     "'glimpse_lm'"),
])
def test_parts_without_a_transformers_counterpart_are_named(change, said):
    base = dict(vision=VisionConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
                lm=LMConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48),
                connector="mlp", image_token_id=IMAGE, vision_layer=-1)
    with pytest.raises(ValueError, match=said):
        hf_vlm_layout(VLMConfig(**{**base, **change}))


# llava-hf/llava-1.5-7b-hf's chat_template.json ({% generation %} marks dropped: plain Jinja renders the same text)
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
                  "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_llava_chat_template_renders_llava_hf_text():
    import jinja2
    from processing import CHAT_TEMPLATES, ImagePlaceholder, Special, chat_message, untargeted

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
            {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]}]
    parts = CHAT_TEMPLATES["llava"]([chat_message(m) for m in chat], True)
    ours = "".join("<image>" if isinstance(untargeted(p), ImagePlaceholder) else "" if isinstance(untargeted(p), Special)
                   else untargeted(p) for p in parts)  # </s> ends a reply as the model writes it, outside the text
    assert ours == jinja2.Template(LLAVA_TEMPLATE).render(messages=chat, add_generation_prompt=True)


def test_generate_py_answers_from_a_llava_folder(tmp_path):
    import subprocess
    import sys
    from PIL import Image

    tiny_llava(tmp_path)
    tokenizer = data.train_tokenizer([{"text": "what color is the shape? blue. USER: ASSISTANT:"}] * 8, 300)
    tokenizer.add_special_tokens(["<image>", "</s>"])
    tokenizer.save(str(tmp_path))
    ImageProcessor(size={"shortest_edge": 28}, do_center_crop=True, crop_size={"height": 28, "width": 28}).save(
        str(tmp_path))
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace(f'"image_token_index": {IMAGE}',
                                                         f'"image_token_index": {tokenizer.token_to_id("<image>")}'))
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "generate.py"), "--model", str(tmp_path), "--image",
                        str(tmp_path / "red.png"), "--prompt", "what color?", "--max-new-tokens", "4"],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_sparse_llava_configs_take_transformers_defaults():
    """save_pretrained leaves out what equals the config class's defaults (llava-1.5's text_config holds four
    fields); a missing vision_config is LlavaConfig's CLIP ViT-L/14-336; vision_feature_layer 0 is the embeddings."""
    from layouts import hf_vlm_settings
    settings, _ = hf_vlm_settings({"model_type": "llava", "vision_feature_layer": 0, "text_config": {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}})
    lm, vision = settings["lm"], settings["vision"]
    assert (lm.vocab_size, lm.hidden_dim, lm.max_seq_len, lm.norm_eps) == (32000, 11008, 2048, 1e-6)
    assert (vision.family, vision.dim, vision.n_layers, vision.image_size, vision.patch_size) == ("clip", 1024, 24, 336, 14)
    assert settings["vision_layer"] == -25  # hidden_states[0]: no layer run
