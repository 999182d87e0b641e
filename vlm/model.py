"""The vision-language model: a stock `LlavaForConditionalGeneration` over CLIP + GPT-2.

Three ways in (see `ModelConfig`): a checkpoint of ours, pretrained hub models,
or tiny models built from config dimensions (the CPU default and the tests).
Whatever the way in, the result saves with `save_pretrained` and loads with stock
`transformers` (LlavaForConditionalGeneration + AutoProcessor), no code of ours.

GPT-2 ties `lm_head` to `wte`; transformers' Llava ties `lm_head` to
`language_model.embed_tokens`, which GPT2Model does not have. So the model is
built untied and `wte` is copied into `lm_head` once: same start, separate weights.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vlm import projectors  # registers the non-default projector types with transformers' Auto classes
from vlm.config import ConfigError, ModelConfig
from vlm.vision import clip_image_processor

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"

# One turn is "USER: <image>\n{question}\nASSISTANT: {answer}<eos>\n"; the VQA prompt
# template in DataConfig is this template's single-turn rendering, so a stock
# `processor.apply_chat_template` reproduces the training prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}" + EOS_TOKEN + "{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> GPT2TokenizerFast:
    """Byte-level BPE (GPT-2's scheme) trained on the built-in corpus, with `<image>` added."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )
    return tokenizer


def _finish_tokenizer(tokenizer) -> GPT2TokenizerFast:
    """GPT-2 has no pad token: pad with EOS (collators keep the EOS that ends an answer)."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(config: ModelConfig, corpus: Iterable[str] | None = None) -> LlavaProcessor:
    """Tokenizer with `<image>` + CLIP image processor + chat template."""
    if config.text_model:
        tokenizer = AutoTokenizer.from_pretrained(config.text_model)
    else:
        if corpus is None:
            raise ValueError("building a tokenizer from scratch needs a text corpus")
        tokenizer = train_tokenizer(corpus, config.vocab_size)
    tokenizer = _finish_tokenizer(tokenizer)
    if config.clip_head:  # the output token CLIP-GPT's regression head reads (vlm/retrieval.py)
        from vlm.retrieval import EMBED_TOKEN

        tokenizer.add_special_tokens({"additional_special_tokens": [EMBED_TOKEN]}, replace_extra_special_tokens=False)
    if config.vision_model:
        image_processor = CLIPImageProcessor.from_pretrained(config.vision_model)
        patch_size = CLIPVisionConfig.from_pretrained(config.vision_model).patch_size
    else:
        image_processor = clip_image_processor(config.image_size)
        patch_size = config.patch_size
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",  # CLS + patches: 50 tokens for ViT-B/32 at 224 px
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def image_seq_length(vision_config: CLIPVisionConfig) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def llava_config(vision: CLIPVisionConfig, text: GPT2Config, vocab_size: int, image_token_id: int,
                 eos_token_id: int, config: ModelConfig) -> LlavaConfig:
    text.tie_word_embeddings = False
    text.vocab_size = max(vocab_size, text.vocab_size)
    text.bos_token_id = text.eos_token_id = text.pad_token_id = eos_token_id
    # model.projector "llava" gives the stock LlavaConfig; other types a VLMConfig whose
    # image_seq_length is the type's image token count (vlm/projectors.py).
    return projectors.make_config(
        config.projector, config.prefix_length, config.projector_layers, config.clip_head,
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=config.vision_feature_layer,
        image_seq_length=image_seq_length(vision),
        projector_hidden_act=config.projector_act,
        tie_word_embeddings=False,
    )


def scratch_configs(config: ModelConfig, vocab_size: int) -> tuple[CLIPVisionConfig, GPT2Config]:
    """Vision and text configs of a model built from the config's dimensions."""
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width,
        intermediate_size=4 * config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_width,
        attention_dropout=config.dropout,
    )
    text = GPT2Config(
        n_embd=config.text_width,
        n_layer=config.text_layers,
        n_head=config.text_heads,
        n_positions=config.max_positions,
        vocab_size=vocab_size,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        # GPT2Config's defaults (50256) lie outside a small vocabulary; llava_config sets the tokenizer's
        bos_token_id=None,
        eos_token_id=None,
    )
    return vision, text


def _generation_config(model: LlavaForConditionalGeneration, tokenizer) -> GenerationConfig:
    # Saved with the model, so stock generate() never emits <image> (or <clip>, model.clip_head) either.
    suppress = [model.config.image_token_index]
    if getattr(model.config, "embedding_head", False):
        from vlm.retrieval import EMBED_TOKEN

        suppress.append(tokenizer.convert_tokens_to_ids(EMBED_TOKEN))
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        suppress_tokens=suppress,
        max_new_tokens=16,
        do_sample=False,
    )


