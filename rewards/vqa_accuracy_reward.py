"""The verifiable reward: official VQA accuracy (vlm/vqa_metric.py) of the answer against the
record's annotator answers, in [0, 1]. It knows the answer, so it cannot be hacked; it needs
reference answers, so it only applies to prompts that have them."""
from __future__ import annotations

from vlm.vqa_metric import vqa_accuracy
from rewards.base import Reward, RewardContext, RewardInput


class VQAAccuracyReward(Reward):
    needs = ("reference_answers",)

    def __init__(self, min_accuracy: float):
        super().__init__()
        # an answer counts as correct from the autolabel cut on (0.6: two annotators gave it)
        self.threshold = min_accuracy - 1e-6

    @classmethod
    def from_config(cls, config, context: RewardContext) -> "VQAAccuracyReward":
        return cls(config.autolabel.min_accuracy)

    def score(self, inputs: list[RewardInput]) -> list[float]:
        return [vqa_accuracy(item.answer, list(item.reference_answers)) for item in inputs]
