"""One reward interface for every RL algorithm: a reward scores answers, one float per answer.

    reward = build_reward(config, RewardContext(processor, images_for))   # ppo.reward / ppo.reward_weights
    scores = reward([RewardInput(record_id, image, question, answer, reference_answers, caption), ...])

A reward sees what the data knows about each answer's question: the image (a path
relative to the data dir), the question, the answer, and, where the record has them,
its reference answers (VQA's ten) and the image's reference facts (its captions). A
reward that cannot score without a reference says so in `needs`, and an input that
lacks it is an error naming the record and the field, never a silent zero.

Rewards are `nn.Module`s so that the trainers can move and prepare them as they do a
reward model (trl's PPOTrainer calls `.to(device)` on its reward).

Adding a reward: one file with a `Reward` subclass (`from_config(config, context)`,
`score(inputs)`) and one line in `rewards/registry.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from rewards.registry import check_reward_config, reward_class, reward_names


@dataclass(frozen=True)
class RewardInput:
    """One answer to score, with its question's record data."""
    record_id: str
    image: str  # relative to the data dir
    question: str
    answer: str
    reference_answers: tuple[str, ...] = ()  # the record's annotator answers (VQA: ten); () when unknown
    caption: str | None = None  # the image's reference facts; None when the data has none


@dataclass
class RewardContext:
    """What building a reward needs from the stage that uses it.

    `processor`: the policy's (a reward model reads the policy's token ids, and PPO's critic
    starts as one). `images_for(model)`: an image source (path -> tensor, with its `kind`)
    that fits that model's vision tower: pixels, or the feature cache when the tower made it."""
    processor: object
    images_for: Callable[[nn.Module], Callable]
    data_dir: object = None
    notes: list = field(default_factory=list)


class Reward(nn.Module):
    """A reward: `reward(inputs) -> tensor[len(inputs)]` (float32, on the reward's device)."""

    name: str = ""
    # RewardInput fields this reward cannot score without (checked per input, with the record named)
    needs: tuple[str, ...] = ()
    # The score above which the reward calls an answer correct: the reward-hacking alarm compares
    # that call with the official VQA accuracy of the same answers.
    threshold: float = 0.0

    def forward(self, inputs: list[RewardInput]) -> torch.Tensor:
        for item in inputs:
            for name in self.needs:
                if not getattr(item, name):
                    raise ValueError(f"reward '{self.name}': record {item.record_id} (image {item.image}) has no "
                                     f"'{name}'; this reward needs it (use another ppo.reward for this data)")
        scores = torch.as_tensor(self.score(inputs), dtype=torch.float32)
        if scores.shape != (len(inputs),):
            raise RuntimeError(f"reward '{self.name}' returned {tuple(scores.shape)} scores for {len(inputs)} answers")
        return scores

    def score(self, inputs: list[RewardInput]) -> list[float] | torch.Tensor:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config, context: RewardContext) -> "Reward":
        raise NotImplementedError


class MixedReward(Reward):
    """A weighted sum of rewards (ppo.reward: a+b, ppo.reward_weights: {a: w, b: v})."""

    def __init__(self, parts: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.weights = dict(weights)
        self.name = "+".join(parts)
        self.needs = tuple(sorted({need for part in parts.values() for need in part.needs}))
        # the mix calls an answer correct where its parts' thresholds, mixed alike, put the cut
        self.threshold = sum(self.weights[name] * part.threshold for name, part in parts.items())

    def score(self, inputs: list[RewardInput]) -> torch.Tensor:
        return sum(self.weights[name] * part(inputs) for name, part in self.parts.items())


def build_reward(config, context: RewardContext) -> Reward:
    """The reward of `config.ppo` (a name, or names joined by '+' mixed with ppo.reward_weights)."""
    check_reward_config(config.ppo)
    names = reward_names(config.ppo.reward)
    parts = {name: reward_class(name).from_config(config, context) for name in names}
    for name, part in parts.items():
        part.name = name
    weights = {name: float(config.ppo.reward_weights.get(name, 1.0)) for name in names}
    if len(parts) == 1 and weights[names[0]] == 1.0:
        return parts[names[0]]
    return MixedReward(parts, weights)


def inputs_from_references(references: list[dict], answers: list[str]) -> list[RewardInput]:
    """RewardInputs of answers to prompts whose record data is `references` (vlm.data.reference_of)."""
    return [RewardInput(record_id=str(ref["id"]), image=ref["image"], question=ref["question"], answer=answer,
                        reference_answers=tuple(ref.get("answers") or ()), caption=ref.get("caption"))
            for ref, answer in zip(references, answers)]
