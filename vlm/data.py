"""Examples for training: prompts, answer-only labels, images, collation.

Labels are built span by span while tokenizing: the prompt's tokens get -100 and
the answer's tokens (plus the EOS that ends it) are the targets. Nothing is found
again by re-tokenizing and searching, so the answer mask cannot drift.
"""
from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import unquote

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm.image_input import PIXELS, input_kind_of

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


# PIL's own decompression-bomb limit (it warns above it and refuses twice as many pixels).
MAX_IMAGE_PIXELS = 89_478_485


def check_image_path(relative_path: str) -> str:
    """A record's image path, checked lexically: it must stay under the root it is relative to.

    No absolute paths, no '..' components (also when percent-encoded, '%2e%2e'). Lexical on
    purpose: a dataset's images/<name> may be a symlink to the real image folder, which
    resolve() would take for an escape. Converters also resolve() against the image root."""
    if not isinstance(relative_path, str) or not relative_path.strip() or "\0" in relative_path:
        raise ValueError(f"image path escapes the image root: {relative_path!r} is not a file path")
    for form in {relative_path, unquote(relative_path) if "%" in relative_path else relative_path}:
        parts = form.replace("\\", "/").split("/")
        if form.startswith(("/", "\\")) or (len(form) > 1 and form[1] == ":") or ".." in parts:
            raise ValueError(f"image path escapes the image root: {relative_path!r}")
    return relative_path


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency onto white, 16-bit integer images scaled to 8 bits."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # convert("RGB") would clip 16-bit values at 255 (a white image): scale 0..65535 to 0..255.
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image as RGB, or a clear error naming the file: 'image not found', 'image empty',
    'image too large' (more than max_pixels: a decompression bomb is refused before it is
    decoded) or 'image unreadable' (corrupt, truncated, unknown format)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ValueError(f"image empty: {path} has 0 bytes")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ValueError(f"image too large: {path} is {width}x{height}, more than {max_pixels} pixels")
                image.load()  # decodes everything: a truncated file fails here
                return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {path}: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"image unreadable: {path}: {exc}") from None


class ImageCache:
    """Preprocessed pixel values by image path, the most recent `max_items` kept in memory.

    The built-in dataset (7,000 small images) is decoded once; a VQA v2-sized one (tens of
    thousands of 224-px images, 600 KB each as float32) would not fit, so old entries go.
    `vlm.features.FeatureStore` stands in for it when the vision tower is frozen; `kind`
    says which of the two a source is (vlm.features.ImageInputKind)."""

    kind = PIXELS

    def __init__(self, image_processor, root: Path, max_items: int = 20_000):
        self.image_processor = image_processor
        self.root = Path(root)
        self.max_items = max_items
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, relative_path: str) -> torch.Tensor:
        if relative_path in self._cache:
            self._cache.move_to_end(relative_path)
            return self._cache[relative_path]
        image = load_rgb(self.root / check_image_path(relative_path))
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        self._cache[relative_path] = pixels
        if len(self._cache) > self.max_items:
            self._cache.popitem(last=False)
        return pixels


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
    if answers == []:
        return "field 'answers' is empty: an inference-only split (e.g. VQA v2 test-dev) cannot be trained or scored"
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
    `image` None is a text-only example (LLaVA-1.5 mix): no pixels, no image tokens.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, str, str | None, list[tuple[str, str]]]],  # (record id, source, image, turns)
        tokenizer,
        images: ImageCache,
        image_seq_length: int,
        max_length: int,
        rejects: RejectLog,
    ):
        self.examples: list[tuple[EncodedExample, str | None]] = []
        self.images = images
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        for record_id, source, image, turns in items:
            try:
                encoded = encode_turns(tokenizer, turns, image_seq_length, max_length)
                # One image, one placeholder: the model scatters image features into exactly
                # these positions, so a mismatch would be a crash mid-training.
                expected = image_seq_length if image is not None else 0
                found = encoded.input_ids.count(image_token_id)
                if found != expected:
                    raise ValueError(f"{found} image tokens in the prompt, expected {expected} "
                                     f"({'one image' if image is not None else 'text-only record'})")
                if image is not None:
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
            self.images.kind.key: self.images(image) if image is not None else None,
        }


