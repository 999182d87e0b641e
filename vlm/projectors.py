"""The projector / connector registry: how CLIP features reach GPT-2.

`model.projector` picks one type. Every type is one `nn.Module` class registered
here with `@register(name)`; it maps the vision tower's features at
`vision_feature_layer` ([batch, 1 + patches, vision width], CLS first: the same
tensor the feature cache stores) to [batch, image_tokens, text width]. What the
model does with that output is one of two mechanisms:

- **tokens** (`llava`, `mlp`, `linear-ln-transformer`, `prefix`): the prompt's
  `<image>` placeholder is expanded to `image_tokens` copies (vlm/data.py
  `expand_image_tokens`, driven by `model.config.image_seq_length`, the one source
  of truth) and Llava's own merge *replaces* their embeddings with the projector's
  output. GPT2MultiModal's "add the image features to the `<image>` embeddings"
  is the same thing with a bias: `linear-ln-transformer` ends with a learned vector
  that starts as the `<image>` token's embedding.
- **cross-attention** (`cross-attention`, VisionGPT-2): GPT-2 is built with
  `add_cross_attention=True` and the projected features are its
  `encoder_hidden_states`. The prompt keeps one `<image>` token as a marker (its
  own learned embedding, never replaced): it tells rows with an image from
  text-only rows and keeps every prompt format unchanged.

`llava` is the stock `LlavaForConditionalGeneration` (Linear-GELU-Linear), which
loads with plain `transformers`. The other types are `VLMForConditionalGeneration`
(a Llava subclass with `VLMConfig`, model_type `vlm_llava`), registered with
transformers' Auto classes on import of this module (vlm/model.py imports it), saved
with `save_pretrained` (safetensors) and loaded by `vlm.model.load_model`.

Parameter names: every projector lives under `model.multi_modal_projector.` (the
"projector" part of vlm/train.py's `model_part`); the cross-attention layers inside
GPT-2 blocks (`crossattention`, `ln_cross_attn`) are new modules too and count as
"projector" there, so "train the connector first" schedules train them.

To add a type: a module class with `image_tokens(config)` and `forward(features)`,
decorated with `@register("name")`; nothing else changes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llava.modeling_llava import LlavaModel, LlavaModelOutputWithPast

STOCK = "llava"  # the default: stock Llava's Linear-GELU-Linear, stock-loadable
CROSS_ATTENTION = "cross-attention"
PROJECTORS: dict[str, type[nn.Module]] = {}


def register(name: str):
    def add(cls):
        PROJECTORS[name] = cls
        return cls
    return add


def projector_types() -> list[str]:
    return [STOCK, *PROJECTORS]


def check_projector_type(name: str) -> None:
    if name != STOCK and name not in PROJECTORS:
        raise ValueError(f"unknown model.projector {name!r}; types: {', '.join(projector_types())}")


def _all_vision_tokens(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1  # patches + CLS ("full" strategy)


def _encoder_layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                      batch_first=True, norm_first=True)


@register("mlp")
class ResidualMLPProjector(nn.Module):
    """GPT-2 Vision: every CLIP token (CLS + patches) through Linear then a residual MLP."""

    @staticmethod
    def image_tokens(config) -> int:
        return _all_vision_tokens(config)

    def __init__(self, config):
        super().__init__()
        width = config.text_config.hidden_size
        self.linear_in = nn.Linear(config.vision_config.hidden_size, width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_in(features)
        return hidden + self.mlp(hidden)


@register("linear-ln-transformer")
class LinearLNTransformerProjector(nn.Module):
    """GPT2MultiModal: Linear -> LayerNorm -> transformer encoder layer(s) over the image tokens,
    added to the `<image>` embeddings (`image_token_embedding` starts as that embedding,
    vlm/model.py build_model)."""

    @staticmethod
    def image_tokens(config) -> int:
        return _all_vision_tokens(config)

    def __init__(self, config):
        super().__init__()
        width = config.text_config.hidden_size
        self.linear = nn.Linear(config.vision_config.hidden_size, width)
        self.norm = nn.LayerNorm(width)
        self.encoder = nn.ModuleList(_encoder_layer(width, config.text_config.num_attention_heads)
                                     for _ in range(config.projector_layers))
        self.image_token_embedding = nn.Parameter(torch.zeros(width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.linear(features))
        for layer in self.encoder:
            hidden = layer(hidden)
        return hidden + self.image_token_embedding


@register("prefix")
class PrefixProjector(nn.Module):
    """ClipCap / CLIPxGPT: the pooled CLIP embedding (the CLS token's hidden state, layer-normed)
    mapped to K = `prefix_length` tokens by a transformer over [mapped; learned constants],
    ClipCap's "transformer mapper"; the outputs at the constants' positions are the prefix."""

    @staticmethod
    def image_tokens(config) -> int:
        return config.prefix_length

    def __init__(self, config):
        super().__init__()
        width, k = config.text_config.hidden_size, config.prefix_length
        self.prefix_length = k
        self.norm = nn.LayerNorm(config.vision_config.hidden_size)
        self.linear = nn.Linear(config.vision_config.hidden_size, k * width)
        self.prefix_const = nn.Parameter(torch.randn(k, width) * 0.02)
        self.encoder = nn.ModuleList(_encoder_layer(width, config.text_config.num_attention_heads)
                                     for _ in range(config.projector_layers))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(features[:, 0])  # CLS
        mapped = self.linear(pooled).view(features.shape[0], self.prefix_length, -1)
        hidden = torch.cat([mapped, self.prefix_const.expand(features.shape[0], -1, -1)], dim=1)
        for layer in self.encoder:
            hidden = layer(hidden)
        return hidden[:, self.prefix_length:]


@register(CROSS_ATTENTION)
class CrossAttentionProjector(nn.Module):
    """VisionGPT-2: CLIP tokens projected to GPT-2's width, attended to by cross-attention
    layers in every GPT-2 block. One `<image>` marker token stays in the prompt."""

    @staticmethod
    def image_tokens(config) -> int:
        return 1

    def __init__(self, config):
        super().__init__()
        self.linear = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.norm = nn.LayerNorm(config.text_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(features))


@strict
class VLMConfig(LlavaConfig):
    """LlavaConfig plus the projector type and its settings."""

    model_type = "vlm_llava"
    projector_type: str = "mlp"
    prefix_length: int = 4  # `prefix`: image tokens (K)
    projector_layers: int = 1  # `prefix`, `linear-ln-transformer`: transformer encoder layers
    # CLIP-GPT's caption -> CLIP embedding head at the `<clip>` token (vlm/retrieval.py)
    embedding_head: bool = False


class VLMModel(LlavaModel):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        check_projector_type(config.projector_type)
        self.multi_modal_projector = PROJECTORS[config.projector_type](config)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                image_sizes=None, mm_encoder_outputs=None, **kwargs):
        if self.config.projector_type != CROSS_ATTENTION:
            return super().forward(
                input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
                mm_encoder_outputs=mm_encoder_outputs, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image = (mm_encoder_outputs or {}).get("image")
        if image is None and pixel_values is not None:
            image = self.get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                            return_dict=True)
        encoder_hidden_states = None
        if image is not None:
            features = torch.stack(list(image.pooler_output)).to(inputs_embeds.dtype)
            batch = inputs_embeds.shape[0]
            if features.shape[0] == batch:
                encoder_hidden_states = features
            elif input_ids is not None:
                # Text-only rows mixed in (VLMCollator stacks images of the rows that have
                # one): those rows attend to zeros, i.e. only the cross-attention biases.
                has_image = (input_ids == self.config.image_token_id).any(-1)
                if int(has_image.sum()) != features.shape[0]:
                    raise ValueError(f"{features.shape[0]} images for {int(has_image.sum())} rows with <image>")
                encoder_hidden_states = features.new_zeros(batch, *features.shape[1:])
                encoder_hidden_states[has_image] = features
            else:
                raise ValueError(f"{features.shape[0]} images for a batch of {batch} rows")
        outputs = self.language_model(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                      inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
                                      **kwargs)
        return LlavaModelOutputWithPast(**outputs, image_outputs=image)


class VLMForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig):
        super().__init__(config)
        self.model = VLMModel(config)
        if config.embedding_head:  # saved and loaded with the model's other weights
            from vlm.retrieval import EmbeddingHead

            self.embedding_head = EmbeddingHead(config.text_config.hidden_size, config.vision_config.hidden_size)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # generate() hands image inputs to the prefill step only (they became token embeddings
        # there); cross-attention needs them at every step (GPT-2 reuses cached cross K/V).
        if self.config.projector_type == CROSS_ATTENTION and kwargs.get("mm_encoder_outputs") is not None:
            inputs["mm_encoder_outputs"] = kwargs["mm_encoder_outputs"]
        return inputs

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        # Beam search / several return sequences: the stock helper pairs image features with
        # rows by counting `<image>` tokens, which cross-attention's single marker does not
        # match. Here every row has one image: repeat each image for its row's copies.
        if self.config.projector_type != CROSS_ATTENTION:
            return super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, inputs_embeds)
        image = mm_encoder_output.get("image")
        if image is not None and image.pooler_output is not None:
            image.pooler_output = [out for out in image.pooler_output for _ in range(expand_size)]
        return mm_encoder_output


AutoConfig.register(VLMConfig.model_type, VLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(VLMConfig, VLMForConditionalGeneration, exist_ok=True)


def model_class(projector_type: str):
    check_projector_type(projector_type)
    return LlavaForConditionalGeneration if projector_type == STOCK else VLMForConditionalGeneration


def make_config(projector_type: str, prefix_length: int, projector_layers: int, embedding_head: bool = False,
                **llava_kwargs) -> LlavaConfig:
    """The model config of a projector type: stock LlavaConfig for `llava`, VLMConfig otherwise.
    `image_seq_length` (how many tokens `<image>` expands to) is set from the type here."""
    check_projector_type(projector_type)
    if projector_type == STOCK:
        if embedding_head:
            raise ValueError("model.clip_head needs a model.projector other than llava: stock Llava "
                             f"has no place for the head (types: {', '.join(PROJECTORS)})")
        return LlavaConfig(**llava_kwargs)
    if projector_type == CROSS_ATTENTION:
        llava_kwargs["text_config"].add_cross_attention = True
    config = VLMConfig(projector_type=projector_type, prefix_length=prefix_length,
                       projector_layers=projector_layers, embedding_head=embedding_head, **llava_kwargs)
    config.image_seq_length = PROJECTORS[projector_type].image_tokens(config)
    return config


def finish_new_model(model) -> None:
    """Initialisation that needs the built model: the added `<image>` embedding starts as
    the token's own embedding (so "add to <image>" starts exactly as GPT2MultiModal)."""
    projector = model.model.multi_modal_projector
    if isinstance(projector, LinearLNTransformerProjector):
        with torch.no_grad():
            projector.image_token_embedding.copy_(
                model.model.language_model.wte.weight[model.config.image_token_index])


def class_for_saved(path) -> type:
    """The model class of a saved model dir, by its config.json's model_type."""
    model_type = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    return VLMForConditionalGeneration if model_type == VLMConfig.model_type else LlavaForConditionalGeneration
