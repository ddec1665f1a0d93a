"""Evaluation: metrics as short functions, and evaluation runs over a data set.

    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa           # test accuracy
    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa --no-image  # the blind baseline
    python evaluate.py --checkpoint runs/tiny-qformer --task retrieval             # Recall@K + similarity grid

Writes DIR/eval-TASK.json and prints a table.
"""

import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch

from generate import END_OF_TURN, generate, load


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, articles or extra spaces (the VQA evaluation's normalisation, short form)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def vqa_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Exact match after normalisation (easy-VQA has one right answer per question)."""
    return sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)) / max(1, len(answers))


def question_type(question: str) -> str:
    q = question.lower()
    if "color" in q or "colour" in q:
        return "color"
    if "shape" in q:
        return "shape"
    return "yes/no"


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, rows aligned to the right (generation continues on the right)."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.inference_mode()
def answer_questions(model, tok, processor, template, samples, batch_size=32, max_new_tokens=4, image=True,
                     device="cpu", progress=True) -> list[str]:
    """Greedy answers to the first user turn of each sample ({"messages", "images"}), batched with
    left padding; image=False asks the same questions with the images left out."""
    from tqdm import tqdm

    from processing import Special, build_prompt

    end = [i for i in (tok.token_to_id(END_OF_TURN.get(template, "")), tok.eos_id) if i is not None]
    out = []
    for i in tqdm(range(0, len(samples), batch_size), desc="evaluating", disable=not progress):
        rows, images = [], []
        for s in samples[i: i + batch_size]:
            parts = [p for p in s["messages"][0]["content"] if image or p.get("type") != "image"]
            n_images = sum(p.get("type") == "image" for p in parts)
            tokens = [[Special("<image>")] * model.config.tokens_per_image()] * n_images
            rows.append(build_prompt(tok, [{"role": "user", "content": parts}], template=template, image_tokens=tokens))
            images += s["images"][:n_images]
        ids, mask = left_pad(rows, tok.pad_id if tok.pad_id is not None else 0)
        kwargs = {"pixel_values": processor(images).to(device)} if images else {}
        new = generate(model, ids.to(device), max_new_tokens, attention_mask=mask.to(device), eos_ids=end, **kwargs)
        out += [tok.decode([t for t in row.tolist() if t not in end]).strip() for row in new]
    return out


def recall_at_k(sim, relevant, ks=(1, 5, 10)) -> dict:
    """sim (Q, G) query-gallery scores, relevant (Q, G) bool -> {k: share of queries with a relevant
    item among their k best}."""
    top = sim.argsort(dim=1, descending=True)  # (Q, G)
    hits = relevant.gather(1, top)  # (Q, G): relevance in rank order
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


@torch.inference_mode()
def retrieval_report(model, tok, processor, samples, out_dir: str, batch_size: int = 64) -> dict:
    """Image-to-text and text-to-image Recall@1/5/10 of a Q-Former VLM on caption samples (the
    gallery of texts is every distinct caption; an image's relevant texts are its own caption), and
    similarity_grid.png: rows captions, columns images, cells cosine similarity."""
    from data import caption_ids
    from qformer import similarity

    qformer = model.connector.qformer.eval()
    captions = [s["messages"][-1]["content"] for s in samples]
    texts = sorted(set(captions))
    text_ids, text_mask = caption_ids(tok, texts, qformer.config.max_positions)
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


def similarity_grid(sim, texts, captions, samples, path: str, n: int = 8) -> str:
    """A PNG of the similarity of n captions (rows) and n images (columns, one per caption, shown
    above the grid): the diagonal is each caption's own image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from processing import load_image

    rows = texts[:n]
    cols = [captions.index(t) for t in rows]  # an image of each caption
    grid = sim[cols][:, [texts.index(t) for t in rows]].t().numpy()  # (n captions, n images)
    fig, axes = plt.subplots(2, 1, figsize=(1.2 * n + 3, 1.2 * n + 2.5), gridspec_kw={"height_ratios": [1, n]})
    axes[0].imshow(np.concatenate([np.array(load_image(samples[c]["images"][0]).resize((64, 64))) for c in cols], 1))
    axes[0].axis("off")
    axes[1].imshow(grid, cmap="viridis")
    axes[1].set_yticks(range(len(rows)), rows)
    axes[1].set_xticks(range(len(cols)), [f"image {i + 1}" for i in range(len(cols))], rotation=45)
    for i in range(len(rows)):
        for j in range(len(cols)):
            axes[1].text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    axes[1].set_title("cosine similarity: captions (rows) x images (columns)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def print_table(result: dict):
    print(f"{'metric':<20}{'value':>10}")
    for k, v in result.items():
        if isinstance(v, (int, float)):
            print(f"{k:<20}{v:>10.4g}")


def evaluate_easy_vqa(path: str, limit: int | None, image: bool, batch_size: int, device: str) -> dict:
    from data import easy_vqa_qa
    from processing import ImageProcessor

    model, tok, processor, template = load(path, torch.float32, device)
    if image and not isinstance(processor, ImageProcessor):
        raise ValueError(f"{path} is not a VLM that train.py wrote (easy-VQA evaluation asks one <image> per "
                         "embedding); pass --no-image to evaluate a language model blind")
    samples = easy_vqa_qa("test", limit=limit)
    t0 = time.perf_counter()
    predictions = answer_questions(model, tok, processor, template, samples, batch_size, image=image, device=device)
    answers = [s["messages"][1]["content"] for s in samples]
    questions = [next(p["text"] for p in s["messages"][0]["content"] if p.get("type") == "text") for s in samples]
    kinds = [question_type(q) for q in questions]
    result = {"task": "easy-vqa", "checkpoint": path, "image": image, "samples": len(samples),
              "accuracy": vqa_accuracy(predictions, answers), "seconds": time.perf_counter() - t0}
    for kind in sorted(set(kinds)):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        result[f"accuracy_{kind}"] = vqa_accuracy([predictions[i] for i in idx], [answers[i] for i in idx])
    result["examples"] = [{"question": q, "answer": a, "prediction": p}
                          for q, a, p in list(zip(questions, answers, predictions))[:10]]
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a glimpse checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, a run folder (its latest), or a hub id")
    p.add_argument("--task", default="easy-vqa", choices=["easy-vqa", "retrieval"])
    p.add_argument("--limit", type=int, default=None, help="only the first N test samples")
    p.add_argument("--no-image", action="store_true", help="ask without the image: the answer-without-looking baseline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from generate import check_device, run_checkpoint
    from processing import CheckpointError

    path = run_checkpoint(args.checkpoint)

    try:
        args.device = str(check_device(args.device))
        if args.task == "retrieval":  # easy-VQA's held-out captions, through a Q-Former VLM
            from data import easy_vqa_captions

            model, tok, processor, _ = load(path, torch.float32, args.device)
            if model.config.connector != "qformer":
                raise ValueError(f"{path} has a {model.config.connector!r} connector; retrieval needs a Q-Former")
            result = retrieval_report(model, tok, processor, easy_vqa_captions("test", limit=args.limit or 500), path)
        else:
            result = evaluate_easy_vqa(path, args.limit, not args.no_image, args.batch_size, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    name = f"eval-{args.task}{'-noimage' if args.no_image else ''}.json"
    if os.path.isdir(path) and args.task != "retrieval":  # retrieval_report wrote retrieval.json itself
        with open(os.path.join(path, name), "w") as f:
            json.dump(result, f, indent=2)
    print_table(result)


if __name__ == "__main__":
    main()
