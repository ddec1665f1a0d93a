"""dpo.py: the DPO loss against its formula and against TRL's DPOTrainer, log 2 at the start, sequence
log-probabilities against a sum by hand (images, padding), LoRA switched off as the reference, and a
few steps of DPO on a tiny VLM learning easy-VQA preference pairs."""

import copy
import math
import types
from collections import defaultdict

import pytest
import torch

import data
import easyvqa
from dpo import (concat_pair, dpo_loss, dpo_step, logit_positions, pair_logprobs, reference_logprobs,
                 sequence_logprobs, token_logprobs)
from lora import apply_lora, disable_adapters, lora_layers
from model import LanguageModel, LMConfig
from processing import IGNORE_INDEX, ImageProcessor, Special
from siglip import VisionConfig
from vlm import VLM, VLMConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# Hand-made sequence log-probabilities of 4 pairs: policy chosen/rejected, reference chosen/rejected.
PC = [-3.0, -10.5, -7.25, -1.0]
PR = [-4.0, -9.0, -5.25, -12.0]
RC = [-3.5, -10.0, -8.0, -2.0]
RR = [-3.5, -9.5, -6.0, -11.0]


def tensors(*rows):
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


def by_formula(beta, eps=0.0, loss_type="sigmoid"):
    """The loss and metrics of PC, PR, RC, RR from the papers' formulas, in plain Python floats."""
    def log_sigmoid(z):
        return -math.log1p(math.exp(-z))

    losses, chosen, rejected = [], [], []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        x = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":  # Rafailov et al. 2023 eq. 7; conservative DPO with eps
            losses.append(-(1 - eps) * log_sigmoid(beta * x) - eps * log_sigmoid(-beta * x))
        else:  # Azar et al. 2023 eq. 17
            losses.append((x - 1 / (2 * beta)) ** 2)
        chosen.append(beta * (pc - rc))
        rejected.append(beta * (pr - rr))
    n = len(losses)
    return {"loss": sum(losses) / n, "rewards/chosen": sum(chosen) / n, "rewards/rejected": sum(rejected) / n,
            "rewards/accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
            "rewards/margin": sum(c - r for c, r in zip(chosen, rejected)) / n}


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0)])
def test_dpo_loss_is_the_formula(beta, loss_type, eps):
    loss, metrics = dpo_loss(*tensors(PC, PR, RC, RR), beta=beta, label_smoothing=eps, loss_type=loss_type)
    expected = by_formula(beta, eps, loss_type)
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-12)
    assert metrics == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert metrics["rewards/accuracy"] == 0.5  # pair 2 prefers the rejected reply, pair 3 ties: both count wrong


def test_dpo_loss_refuses_unknown_options():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*tensors(PC, PR, RC, RR), loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*tensors(PC, PR, RC, RR), label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*tensors(PC, PR, RC, RR), label_smoothing=0.1, loss_type="ipo")


# ---------------------------------------------------------------------------------------------
# A tiny VLM and real easy-VQA preference batches
# ---------------------------------------------------------------------------------------------


def tiny_vlm(tokenizer, seed=0) -> VLM:
    torch.manual_seed(seed)
    return VLM(VLMConfig(
        vision=VisionConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2, hidden_dim=32),
        lm=LMConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                    max_seq_len=128),
        connector="pixel_shuffle", image_token_id=tokenizer.token_to_id("<image>")))  # 1 token per image


def collate(samples, tokenizer):
    return data.collate_preferences(samples, tokenizer, ImageProcessor(size={"height": 16, "width": 16}),
                                    template="chatml-plain", image_tokens=lambda: [Special("<image>")], max_len=128)


@pytest.fixture(scope="module")
def samples():
    return easyvqa.easy_vqa_preferences("train", limit=6)


@pytest.fixture(scope="module")
def padded_pair(tokenizer, samples):
    """Three easy-VQA pairs, one reply made longer so both sides have padding."""
    chosen_long = {**samples[0], "chosen": "It is a rectangle, a blue one."}
    rejected_long = {**samples[1], "rejected": "Brown, I would say."}
    pair = collate([chosen_long, rejected_long, samples[2]], tokenizer)
    assert all((~pair[side]["attention_mask"].bool()).any() for side in ("chosen", "rejected"))
    return pair


