"""Caption evaluation: caption a split's images, score BLEU-1..4 and CIDEr-D against all of
each image's reference captions, and the model's perplexity on the reference captions.

    vqa-rlhf caption-eval configs/seeds/clipxgpt-captioner.yaml [--model DIR] [key=value ...]

Reads the `captions/` dataset of data.dir (built-in captions, or COCO / Flickr30k from
`vqa-rlhf prep coco-captions|flickr30k`: one record per caption, grouped here by image),
split eval.split. Metrics: vlm/caption_metrics.py (coco-caption's BLEU and CIDEr-D, pure
Python). Perplexity: exp(mean negative log-likelihood) of the reference caption tokens
(+ EOS) after the caption prompt, the way SFT trains captions.
Writes <run>/eval/captions/metrics.json and predictions.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlm.caption_metrics import caption_scores
from vlm.captioning import caption_batch, caption_perplexity, references_by_image
from vlm.config import DecodingConfig, RunConfig
from vlm.data import RejectLog, load_split
from vlm.features import image_source
from vlm.model import load_for_inference
from vlm.stage_cli import parse_model_stage_args, run_stage, write_json


def evaluate_captions(config: RunConfig, model_dir: Path) -> dict:
    split = config.eval.split
    records = load_split(config.data_dir, "captions", split)
    refs = references_by_image(records)
    if config.eval.caption_max_images:
        refs = dict(list(refs.items())[:config.eval.caption_max_images])
    if not refs:
        raise ValueError(f"{config.data_dir}/captions/{split}: no captions to evaluate")
    torch.manual_seed(config.seed)
    model, processor = load_for_inference(model_dir, config.device, config.inference_bf16, "caption-eval")
    images = image_source(config.data.feature_cache, config.data_dir, processor, model, True, str(model_dir))
    decoding = DecodingConfig(**{**vars(config.eval.decoding), "max_new_tokens": config.eval.caption_max_new_tokens})
    out_dir = config.paths.eval_dir("captions")
    rejects = RejectLog(out_dir / "rejects.jsonl", config.data.on_bad_record)
    (out_dir / "rejects.jsonl").unlink(missing_ok=True)
    keys, candidates = list(refs), {}
    started = time.perf_counter()
    batch_size = config.eval.batch_size
    for start in tqdm(range(0, len(keys), batch_size), desc="captioning", unit="batch"):
        batch_keys = keys[start:start + batch_size]
        pixels = torch.stack([images(k) for k in batch_keys])
        for key, caption in zip(batch_keys, caption_batch(model, processor, pixels, config.data, decoding,
                                                          config.data.max_length, images.kind)):
            candidates[key] = caption
    seconds = time.perf_counter() - started
    scores = caption_scores(candidates, refs)
    evaluated = [r for r in records if r["image"] in refs]
    perplexity = caption_perplexity(model, processor, evaluated, images, config.data, batch_size, rejects)
    metrics = {"model": str(model_dir), "split": split, **scores, "references": sum(map(len, refs.values())),
               "perplexity": round(perplexity, 4), "rejected": rejects.count, "seconds": round(seconds, 2),
               "images_per_second": round(len(keys) / seconds, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "predictions.jsonl.tmp"
    with open(tmp, "w") as f:
        for key in keys:
            f.write(json.dumps({"image": key, "caption": candidates[key], "references": refs[key]}) + "\n")
    tmp.replace(out_dir / "predictions.jsonl")
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def main(argv=None) -> int:
    config, model_dir = parse_model_stage_args("caption-eval", __doc__, argv)
    metrics = evaluate_captions(config, model_dir)
    print(f"caption-eval {metrics['split']}: {metrics['images']} images, CIDEr-D {metrics['cider']:.3f}, "
          f"BLEU-4 {metrics['bleu_4']:.3f}, perplexity {metrics['perplexity']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
