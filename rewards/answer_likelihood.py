"""The likelihood reward model (rm.objective=likelihood): a copy of the policy's own language model,
trained on the judgments, scores an answer by the probability it gives that answer.

    reward(image, question, answer) = p(" answer" + EOS | image, question)        in [0, 1]

Why not a scalar head: the policy's backbone with a linear head on the last token learned counting
and little else from the same labels; it judged colour, shape, side and existence at chance even
with every candidate answer labeled, and could not fit its own training labels (issue 21's probe).
The policy already holds, at the answer's first position, a distribution over the answers of the
question's kind: the binding of question, image and answer that the head had to relearn from
scratch. Reading the answer's probability reuses it, so judging starts from what the policy knows.

Training is a binary cross-entropy on that probability: for an answer labeled correct the loss is
-log p (supervised fine-tuning on it, as rejection-sampling fine-tuning does), for one labeled
incorrect -log(1 - p) (unlikelihood: it pushes down wrong answers the model believes, and barely
touches the ones it already finds unlikely). A soft target t (rm.soft_targets) mixes the two.

The model is a stock `LlavaForConditionalGeneration`: it loads and generates with plain
transformers, and it can itself answer questions (its greedy answers are a policy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm.data import IGNORE_INDEX, encode_example, pad
from vlm.image_input import input_kind_of

# p(answer) is at most this close to 1 in the unlikelihood term: log(1 - p) stays finite.
_MAX_LOG_P = -1e-6


def answer_log_probs(model, batch: dict) -> torch.Tensor:
    """Sum of log-probabilities of each row's supervised tokens (the answer and its EOS), (B,)."""
    batch = dict(batch)
    labels = batch.pop("labels")
    batch.pop("targets", None)
    batch.pop("ref_log_p", None)
    kind = input_kind_of(batch)
    images = batch.pop(kind.key)
    logits = model(**batch, **kind.model_inputs(model, images), use_cache=False).logits
    targets = labels[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    supervised = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * supervised).sum(1)


def likelihood_loss(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with p = exp(log_p): -t log p - (1 - t) log(1 - p)."""
    targets = targets.to(log_p.dtype)
    log_not_p = torch.log(-torch.expm1(log_p.clamp(max=_MAX_LOG_P)))
    return -(targets * log_p + (1 - targets) * log_not_p).mean()


def encode_judged_rows(rows: list[dict], tokenizer, images, prompt, answer_template: str, image_seq_length: int,
                       max_length: int) -> list[dict]:
    """Prompt (masked) + " answer" + EOS (supervised) with the image and the label's target, per row.
    `prompt(row)` gives the row's prompt; a row that does not fit is an error naming it."""
    encoded = []
    for row in rows:
        try:
            example = encode_example(tokenizer, prompt(row), answer_template.format(answer=row["answer"].strip() or "?"),
                                     image_seq_length, max_length)
        except ValueError as exc:
            raise ValueError(f"label sample_id {row.get('sample_id')} (question {row['question_id']}): {exc}") from None
        encoded.append({"input_ids": example.input_ids, "labels": example.labels,
                        "pixel_values": images(row["image"]),
                        "target": float(row.get("train_target", row.get("target", 1.0)))})
    return encoded


@dataclass
class JudgedAnswerCollator:
    """Right padding; labels padded with IGNORE_INDEX, so padding is never scored. The images travel
    under `image_key` (pixels, or cached features: vlm.image_input.ImageInputKind.key)."""
    pad_token_id: int
    image_key: str = "pixel_values"

    def __call__(self, items: list[dict]) -> dict:
        input_ids, attention_mask = pad([item["input_ids"] for item in items], self.pad_token_id)
        labels, _ = pad([item["labels"] for item in items], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                self.image_key: torch.stack([item["pixel_values"] for item in items]),
                "targets": torch.tensor([item["target"] for item in items])}


def dpo_loss(log_p: torch.Tensor, ref_log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO on (chosen, rejected) rows stacked chosen-first: -log sigmoid(beta * (chosen's log-ratio to the
    reference - rejected's))."""
    ratio = log_p - ref_log_p
    chosen, rejected = ratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


@dataclass
class PreferencePairCollator:
    """(chosen, rejected) encoded rows -> one batch, the chosen rows first, with each row's reference
    log-probability (`ref_log_p`, computed once by the frozen starting model)."""
    pad_token_id: int

    def __call__(self, pairs: list[tuple[dict, dict]]) -> dict:
        rows = [good for good, _ in pairs] + [bad for _, bad in pairs]
        batch = JudgedAnswerCollator(self.pad_token_id)(rows)
        batch["ref_log_p"] = torch.tensor([row["ref_log_p"] for row in rows])
        return batch


@torch.no_grad()
def answer_log_likelihoods(model, encoded: list[dict], pad_token_id: int, batch_size: int = 128,
                           image_key: str = "pixel_values") -> list[float]:
    """log p(answer) of encoded rows, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collate = JudgedAnswerCollator(pad_token_id, image_key)
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size]).items()}
        out += answer_log_probs(model, batch).float().cpu().tolist()
    model.train(was_training)
    return out


def answer_probabilities(model, encoded: list[dict], pad_token_id: int, batch_size: int = 128,
                         image_key: str = "pixel_values") -> list[float]:
    """p(answer) of encoded rows, in order (the reward of each)."""
    return [math.exp(log_p) for log_p in answer_log_likelihoods(model, encoded, pad_token_id, batch_size, image_key)]


def with_reference_log_probs(model, encoded: list[dict], pad_token_id: int) -> None:
    """Each row's log p(answer) under `model` as it is now (DPO's frozen reference), in place."""
    for row, log_p in zip(encoded, answer_log_likelihoods(model, encoded, pad_token_id)):
        row["ref_log_p"] = log_p
