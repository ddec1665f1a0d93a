"""Metrics of evaluate.py against their reference implementations (pycocoevalcap, sacrebleu,
rouge_score, transformers) and hand-worked examples, and its command line on a tiny VLM."""

import json
import math
import os

import pytest
import torch

from evaluate import (
    bleu,
    captions_metrics,
    cider_d,
    main,
    normalize_answer,
    perplexity,
    question_type,
    rouge_l,
    token_f1,
    tokenize_caption,
    vqa_accuracy,
)

# Candidate captions and their references, already tokenized (the scorers split on spaces).
CAPTION_CASES = {
    "several-references": (
        ["a man rides a horse on the beach", "two dogs play in the snow", "a red bus"],
        [["a man rides a horse along the beach", "a person on a horse by the sea", "man riding horse"],
         ["two dogs playing in snow", "dogs run through the snow together"],
         ["a red double decker bus on a street", "a bus"]]),
    "length-mismatch": (  # shorter than the references overall: the brevity penalty applies
        ["a cat", "a brown dog sits on a big green chair in the living room today"],
        [["a cat sitting on a wooden table near a window"], ["a dog on a chair", "a brown dog sits on a green chair"]]),
    "zero-overlap": (
        ["blue sky", "the cat sleeps"],
        [["a red car parked"], ["dogs bark loudly at night", "a loud dog"]]),
    "repeated-words": (
        ["the the the the the", "dog dog dog", "a cat on a mat"],
        [["the cat is on the mat", "there is a cat on the mat"], ["a dog and another dog", "dog"], ["a cat on a mat"]]),
    "one-image": (  # idf is log(1) - log(1) = 0 for every n-gram: CIDEr-D is 0
        ["a red triangle"],
        [["a red triangle", "a triangle that is red"]]),
}


def coco(predictions, references):
    """pycocoevalcap's inputs: {image id: [reference, ...]}, {image id: [candidate]}."""
    return dict(enumerate(references)), {i: [p] for i, p in enumerate(predictions)}


@pytest.mark.parametrize("case", CAPTION_CASES)
def test_caption_metrics_equal_pycocoevalcap(case):
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predictions, references = CAPTION_CASES[case]
    gts, res = coco(predictions, references)
    theirs = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert bleu(predictions, references) == pytest.approx(theirs, rel=1e-9, abs=1e-15)
    assert rouge_l(predictions, references) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-9, abs=1e-12)
    assert cider_d(predictions, references) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", ["several-references", "length-mismatch", "repeated-words"])
def test_bleu_equals_sacrebleu_where_every_order_has_a_match(case):
    """sacrebleu (tokenize="none", no smoothing) defines corpus BLEU the same way: clipped counts,
    closest reference length. Only where an order has no match at all do they differ: sacrebleu
    gives 0, pycocoevalcap's 1e-15 / 1e-9 constants a tiny positive score (checked below)."""
    sacrebleu = pytest.importorskip("sacrebleu")
    predictions, references = CAPTION_CASES[case]
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(max(map(len, references)))]
    for n, ours in enumerate(bleu(predictions, references), 1):
        theirs = sacrebleu.metrics.BLEU(max_ngram_order=n, tokenize="none", smooth_method="none")
        score = theirs.corpus_score(predictions, streams)
        assert min(score.counts) > 0
        assert ours == pytest.approx(score.score / 100, rel=1e-7)
    predictions, references = CAPTION_CASES["zero-overlap"]
    streams = [[refs[0] for refs in references]]
    assert sacrebleu.metrics.BLEU(tokenize="none", smooth_method="none").corpus_score(predictions, streams).score == 0
    assert 0 < bleu(predictions, [[refs[0]] for refs in references])[3] < 1e-6


def test_rouge_l_with_beta_1_equals_rouge_score_on_one_reference():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    predictions = [p for preds, _ in CAPTION_CASES.values() for p in preds]
    references = [refs[-1] for _, refs_of in CAPTION_CASES.values() for refs in refs_of]
    theirs = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    for p, r, f in zip(predictions, references, theirs):
        assert rouge_l([p], [[r]], beta=1.0) == pytest.approx(f, abs=1e-12)
    assert rouge_l(predictions, [[r] for r in references], beta=1.0) == pytest.approx(sum(theirs) / len(theirs))
    assert rouge_l(predictions, [[r] for r in references]) != pytest.approx(sum(theirs) / len(theirs))  # beta 1.2


