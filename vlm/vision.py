"""A vision tower that sees shape: region-text pretraining of a CLIP tower, and the probe that checks it.

LLaVA's recipe starts from a pretrained CLIP tower and keeps it frozen (or trains it gently)
while the projector and the language model learn. A tower trained from scratch only through
the language model's loss never learns shape on the built-in data, and SFT at the LM's
learning rate wears a pretrained one down (README, "Vision"). The built-in run cannot download
CLIP, so `stages/vision.py` makes its own tower first, with this module.

Objective ("region_text", dense region-text alignment): a caption names what is in each
region ("at the top left a red circle, ..."). Each region's phrase becomes one target per
attribute (colour, shape and place, vlm/regions.py; "nothing" for an empty region) for the patch token that covers the
region, and linear heads on the tower's patch tokens learn them with cross-entropy. The heads
are thrown away; the tower is saved as a stock `CLIPVisionModel`.

The probe (`cell_probe`) is how every tower is judged: a linear classifier per attribute,
fitted on the patch tokens of training images and scored on held-out images, over the
regions that hold an object. It reads the hidden state the projector reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel

NOTHING = "nothing"  # the class of an empty region


def clip_image_processor(size: int) -> CLIPImageProcessor:
    """CLIP's preprocessing for a tower of `size` px: shortest edge to `size`, centre crop, normalise.

    At `size` itself the resize and the crop change nothing, so one image pixel stays one input
    pixel (the built-in images are made at the model's size; tested with each installed
    backend), while images of other sizes (a converted dataset) are still brought to it."""
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@dataclass
class RegionTargets:
    """Per image and region, the class index of each attribute; `classes[attr][0]` is NOTHING."""

    classes: dict[str, list[str]]
    labels: dict[str, torch.Tensor]  # attr -> [images, regions] long

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {attr: labels[index] for attr, labels in self.labels.items()}


def region_targets(regions: list[dict[int, dict[str, str]]], region_count: int,
                   classes: dict[str, list[str]]) -> RegionTargets:
    """`regions[i]` maps a region index (row-major) to its attributes, e.g. {4: {"colour": "red",
    "shape": "circle"}}; regions not named hold nothing."""
    classes = {attr: [NOTHING, *sorted(set(values) - {NOTHING})] for attr, values in classes.items()}
    index = {attr: {name: i for i, name in enumerate(names)} for attr, names in classes.items()}
    labels = {attr: torch.zeros(len(regions), region_count, dtype=torch.long) for attr in classes}
    for image, named in enumerate(regions):
        for region, attributes in named.items():
            if not 0 <= region < region_count:
                raise ValueError(f"image {image}: region {region} outside the tower's {region_count} patches")
            for attr, value in attributes.items():
                labels[attr][image, region] = index[attr][value]
    return RegionTargets(classes, labels)


class RegionHeads(nn.Module):
    """One linear classifier per attribute on each patch token."""

    def __init__(self, width: int, classes: dict[str, list[str]]):
        super().__init__()
        self.heads = nn.ModuleDict({attr: nn.Linear(width, len(names)) for attr, names in classes.items()})

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        return {attr: head(patches) for attr, head in self.heads.items()}


def patch_tokens(tower: CLIPVisionModel, pixels: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
    """[batch, patches, width]: the hidden state the projector reads, without the CLS token."""
    hidden = tower(pixels, output_hidden_states=True, return_dict=True).hidden_states[feature_layer]
    return hidden[:, 1:]


def region_loss(heads: RegionHeads, patches: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = heads(patches)
    return sum(F.cross_entropy(logits[attr].flatten(0, 1), labels[attr].flatten()) for attr in logits)


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate: linear warm-up, then cosine to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(count: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The images of one step, a function of (seed, step) only: a resumed run draws the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(count, (batch_size,), generator=generator)


@torch.no_grad()
def encode_patches(tower: CLIPVisionModel, pixels: torch.Tensor, feature_layer: int = -1,
                   batch_size: int = 256) -> torch.Tensor:
    """Patch tokens of `pixels` (on the CPU, fp32) by a tower on any device and dtype: the probes
    that read them fit in fp32 on the CPU whatever the model was evaluated in."""
    was_training = tower.training
    tower.eval()
    weight = next(tower.parameters())
    out = torch.cat([patch_tokens(tower, pixels[i:i + batch_size].to(weight.device, weight.dtype),
                                  feature_layer).float().cpu()
                     for i in range(0, len(pixels), batch_size)])
    tower.train(was_training)
    return out


def cell_probe(train_features: torch.Tensor, train: RegionTargets, test_features: torch.Tensor,
               test: RegionTargets, steps: int = 300, lr: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy (%) of a linear probe per attribute, over regions holding an object.

    Fitted full-batch on the occupied regions of the training images (features standardised
    with the training statistics), so the figure says what a linear read-out of one patch
    token can know, not what a deeper head could learn."""
    torch.manual_seed(seed)
    results = {}
    mean = train_features.flatten(0, 1).mean(0)
    std = train_features.flatten(0, 1).std(0) + 1e-6
    for attr, classes in train.classes.items():
        occupied = train.labels[attr] != 0
        x = ((train_features - mean) / std)[occupied]
        y = train.labels[attr][occupied]
        probe = nn.Linear(x.shape[1], len(classes))
        optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(probe(x), y).backward()
                optimizer.step()
        test_occupied = test.labels[attr] != 0
        with torch.no_grad():
            predicted = probe(((test_features - mean) / std)[test_occupied]).argmax(-1)
        results[attr] = round(100.0 * (predicted == test.labels[attr][test_occupied]).float().mean().item(), 2)
    return results
