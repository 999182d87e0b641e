"""The similarity reward: all-MiniLM-L6-v2 (offline, rewards/baselines.py) cosine between the
answer and its closest reference answer. The reward-model stage's baseline, as a reward; it
cannot tell colours apart well (cosine red/black 0.65), which is what the comparison shows."""
from __future__ import annotations

import json

from rewards.base import Reward, RewardContext, RewardInput
from rewards.baselines import load_similarity_model, similarity_scores

# The cut the rm stage fitted for this baseline on the default run's labels (README: 0.93),
# used when the run has no rm metrics to take it from.
DEFAULT_THRESHOLD = 0.93


class SimilarityReward(Reward):
    needs = ("reference_answers",)

    def __init__(self, model, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        self.model = model  # a SentenceTransformer (an nn.Module: moves with the reward)
        self.threshold = threshold

    @classmethod
    def from_config(cls, config, context: RewardContext) -> "SimilarityReward":
        threshold = DEFAULT_THRESHOLD
        metrics = config.paths.metrics("rm")
        if metrics.is_file():
            fitted = json.loads(metrics.read_text()).get("baselines", {}).get("similarity", {}).get("threshold")
            threshold = DEFAULT_THRESHOLD if fitted is None else float(fitted)
        return cls(load_similarity_model(), threshold)

    def score(self, inputs: list[RewardInput]) -> list[float]:
        return similarity_scores(self.model, [{"answer": item.answer.strip(), "gt_answers": list(item.reference_answers)}
                                              for item in inputs])
