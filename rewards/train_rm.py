"""Reward model training on exported correct / incorrect labels.

pointwise (default): BCE of the reward (a logit) against the label.
likelihood: the policy's own LM, BCE of its answer probability against the label
(rewards/answer_likelihood.py); with rm.only_correct, SFT on the answers labeled correct
(rejection-sampling fine-tuning). dpo: the policy's own LM, DPO on (correct, incorrect) answers to
one question against the frozen starting model. Both train a policy as much as a reward.
pairwise: a correct and an incorrect answer to the same question about the same
image, -logsigmoid(r_correct - r_incorrect) (Bradley-Terry, as TRL's RewardTrainer,
which is text-only and so cannot be used here).

Each example is the VQA prompt with its image + " answer" + EOS, encoded as SFT
encodes it (vlm.data.encode_example), so the reward reads the state after the EOS
that the policy emits to end its answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlm.config import RewardTrainConfig
from vlm.data import ImageCache, encode_example, pad, vqa_prompt
from vlm.train import VLMTrainer
from rewards.answer_likelihood import answer_log_probs, dpo_loss, likelihood_loss

# Objectives that train the policy's own language model (a stock Llava checkpoint, no scalar head).
LANGUAGE_MODEL_OBJECTIVES = ("likelihood", "dpo")


def reward_prompt(prompt_template: str, question: str, facts_template: str | None = None,
                  facts: str | None = None) -> str:
    """The prompt a reward model reads: the VQA prompt, with the image's reference facts before the
    question when the model is fact-augmented (`facts_template`) and the data has facts."""
    if facts_template and facts:
        question = facts_template.format(facts=facts.strip()) + question.strip()
    return vqa_prompt(prompt_template, question)


def encode_answer(tokenizer, prompt: str, answer: str, answer_template: str, image_seq_length: int,
                  max_length: int) -> list[int]:
    """Prompt + " answer" + EOS, as SFT encodes an answer. An empty answer (the policy emitted EOS at
    once) is scored as "?": it still gets a (low) reward instead of failing the batch."""
    return encode_example(tokenizer, prompt, answer_template.format(answer=answer.strip() or "?"),
                          image_seq_length, max_length).input_ids


def encode_rows(rows: list[dict], tokenizer, images: ImageCache, prompt_template: str, answer_template: str,
                image_seq_length: int, max_length: int, facts_template: str | None = None) -> list[dict]:
    """Token ids + pixels of (image, question, answer) rows (+ the row's `facts` for a fact-augmented
    reward model); a row that does not fit is an error naming it."""
    encoded = []
    for row in rows:
        try:
            prompt = reward_prompt(prompt_template, row["question"], facts_template, row.get("facts"))
            ids = encode_answer(tokenizer, prompt, row["answer"], answer_template, image_seq_length, max_length)
        except ValueError as exc:
            raise ValueError(f"label sample_id {row.get('sample_id')} (question {row['question_id']}): {exc}") from None
        # train_target: a soft target (rm.soft_targets) where one is set, else the label
        encoded.append({"input_ids": ids, "pixel_values": images(row["image"]),
                        "target": float(row.get("train_target", row["target"]))})
    return encoded


def pad_rows(items: list[dict], pad_token_id: int) -> dict:
    """Right padding; the mask (not the token id) says where each row ends."""
    input_ids, attention_mask = pad([item["input_ids"] for item in items], pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.stack([item["pixel_values"] for item in items])}


@dataclass
class PointwiseCollator:
    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        batch = pad_rows(items, self.pad_token_id)
        batch["targets"] = torch.tensor([item["target"] for item in items])
        return batch


@dataclass
class PairwiseCollator:
    """Items are (correct, incorrect) pairs: the batch holds all correct rows, then all incorrect ones."""
    pad_token_id: int

    def __call__(self, pairs: list[tuple[dict, dict]]) -> dict:
        return pad_rows([good for good, _ in pairs] + [bad for _, bad in pairs], self.pad_token_id)


def pointwise_loss(rewards: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(rewards, targets.to(rewards.dtype))


def pairwise_loss(rewards: torch.Tensor) -> torch.Tensor:
    correct, incorrect = rewards.chunk(2)
    return -F.logsigmoid(correct - incorrect).mean()


class RewardTrainer(VLMTrainer):
    """VLMTrainer (per-part learning rates, checkpoint loading) with the reward losses."""

    def __init__(self, *args, objective: str, dpo_beta: float = 0.1, **kwargs):
        self.objective = objective
        self.dpo_beta = dpo_beta
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective in LANGUAGE_MODEL_OBJECTIVES:
            log_p = answer_log_probs(model, inputs)
            loss = (likelihood_loss(log_p, inputs["targets"]) if self.objective == "likelihood"
                    else dpo_loss(log_p, inputs["ref_log_p"].to(log_p), self.dpo_beta))
            return (loss, log_p) if return_outputs else loss
        targets = inputs.pop("targets", None)
        rewards = model(**inputs)
        loss = pairwise_loss(rewards) if self.objective == "pairwise" else pointwise_loss(rewards, targets)
        return (loss, rewards) if return_outputs else loss


@torch.no_grad()
def score(model, encoded: list[dict], pad_token_id: int, batch_size: int = 128) -> list[float]:
    """Rewards of encoded rows, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = pad_rows(encoded[start:start + batch_size], pad_token_id)
        out += model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().tolist()
    model.train(was_training)
    return out


def check_objective(config: RewardTrainConfig, train_rows: list[dict], preferences: list | None = None,
                    sample=None) -> None:
    """Labels a reward model can learn from, checked before any training: a ValueError naming the
    config keys that change them. `sample`: the run's SampleConfig (what produced the answers)."""
    if config.objective in ("pairwise", "dpo"):
        from rewards.labels_io import pairs_by_question

        if not pairs_by_question(train_rows) and not preferences:
            raise ValueError(f"rm.objective={config.objective} needs questions with both a correct and an incorrect "
                             "labelled answer, or pairwise preferences; the labels have none "
                             "(use rm.objective=pointwise)")
    counts = {label: sum(1 for r in train_rows if r["target"] == target) for label, target in
              (("correct", 1), ("incorrect", 0))}
    fewest = min(counts, key=counts.get)
    if preferences or 0 < counts[fewest] >= config.min_labels_per_class:
        return
    what = (f"{counts[fewest]} of {len(train_rows)} training labels are {fewest}" if counts[fewest] else
            f"all {len(train_rows)} training labels are {'correct' if fewest == 'incorrect' else 'incorrect'}")
    if config.min_labels_per_class == 0:  # accepted on request (a smoke run), but said loudly
        print(f"rm: WARNING: {what}: the reward model can only learn a constant", flush=True)
        return
    now = f" (now {sample.k}, {sample.temperature}, {sample.max_questions})" if sample is not None else ""
    raise ValueError(f"{what}, fewer than rm.min_labels_per_class={config.min_labels_per_class}: a reward model "
                     f"learns nothing from one class. Label answers of both kinds: sample more varied answers with "
                     f"sample.k, sample.temperature or sample.max_questions{now}, or label some by hand "
                     f"(vqa-rlhf label)")