def pad(rows: list[list[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, longest row] of ids filled out with `value` on the right (training, scoring) or on the
    left (prompts to generate from: every row's answer then starts at the same column), and the
    attention mask. GPT-2 pads with EOS, so the mask, never the id, says where a row's tokens are."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, columns] = torch.tensor(row, dtype=torch.long)
        mask[i, columns] = 1
    return ids, mask


@dataclass
class VLMCollator:
    """Right-pads to the longest example. GPT-2 pads with EOS, so padding is masked by
    position (attention_mask), never by token id: the EOS that ends an answer stays a label.

    Text-only rows (image input None) mix with image rows: the image input stacks the rows
    that have one, in row order, which is the order Llava scatters image features into the
    `<image>` positions; a batch without images has none."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        image_key = input_kind_of(batch[0]).key
        input_ids, attention_mask = pad([item["input_ids"] for item in batch], self.pad_token_id)
        labels, _ = pad([item["labels"] for item in batch], IGNORE_INDEX)
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
        }
        # pixels, or cached vision features (vlm/features.py); text-only rows have none
        images = [item[image_key] for item in batch if item.get(image_key) is not None]
        if images:
            out[image_key] = torch.stack(images)
        return out


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


def move_image_token(conversations: list[dict], has_image: bool) -> list[dict]:
    """LLaVA's placement of the image placeholder: every `<image>` is taken out of the turn
    it is in and one is put at the front of the first human turn as "<image>\n...", where
    the chat template and the VQA prompt put it. A record with an image and no placeholder
    gets one (its image would otherwise be loaded and never seen); more than one placeholder
    for one image, or one in a text-only record, is an error (ValueError)."""
    count = sum(str(turn.get("value", "")).count("<image>") for turn in conversations)
    if not has_image:
        if count:
            raise ValueError(f"{count} <image> placeholder(s) in a record without an image")
        return [dict(turn) for turn in conversations]
    if count > 1:
        raise ValueError(f"{count} <image> placeholders for one image")
    out = [dict(turn, value=turn["value"].replace("<image>", "").strip()) for turn in conversations]
    for index, (turn, moved) in enumerate(zip(conversations, out)):
        if "<image>" in turn["value"] and turn.get("from") == "gpt":
            raise ValueError(f"conversations[{index}] (a gpt turn) holds <image>")
        if "<image>" in turn["value"] and not moved["value"] and index > 0:
            raise ValueError(f"conversations[{index}] holds nothing but <image>")
    first_human = next((i for i, turn in enumerate(out) if turn.get("from") == "human"), None)
    if first_human is None:
        raise ValueError("no human turn to put the image in")
    out[first_human]["value"] = "<image>\n" + out[first_human]["value"]
    return out


def check_conversation_record(record: dict) -> str | None:
    """Why a conversation record (LLaVA format) is unusable for training, or None."""
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        return f"field 'image' must be a relative path or null, got {image!r}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return "field 'conversations' is empty"
    for index, turn in enumerate(turns):
        expected = "human" if index % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else turn
            return f"conversations[{index}].from is {got!r}, expected {expected!r} (turns alternate human/gpt)"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"conversations[{index}].value is empty"
    if len(turns) % 2:
        return f"conversations[{len(turns) - 1}] is a human turn with no gpt answer"
    return None


def conversation_turns(conversations: list[dict], data) -> list[tuple[str, str]]:
    """(prompt, answer) spans of a checked conversation whose `<image>` is in place (move_image_token).

    The first human turn goes through data.prompt_template (its "<image>\n" dropped for a
    text-only record), later ones through data.followup_template and answers through
    data.answer_template: the VQA examples' format, which is the chat template's rendering
    (vlm/model.py CHAT_TEMPLATE; tests/test_instruct.py checks the two agree)."""
    image_line = "<image>\n"
    turns = []
    for index in range(0, len(conversations), 2):
        question = conversations[index]["value"].strip()
        answer = data.answer_template.format(answer=conversations[index + 1]["value"].strip())
        if index == 0:
            if question.startswith(image_line):
                prompt = vqa_prompt(data.prompt_template, question[len(image_line):])
            else:
                if image_line not in data.prompt_template:
                    raise ValueError(f"data.prompt_template has no {image_line!r} to drop for a text-only record")
                prompt = vqa_prompt(data.prompt_template.replace(image_line, "", 1), question)
        else:
            prompt = vqa_prompt(data.followup_template, question)
        turns.append((prompt, answer))
    return turns


def conversation_items(records, data, source: str, rejects: RejectLog):
    """Training conversations from LLaVA-format records (image None: a text-only record)."""
    for record in records:
        problem = check_conversation_record(record)
        if problem is None:
            try:
                conversations = move_image_token(record["conversations"], record.get("image") is not None)
                turns = conversation_turns(conversations, data)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            rejects.reject(record.get("id"), source, problem)
            continue
        yield record.get("id"), source, record.get("image"), turns


def split_exists(dataset_dir: Path, kind: str, split: str) -> bool:
    """Whether a dataset dir holds `kind` (vqa, captions, conversations) with that split."""
    index = Path(dataset_dir) / kind / "dataset_dict.json"
    return index.is_file() and split in json.loads(index.read_text()).get("splits", [])


TASKS = ("vqa", "captions")


def training_tasks(data, dataset_dir: Path) -> frozenset[str]:
    """What SFT trains on, {"vqa"}, {"captions"} or both: data.supervision, checked against
    what the train split of `dataset_dir` holds. `auto` takes whatever is there (captions
    beside VQA only when data.caption_ratio > 0); a named kind that is missing is an error
    naming the path, so a captioner config never trains on nothing."""
    split = data.train_split
    held = {kind for kind in TASKS if split_exists(dataset_dir, kind, split)}
    if data.supervision == "auto":
        tasks = held - ({"captions"} if "vqa" in held and data.caption_ratio <= 0 else set())
    else:
        tasks = set(TASKS) if data.supervision == "both" else {data.supervision}
        missing = sorted(tasks - held)
        if missing:
            raise FileNotFoundError(f"data.supervision={data.supervision} needs "
                                    f"{' and '.join(f'{dataset_dir}/{kind}/{split}' for kind in missing)}, "
                                    f"which is not there (the dataset holds {sorted(held) or 'neither'})")
        if data.supervision == "both" and data.caption_ratio <= 0:
            raise ValueError("data.supervision=both mixes captions in at data.caption_ratio, which is 0")
    if not tasks:
        raise FileNotFoundError(f"{dataset_dir}: no vqa/{split} or captions/{split} split to train on; run the "
                                f"prep stage or convert a dataset into it (data_prep/README.md)")
    return frozenset(tasks)


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


def answer_carrying(split, images: int):
    """The records of a split's first `images` images (sorted by path, so a VQA split and a captions
    split of the same images agree): the images whose written answers SFT may learn from
    (data.answer_images). More images than the split holds is an error naming the key."""
    ordered = sorted(set(split["image"]))
    if images > len(ordered):
        raise ValueError(f"config key 'data.answer_images' is {images}, but the train split has only "
                         f"{len(ordered)} images")
    keep = set(ordered[:images])
    return split.select([i for i, image in enumerate(split["image"]) if image in keep])


def captions_by_image(dataset_dir: Path) -> dict[str, str]:
    """Each image's reference facts: its captions (every split; several joined by a space, as
    COCO's five are), by image path. {} when the dataset has no captions/."""
    from datasets import load_from_disk

    path = Path(dataset_dir) / "captions"
    if not path.exists():
        return {}
    captions: dict[str, list[str]] = {}
    for split in load_from_disk(str(path)).values():
        for image, caption in zip(split["image"], split["caption"]):
            if isinstance(caption, str) and caption.strip():
                captions.setdefault(image, []).append(caption.strip())
    return {image: " ".join(texts) for image, texts in captions.items()}


def reference_of(record: dict, captions: dict[str, str]) -> dict:
    """What a reward may know about a VQA record's question: its id, image, question, annotator
    answers ([] when unknown) and the image's caption (None when the data has none)."""
    answers = record.get("answers")
    return {"id": str(record["id"]), "image": record["image"], "question": record["question"],
            "answers": list(answers) if isinstance(answers, list) else [], "caption": captions.get(record["image"])}


def corpus(config):
    """Texts a from-scratch tokenizer is trained on: prompts, answers and captions of the train split.

    Everything the dataset holds, whatever data.supervision trains on: a captions-only run
    and a VQA + captions run on the same data get the same tokenizer."""
    data_dir, split = config.data_dir, config.data.train_split
    prompt = config.data.prompt_template.format(question="")
    yield prompt + " " + config.data.caption_prompt
    if split_exists(data_dir, "vqa", split):
        for record in load_split(data_dir, "vqa", split):
            yield config.data.prompt_template.format(question=record["question"])
            yield " ".join(record["answers"])
    if split_exists(data_dir, "captions", split):
        for record in load_split(data_dir, "captions", split):
            yield record["caption"]
