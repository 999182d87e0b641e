"""SFT step time with the CLIP feature cache vs computing the features on the fly, side by side.

    vqa-rlhf bench cache [--steps 5] [--batch-size 4] [--lora]

Same model (GPT-2 124M + CLIP ViT-B/32 sized, built from configs, vision tower frozen),
same batches (VQA-shaped: 50 image tokens + 30 text tokens), same optimizer. Images are
640x480 JPEGs on disk, the size of COCO's. A step on the fly decodes its images,
preprocesses them (CLIPImageProcessor) and runs the vision tower, exactly as SFT does
(vlm.data.ImageCache); a cached step reads the features that `vqa-rlhf prep features`
wrote (vlm.features.FeatureStore, memory-mapped) and runs only projector + language
model. Each step uses images it has not seen, so no in-memory reuse helps either side.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_images(image_dir: Path, count: int) -> list[str]:
    """COCO-sized JPEGs with some structure (JPEG decode time depends on content)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    image_dir.mkdir(parents=True)
    names = []
    for i in range(count):
        base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            draw.ellipse([x, y, x + 80, y + 80], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        name = f"images/{i:06d}.jpg"
        image.save(image_dir.parent / name, quality=90)
        names.append(name)
    return names


def setup(work: Path, image_count: int):
    """A saved model + processor, a dataset naming the images, and its feature cache."""
    from datasets import Dataset, DatasetDict
    from transformers import LlavaForConditionalGeneration

    from vlm.model import build_processor, llava_config, scratch_configs
    from data_prep.features import build_cache
    from bench.sft_throughput import MODELS

    bench = MODELS["gpt2-124m"]
    processor = build_processor(bench.model, ["a tiny corpus for a tokenizer the bench does not use"])
    vision, text = scratch_configs(bench.model, bench.vocab_size)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(
        vision, text, bench.vocab_size, image_token_id=bench.vocab_size - 1, eos_token_id=0, config=bench.model))
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data_dir = work / "data"
    names = write_images(data_dir / "images", image_count)
    records = {"id": names, "image": names, "caption": ["x"] * len(names)}
    DatasetDict({"train": Dataset.from_dict(records)}).save_to_disk(str(data_dir / "captions"))
    started = time.perf_counter()
    build_cache(str(model_dir), data_dir, work / "features", batch_size=16)
    cache_seconds = time.perf_counter() - started
    return model, processor, data_dir, names, cache_seconds, bench


def timed_steps(model, optimizer, images, names, batch_size: int, text_tokens: int, steps: int, warmup: int = 1):
    from vlm.data import VLMCollator
    cfg = model.config
    collate = VLMCollator(pad_token_id=0)
    generator = torch.Generator().manual_seed(0)
    timings = []
    for step in range(warmup + steps):
        batch_names = names[step * batch_size:(step + 1) * batch_size]
        start = time.perf_counter()
        items = []
        for name in batch_names:  # what SupervisedDataset.__getitem__ does
            text = torch.randint(1, cfg.text_config.vocab_size - 1, (text_tokens,), generator=generator).tolist()
            ids = text[:4] + [cfg.image_token_index] * cfg.image_seq_length + text[4:]
            items.append({"input_ids": ids, "labels": [-100] * (len(ids) - 3) + ids[-3:],
                          images.kind.key: images(name)})
        batch = collate(items)
        image_batch = batch.pop(images.kind.key)
        loss = model(**batch, **images.kind.model_inputs(model, image_batch)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            timings.append(time.perf_counter() - start)
    return sorted(timings)[len(timings) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (after 1 warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=30)
    parser.add_argument("--lora", action="store_true", help="LoRA on the language model (its weights frozen too)")
    args = parser.parse_args(argv)

    from vlm.config import TrainConfig
    from vlm.data import ImageCache
    from vlm.features import FeatureStore
    from vlm.train import apply_lora, set_trainable

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        per_mode = (args.steps + 1) * args.batch_size
        model, processor, data_dir, names, cache_seconds, bench = setup(work, 2 * per_mode)
        train_config = TrainConfig(freeze_vision=True)
        train_config.lora.enabled = args.lora
        set_trainable(model, train_config)
        if args.lora:
            model = apply_lora(model, train_config)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        print(f"model: {bench.name}, vision frozen{', LoRA' if args.lora else ', full fine-tuning'}; "
              f"batch {args.batch_size} x {model.config.image_seq_length + args.text_tokens} tokens; "
              f"{torch.get_num_threads()} threads")
        print(f"feature cache built for {len(names)} images in {cache_seconds:.1f} s "
              f"({len(names) / cache_seconds:.1f} images/s)")
        # Each mode gets its own images: nothing decoded by one is reused by the other.
        on_the_fly = timed_steps(model, optimizer, ImageCache(processor.image_processor, data_dir), names[:per_mode],
                                 args.batch_size, args.text_tokens, args.steps)
        cached = timed_steps(model, optimizer, FeatureStore(work / "features"), names[per_mode:],
                             args.batch_size, args.text_tokens, args.steps)
    print(f"{'mode':<34}{'s/step':>8}{'samples/s':>11}")
    print(f"{'on the fly (decode+CLIP forward)':<34}{on_the_fly:>8.3f}{args.batch_size / on_the_fly:>11.2f}")
    print(f"{'feature cache':<34}{cached:>8.3f}{args.batch_size / cached:>11.2f}")
    print(f"speed-up: {on_the_fly / cached:.2f}x (median of {args.steps} steps each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
