"""What a model reads an image as: pixels, or CLIP features a frozen tower already computed.

The one place the two kinds differ (how a batch carries them, how a model takes them, how
the pooled CLS embedding is read); the sources that produce them are vlm.data.ImageCache
(pixels) and vlm.features.FeatureStore (the feature cache, checked against the model's tower),
and vlm.features.image_source picks one for a stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


def llava_of(model):
    """The LlavaForConditionalGeneration inside DeepSpeed / PEFT wrappers."""
    model = getattr(model, "module", model)  # DeepSpeed engine, DDP
    if hasattr(model, "get_base_model"):  # PEFT: its wrapped modules stay in the base model's tree
        model = model.get_base_model()
    return model


def vision_features(vision_tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """[batch, 1 + patches, width]: what Llava's projector consumes (strategy "full")."""
    outputs = vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    return outputs.hidden_states[feature_layer]


@dataclass(frozen=True)
class ImageInputKind:
    """What a model reads an image as: pixels through its vision tower, or CLIP features a
    frozen tower already computed (the feature cache). Every difference between the two is
    here; batches carry the image tensor under `key`, and code asks the kind, not the key.

    Image sources (vlm.data.ImageCache: pixels; FeatureStore: cached features) name their kind."""
    key: str  # the batch key the image tensor travels under (the stock forward's name for pixels)
    cached: bool

    def model_inputs(self, model, images: torch.Tensor) -> dict:
        """Forward / generate keyword arguments for a batch of this kind.

        Cached features go through the (trainable) projector here and enter the stock model
        as pre-encoded image outputs, which Llava merges at the `<image>` positions exactly
        as it merges its own."""
        if not self.cached:
            return {"pixel_values": images}
        projected = llava_of(model).model.multi_modal_projector(images)
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}}

    def pooled(self, model, images: torch.Tensor) -> torch.Tensor:
        """[batch, vision width]: the CLS row at `vision_feature_layer` (row 0 of what the cache
        stores), from cached features or from pixels through the vision tower (no gradient: a target)."""
        if self.cached:
            return images[:, 0]
        llava = llava_of(model)
        with torch.no_grad():
            return vision_features(llava.model.vision_tower, images, llava.config.vision_feature_layer)[:, 0]


PIXELS = ImageInputKind("pixel_values", cached=False)
FEATURES = ImageInputKind("image_features", cached=True)


def input_kind_of(batch: dict) -> ImageInputKind:
    """The kind of image a batch (or one item of it) carries; pixels when it carries none."""
    return FEATURES if FEATURES.key in batch else PIXELS