def by_hand(model, batch) -> torch.Tensor:  # (B, T - 1) float64, 0 but at the reply positions
    """Each reply token's log-probability, from the full logits, one position at a time."""
    kwargs = {"pixel_values": batch["pixel_values"]} if batch["pixel_values"] is not None else {}
    with torch.no_grad():
        logps = model(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).double().log_softmax(-1)
    labels = batch["labels"]
    out = torch.zeros(labels.shape[0], labels.shape[1] - 1, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != IGNORE_INDEX:  # logits at t predict token t + 1
                out[b, t] = logps[b, t, labels[b, t + 1]]
    return out


def with_random_lora(model, seed=1):
    """LoRA on every linear of the LM, lora_B random: the adapter changes the log-probabilities."""
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return model


# ---------------------------------------------------------------------------------------------
# Sequence log-probabilities
# ---------------------------------------------------------------------------------------------


def test_sequence_logprobs_sum_the_reply_tokens_with_images_and_padding(tokenizer, padded_pair):
    model = tiny_vlm(tokenizer)
    for side in ("chosen", "rejected"):
        batch = padded_pair[side]
        assert batch["pixel_values"].shape == (3, 3, 16, 16)
        with torch.no_grad():
            ours = sequence_logprobs(model, batch)
        assert ours.dtype == torch.float32 and ours.shape == (3,)
        torch.testing.assert_close(ours.double(), by_hand(model, batch).sum(dim=1), rtol=0, atol=1e-5)

    with torch.no_grad():  # both sides in one forward pass: the same numbers
        chosen, rejected = pair_logprobs(model, padded_pair)
        torch.testing.assert_close(chosen, sequence_logprobs(model, padded_pair["chosen"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(rejected, sequence_logprobs(model, padded_pair["rejected"]), rtol=0, atol=1e-5)
    both = concat_pair(padded_pair)
    assert both["input_ids"].shape[0] == 6 and both["pixel_values"].shape[0] == 6


def test_sequence_logprobs_of_a_language_model_without_images(tokenizer):
    torch.manual_seed(0)
    lm = LanguageModel(LMConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                hidden_dim=48, max_seq_len=128))
    pair = data.collate_preferences(
        [{"prompt": [{"role": "user", "content": "Name a colour."}], "chosen": "Blue.",
          "rejected": "A triangle, I think."},
         {"prompt": [{"role": "user", "content": "Is the sky green today?"}], "chosen": "No.", "rejected": "Yes."}],
        tokenizer, template="chatml-plain")
    assert pair["chosen"]["pixel_values"] is None
    with torch.no_grad():
        chosen, rejected = pair_logprobs(lm, pair)
    torch.testing.assert_close(chosen.double(), by_hand(lm, pair["chosen"]).sum(dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected.double(), by_hand(lm, pair["rejected"]).sum(dim=1), rtol=0, atol=1e-5)


def test_sequence_logprobs_carry_gradients(tokenizer, padded_pair):
    model = tiny_vlm(tokenizer)
    sequence_logprobs(model, padded_pair["chosen"]).sum().backward()
    assert model.lm.embed.weight.grad.abs().sum() > 0 and model.connector.proj.weight.grad.abs().sum() > 0


def test_logits_at_the_labelled_positions_give_the_full_logits_loss_and_gradients(tokenizer, padded_pair):
    """Training's LM head only where the loss looks (logits_at=logit_positions): the loss and every
    gradient of the full (B, T, V) path, to float tolerance."""
    batch = padded_pair["rejected"]
    losses, grads = [], []
    for at in (None, logit_positions(batch)):
        model = tiny_vlm(tokenizer)
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
                       logits_at=at)  # (B, T, V), then (n, V)
        loss = -token_logprobs(logits, batch["labels"])[0].sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in model.parameters()])
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    assert logits.shape == (n, tokenizer.vocab_size) and n < batch["input_ids"].numel() // 4
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    for full, at_labels in zip(*grads):
        torch.testing.assert_close(at_labels, full, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The reference model and the start of training
# ---------------------------------------------------------------------------------------------


def with_reference(policy, reference, pair: dict) -> dict:
    """The pair with the reference's log-probabilities in it, as train.py's DPO batches carry them."""
    return {**pair, **dict(zip(("ref_chosen", "ref_rejected"), reference_logprobs(policy, reference, pair)))}


def test_loss_is_log2_and_rewards_zero_when_policy_is_reference(tokenizer, samples):
    pair = collate(samples, tokenizer)
    policy = tiny_vlm(tokenizer)
    frozen = copy.deepcopy(policy).requires_grad_(False)
    fresh_lora = apply_lora(tiny_vlm(tokenizer), "all-linear", r=4)  # lora_B = 0: the base model
    precomputed = with_reference(fresh_lora, None, pair)
    for model, reference, batch_pair in [(policy, frozen, pair), (fresh_lora, None, pair),
                                         (fresh_lora, None, precomputed)]:
        for eps in (0.0, 0.2):
            loss, metrics = dpo_step(model, reference, batch_pair, beta=0.1, label_smoothing=eps)
            assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
            assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margin"] == 0
            assert metrics["rewards/accuracy"] == 0  # no chosen reward is above its rejected one
        loss, _ = dpo_step(model, reference, batch_pair, beta=0.1, loss_type="ipo")
        assert loss.item() == pytest.approx(1 / (4 * 0.1**2), rel=1e-6)  # (0 - 1/(2 beta))^2


def test_rpo_adds_the_chosen_replies_per_token_nll(tokenizer, samples):
    pair = collate(samples, tokenizer)
    policy = tiny_vlm(tokenizer)
    frozen = copy.deepcopy(policy).requires_grad_(False)
    plain, _ = dpo_step(policy, frozen, pair, beta=0.1)
    with_nll, metrics = dpo_step(policy, frozen, pair, beta=0.1, rpo_alpha=0.5)
    labels = pair["chosen"]["labels"][:, 1:]
    nll = -(sequence_logprobs(policy, pair["chosen"]) / (labels != IGNORE_INDEX).sum(dim=1)).mean()
    assert metrics["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)


def test_lora_switched_off_is_the_reference_exactly(tokenizer, padded_pair):
    base = tiny_vlm(tokenizer)
    policy = with_random_lora(copy.deepcopy(base))
    with torch.no_grad():
        base_logps = pair_logprobs(base, padded_pair)
        with disable_adapters(policy):
            off = pair_logprobs(policy, padded_pair)
        on = pair_logprobs(policy, padded_pair)
    for a, b in zip(off, base_logps):
        assert torch.equal(a, b)
    for a, b in zip(reference_logprobs(policy, None, padded_pair), base_logps):
        assert torch.equal(a, b)
    assert all((a - b).abs().min() > 1e-3 for a, b in zip(on, base_logps))
    assert all(layer.enabled for layer in lora_layers(policy).values())  # switched back on

    with pytest.raises(ValueError, match="reference model"):  # no LoRA and no reference: refused
        reference_logprobs(base, None, padded_pair)


def test_reference_gets_no_gradients_and_precomputed_values_agree(tokenizer, padded_pair):
    policy = with_random_lora(tiny_vlm(tokenizer))
    live, _ = dpo_step(policy, None, padded_pair)
    precomputed, _ = dpo_step(policy, None, with_reference(policy, None, padded_pair))
    assert precomputed.item() == pytest.approx(live.item(), abs=1e-6)
    ref_chosen, ref_rejected = reference_logprobs(policy, None, padded_pair)
    assert not ref_chosen.requires_grad and not ref_rejected.requires_grad
    live.backward()
    assert all(layer.lora_B.weight.grad is not None for layer in lora_layers(policy).values())


# ---------------------------------------------------------------------------------------------
# Against TRL's DPOTrainer
# ---------------------------------------------------------------------------------------------


def trl_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, beta, loss_type):
    """TRL's DPOTrainer._compute_loss (trl 1.x) on given per-token log-probabilities, without building
    a trainer: `self` is a namespace with the attributes the method reads, the model a function
    returning TRL's fused-LM-head outputs (log_probs (2B, T - 1), chosen rows first), and the reference
    log-probabilities come precomputed, as TRL's precompute_ref_log_probs passes them."""
    from trl import DPOTrainer

    rows, T = completion_mask.shape
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, use_weighting=False, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=0.0, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    zeros = torch.zeros(rows, T - 1)

    def model(**kwargs):
        return types.SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros,
                                     is_top1=zeros.bool())

    inputs = {"input_ids": torch.zeros(rows, T, dtype=torch.long), "attention_mask": torch.ones(rows, T),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_dpo_step_matches_trl(tokenizer, padded_pair):
    """Our dpo_step on a LoRA policy (reference: adapters off) against TRL's loss fed the same model's
    per-token log-probabilities, computed by hand. TRL 1.x's sigmoid loss has no label smoothing
    (conservative DPO is checked against its formula above); its IPO divides by the reply lengths."""
    pytest.importorskip("trl")
    policy = with_random_lora(tiny_vlm(tokenizer))
    both = concat_pair(padded_pair)
    per_token = by_hand(policy, both).float()  # (2B, T - 1)
    with disable_adapters(policy):
        ref_chosen, ref_rejected = by_hand(policy, both).sum(dim=1).float().chunk(2)
    completion_mask = (both["labels"] != IGNORE_INDEX).long()  # (2B, T)
    for loss_type in ("sigmoid", "ipo"):
        for beta in (0.1, 0.5):
            theirs, their_metrics = trl_loss(per_token, completion_mask, ref_chosen, ref_rejected, beta, loss_type)
            with torch.no_grad():
                ours, metrics = dpo_step(policy, None, padded_pair, beta=beta, loss_type=loss_type)
            assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-5)  # float32 sums of ~10 tokens
            if loss_type == "sigmoid":  # TRL's rewards use the summed log-probabilities, ours too
                for name, their_name in [("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                                         ("rewards/accuracy", "rewards/accuracies"),
                                         ("rewards/margin", "rewards/margins")]:
                    assert metrics[name] == pytest.approx(their_metrics[their_name], rel=1e-4, abs=1e-5)


def test_dpo_loss_matches_trl_on_hand_made_numbers():
    pytest.importorskip("trl")
    pc, pr, rc, rr = (torch.tensor(v) for v in (PC, PR, RC, RR))
    per_token = torch.cat([pc, pr])[:, None]  # (8, 1): each reply one token, holding the whole log-probability
    completion_mask = torch.tensor([[0, 1]] * 8)
    for beta in (0.01, 0.1, 0.5, 2.0):
        for loss_type in ("sigmoid", "ipo"):
            theirs, their_metrics = trl_loss(per_token, completion_mask, rc, rr, beta, loss_type)
            ours, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
            assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
            assert metrics["rewards/margin"] == pytest.approx(their_metrics["rewards/margins"], rel=1e-6)
            assert metrics["rewards/accuracy"] == their_metrics["rewards/accuracies"]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora, lr", [(False, 3e-3), (True, 1e-2)])
def test_a_few_dpo_steps_learn_the_preferences(tokenizer, samples, lora, lr):
    pair = collate(samples, tokenizer)
    policy = tiny_vlm(tokenizer)
    if lora:  # reference: the adapters off
        apply_lora(policy, "all-linear", r=8, alpha=16, dropout=0.0)
        reference = None
    else:  # reference: a frozen copy
        reference = copy.deepcopy(policy).requires_grad_(False)
    pair = with_reference(policy, reference, pair)  # up front: one reference pass
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(12):
        loss, metrics = dpo_step(policy, reference, pair, beta=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics)
    with torch.no_grad():
        _, final = dpo_step(policy, reference, pair, beta=0.5)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["rewards/accuracy"] == 0
    assert final["loss"] < 0.6 * math.log(2)
    assert final["rewards/accuracy"] == 1.0 and final["rewards/margin"] > 0.5