def test_captions_are_tokenized_as_coco_does_before_scoring():
    assert tokenize_caption("A Red Triangle.") == "a red triangle"
    assert tokenize_caption("A dog's toy, (blue)!") == "a dog 's toy blue"
    assert tokenize_caption("He doesn't see 1,000 black-and-white cats...") == "he does n't see 1,000 black-and-white cats"
    predictions, references = ["A man's dog, running!"], [["A man's dog runs.", "The dog of a man."]]
    tokenized = [[tokenize_caption(r) for r in refs] for refs in references]
    expected = dict(zip(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], bleu(["a man 's dog running"], tokenized)))
    expected.update({"ROUGE-L": rouge_l(["a man 's dog running"], tokenized),
                     "CIDEr-D": cider_d(["a man 's dog running"], tokenized)})
    assert captions_metrics(predictions, references) == expected
    with pytest.raises(ValueError):
        captions_metrics(["a cat"], [[]])


def test_token_f1_follows_squad_v1_1():
    """Hand-worked with SQuAD v1.1's evaluate-v1.1.py: lower case, punctuation and articles removed,
    bag-of-words overlap, best reference."""
    cases = [
        ("the cat sat on the mat", ["a cat on a mat"], 6 / 7),  # P = 3/4, R = 3/3
        ("Paris.", ["paris"], 1.0),
        ("in Paris, France", ["Paris", "France's capital"], 0.5),  # "paris": P = 1/3, R = 1; "frances capital": 0
        ("dog dog cat", ["dog cat cat"], 2 / 3),  # overlap counts clip: one dog, one cat
        ("blue", ["red"], 0.0),
        ("The", ["a"], 0.0),  # both empty after normalisation: 0 in v1.1
    ]
    for prediction, references, f1 in cases:
        assert token_f1([prediction], [references]) == pytest.approx(f1)
    assert token_f1([c[0] for c in cases], [c[1] for c in cases]) == pytest.approx(sum(c[2] for c in cases) / 6)
    assert token_f1(["a cat"], ["the cat"]) == 1.0  # one reference as a string


def test_vqa_accuracy_normalises_answers():
    assert normalize_answer("  The Red!") == "red"
    assert vqa_accuracy(["Red.", "a circle", "no"], ["red", "circle", "yes"]) == 2 / 3
    assert question_type("teal") == "color"
    assert question_type("circle") == "shape"
    assert question_type("no") == "yes/no"


def test_vqa_normalisation_follows_the_official_script():
    examples = {
        "Two dogs.": "2 dogs",  # period dropped, number word as a digit
        "a cat": "cat",  # articles removed
        "it's": "it's",  # the apostrophe is not in the official punctuation list
        "dont": "don't", "whats": "what's", "couldnt've": "couldn't've",  # contractions fixed
        "yes, it is": "yes it is",  # punctuation next to a space is dropped
        "red/blue": "red blue",  # elsewhere it becomes a space
        "1,000 (about)": "1000 about",  # with a "1,000"-style number every mark is dropped
        "3.5": "3.5",  # a period before a digit stays
        "None": "0", "TEN": "10",
        "Is\tit\nblue?": "is it blue",
    }
    assert {text: normalize_answer(text) for text in examples} == examples


def test_vqa_accuracy_with_ten_human_answers():
    """min(#humans who said it / 3, 1), averaged over the ten ways of leaving one human out."""
    two_red = ["red"] * 2 + ["maroon"] * 8  # red humans see 1 other red (1/3), the others 2 (2/3)
    three_red = ["red"] * 3 + ["maroon"] * 7  # red humans see 2 (2/3), the others 3 (1)
    assert vqa_accuracy(["Red"], [two_red]) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_accuracy(["red"], [three_red]) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy(["two"], [["2"] * 4 + ["3"] * 6]) == 1.0
    assert vqa_accuracy(["blue"], [three_red]) == 0.0
    assert vqa_accuracy(["red", "red"], ["red", two_red]) == pytest.approx((1 + 0.6) / 2)  # strings and lists mixed
    with pytest.raises(ValueError):
        vqa_accuracy(["red"], [])