def build_model(config: ModelConfig, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """A fresh VLM: tiny from config dims, or pretrained CLIP + GPT-2 with a new projector."""
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config.text_model and not config.vision_model:
        raise ValueError("model.text_model needs model.vision_model (a pretrained CLIP) beside it")
    if config.vision_model and not config.text_model:
        # A pretrained tower (the vision stage's, or a hub CLIP) under a GPT-2 built from the dimensions.
        vision_model = CLIPVisionModel.from_pretrained(config.vision_model)
        _, text = scratch_configs(config, len(tokenizer))
        model = projectors.model_class(config.projector)(llava_config(
            vision_model.config, text, len(tokenizer), image_token_id, tokenizer.eos_token_id, config))
        model.model.vision_tower.load_state_dict(vision_model.state_dict())
        del vision_model
    elif config.text_model:
        vision_model = CLIPVisionModel.from_pretrained(config.vision_model)
        text_model = GPT2LMHeadModel.from_pretrained(config.text_model)
        model_cls = projectors.model_class(config.projector)
        model = model_cls(llava_config(
            vision_model.config, text_model.config, len(tokenizer), image_token_id, tokenizer.eos_token_id, config))
        model.model.vision_tower.load_state_dict(vision_model.state_dict())
        # New rows (for <image>) start at the mean embedding; a vocabulary padded beyond
        # the tokenizer keeps its size.
        text_model.resize_token_embeddings(max(len(tokenizer), text_model.config.vocab_size), mean_resizing=True)
        missing, unexpected = model.model.language_model.load_state_dict(
            text_model.transformer.state_dict(), strict=False)
        # Only the cross-attention layers (projector "cross-attention") are new in GPT-2.
        missing = [k for k in missing if ".crossattention." not in k and ".ln_cross_attn." not in k]
        if missing or unexpected:
            raise ValueError(f"{config.text_model}: GPT-2 weights do not fit: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        del vision_model, text_model
    else:
        vision, text = scratch_configs(config, len(tokenizer))
        model = projectors.model_class(config.projector)(llava_config(
            vision, text, len(tokenizer), image_token_id, tokenizer.eos_token_id, config))
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.language_model.wte.weight)
    projectors.finish_new_model(model)
    model.generation_config = _generation_config(model, tokenizer)
    return model


def load_model(path: str | Path, dtype: torch.dtype | None = None, **kwargs):
    """A saved VLM and its processor, through the stock classes only."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a saved model (no config.json)")
    # Stock Llava, or one of vlm/projectors.py's types (by config.json's model_type).
    model = projectors.class_for_saved(path).from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "right"
    return model, processor


DEVICES = ("auto", "cuda", "cpu")


def pick_device(choice: str = "auto") -> torch.device:
    """The one device rule of every stage and command that runs a model (config key `device`,
    the commands' --device): CUDA when there is one, else the CPU. Under torchrun each process
    takes LOCAL_RANK's GPU, so ranks never pile onto cuda:0."""
    if choice not in DEVICES:
        raise ConfigError(f"config key 'device' is {choice!r}; allowed: {list(DEVICES)}")
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise ConfigError("config key 'device' is 'cuda' but torch sees no CUDA device here "
                              "(torch.cuda.is_available() is False); use device=auto or device=cpu")
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def inference_dtype(device: torch.device, bf16: bool) -> torch.dtype:
    """bf16 where the run asks for it and the device is a GPU; fp32 on the CPU, where bf16 matmuls
    are slower than fp32 and the CPU figures were measured in fp32."""
    return torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32


def announce_device(what: str, device: torch.device, dtype: torch.dtype) -> None:
    """The first line a command that runs a model prints: where and in what precision it runs (on
    stderr, so that stdout stays the command's answers)."""
    print(f"{what}: device {device}, dtype {str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)


def trained_in_bf16(path: str | Path) -> bool:
    """Whether a saved model's run trained in bf16 (sft.bf16 of the training_config.json saved with
    it, as RunConfig.inference_bf16): the commands given a model dir and no config (ask, chat,
    caption) infer in the precision the model was trained in."""
    saved = Path(path) / "training_config.json"
    if not saved.is_file():
        return False
    return bool(json.loads(saved.read_text()).get("sft", {}).get("bf16", False))


def load_for_inference(path: str | Path, device: str = "auto", bf16: bool = False, what: str = "model"):
    """A saved VLM and its processor, in eval mode on the chosen device and dtype (pick_device,
    inference_dtype). vlm/generate.py moves every batch to the model's device and dtype."""
    chosen = pick_device(device)
    dtype = inference_dtype(chosen, bf16)
    announce_device(what, chosen, dtype)
    model, processor = load_model(path, dtype=dtype)
    model.to(chosen).eval()
    return model, processor


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
