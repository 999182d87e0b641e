"""Region targets of a dataset's captions, and the per-cell probe of a vision tower on them.

The built-in captions name what is in each cell ("at the top left a red circle, ...");
`vlm.scene.caption_regions` reads them back. Each named region gets three targets: its
colour, its shape and its place (the phrase's location words, "top left"). The place keeps
the tower's patch tokens saying where they are, as a real CLIP's do: trained on colour and
shape alone, position explained 0.05% of their variance and a linear probe read a patch's
column at 66% (chance 33), so the language model had no column to read for "Which side is
the red circle on?" (README, "Vision"). The vision stage trains on these targets and every
stage that has a model reports the probe (vlm/vision.py `cell_probe`)."""
from __future__ import annotations

import torch

from vlm.config import RunConfig
from vlm.data import check_image_path, load_rgb, load_split
from vlm.scene import COLOURS, SHAPES, caption_regions, cell_name
from vlm.vision import RegionTargets, cell_probe, clip_image_processor, encode_patches, region_targets


def region_classes(grid: int) -> dict[str, list[str]]:
    places = [cell_name(row, col, grid) for row in range(grid) for col in range(grid)]
    return {"colour": list(COLOURS), "shape": list(SHAPES), "place": places}


def load_regions(config: RunConfig, split: str, limit: int | None = None) -> tuple[torch.Tensor, RegionTargets]:
    """Pixels [images, 3, size, size] and region targets of a split's captioned images.

    A caption outside the region grammar is a ValueError naming the file, record and field."""
    model = config.model
    grid = model.image_size // model.patch_size
    captions = load_split(config.data_dir, "captions", split)
    if limit is not None:
        captions = captions.select(range(min(limit, len(captions))))
    processor = clip_image_processor(model.image_size)
    images, regions = [], []
    source = config.data_dir / "captions" / split
    for number, record in enumerate(captions):
        try:
            named = caption_regions(record["caption"], grid)
        except ValueError as exc:
            raise ValueError(f"{source}: record {number} (id {record['id']}), field 'caption': {exc}") from None
        regions.append({cell: {**attributes, "place": cell_name(cell // grid, cell % grid, grid)}
                        for cell, attributes in named.items()})
        images.append(load_rgb(config.data_dir / check_image_path(record["image"])))
    pixels = torch.cat([processor(images=images[i:i + 512], return_tensors="pt")["pixel_values"]
                        for i in range(0, len(images), 512)])
    if pixels.shape[-1] != model.image_size:
        raise ValueError(f"{source}: images are {pixels.shape[-1]} px, model.image_size is {model.image_size}")
    return pixels, region_targets(regions, grid * grid, region_classes(grid))


def probe_towers(config: RunConfig, towers: dict) -> dict[str, dict[str, float]]:
    """Per-cell linear probe accuracy (%) of each tower: fitted on vision.probe_images train
    images, scored on the test split's images, over cells that hold an object."""
    train_pixels, train_targets = load_regions(config, config.data.train_split, config.vision.probe_images)
    test_pixels, test_targets = load_regions(config, config.data.test_split)
    layer = config.model.vision_feature_layer
    return {name: cell_probe(encode_patches(tower, train_pixels, layer), train_targets,
                             encode_patches(tower, test_pixels, layer), test_targets, seed=config.seed)
            for name, tower in towers.items()}
