"""The rewards RL can optimise (`ppo.reward`), by name -> "module:class".

Names only, no imports: the config checks `ppo.reward` against this table without loading
torch or a model. A new reward is one file with a `rewards.base.Reward` subclass and one
line here.
"""
from __future__ import annotations

import importlib

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
