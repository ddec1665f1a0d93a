"""LoRA against PEFT on a tiny random Llama: same logits, adapter files both ways, merging,
freezing, switching adapters off, and clear errors for adapters that do not fit."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from lora import (Linear_LORA, apply_lora, disable_adapters, load_adapter, lora_layers, merge_lora,
                  print_trainable_parameters, save_adapter)
from model import LanguageModel, Linear, LMConfig
from siglip import VisionConfig
from vlm import VLM, VLMConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
QV = ["q_proj", "v_proj"]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def write_llama(folder, **extra) -> str:
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **extra}))
    with torch.no_grad():  # random everything, so that a wrong weight anywhere shows in the logits
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return write_llama(tmp_path_factory.mktemp("llama"))


def ours(folder) -> LanguageModel:
    return LanguageModel.from_pretrained(folder)


def theirs(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder).eval()


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_b(model, seed=2):
    """A trained-looking adapter: lora_B non-zero, so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def hf_module(name: str) -> str:  # layers.0.attn.q_proj -> model.layers.0.self_attn.q_proj, written out here
    return "model." + name.replace(".attn.", ".self_attn.")


def peft_lora(peft_model) -> dict:
    """PEFT's LoRA layers by their module name in the transformers model."""
    return {name: m for name, m in peft_model.base_model.model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def test_fresh_adapter_leaves_logits_unchanged(llama):
    lm = ours(llama)
    base = logits(lm)
    apply_lora(lm)
    assert sorted(lora_layers(lm)) == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    assert torch.equal(logits(lm), base)
    assert not any(layer.training for layer in lora_layers(lm).values())  # the eval model stays in eval mode
    randomize_b(lm)
    lm.train()  # dropout (0.1) on the adapter input now acts
    assert not torch.equal(logits(lm), logits(lm))


@pytest.mark.parametrize("targets", [QV, "all-linear"])
def test_same_adapter_weights_give_peft_logits(llama, targets, capsys):
    lm = ours(llama)
    assert max_diff(logits(lm), logits(theirs(llama))) <= 1e-5
    print_trainable_parameters(apply_lora(lm, targets, r=4, alpha=8, dropout=0.0))
    randomize_b(lm)
    pm = peft.get_peft_model(theirs(llama), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=targets, task_type="CAUSAL_LM"))
    pm.print_trainable_parameters()
    ours_line, peft_line = capsys.readouterr().out.splitlines()
    assert ours_line == peft_line  # same parameter counts
    theirs_layers = peft_lora(pm)
    assert set(theirs_layers) == {hf_module(n) for n in lora_layers(lm)}  # "all-linear" means the same
    with torch.no_grad():
        for name, layer in lora_layers(lm).items():
            theirs_layers[hf_module(name)].lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs_layers[hf_module(name)].lora_B["default"].weight.copy_(layer.lora_B.weight)
    mine = logits(lm)
    assert max_diff(mine, logits(ours(llama))) > 1e-3  # the adapter matters
    assert max_diff(mine, logits(pm.eval())) <= 1e-5


@pytest.mark.parametrize("targets", [QV, "all-linear"])
def test_lora_in_chosen_layers_is_peft_layers_to_transform(llama, targets):
    lm = apply_lora(ours(llama), targets, r=4, alpha=8, dropout=0.0, layers=[1])
    randomize_b(lm)
    every_linear = [f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")]  # PEFT takes no string here
    pm = peft.get_peft_model(theirs(llama), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=every_linear if targets == "all-linear" else targets,
        layers_to_transform=[1], task_type="CAUSAL_LM"))
    theirs_layers = peft_lora(pm)
    assert lora_layers(lm) and all(name.startswith("layers.1.") for name in lora_layers(lm))
    assert set(theirs_layers) == {hf_module(n) for n in lora_layers(lm)}
    with torch.no_grad():
        for name, layer in lora_layers(lm).items():
            theirs_layers[hf_module(name)].lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs_layers[hf_module(name)].lora_B["default"].weight.copy_(layer.lora_B.weight)
    assert max_diff(logits(lm), logits(pm.eval())) <= 1e-5
    with pytest.raises(ValueError, match="LoRA layers 2..2: the LM's are 0..1"):
        apply_lora(ours(llama), targets, layers=[2])


@pytest.mark.parametrize("targets", [QV, "all-linear"])
def test_our_adapter_loads_in_peft(llama, targets, tmp_path):
    lm = apply_lora(ours(llama), targets, r=4, alpha=8, dropout=0.05)
    randomize_b(lm)
    save_adapter(lm, str(tmp_path), base_model_name_or_path=llama)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias")} == \
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none"}
    assert config["target_modules"] == sorted(hf_module(n) for n in lora_layers(lm))
    pm = peft.PeftModel.from_pretrained(theirs(llama), str(tmp_path)).eval()
    assert len(peft_lora(pm)) == len(lora_layers(lm))
    assert max_diff(logits(lm), logits(pm)) <= 1e-5


@pytest.mark.parametrize("targets", [QV, "all-linear", r".*mlp\.(gate|down)_proj"])
def test_peft_adapter_loads_here(llama, targets, tmp_path):
    pm = peft.get_peft_model(theirs(llama), peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in peft_lora(pm).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path))
    lm = load_adapter(ours(llama), str(tmp_path))
    assert {hf_module(n) for n in lora_layers(lm)} == set(peft_lora(pm))
    assert all(layer.scale == 4.0 for layer in lora_layers(lm).values())
    assert max_diff(logits(lm), logits(pm.eval())) <= 1e-5


