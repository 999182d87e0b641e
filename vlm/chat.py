"""Talking to a trained model: a conversation kept as chat messages, rendered with the
processor's stock chat template (the training format), answers streamed as they are generated.

Used by `vqa-rlhf ask` (one question) and `vqa-rlhf chat` (interactive); `<image>` is
suppressed in generation (vlm/generate.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TextStreamer

from vlm.config import DecodingConfig
from vlm.data import PromptTooLong, load_rgb
from vlm.generate import generate
from vlm.model import load_for_inference, trained_in_bf16


class PrintStreamer(TextStreamer):
    """Prints text as tokens arrive (whole words: TextStreamer holds back a partial word),
    without the leading space every answer starts with."""

    def __init__(self, tokenizer, out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out or sys.stdout
        self.started = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


class ChatSession:
    """One model, one image (or none), the turns so far."""

    def __init__(self, model_dir: str | Path, decoding: DecodingConfig, device: str = "auto", command: str = "chat"):
        self.model, self.processor = load_for_inference(model_dir, device, trained_in_bf16(model_dir), command)
        self.decoding = decoding
        self.max_length = self.model.config.text_config.max_position_embeddings  # GPT-2: n_positions
        self.pixel_values: torch.Tensor | None = None
        self.messages: list[dict] = []

    def set_image(self, path: str | Path | None) -> None:
        """A new image starts a new conversation (one image per conversation, as trained)."""
        self.messages = []
        if path is None:
            self.pixel_values = None
            return
        image = load_rgb(Path(path))
        self.pixel_values = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def _user_message(self, text: str, first: bool) -> dict:
        if first and self.pixel_values is not None:
            return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        return {"role": "user", "content": [{"type": "text", "text": text}]}

    def prompt(self) -> str:
        return self.processor.apply_chat_template(self.messages, add_generation_prompt=True)

    def ask(self, question: str, stream=None) -> str:
        """The model's answer to `question` after the turns so far; streamed to `stream`
        (a file, e.g. sys.stdout) when given. Turns that no longer fit the context are
        dropped, oldest first (the image stays with the first remaining question)."""
        self.messages.append(self._user_message(question.strip(), first=not self.messages))
        while True:
            try:
                streamer = PrintStreamer(self.processor.tokenizer, stream) if stream is not None else None
                answer = generate(self.model, self.processor.tokenizer, [self.prompt()], self.pixel_values,
                                  self.decoding, self.max_length, streamer=streamer)[0]
                break
            except PromptTooLong:
                if len(self.messages) <= 1:
                    self.messages.pop()
                    raise
                # Drop the oldest question and answer; the image moves to the new first question.
                self.messages = self.messages[2:]
                text = "".join(p["text"] for p in self.messages[0]["content"] if p["type"] == "text")
                self.messages[0] = self._user_message(text, first=True)
                if stream is not None:
                    stream.write("(earliest turn dropped: the conversation no longer fits the context)\n")
        self.messages.append({"role": "assistant", "content": answer})
        return answer
