"""The rewards RL can optimise (`ppo.reward`), by name -> "module:class".

Names only, no imports: `ppo.reward` is checked against this table (check_reward_config: by
the pipeline before its first stage, and where the reward is built) without loading torch or
a model. A new reward is one file with a `rewards.base.Reward` subclass and one line here.
"""
from __future__ import annotations

import difflib
import importlib

from vlm.config import ConfigError

REWARDS = {
    # the learned reward model (rm stage; ppo.reward_model): image + question + answer
    "model": "rewards.model_reward:ModelReward",
    # the fact-augmented reward model (rm stage with rm.facts=true; ppo.fact_model): it also
    # reads the image's reference facts (captions), as LLaVA-RLHF's Fact-RLHF
    "fact_model": "rewards.model_reward:FactModelReward",
    # official VQA accuracy against the record's annotator answers: verifiable, no model
    "vqa_accuracy": "rewards.vqa_accuracy_reward:VQAAccuracyReward",
    # all-MiniLM-L6-v2 cosine between the answer and the closest reference answer
    "similarity": "rewards.similarity_reward:SimilarityReward",
}


def reward_class(name: str):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; rewards are {sorted(REWARDS)}")
    module, cls = REWARDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def reward_names(spec: str) -> list[str]:
    """`model+vqa_accuracy` -> ["model", "vqa_accuracy"] (order kept; each name once)."""
    names = [name.strip() for name in spec.split("+")]
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError(f"{spec!r}: reward names joined by '+', each once")
    return names


def check_reward_config(ppo) -> None:
    """`ppo.reward` names known rewards, and `ppo.reward_weights` weighs only those, as numbers;
    else a ConfigError that names the key (and the closest reward names)."""
    try:
        names = reward_names(ppo.reward)
    except ValueError as exc:
        raise ConfigError(f"config key 'ppo.reward': {exc}") from None
    for name in names:
        if name not in REWARDS:
            close = difflib.get_close_matches(name, list(REWARDS), n=2, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"config key 'ppo.reward' names unknown reward {name!r}{hint} "
                              f"(rewards: {', '.join(REWARDS)}; mix with '+')")
    for name, weight in ppo.reward_weights.items():
        if name not in names:
            raise ConfigError(f"config key 'ppo.reward_weights.{name}': {name!r} is not in ppo.reward={ppo.reward!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"config key 'ppo.reward_weights.{name}' must be a number, got {weight!r}")
