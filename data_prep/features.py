"""Build the CLIP feature cache of a dataset: the frozen vision tower runs once per image.

    vqa-rlhf prep features --model openai/clip-vit-base-patch32 --data data/vqav2 --out data/vqav2/features/clip-b32
    vqa-rlhf prep features --model runs/default/sft/final --data runs/default/data --out /tmp/feats

--model is a CLIP vision model (hub name or dir; --feature-layer picks the hidden state,
as the Llava model's `vision_feature_layer` will) or a saved VLM of ours (its layer is used).
Every image that any record of the dataset (vqa/, captions/, conversations/, all splits)
names is encoded once. Output in --out:

    features.npy    [images, 1 + patches, width], memory-mapped by the readers
    meta.json       format, the images in row order, and the signature (vision config,
                    image-processor settings, feature layer, hash of the tower's weights)
    progress.json   rows finished + images that could not be read (with the reason)

A killed run resumes where it stopped when the same command is run again. Training uses
the cache with `data.feature_cache=DIR` when the vision tower is frozen; a cache made by
another tower, processor or layer is an error (vlm/features.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModel

from vlm.data import check_image_path, load_rgb
from vlm.features import FORMAT_VERSION, signature
from vlm.files import write_json
from vlm.image_input import vision_features

DATASET_KINDS = ("vqa", "captions", "conversations")


def dataset_images(data_dir: Path) -> list[str]:
    """Every image path named by the dataset's records, sorted, each once."""
    from datasets import load_from_disk

    images: set[str] = set()
    found = False
    for kind in DATASET_KINDS:
        if not (data_dir / kind).exists():
            continue
        found = True
        for split in load_from_disk(str(data_dir / kind)).values():
            if "image" in split.column_names:
                images.update(image for image in split["image"] if image)  # text-only records have None
    if not found:
        raise FileNotFoundError(f"{data_dir}: no dataset here (none of {', '.join(DATASET_KINDS)}/)")
    return sorted(images)


def load_vision(model_name: str, feature_layer: int | None):
    """(vision tower, image processor, feature layer) from a VLM of ours or a CLIP model."""
    path = Path(model_name)
    # "vlm_llava": the non-default projector types (vlm/projectors.py); read as a bare CLIP
    # model, their tower's weights were not found and the cache was made by a random tower.
    if (path / "config.json").is_file() and \
            json.loads((path / "config.json").read_text()).get("model_type") in ("llava", "vlm_llava"):
        from vlm.model import load_model

        model, processor = load_model(path)
        layer = model.config.vision_feature_layer
        if feature_layer is not None and feature_layer != layer:
            raise SystemExit(f"error: {path} uses vision_feature_layer={layer}; --feature-layer {feature_layer} "
                             f"would make a cache it cannot use")
        return model.model.vision_tower, processor.image_processor, layer

    return (CLIPVisionModel.from_pretrained(model_name), CLIPImageProcessor.from_pretrained(model_name),
            -1 if feature_layer is None else feature_layer)


def _start_or_resume(out: Path, meta: dict, shape: tuple, dtype: str):
    """The memory map and progress of a new cache, or of the unfinished one in `out`."""
    meta_path = out / "meta.json"
    if meta_path.is_file():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            which = [k for k in meta if existing.get(k) != meta[k]]
            raise SystemExit(f"error: {out} holds a feature cache of another model or dataset "
                             f"(differs in {', '.join(which)}); remove it or choose another --out")
        progress = json.loads((out / "progress.json").read_text())
        return np.load(out / "features.npy", mmap_mode="r+"), progress
    out.mkdir(parents=True, exist_ok=True)
    features = np.lib.format.open_memmap(out / "features.npy", mode="w+", dtype=dtype, shape=shape)
    progress = {"done": 0, "failed": {}}
    write_json(out / "progress.json", progress)
    write_json(meta_path, meta)  # last: a cache without meta.json is simply started again
    return features, progress


