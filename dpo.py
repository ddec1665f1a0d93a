"""Preference tuning: the DPO loss and the sequence log-probabilities it is made of.

Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model") trains a policy pi on pairs (prompt x, chosen reply y_w,
rejected reply y_l) against a frozen reference model pi_ref, with no reward model and no sampling:

    reward(y)  = beta * (log pi(y | x) - log pi_ref(y | x))          (the implicit reward)
    loss       = -log sigmoid(reward(y_w) - reward(y_l))              (mean over the pairs)

At the start (pi = pi_ref) every reward is 0 and the loss is log 2. The reference model is either a
frozen copy of the policy, or, when the policy trains with LoRA, the same model with its adapters
switched off (lora.disable_adapters: no second copy in memory). Its log-probabilities never change,
so they can be computed once up front and put in the pair as "ref_chosen" and "ref_rejected".

    batch_pair = data.collate_preferences(samples, tokenizer, image_processor, image_tokens=...)
    loss, metrics = dpo_step(policy, reference, batch_pair, beta=0.1)  # reference=None: LoRA off
    loss.backward()

    reference_logprobs(policy, None, batch_pair)       # (chosen (B,), rejected (B,)) of pi_ref

`token_logprobs` is also training's next-token loss (train.token_loss) and evaluate.py's perplexity.
"""

import torch
import torch.nn.functional as F

from lora import disable_adapters, lora_layers
from processing import IGNORE_INDEX

LOSS_TYPES = ("sigmoid", "ipo")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin")


# ---------------------------------------------------------------------------------------------
# Log-probabilities of the replies
# ---------------------------------------------------------------------------------------------


def response_mask(batch: dict) -> torch.Tensor:  # (B, T - 1) bool
    """Where position t predicts a reply token: labels[t + 1] is not -100 (labels are unshifted)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def logit_positions(batch: dict) -> torch.Tensor:  # (B, T) bool
    """response_mask padded to T: the positions whose logits a loss reads (the model's logits_at)."""
    return F.pad(response_mask(batch), (0, 1), value=False)


def token_logprobs(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:  # (n,) float32, (n,) long
    """log p(token) of every labelled token, and the row it is in: logits (B, T, V) at position t
    predict token t + 1, or (n, V) at the labelled positions only (forward's logits_at=logit_positions),
    labels (B, T) unshifted, -100 where nothing is learned (data.collate). Training's next-token loss is
    minus their sum; perplexity is exp of minus their mean. Only the labelled positions are turned into
    float32 log-probabilities, so no second (B, T, V) tensor is made."""
    mask = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1)
    targets = labels[:, 1:][mask]  # (n,) the labelled tokens, row by row
    if logits.dim() == 3:
        logits = logits[:, :-1][mask]  # (n, V)
    logps = logits.float().log_softmax(dim=-1)  # (n, V)
    return logps.gather(-1, targets[:, None]).squeeze(-1), mask.nonzero()[:, 0]  # (n,), (n,)


def sequence_logprobs(model, batch: dict) -> torch.Tensor:  # (B,) float32
    """log pi(reply | prompt, images) per row: the sum over the reply's tokens of log p(token).

    batch: input_ids, attention_mask, labels (B, T) as data.collate makes them (-100 everywhere but
    the reply), and pixel_values (N, 3, H, W) or None."""
    kwargs = {"pixel_values": batch["pixel_values"]} if batch.get("pixel_values") is not None else {}
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_at=logit_positions(batch),
                   **kwargs)  # (n, V)
    logps, rows = token_logprobs(logits, batch["labels"])  # (n,), (n,)
    return logps.new_zeros(len(batch["labels"])).index_add(0, rows, logps)  # (B,)


def concat_pair(batch_pair: dict) -> dict:
    """One batch of 2B rows, the chosen rows then the rejected ones, so both sides go through the model
    in one forward pass. The shorter side is padded on the right with id 0, mask 0 and label -100
    (masked out and unlabelled: never read); the images of the chosen rows come first, as their
    placeholders do."""
    chosen, rejected = batch_pair["chosen"], batch_pair["rejected"]
    T = max(chosen["input_ids"].shape[1], rejected["input_ids"].shape[1])

    def both(key, pad_value):  # (2B, T)
        return torch.cat([F.pad(side[key], (0, T - side[key].shape[1]), value=pad_value)
                          for side in (chosen, rejected)])

    images = [side["pixel_values"] for side in (chosen, rejected) if side.get("pixel_values") is not None]
    return {"input_ids": both("input_ids", 0), "attention_mask": both("attention_mask", 0),
            "labels": both("labels", IGNORE_INDEX), "pixel_values": torch.cat(images) if images else None}


