"""Evaluation: metrics as short functions, and evaluation runs over a data set.

    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa           # test accuracy
    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa --no-image  # the blind baseline

Writes DIR/eval-TASK.json and prints a table.
"""

import argparse
import json
import os
import re
import sys
import time

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


def evaluate_easy_vqa(path: str, limit: int | None, image: bool, batch_size: int, device: str) -> dict:
    from data import easy_vqa_qa

    model, tok, processor, template = load(path, torch.float32, device)
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
    p.add_argument("--task", default="easy-vqa", choices=["easy-vqa"])
    p.add_argument("--limit", type=int, default=None, help="only the first N test samples")
    p.add_argument("--no-image", action="store_true", help="ask without the image: the answer-without-looking baseline")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    path = args.checkpoint
    if os.path.isfile(os.path.join(path, "latest")):
        path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
    from processing import CheckpointError

    try:
        result = evaluate_easy_vqa(path, args.limit, not args.no_image, args.batch_size, args.device)
    except (CheckpointError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    name = f"eval-{args.task}{'-noimage' if args.no_image else ''}.json"
    if os.path.isdir(path):
        with open(os.path.join(path, name), "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'metric':<20}{'value':>10}")
    for k, v in result.items():
        if k.startswith("accuracy") or k in ("samples", "seconds"):
            print(f"{k:<20}{v:>10.4g}")


if __name__ == "__main__":
    main()
