"""Captioning with a trained model: the caption prompt it was trained with, captions for a
batch of images, and its perplexity on reference captions (the caption command, the
caption_eval stage and SFT's held-out curve of a captioner)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from vlm.config import DataConfig, RunConfig, _build
from vlm.data import RejectLog, SupervisedDataset, VLMCollator, caption_items, vqa_prompt
from vlm.generate import generate
from vlm.image_input import PIXELS, ImageInputKind


def data_config_of(model_dir: Path):
    """The DataConfig the model was trained with (prompt formats), or the defaults."""
    path = Path(model_dir) / "training_config.json"
    if not path.is_file():
        return DataConfig()
    saved = json.loads(path.read_text())
    return _build(RunConfig, {"data": saved.get("data", {})}, "").data


def caption_prompt(data) -> str:
    return vqa_prompt(data.prompt_template, data.caption_prompt)


def caption_batch(model, processor, pixel_values, data, decoding, max_length: int,
                  image_kind: ImageInputKind = PIXELS) -> list[str]:
    """Captions for a batch of images (pixels or cached features)."""
    prompts = [caption_prompt(data)] * len(pixel_values)
    return generate(model, processor.tokenizer, prompts, pixel_values, decoding, max_length,
                    image_kind=image_kind)


def references_by_image(records) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = {}
    for record in records:
        caption = record.get("caption")
        if isinstance(caption, str) and caption.strip():
            refs.setdefault(record["image"], []).append(caption.strip())
    return refs


@torch.no_grad()
def caption_perplexity(model, processor, records, images, data, batch_size: int, rejects: RejectLog) -> float:
    """exp of the mean NLL per supervised token (caption tokens + EOS) over `records`."""
    dataset = SupervisedDataset(caption_items(records, data, "captions"), processor.tokenizer, images,
                                model.config.image_seq_length, data.max_length, rejects)
    collate = VLMCollator(processor.tokenizer.pad_token_id)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        weight = next(model.parameters())  # batches follow the model's device and dtype (vlm.model.pick_device)
        batch = {key: value.to(weight.device) for key, value in batch.items()}
        labels = batch.pop("labels")
        if images.kind.key in batch:  # pixels, or cached features projected here (vlm/features.py)
            batch.update(images.kind.model_inputs(model, batch.pop(images.kind.key).to(weight.dtype)))
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