@torch.no_grad()
def build_cache(model_name: str, data_dir: str | Path, out: str | Path, feature_layer: int | None = None,
                batch_size: int = 64, dtype: str = "float32", max_batches: int | None = None,
                device: str = "auto") -> dict:
    """Encodes the images not yet in the cache; returns counts. `max_batches` stops early (tests).
    The tower runs on `device` (vlm.model.pick_device) in fp32 whatever the device: the cache is
    read by runs in either precision and its signature is of the fp32 weights."""
    from vlm.model import announce_device, pick_device

    data_dir, out = Path(data_dir), Path(out)
    images = dataset_images(data_dir)
    if not images:
        raise SystemExit(f"error: {data_dir}: the records name no images")
    chosen = pick_device(device)
    announce_device("prep features", chosen, torch.float32)
    tower, image_processor, layer = load_vision(model_name, feature_layer)
    tower.to(chosen).eval()
    probe = image_processor(images=[blank_image(image_processor)], return_tensors="pt")["pixel_values"]
    shape = (len(images),) + tuple(vision_features(tower, probe.to(chosen), layer).shape[1:])
    meta = {"format": FORMAT_VERSION, "model": str(model_name), "data": str(data_dir.resolve()), "dtype": dtype,
            "shape": list(shape), "signature": signature(tower, image_processor, layer), "images": images}
    features, progress = _start_or_resume(out, meta, shape, dtype)
    started, encoded = time.perf_counter(), 0
    bar = tqdm(total=len(images), initial=progress["done"], desc="caching features", unit="img")
    for batch_index, start in enumerate(range(progress["done"], len(images), batch_size)):
        if max_batches is not None and batch_index >= max_batches:
            break
        names = images[start:start + batch_size]
        pixels, rows = [], []
        for offset, name in enumerate(names):
            try:
                pixels.append(load_rgb(data_dir / check_image_path(name)))
                rows.append(start + offset)
            except (ValueError, FileNotFoundError) as exc:
                progress["failed"][name] = str(exc)
        if pixels:
            batch = image_processor(images=pixels, return_tensors="pt")["pixel_values"]
            features[rows] = vision_features(tower, batch.to(chosen), layer).float().cpu().numpy().astype(dtype)
            features.flush()  # rows on disk before progress says they are
        progress["done"] = start + len(names)
        write_json(out / "progress.json", progress)
        encoded += len(names)
        bar.update(len(names))
    bar.close()
    seconds = time.perf_counter() - started
    return {"images": len(images), "done": progress["done"], "encoded_now": encoded,
            "failed": len(progress["failed"]), "seconds": round(seconds, 2),
            "images_per_second": round(encoded / seconds, 1) if seconds else None}


def blank_image(image_processor):
    """A blank image at the processor's crop size: one forward tells the feature shape."""
    crop = image_processor.crop_size or {"height": 224, "width": 224}
    return Image.new("RGB", (crop["width"], crop["height"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf prep features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="CLIP vision model (hub name or dir) or a saved VLM dir")
    parser.add_argument("--data", required=True, help="dataset dir in the project's schema (data_prep/README.md)")
    parser.add_argument("--out", required=True, help="cache dir (created; an unfinished one is resumed)")
    parser.add_argument("--feature-layer", type=int, default=None,
                        help="hidden state fed to the projector, as model.vision_feature_layer (default -1; "
                             "taken from the model when --model is a saved VLM)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="storage type; float16 halves the size (ViT-B/32: 77 KB per image)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where the tower runs (default auto: CUDA when there is one, else the CPU)")
    args = parser.parse_args(argv)
    counts = build_cache(args.model, args.data, args.out, args.feature_layer, args.batch_size, args.dtype,
                         device=args.device)
    print(f"prep features: {counts['done']} of {counts['images']} images in {args.out} "
          f"({counts['encoded_now']} encoded now, {counts['images_per_second']} img/s; "
          f"{counts['failed']} unreadable, listed in {Path(args.out) / 'progress.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