def pair_logprobs(model, batch_pair: dict) -> tuple[torch.Tensor, torch.Tensor]:  # (B,), (B,)
    """sequence_logprobs of the chosen and of the rejected replies, from one forward pass."""
    return sequence_logprobs(model, concat_pair(batch_pair)).chunk(2)


# ---------------------------------------------------------------------------------------------
# The reference model: a frozen copy, or the policy with its LoRA adapters off
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_logprobs(policy, reference, batch_pair: dict) -> tuple[torch.Tensor, torch.Tensor]:  # (B,), (B,)
    """pi_ref's log-probabilities of the chosen and rejected replies: from `reference` (a frozen copy)
    when given, else from `policy` with its LoRA adapters switched off. Only the adapters go off: if
    other parameters train too (say the connector), compute the reference once before the first step.
    A policy without LoRA and no reference is an error: the policy is no reference once it trains."""
    if reference is not None:
        return pair_logprobs(reference, batch_pair)
    if not lora_layers(policy):
        raise ValueError("DPO needs a reference model: pass a frozen copy of the policy, or train it with LoRA "
                         "(the reference is then the policy with its adapters off)")
    with disable_adapters(policy):
        return pair_logprobs(policy, batch_pair)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """The DPO loss from sequence log-probabilities, all (B,), and the metrics people watch (floats).

    With x = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected), the log-ratio difference:
      "sigmoid"  -log sigmoid(beta x)  (Rafailov et al. 2023, eq. 7); with label_smoothing eps, the
                 conservative DPO of Mitchell 2023: (1 - eps) (-log sigmoid(beta x)) + eps (-log sigmoid(-beta x)),
                 for labels flipped with probability eps
      "ipo"      (x - 1 / (2 beta))^2  (Azar et al. 2023, eq. 17, beta their tau); TRL feeds it per-token
                 mean log-probabilities (dpo_step does too)
    each averaged over the batch.

    metrics: "loss", "rewards/chosen" and "rewards/rejected" (mean of beta * (policy - ref)),
    "rewards/accuracy" (share of pairs whose chosen reward is higher), "rewards/margin" (mean of
    chosen reward - rejected reward)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != "sigmoid"):
        raise ValueError(f"label_smoothing must lie in [0, 0.5) and goes with the sigmoid loss; "
                         f"got {label_smoothing} with {loss_type!r}")
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected  # (B,)
    x = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * x) - label_smoothing * F.logsigmoid(-beta * x)
    else:
        losses = (x - 1 / (2 * beta)) ** 2
    loss = losses.mean()

    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    values = torch.stack([loss.detach(), chosen_rewards.mean(), rejected_rewards.mean(),
                          (chosen_rewards > rejected_rewards).to(loss.dtype).mean(),
                          (chosen_rewards - rejected_rewards).mean()])  # (5,): one device-to-host copy
    return loss, dict(zip(METRICS, values.tolist()))


def dpo_step(policy, reference, batch_pair: dict, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", rpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DPO loss (with gradients into the policy) and metrics of one batch pair
    {"chosen": batch, "rejected": batch} (data.collate_preferences).

    The policy sees both sides in one forward pass. The reference log-probabilities come from the
    pair's "ref_chosen"/"ref_rejected" when the caller put them there (train.py does, with each
    batch), else from `reference` (a frozen copy), else from the policy with its LoRA adapters off. For IPO every
    log-probability is divided by its reply's length, as TRL does (Azar et al. 2023 leave it open).
    rpo_alpha > 0 adds that much of the chosen replies' per-token negative log-likelihood (RPO, Pang
    et al. 2024; TRL's `rpo_alpha`), which keeps the chosen answers' own probability from sinking."""
    policy_logps = pair_logprobs(policy, batch_pair)
    nll = -(policy_logps[0] / response_mask(batch_pair["chosen"]).sum(dim=1).clamp(min=1)).mean()
    if "ref_chosen" in batch_pair:
        ref_logps = batch_pair["ref_chosen"], batch_pair["ref_rejected"]
    else:
        ref_logps = reference_logprobs(policy, reference, batch_pair)
    if loss_type == "ipo":
        lengths = [response_mask(batch_pair[side]).sum(dim=1).clamp(min=1) for side in ("chosen", "rejected")]
        policy_logps = [logps / n for logps, n in zip(policy_logps, lengths)]
        ref_logps = [logps / n for logps, n in zip(ref_logps, lengths)]
    loss, metrics = dpo_loss(*policy_logps, *ref_logps, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    if rpo_alpha:
        loss = loss + rpo_alpha * nll
        metrics["nll"] = nll.item()
    return loss, metrics
