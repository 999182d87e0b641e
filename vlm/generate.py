"""Answer generation: greedy, sampling (temperature / top-p) or beam search.

Prompts are left-padded so every row's answer starts at the same position; the
`<image>` token is always suppressed (it is also in the saved generation config).
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from vlm.config import DecodingConfig
from vlm.data import encode_example, pad, vqa_prompt
from vlm.image_input import PIXELS, ImageInputKind


def decoding_kwargs(decoding: DecodingConfig) -> dict:
    if decoding.strategy == "greedy":
        return {"do_sample": False, "num_beams": 1}
    if decoding.strategy == "sample":
        return {"do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p, "num_beams": 1}
    if decoding.strategy == "beam":
        return {"do_sample": False, "num_beams": decoding.num_beams}
    raise ValueError(f"unknown decoding strategy {decoding.strategy!r} (greedy | sample | beam)")


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    pixel_values: torch.Tensor | None,
    decoding: DecodingConfig,
    max_length: int,
    num_return_sequences: int = 1,
    image_kind: ImageInputKind = PIXELS,
    streamer=None,
) -> list[str]:
    """Answers for a batch of prompts (one image each); `num_return_sequences` per prompt.

    `pixel_values` holds cached vision features instead of pixels when `image_kind` is
    vlm.features.FEATURES. `pixel_values` None: text-only prompts (no `<image>`).
    `streamer` (transformers TextStreamer, one prompt) gets the tokens as they are generated."""
    image_seq_length = model.config.image_seq_length
    rows = [encode_example(tokenizer, p, None, image_seq_length, max_length).input_ids for p in prompts]
    input_ids, attention_mask = pad(rows, tokenizer.pad_token_id, side="left")
    width = input_ids.shape[1]
    device = next(model.parameters()).device
    image_token_id = model.config.image_token_index
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        **({} if pixel_values is None else
           image_kind.model_inputs(model, pixel_values.to(device, dtype=next(model.parameters()).dtype))),
        max_new_tokens=min(decoding.max_new_tokens, max_length - width),
        num_return_sequences=num_return_sequences,
        suppress_tokens=[image_token_id],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        streamer=streamer,
        **decoding_kwargs(decoding),
    )
    new_tokens = output[:, width:]
    if (new_tokens == image_token_id).any():  # suppression is a contract: fail loudly if broken
        raise RuntimeError("generation emitted <image>")
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def answer_questions(model, processor, records, images, prompt_template: str, decoding: DecodingConfig,
                     batch_size: int, max_length: int, progress: bool = False) -> list[str]:
    """Greedy (or configured) answers for VQA records, in record order."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="answering", unit="batch", disable=not progress):
        batch = records[start:start + batch_size]
        pixel_values = torch.stack([images(r["image"]) for r in batch])
        prompts = [vqa_prompt(prompt_template, r["question"]) for r in batch]
        answers.extend(generate(model, processor.tokenizer, prompts, pixel_values, decoding, max_length,
                                image_kind=images.kind))
    model.train(was_training)
    return answers