def test_merge_unmerge_and_merge_lora(llama):
    lm = ours(llama)
    base = logits(lm)
    layers = lora_layers(apply_lora(lm, "all-linear", r=4, alpha=8))
    randomize_b(lm)
    adapted = logits(lm)
    weights = {name: (layer.base.weight, layer.base.weight.clone(), layer.base.weight.stride())
               for name, layer in layers.items()}
    for layer in layers.values():
        layer.merge()
    assert max_diff(logits(lm), adapted) <= 1e-5
    for name, layer in layers.items():  # merged into the same tensor, layout kept
        w, _, stride = weights[name]
        assert layer.base.weight is w and w.stride() == stride
    for layer in layers.values():
        layer.unmerge()
    assert max_diff(logits(lm), adapted) <= 1e-5
    for name, (w, before, _) in weights.items():
        assert max_diff(w, before) <= 1e-6
    with disable_adapters(lm):
        assert max_diff(logits(lm), base) <= 1e-5

    merged = merge_lora(lm)
    assert merged is lm and not lora_layers(lm)
    assert all(type(lm.get_submodule(name)) is Linear for name in layers)  # the LM's own linear, back
    assert not any(isinstance(m, Linear_LORA) for m in lm.modules())
    assert max_diff(logits(lm), adapted) <= 1e-5


def test_disabled_adapters_give_the_base_logits(llama):
    lm = ours(llama)
    base = logits(lm)
    apply_lora(lm, QV, r=4)
    randomize_b(lm)
    adapted = logits(lm)
    with disable_adapters(lm):
        assert torch.equal(logits(lm), base)
    assert torch.equal(logits(lm), adapted)
    for layer in lora_layers(lm).values():  # a merged model too: disable_adapters unmerges the layers
        layer.merge()
    with disable_adapters(lm):
        assert max_diff(logits(lm), base) <= 1e-5
    assert max_diff(logits(lm), adapted) <= 1e-5
    layer = next(iter(lora_layers(lm).values()))
    layer.merge()
    layer.enabled = False  # switched off by hand while merged: refused, never silently changed
    with pytest.raises(RuntimeError, match="unmerge"):
        logits(lm)


def tiny_vlm() -> VLM:
    torch.manual_seed(0)
    return VLM(VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=4, hidden_dim=64),
        lm=LMConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64),
        connector="mlp", image_token_id=63))


def test_only_adapters_and_marked_params_train(capsys):
    vlm = tiny_vlm()
    print_trainable_parameters(apply_lora(vlm, "all-linear", r=4, trainable=("connector.",)))
    assert "trainable params:" in capsys.readouterr().out
    assert set(lora_layers(vlm)) == {f"layers.{i}.{m}" for i in range(2) for m in
                                     ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert not any(isinstance(m, Linear_LORA) for m in vlm.vision.modules())  # the tower is not adapted
    params = dict(vlm.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == {n for n in params if ".lora_" in n or n.startswith("connector.")}

    frozen = {n: p.detach().clone() for n, p in params.items() if n not in trainable}
    before = {n: params[n].detach().clone() for n in trainable}
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-2, weight_decay=0.1)  # all of them, frozen included
    ids = torch.tensor([[1, 2] + [63] * 4 + [3, 4]])
    out = vlm(ids, pixel_values=torch.randn(1, 3, 16, 16))  # (1, 8, 64)
    F.cross_entropy(out[0, :-1], ids[0, 1:]).backward()
    opt.step()
    assert all(torch.equal(params[n], w) for n, w in frozen.items())
    assert all(not torch.equal(params[n], w) for n, w in before.items())


def test_apply_lora_errors(llama):
    lm = ours(llama)
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(lm, ["qkv"])
    with pytest.raises(ValueError, match="conector"):
        apply_lora(ours(llama), trainable=("conector.",))
    apply_lora(lm)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(lm)


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory) -> dict:
    """Adapter folders that do not fit a q/v LoRA of rank 8 on `llama`."""
    root = tmp_path_factory.mktemp("adapters")
    narrow = write_llama(root / "narrow", intermediate_size=80)
    made = {"rank": (llama, QV, 4), "targets": (llama, ["q_proj", "k_proj"], 8), "shape": (narrow, ["down_proj"], 8)}
    for kind, (base, targets, r) in made.items():
        save_adapter(apply_lora(ours(base), targets, r=r), str(root / kind))
    return {kind: str(root / kind) for kind in made}


@pytest.mark.parametrize("kind, module, words", [
    ("rank", "layers.0.attn.q_proj", "rank 8"),
    ("targets", "layers.0.attn.k_proj", "no LoRA there"),
])
def test_adapter_that_does_not_fit_the_lora_names_the_module(llama, adapters, kind, module, words):
    lm = apply_lora(ours(llama), QV, r=8)
    with pytest.raises(ValueError, match=f"^{module}: .*{words}"):
        load_adapter(lm, adapters[kind])


def test_adapter_for_another_base_shape_names_the_module(llama, adapters):
    lm = ours(llama)
    with pytest.raises(ValueError, match=r"^layers\.0\.mlp\.down_proj: .*80 -> 64 linear, this model's is 96 -> 64"):
        load_adapter(lm, adapters["shape"])
    assert not lora_layers(lm)  # checked before anything changed


def test_adapter_weights_outside_its_targets_name_the_module(llama, adapters, tmp_path):
    with open(os.path.join(adapters["targets"], "adapter_config.json")) as f:
        config = json.load(f)
    config["target_modules"] = ["q_proj"]  # the file still holds k_proj weights
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    os.link(os.path.join(adapters["targets"], "adapter_model.safetensors"), tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"^layers\.0\.attn\.k_proj: .*target_modules does not select it"):
        load_adapter(ours(llama), str(tmp_path))
