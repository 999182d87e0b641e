"""Retrieval evaluation (CLIP-GPT's second direction): caption -> predicted CLIP embedding ->
nearest images. recall@1/5/10 of a split's captions against an index of the split's images.

    vqa-rlhf retrieval-eval configs/seeds/clip-gpt.yaml [--model DIR] [key=value ...]

The model must have been trained with `model.clip_head: true` (vlm/retrieval.py). Queries:
every caption of the first eval.caption_max_images images (all when unset) of the
`captions/` dataset's split eval.split; the index: those images' pooled CLIP embeddings
(the CLS row at vision_feature_layer), read from data.feature_cache when one is set
(checked against the model's vision tower), else computed by the vision tower once.
A caption counts at k when its own image is among the k nearest by cosine similarity;
`chance` is recall@k of a random ranking (k / index size).
Writes <run>/eval/retrieval/metrics.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from vlm.config import RunConfig
from vlm.data import ImageCache, load_split
from vlm.features import open_for_model
from vlm.model import load_for_inference
from vlm.retrieval import TowerEmbeddings, embedding_head, embedding_token_id, retrieval_recall
from vlm.stage_cli import parse_model_stage_args, write_json


def evaluate_retrieval(config: RunConfig, model_dir: Path) -> dict:
    split = config.eval.split
    records = load_split(config.data_dir, "captions", split)
    records = [r for r in records if isinstance(r.get("caption"), str) and r["caption"].strip()]
    images = list(dict.fromkeys(r["image"] for r in records))  # first-seen order, as caption_eval
    if config.eval.caption_max_images:
        images = images[:config.eval.caption_max_images]
    kept = set(images)
    records = [r for r in records if r["image"] in kept]
    if not records:
        raise ValueError(f"{config.data_dir}/captions/{split}: no captions to evaluate")
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, "retrieval-eval")
    head = embedding_head(model)
    if head is None:
        raise ValueError(f"{model_dir}: the model has no caption -> CLIP embedding head; "
                         f"train it with model.clip_head=true")
    started = time.perf_counter()
    if config.data.feature_cache:
        store = open_for_model(config.data.feature_cache, model, processor, str(model_dir))
    else:
        store = TowerEmbeddings(model, ImageCache(processor.image_processor, config.data_dir), images,
                                config.eval.batch_size)
    recall = retrieval_recall(model, head, processor.tokenizer, embedding_token_id(processor.tokenizer), store,
                              records, config.eval.batch_size)
    seconds = time.perf_counter() - started
    metrics = {"model": str(model_dir), "split": split, **recall,
               "chance": {k: round(min(1.0, int(k.split("@")[1]) / recall["index_size"]) * 100, 2)
                          for k in recall if k.startswith("recall@")},
               "index_from": "feature_cache" if config.data.feature_cache else "vision_tower",
               "seconds": round(seconds, 2)}
    write_json(config.paths.eval_metrics("retrieval"), metrics)
    return metrics


def main(argv=None) -> int:
    config, model_dir = parse_model_stage_args("retrieval-eval", __doc__, argv)
    m = evaluate_retrieval(config, model_dir)
    print(f"retrieval-eval {m['split']}: {m['queries']} captions, {m['index_size']} images: "
          f"recall@1 {m['recall@1']}, @5 {m['recall@5']}, @10 {m['recall@10']} "
          f"(chance {m['chance']['recall@1']}, {m['chance']['recall@5']}, {m['chance']['recall@10']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
