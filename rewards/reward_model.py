"""The multimodal reward model: our VLM's backbone with a scalar head on the last non-pad token.

    RewardModel.from_sft("runs/default/sft/final")     # backbone from an SFT checkpoint, fresh head
    RewardModel.from_pretrained("runs/default/rm/final")  # a trained reward (or value) model

The backbone is the `LlavaModel` inside the stock `LlavaForConditionalGeneration`
(CLIP tower + projector + GPT-2), so the reward sees the image. TRL's PPO reads a
reward / value model as `getattr(model, model.base_model_prefix)` (the backbone) and
`model.score(hidden_states)` (per-token scalars); both are exposed here under those
names. The value model of PPO is a copy of the trained reward model.

The reward is read at the last token whose attention mask is 1: GPT-2 pads with EOS,
so looking for the pad token would find the EOS that ends the answer (right padding)
or the padding before the prompt (left padding). The mask is right under both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel


class RewardModelConfig(LlavaConfig):
    # Its own model type: the stock Llava key conversion (original-layout checkpoints) does
    # not apply, so the keys saved are the keys loaded.
    model_type = "vqa_rlhf_reward"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the unmasked tokens of each row (left padding gets position 0)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last unmasked token, for left and right padding alike."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.long().flip(1).argmax(1)


class RewardModel(LlavaPreTrainedModel):
    config_class = RewardModelConfig
    base_model_prefix = "model"  # TRL: getattr(model, model.base_model_prefix) is the backbone

    def __init__(self, config: RewardModelConfig):
        super().__init__(config)
        self.model = LlavaModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, 1)  # TRL: model.score(hidden_states)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "score", None):
            nn.init.normal_(module.weight, std=1e-3)
            nn.init.zeros_(module.bias)

    def token_values(self, input_ids, attention_mask, pixel_values=None, position_ids=None,
                     mm_encoder_outputs=None) -> torch.Tensor:
        """A scalar per token (B, T): the value model's view. The image comes as pixels or as
        projected cached features (`mm_encoder_outputs`, vlm.features.ImageInputKind.model_inputs)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            mm_encoder_outputs=mm_encoder_outputs, position_ids=position_ids, use_cache=False,
        ).last_hidden_state
        return self.score(hidden).squeeze(-1)

    def forward(self, input_ids, attention_mask, pixel_values=None, position_ids=None, mm_encoder_outputs=None,
                **kwargs) -> torch.Tensor:
        """One reward per row (B,): the head's output at the last unmasked token."""
        values = self.token_values(input_ids, attention_mask, pixel_values, position_ids, mm_encoder_outputs)
        rows = torch.arange(values.shape[0], device=values.device)
        return values[rows, last_token_index(attention_mask)]

    @classmethod
    def from_sft(cls, checkpoint: str | Path) -> "RewardModel":
        """Backbone weights of a saved VLM (stock Llava), a freshly initialised head."""
        vlm = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        config = RewardModelConfig(**{k: v for k, v in vlm.config.to_dict().items() if k != "model_type"})
        model = cls(config)
        model.model.load_state_dict(vlm.model.state_dict(), strict=True)
        del vlm
        return model


def register_auto_classes() -> None:
    """Lets AutoConfig / AutoModel open a saved reward model (with this package installed)."""
    try:
        AutoConfig.register(RewardModelConfig.model_type, RewardModelConfig)
        AutoModel.register(RewardModelConfig, RewardModel)
    except ValueError:  # already registered
        pass


register_auto_classes()
