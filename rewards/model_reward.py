"""Learned rewards: the reward model (`model`) and the fact-augmented reward model (`fact_model`).

Each answer is encoded as the reward model was trained on it (rewards/train_rm.py: the VQA
prompt with its image + " answer" + EOS; for a fact-augmented model the image's reference
facts before the question), then read at the last token.

A fact-augmented model (trained with rm.facts=true) records its `facts_template` in its
config; `fact_model` refuses a model without one and `model` one with one, so a run never
scores with facts a model that never saw them, nor leaves out facts a model was trained on.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from rewards.answer_likelihood import answer_probabilities, encode_judged_rows
from rewards.base import Reward, RewardContext, RewardInput
from rewards.reward_model import RewardModel
from rewards.train_rm import encode_answer, pad_rows, reward_prompt


class ModelReward(Reward):
    reads_facts = False
    what = "reward model (ppo.reward_model)"

    def __init__(self, model, tokenizer, images, prompt_template: str, answer_template: str, max_length: int,
                 threshold: float = 0.0, batch_size: int = 128):
        super().__init__()
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        self.images = images  # path -> pixels or cached features (images.kind)
        self.prompt_template, self.answer_template = prompt_template, answer_template
        self.max_length = max_length
        self.threshold = threshold
        self.batch_size = batch_size
        self.facts_template = getattr(model.config, "facts_template", None)

    @classmethod
    def model_dir(cls, config) -> Path:
        return config.ppo_reward_model

    @classmethod
    def from_config(cls, config, context: RewardContext) -> "ModelReward":
        path = cls.model_dir(config)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no {cls.what} at {path}: run the rm stage first"
                                    + (" with rm.facts=true" if cls.reads_facts else ""))
        if cls is ModelReward and json.loads((path / "config.json").read_text()).get("model_type") == "llava":
            return LikelihoodReward.from_checkpoint(path, config, context)  # rm.objective=likelihood
        model = RewardModel.from_pretrained(path, dtype=torch.float32)
        reads_facts = bool(getattr(model.config, "facts_template", None))
        if reads_facts != cls.reads_facts:
            raise ValueError(f"{path}: this reward model was trained {'with' if reads_facts else 'without'} the "
                             f"image's reference facts; use ppo.reward={'fact_model' if reads_facts else 'model'}")
        data = config.data
        return cls(model, context.processor.tokenizer, context.images_for(model), data.prompt_template,
                   data.answer_template, data.max_length, threshold=fitted_threshold(path))

    def encode(self, item: RewardInput) -> list[int]:
        prompt = reward_prompt(self.prompt_template, item.question, self.facts_template, item.caption)
        try:
            return encode_answer(self.tokenizer, prompt, item.answer, self.answer_template,
                                 self.model.config.image_seq_length, self.max_length)
        except ValueError as exc:
            raise ValueError(f"reward '{self.name}': record {item.record_id}: {exc}") from None

    @torch.no_grad()
    def score(self, inputs: list[RewardInput]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            batch = pad_rows([{"input_ids": self.encode(item), "pixel_values": self.images(item.image)}
                              for item in chunk], self.tokenizer.pad_token_id)
            images = batch.pop("pixel_values").to(device)
            out.append(self.model(**{k: v.to(device) for k, v in batch.items()},
                                  **self.images.kind.model_inputs(self.model, images)).float().cpu())
        return torch.cat(out)


class LikelihoodReward(ModelReward):
    """The likelihood reward model (rm.objective=likelihood, rewards/answer_likelihood.py): the
    probability a copy of the policy's LM, trained on the judgments, gives the answer. `ppo.reward=model`
    reads it when the rm stage trained that form (the checkpoint is a stock Llava model)."""

    @classmethod
    def from_checkpoint(cls, path: Path, config, context: RewardContext) -> "LikelihoodReward":
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        data = config.data
        return cls(model, context.processor.tokenizer, context.images_for(model), data.prompt_template,
                   data.answer_template, data.max_length, threshold=fitted_threshold(path, default=0.5))

    @torch.no_grad()
    def score(self, inputs: list[RewardInput]) -> torch.Tensor:
        rows = [{"question": item.question, "answer": item.answer, "image": item.image, "question_id": item.record_id}
                for item in inputs]
        try:
            encoded = encode_judged_rows(rows, self.tokenizer, self.images,
                                         lambda row: reward_prompt(self.prompt_template, row["question"]),
                                         self.answer_template, self.model.config.image_seq_length, self.max_length)
        except ValueError as exc:
            raise ValueError(f"reward '{self.name}': {exc}") from None
        return torch.tensor(answer_probabilities(self.model, encoded, self.tokenizer.pad_token_id, self.batch_size,
                                                 self.images.kind.key))


class FactModelReward(ModelReward):
    """The reward model that also reads the image's reference facts (LLaVA-RLHF's Fact-RLHF).
    Facts are used where the data has them; an image without a caption is scored without."""
    reads_facts = True
    what = "fact-augmented reward model (ppo.fact_model)"

    @classmethod
    def model_dir(cls, config) -> Path:
        return config.ppo_fact_model


def fitted_threshold(model_dir: Path, default: float = 0.0) -> float:
    """The model's cut between correct and incorrect, fitted on its training labels (rm stage's
    metrics.json beside or inside the model dir); else `default` (a logit's natural cut: 0; a
    probability's: 0.5)."""
    for path in (model_dir.parent / "metrics.json", model_dir / "metrics.json"):
        if path.is_file():
            return float(json.loads(path.read_text()).get("threshold", default))
    return default