def test_perplexity_equals_exp_of_the_transformers_loss(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    from model import LanguageModel

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(tmp_path)
    ours = LanguageModel.from_pretrained(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ([12, 7, 9], [5, 10]):
        ids = torch.randint(0, 128, (len(lengths), max(lengths)), generator=g)  # (B, T)
        mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()  # (B, T), right padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # a prompt that is not scored
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": None})
    with torch.no_grad():
        losses = [hf(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.item()
                  for b in batches]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert perplexity(ours, batches[:1])["perplexity"] == pytest.approx(math.exp(losses[0]), rel=1e-4)
    result = perplexity(ours, batches)  # over both: the token-weighted mean NLL
    assert result["tokens"] == sum(counts)
    nll = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def read_report(folder: str, task: str) -> dict:
    with open(os.path.join(folder, f"eval-{task}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A random tiny VLM checkpoint as train.py writes it (untrained: the command line only has to run)."""
    pytest.importorskip("easy_vqa")
    import easyvqa
    import presets
    import runs
    import train

    cfg = train.TrainConfig(phase="instruct", connector="pixel_shuffle", template="chatml-plain")
    spec = {"vision_config": {**presets.TINY_VISION, "dim": 32, "n_layers": 1, "n_heads": 2, "hidden_dim": 64},
            "lm_config": {**presets.TINY_LM, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128},
            "tokenizer_vocab": 300}

    model, tokenizer, processor = train.start_model(cfg, spec, easyvqa.easy_vqa_text("test", limit=200))
    run = str(tmp_path_factory.mktemp("tiny-vlm"))
    return runs.save_checkpoint(run, 0, model, tokenizer, processor, torch.optim.AdamW(model.parameters()), cfg)


def test_cli_captions_on_a_tiny_vlm(tiny_vlm, one_thread, capsys):
    from easyvqa import easy_vqa_captions

    main(["--checkpoint", tiny_vlm, "--task", "captions", "--limit", "3", "--batch-size", "2"])
    report = read_report(tiny_vlm, "captions")
    assert report["images"] == 3 and len(report["examples"]) == 3
    references = [e["references"] for e in report["examples"]]
    assert references == [[s["messages"][-1]["content"]] for s in easy_vqa_captions("test", limit=3)]
    scores = captions_metrics([e["prediction"] for e in report["examples"]], references)
    assert {k: report[k] for k in scores} == scores
    assert "CIDEr-D" in capsys.readouterr().out


def test_cli_perplexity_on_a_tiny_vlm_equals_the_training_loss(tiny_vlm, one_thread):
    from cli import load
    from data import collate
    from easyvqa import easy_vqa_qa
    from processing import Special
    from train import TrainConfig, token_loss

    main(["--checkpoint", tiny_vlm, "--task", "perplexity", "--limit", "5", "--batch-size", "2"])
    report = read_report(tiny_vlm, "perplexity")
    model, tokenizer, processor, template = load(tiny_vlm, torch.float32, "cpu")
    batch = collate(easy_vqa_qa("test", limit=5), tokenizer, processor, template=template,
                    image_tokens=lambda: [Special("<image>")] * model.config.tokens_per_image())
    with torch.no_grad():
        loss, n, _ = token_loss(model, batch, TrainConfig())  # all five in one batch, as training sums them
    assert report["samples"] == 5 and report["tokens"] == n
    assert report["perplexity"] == pytest.approx(math.exp(loss.item() / n), rel=1e-5)


def test_cli_easy_vqa_balanced_asks_the_redrawn_questions(tiny_vlm, one_thread):
    from easyvqa import easy_vqa_qa, easy_vqa_qa_balanced

    main(["--checkpoint", tiny_vlm, "--task", "easy-vqa", "--limit", "10", "--balanced", "--batch-size", "4"])
    report = read_report(tiny_vlm, "easy-vqa-balanced")
    asked = [(e["question"], e["answer"]) for e in report["examples"]]
    expected = [(s["messages"][0]["content"][1]["text"], s["messages"][1]["content"])
                for s in easy_vqa_qa_balanced("test", limit=10)]
    official = [(s["messages"][0]["content"][1]["text"], s["messages"][1]["content"])
                for s in easy_vqa_qa("test", limit=10)]
    assert report["balanced"] and report["samples"] == 10 and asked == expected != official
    assert report["accuracy"] == vqa_accuracy([e["prediction"] for e in report["examples"]], [a for _, a in asked])


def test_cli_easy_vqa_reports_the_no_image_baseline_beside_the_result(tiny_vlm, one_thread, capsys):
    main(["--checkpoint", tiny_vlm, "--task", "easy-vqa", "--limit", "10", "--batch-size", "4"])
    report = read_report(tiny_vlm, "easy-vqa")
    answers = [e["answer"] for e in report["examples"]]
    with_image = [e["prediction"] for e in report["examples"]]
    blind = [e["prediction_no_image"] for e in report["examples"]]
    assert report["image"] and report["samples"] == 10
    assert report["accuracy"] == vqa_accuracy(with_image, answers)
    assert report["no_image"]["accuracy"] == vqa_accuracy(blind, answers)
    assert report["image_adds"] == report["accuracy"] - report["no_image"]["accuracy"]
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["image", "no", "image", "image", "adds"]  # the two columns and their difference
    main(["--checkpoint", tiny_vlm, "--task", "easy-vqa", "--limit", "10", "--batch-size", "4", "--no-baseline"])
    assert "no_image" not in read_report(tiny_vlm, "easy-vqa")


def test_cli_easy_vqa_reworded_asks_held_out_phrasings_and_the_own_lower_case(tiny_vlm, one_thread, capsys):
    import random

    from questions import reword

    main(["--checkpoint", tiny_vlm, "--limit", "12", "--batch-size", "4", "--balanced", "--reworded", "--seed", "3"])
    report = read_report(tiny_vlm, "easy-vqa-balanced-reworded")
    examples, answers = report["examples"], [e["answer"] for e in report["examples"]]
    rng = random.Random(3)  # the held-out phrasings --seed 3 draws
    assert [e["reworded_question"] for e in examples] == [reword(e["question"], e["answer"], rng, "held_out")
                                                           for e in examples]
    assert [e["own_lower_case_question"] for e in examples] == [e["question"].lower() for e in examples]
    for key in ("reworded", "own_lower_case", "no_image_reworded"):
        assert report[key]["accuracy"] == vqa_accuracy([e[f"prediction_{key}"] for e in examples], answers)
    assert report["case_changed"] == sum(e["prediction"] != e["prediction_own_lower_case"] for e in examples)
    out = capsys.readouterr().out
    assert "reworded" in out.splitlines()[0] and "lower case" in out and "yes/no negated" in out
    assert "letter case alone" in out


@pytest.mark.parametrize("args", [["--task", "perplexity", "--data", "no/such/file.txt"],
                                  ["--task", "captions", "--limit", "0"],
                                  ["--task", "captions", "--no-image"],
                                  ["--task", "captions", "--balanced"],
                                  ["--task", "captions", "--no-baseline"],
                                  ["--task", "captions", "--reworded"],
                                  ["--task", "fly"]])
def test_cli_bad_input_is_one_error_line(tiny_vlm, capsys, args):
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", tiny_vlm, *args])
    assert exit_.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines


def test_answer_questions_never_answers_image_placeholders(tiny_vlm, one_thread, monkeypatch):
    """A VLM biased toward <image> (as if its LM head favoured it) answers the easy-VQA questions
    without a "placeholders but no pixel_values" error and without a special token: they are banned."""
    import evaluate
    from cli import load
    from easyvqa import easy_vqa_qa
    from generate import generate

    model, tok, processor, template = load(tiny_vlm, torch.float32, "cpu")
    bias = torch.zeros(model.config.lm.vocab_size)
    bias[model.config.image_token_id] = 30.0
    model.lm.register_forward_hook(lambda _module, _inputs, logits: logits + bias)
    answers = []

    def recorded_generate(*args, **kwargs):
        answers.append(generate(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(evaluate, "generate", recorded_generate)
    evaluate.answer_questions(model, tok, processor, template, easy_vqa_qa("test", limit=4), batch_size=2,
                              progress=False)
    stops = evaluate.stop_ids(tok, template)
    assert len(answers) == 2 and tok.special_ids - set(stops)
    for new in answers:
        assert not torch.isin(new, torch.tensor(sorted(tok.special_ids - set(stops)))).any(), new


def test_cli_help_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "{easy-vqa,captions,retrieval,perplexity}" in out and "cuda:N" in out
    assert "easy-vqa-qa-balanced" in "".join(out.split())  # the --data sources (help wraps at hyphens)


def test_cli_retrieval_on_a_language_model_is_one_error_line(tiny_vlm, tmp_path, capsys):
    from cli import load
    from model import LanguageModel, LMConfig

    tok = load(tiny_vlm, torch.float32, "cpu")[1]
    tok.save(str(tmp_path))
    LanguageModel(LMConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                           hidden_dim=32)).save_pretrained(str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path), "--task", "retrieval"])
    assert exit_.value.code != 0
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} has no connector (a language model); retrieval needs a Q-Former\n"


def test_a_language_model_answers_easy_vqa_blind_and_bf16_int8_scores_like_float32(tiny_vlm, tmp_path, one_thread,
                                                                                     capsys):
    """--no-image on a language model (the error for an LM suggests it) runs instead of crashing, and
    --dtype bfloat16 --quantize int8 on the tiny VLM answers as float32 does on most questions."""
    from cli import load
    from model import LanguageModel, LMConfig

    tok = load(tiny_vlm, torch.float32, "cpu")[1]
    tok.save(str(tmp_path))
    LanguageModel(LMConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                           hidden_dim=32)).save_pretrained(str(tmp_path))
    main(["--checkpoint", str(tmp_path), "--limit", "8", "--no-image"])
    assert "8 questions" in capsys.readouterr().out
    main(["--checkpoint", tiny_vlm, "--limit", "32", "--no-baseline"])
    full = read_report(tiny_vlm, "easy-vqa")["accuracy"]
    main(["--checkpoint", tiny_vlm, "--limit", "32", "--no-baseline", "--dtype", "bfloat16", "--quantize", "int8"])
    assert abs(read_report(tiny_vlm, "easy-vqa")["accuracy"] - full) <= 0.2


def test_load_refuses_damaged_values_sizes_and_weights(tiny_vlm, tmp_path):
    """What a damaged checkpoint would otherwise run for minutes on, or answer with garbage: one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cli import load
    from checkpoints import CheckpointError

    def copy(change_json=None, change_weights=None):
        folder = str(tmp_path / f"copy{len(os.listdir(tmp_path))}")
        shutil.copytree(tiny_vlm, folder)
        for name, change in (change_json or {}).items():
            path = os.path.join(folder, name)
            settings = json.load(open(path))
            change(settings)
            json.dump(settings, open(path, "w"))
        if change_weights:
            state = load_file(os.path.join(folder, "model.safetensors"))
            change_weights(state)
            save_file(state, os.path.join(folder, "model.safetensors"))
        return folder

    big = copy({"preprocessor_config.json": lambda c: c.update(size={"height": 8192, "width": 8192})})
    with pytest.raises(CheckpointError, match="makes 8192-pixel images"):
        load(big, torch.float32, "cpu")
    huge = copy({"config.json": lambda c: c["lm"].update(n_layers=10 ** 6)})
    with pytest.raises(CheckpointError, match="more than this machine's"):
        load(huge, torch.float32, "cpu")
    nan = copy(change_weights=lambda state: next(v for v in state.values() if v.is_floating_point()).fill_(float("nan")))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load(nan, torch.float32, "cpu")


def test_decoding_refuses_non_finite_logits():
    from generate import beam_search, generate
    from model import LanguageModel, LMConfig

    lm = LanguageModel(LMConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32))
    with torch.no_grad():
        lm.norm.weight.fill_(float("nan"))
    for decode in (generate, beam_search):
        with pytest.raises(ValueError, match="logits are NaN or infinite"):
            decode(lm, torch.tensor([[1, 2, 3]]), max_new_tokens=3)
