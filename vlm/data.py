"""Examples for training: prompts, answer-only labels, images, collation.

Labels are built span by span while tokenizing: the prompt's tokens get -100 and
the answer's tokens (plus the EOS that ends it) are the targets. Nothing is found
again by re-tokenizing and searching, so the answer mask cannot drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = -100


class PromptTooLong(ValueError):
    """An example does not fit the context; answers are never silently cut."""


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def expand_image_tokens(ids: list[int], image_token_id: int, image_seq_length: int) -> list[int]:
    """One `<image>` placeholder becomes one token per CLIP patch (+ CLS), as LlavaProcessor does."""
    out: list[int] = []
    for token in ids:
        out.extend([token] * image_seq_length if token == image_token_id else [token])
    return out


def prompt_ids(tokenizer, prompt: str, image_seq_length: int) -> list[int]:
    """A prompt's token ids with its `<image>` placeholder expanded."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return expand_image_tokens(ids, tokenizer.convert_tokens_to_ids("<image>"), image_seq_length)


def encode_example(
    tokenizer, prompt: str, answer: str | None, image_seq_length: int, max_length: int
) -> EncodedExample:
    """Prompt span (masked) + answer span + EOS (supervised). `answer=None`: prompt only."""
    if answer is None:
        ids = prompt_ids(tokenizer, prompt, image_seq_length)
        if len(ids) > max_length:
            raise PromptTooLong(f"prompt is {len(ids)} tokens, longer than data.max_length={max_length}")
        return EncodedExample(ids, [IGNORE_INDEX] * len(ids))
    return encode_turns(tokenizer, [(prompt, answer)], image_seq_length, max_length)


def encode_turns(
    tokenizer, turns: list[tuple[str, str]], image_seq_length: int, max_length: int
) -> EncodedExample:
    """A conversation, span by span: each prompt masked, each answer + its EOS supervised.

    Turn k's prompt is the text between answer k-1's EOS and answer k (for k > 1 the
    chat template's "\nUSER: ...\nASSISTANT:"), so the ids equal the rendered template's."""
    input_ids: list[int] = []
    labels: list[int] = []
    for prompt, answer in turns:
        prompt_span = prompt_ids(tokenizer, prompt, image_seq_length)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(answer_ids) < 2:
            raise ValueError(f"empty answer {answer!r}: an example needs at least one supervised token")
        input_ids += prompt_span + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_span) + answer_ids
    if len(input_ids) > max_length:
        raise PromptTooLong(
            f"example is {len(input_ids)} tokens ({len(turns)} turn(s)), longer than data.max_length={max_length}"
        )
    return EncodedExample(input_ids, labels)


def load_rgb(path: Path) -> Image.Image:
    """An image as RGB, or a clear error naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image unreadable: {path}: {exc}") from None


class ImageCache:
    """Preprocessed pixel values by image path: small datasets are decoded once."""

    def __init__(self, image_processor, root: Path):
        self.image_processor = image_processor
        self.root = Path(root)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, relative_path: str) -> torch.Tensor:
        if relative_path not in self._cache:
            path = (self.root / relative_path).resolve()
            if not path.is_relative_to(self.root.resolve()):
                raise ValueError(f"image path escapes the dataset dir: {relative_path}")
            image = load_rgb(path)
            pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            self._cache[relative_path] = pixels
        return self._cache[relative_path]


class RejectLog:
    """Counted skips with reasons, written to a rejects file as they happen."""

    def __init__(self, path: Path | None, on_bad_record: str):
        self.path = path
        self.on_bad_record = on_bad_record
        self.count = 0

    def reject(self, record_id, source: str, reason: str) -> None:
        if self.on_bad_record == "error":
            raise ValueError(f"{source}: record {record_id}: {reason}")
        self.count += 1
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"id": record_id, "source_file": source, "reason": reason}) + "\n")


def check_vqa_record(record: dict) -> str | None:
    """Why a VQA record is unusable for training, or None."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return "field 'question' is empty"
    answers = record.get("answers")
    if not isinstance(answers, list) or len(answers) != 10:
        return f"field 'answers' must list 10 answers, got {len(answers) if isinstance(answers, list) else answers!r}"
    if not isinstance(record.get("multiple_choice_answer"), str) or not record["multiple_choice_answer"].strip():
        return "field 'multiple_choice_answer' is empty"
    if not isinstance(record.get("image"), str):
        return "field 'image' is missing"
    return None


class SupervisedDataset(torch.utils.data.Dataset):
    """(image, prompt, answer) triples encoded once; pixels come from the shared image cache.

    Bad records (empty question, wrong answer count, missing or corrupt image, too
    long) are skipped and counted in the reject log, or raise, as configured.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str, str, list[tuple[str, str]]]],  # (record id, source, image, turns)
        tokenizer,
        images: ImageCache,
        image_seq_length: int,
        max_length: int,
        rejects: RejectLog,
    ):
        self.examples: list[tuple[EncodedExample, str]] = []
        self.images = images
        for record_id, source, image, turns in items:
            try:
                encoded = encode_turns(tokenizer, turns, image_seq_length, max_length)
                images(image)  # decode now: a bad image is found before training starts
            except (ValueError, FileNotFoundError) as exc:
                rejects.reject(record_id, source, str(exc))
                continue
            self.examples.append((encoded, image))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        encoded, image = self.examples[index]
        return {
            "input_ids": encoded.input_ids,
            "labels": encoded.labels,
            "pixel_values": self.images(image),
        }


@dataclass
class VLMCollator:
    """Right-pads to the longest example. GPT-2 pads with EOS, so padding is masked by
    position (attention_mask), never by token id: the EOS that ends an answer stays a label."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        }


def vqa_prompt(template: str, question: str) -> str:
    return template.format(question=question.strip())


def vqa_items(records, data, source: str, rejects: RejectLog):
    """Training conversations from VQA records; the target is `multiple_choice_answer`.

    `data.questions_per_example` questions about one image share one example, as
    LLaVA-1.5 packs VQA v2: the image is encoded once for several supervised answers."""
    by_image: dict[str, list[dict]] = {}
    for record in records:
        problem = check_vqa_record(record)
        if problem:
            rejects.reject(record.get("id"), source, problem)
            continue
        by_image.setdefault(record["image"], []).append(record)
    per_example = max(1, data.questions_per_example)
    for image, image_records in by_image.items():
        for start in range(0, len(image_records), per_example):
            group = image_records[start:start + per_example]
            turns = [
                (
                    vqa_prompt(data.prompt_template if i == 0 else data.followup_template, r["question"]),
                    data.answer_template.format(answer=r["multiple_choice_answer"].strip()),
                )
                for i, r in enumerate(group)
            ]
            yield "+".join(r["id"] for r in group), source, image, turns


def caption_items(records, data, source: str):
    for record in records:
        turns = [(vqa_prompt(data.prompt_template, data.caption_prompt),
                  data.answer_template.format(answer=record["caption"].strip()))]
        yield record["id"], source, record["image"], turns


def load_split(dataset_dir: Path, kind: str, split: str):
    """One split of a dataset in the project's schema (data_prep/README.md)."""
    from datasets import load_from_disk

    path = Path(dataset_dir) / kind
    if not path.exists():
        raise FileNotFoundError(f"{path}: no '{kind}' dataset here; run the prep stage first")
    dataset = load_from_disk(str(path))
    if split not in dataset:
        raise KeyError(f"{path}: no split '{split}' (has {list(dataset)})")
    return dataset[split]
