"""Deterministic, seeded synthetic VQA dataset.

Each image is a small grid of cells (default 48 px, 3 x 3 cells of 16 px) with
one to four coloured shapes, each in its own cell.  One object per cell lines up
with a 16-px-patch ViT, so a tiny model can learn the task quickly, while the
questions still need attribute binding ("what color is the circle?" when
there are several objects), counting and spatial words.

For every image the generator writes, in the project's one record schema
(see data_prep/README.md):

* VQA records: question, 10 noisy annotator answers, canonical answer, VQA
  answer type / question type, and the synthetic ``question_family``;
* a dense caption plus the scene ground truth (shape, colour, cell, box);
* a short LLaVA-style multi-turn conversation.

Everything is drawn from one ``random.Random`` (plus a numpy Generator for
pixel noise) per split, derived from the config seed: the same config gives
byte-identical records and identical pixels.  No global RNG is touched.

Usage::

    python -m data_prep.synthetic --out data/synthetic
    python -m data_prep.synthetic --out /tmp/tiny --train-images 50 --val-images 10 --test-images 10
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# The scene vocabulary and caption grammar live in vlm/scene.py (re-exported here: the generator's words)
from vlm.scene import (  # noqa: F401
    COLOURS,
    COLUMN_WORDS_BY_GRID,
    POSITIONS,
    ROW_WORDS,
    ROW_WORDS_BY_GRID,
    SHAPES,
    caption_regions,
    cell_name,
    location_phrase,
    side_phrase,
)

# ---------------------------------------------------------------------------
# Vocabulary (module-level so tokenizer / reward / eval code can import it)
# ---------------------------------------------------------------------------


# Far apart in RGB so that +-COLOUR_JITTER never makes two colours overlap
# (the closest pair, red/orange, is ~100 apart; jitter moves at most ~26).
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COLOUR_JITTER = 15

# `rl`: images SFT never trains on, for sampling answers to label and for RL prompts. Its
# scenes come from train's slice of the scene space (the distribution SFT learns), drawn from
# their own random stream, so train / val / test are exactly what they were before it existed.
# Its images are new; a layout may repeat one of train's (there are only 162 one-object
# layouts), never one of val's or test's.
SPLITS = ("train", "val", "test", "rl")
SIGNATURE_SLICE_OF = {"rl": "train"}  # a split drawing from another split's slice of the scene space
ANSWER_TYPES = ("yes/no", "number", "other")

# Answer used in conversations when the question asks about something absent.
NONE_ANSWER = "there is none"
# Placeholder the LLaVA format puts where the image features go.
IMAGE_TOKEN = "<image>"

# Bump when the generator's output changes for the same config, so that an
# old dataset on disk is not silently reused.
# 3: the caption summary says each object's side ("the circle is red on the left").
GENERATOR_VERSION = 3

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

CONFIG_HELP = {
    "image_size": "image width and height in pixels",
    "grid": "cells per row/column (1-3); one object per cell",
    "max_objects": "maximum objects per image (at least 1)",
    "questions_per_image": "distinct VQA questions per image",
    "train_images": "number of train images",
    "val_images": "number of val images",
    "test_images": "number of test images",
    "rl_images": "number of rl images (never in SFT: prompts for labeling and RL)",
    "seed": "seed for all randomness; same seed -> identical dataset",
    "min_object_scale": "smallest object size as a fraction of its cell",
    "max_object_scale": "largest object size as a fraction of its cell",
    "position_jitter": "share of a cell's free space an object may move in (0: centred, 1: anywhere)",
    "caption_summary": "open each caption with a shape-keyed summary ('the circle is red on the left, ...')",
}

# Fields added after datasets were written without them: absent from a stored config means
# this value (the output it had before the field existed).
ADDED_FIELDS = {"caption_summary": False}


@dataclasses.dataclass
class SyntheticConfig:
    image_size: int = 48
    grid: int = 3
    max_objects: int = 4
    questions_per_image: int = 4
    train_images: int = 6000
    val_images: int = 300
    test_images: int = 600
    rl_images: int = 1000
    seed: int = 0
    # Object size as a fraction of its cell, and how much of the cell's free space
    # the object may wander in (0: centred in its cell, 1: anywhere inside it).
    min_object_scale: float = 0.6
    max_object_scale: float = 0.9
    position_jitter: float = 1.0
    # Open every caption with a shape-keyed summary ("the circle is red on the left, the squares
    # are blue in the middle and green on the right. at the top left ..."): predicting its colours
    # is a lookup by shape, and its sides a lookup by shape and colour, which the position-first
    # phrases ("at the top a red circle": lookups by place) never train. Off by default: measured
    # in the README ("Vision"). Descriptions in the conversations stay position-first.
    caption_summary: bool = False

    def __post_init__(self) -> None:
        if self.grid not in COLUMN_WORDS_BY_GRID:
            raise ValueError(
                f"grid must be 1, 2 or 3 (position words exist only for those), got {self.grid}"
            )
        if self.image_size // self.grid < 8:
            raise ValueError(
                f"image_size {self.image_size} gives cells under 8 px for grid {self.grid}"
            )
        if not 1 <= self.max_objects <= self.grid * self.grid:
            raise ValueError(
                f"max_objects must be in 1..{self.grid * self.grid} (one object per cell), "
                f"got {self.max_objects}"
            )
        # Every scene supports at least 28 distinct questions (18 exists, 3+6+1
        # counts), so 20 is always satisfiable.
        if not 1 <= self.questions_per_image <= 20:
            raise ValueError(f"questions_per_image must be in 1..20, got {self.questions_per_image}")
        for split in SPLITS:
            if self.images(split) < 0:
                raise ValueError(f"{split}_images must be >= 0")
        if not 0.2 <= self.min_object_scale <= self.max_object_scale <= 1.0:
            raise ValueError("need 0.2 <= min_object_scale <= max_object_scale <= 1.0, got "
                             f"{self.min_object_scale}, {self.max_object_scale}")
        if not 0.0 <= self.position_jitter <= 1.0:
            raise ValueError(f"position_jitter must be in [0, 1], got {self.position_jitter}")
        if not isinstance(self.caption_summary, bool):  # a YAML "yes"/"maybe" string would read as on
            raise ValueError(f"caption_summary must be true or false, got {self.caption_summary!r}")

    def images(self, split: str) -> int:
        return getattr(self, f"{split}_images")

    @property
    def cell_size(self) -> int:
        return self.image_size // self.grid


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    row: int
    col: int
    # Inclusive pixel box (x0, y0, x1, y1); the object's centre pixel is
    # ((x0 + x1) // 2, (y0 + y1) // 2) and lies inside every shape.
    bbox: tuple[int, int, int, int]
    # The jittered colour actually drawn (not stored in records).
    rgb: tuple[int, int, int]

    def record(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "row": self.row,
            "col": self.col,
            "bbox": list(self.bbox),
        }


Scene = list[SceneObject]  # always in row-major cell order
Signature = tuple[tuple[str, str, int, int], ...]  # sorted (shape, colour, row, col)


def scene_signature(objects: Scene) -> Signature:
    """What makes two scenes 'the same' for split separation (ignores jitter)."""
    return tuple(sorted((o.shape, o.colour, o.row, o.col) for o in objects))


def sample_scene(config: SyntheticConfig, rng: random.Random, object_count: int) -> Scene:
    cell = config.cell_size
    cells = sorted(rng.sample(range(config.grid * config.grid), object_count))
    objects = []
    for cell_index in cells:
        row, col = divmod(cell_index, config.grid)
        shape = rng.choice(SHAPES)
        colour = rng.choice(COLOURS)
        size = round(cell * rng.uniform(config.min_object_scale, config.max_object_scale))
        # The offset keeps the whole object inside its cell: a patch never
        # sees a piece of a neighbour's object.
        free = cell - size
        low = int(free * (1 - config.position_jitter) / 2)
        x0 = col * cell + rng.randint(low, free - low)
        y0 = row * cell + rng.randint(low, free - low)
        rgb = tuple(
            min(255, max(0, channel + rng.randint(-COLOUR_JITTER, COLOUR_JITTER)))
            for channel in COLOUR_RGB[colour]
        )
        objects.append(
            SceneObject(shape, colour, row, col, (x0, y0, x0 + size - 1, y0 + size - 1), rgb)
        )
    return objects


# Each split owns a fixed, seed-dependent slice of the scene-signature space,
# so a val/test scene can never appear in train.  Partitioning the signature
# space (rather than "draw train, then reject val/test scenes seen in train")
# matters for the small scenes: with 6000 train images nearly all 162
# one-object scenes occur in train, and val/test would end up with no
# one-object scenes at all.  Here val/test stay the same when only
# train_images changes.
SPLIT_SIGNATURE_SHARE = {"val": (0.0, 0.05), "test": (0.05, 0.15), "train": (0.15, 1.0)}


def split_of_signature(signature: Signature, seed: int) -> str:
    # blake2b, not hash(): Python's str hash is randomised per process.
    digest = hashlib.blake2b(repr((seed, signature)).encode(), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2**64
    for split, (low, high) in SPLIT_SIGNATURE_SHARE.items():
        if low <= position < high:
            return split
    raise AssertionError("split shares must cover [0, 1)")


def sample_scene_for_split(config: SyntheticConfig, split: str, rng: random.Random) -> Scene:
    """Draw scenes until one falls in `split`'s slice of the signature space."""
    # The object count is drawn before rejecting, so each split gets exactly
    # the uniform 1..max_objects mix; otherwise chance in how many of the few
    # one-object scenes land in the small val slice would skew val's mix.
    object_count = rng.randint(1, config.max_objects)
    for attempt in range(1, 10_001):
        if attempt % 1000 == 0:
            # 1000 misses in a row: this count's slice is (almost) empty,
            # which happens only for tiny scene spaces (e.g. one-object
            # scenes on a 2 x 2 grid, or a rare seed).  Try another count.
            object_count = rng.randint(1, config.max_objects)
        objects = sample_scene(config, rng, object_count)
        if split_of_signature(scene_signature(objects), config.seed) == SIGNATURE_SLICE_OF.get(split, split):
            return objects
    raise RuntimeError(
        f"could not draw a {split} scene: the scene space of grid={config.grid}, "
        f"max_objects={config.max_objects} is too small to hold out val/test scenes"
    )


def render_scene(objects: Scene, config: SyntheticConfig, noise_rng: np.random.Generator) -> Image.Image:
    size = config.image_size
    # Light grey background with mild grey per-pixel noise, so "background"
    # is not a single constant the model can memorise.
    grey = int(noise_rng.integers(200, 225))
    noise = noise_rng.integers(-6, 7, size=(size, size, 1))
    background = np.clip(grey + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    for o in objects:
        x0, y0, x1, y1 = o.bbox
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=o.rgb)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=o.rgb)
        elif o.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=o.rgb)
        else:
            raise ValueError(f"unknown shape {o.shape!r}")
    return image


# ---------------------------------------------------------------------------
# Words for positions and objects
# ---------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_summary(objects: Scene, grid: int) -> str:
    """e.g. 'the circle is red on the left, the squares are blue in the middle and green on the
    right.' (shapes in SHAPES order, objects in row-major order): each colour word follows the
    shape it belongs to, and each side follows the shape and colour it belongs to."""
    parts = []
    for shape in SHAPES:
        said = [f"{o.colour} {side_phrase(o.col, grid)}" for o in objects if o.shape == shape]
        if len(said) == 1:
            parts.append(f"the {shape} is {said[0]}")
        elif said:
            parts.append(f"the {shape}s are {_listing(said)}")
    return ", ".join(parts) + "."


def caption_for(objects: Scene, grid: int, summary: bool = False) -> str:
    """e.g. 'at the top left a red circle, in the middle a blue square and at the
    bottom right a green triangle.' (objects in row-major order); with `summary`, opened
    by `shape_summary`.

    Position first: every colour and shape word then follows the words that say
    which image patch it describes, so each caption is dense, aligned supervision."""
    parts = [
        f"{location_phrase(o.row, o.col, grid)} {article(o.colour)} {o.colour} {o.shape}"
        for o in objects
    ]
    caption = _listing(parts) + "."
    return f"{shape_summary(objects, grid)} {caption}" if summary else caption


def count_where(objects: Scene, **attributes) -> int:
    return sum(all(getattr(o, k) == v for k, v in attributes.items()) for o in objects)


# ---------------------------------------------------------------------------
# Question families
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    answer: str  # canonical: lowercase, numbers as digits
    family: str


def pick_preferring(rng: random.Random, preferred: list, others: list, preference: float):
    """Pick from `preferred` with probability `preference` (if non-empty), else from `others`."""
    if preferred and (not others or rng.random() < preference):
        return rng.choice(preferred)
    return rng.choice(others)


# Every ask_* function returns a question not in `asked` (question texts
# already used for this image), or None when the scene allows none.  Pools are
# always built by iterating the SHAPES / COLOURS tuples, never sets, so the
# draws do not depend on Python's per-process hash seed.


def ask_exists(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    def text(colour, shape):
        return f"Is there {article(colour)} {colour} {shape}?"

    combos = [(c, s) for c in COLOURS for s in SHAPES]
    present_in_scene = [(c, s) for c, s in combos if count_where(objects, colour=c, shape=s)]
    present = [(c, s) for c, s in present_in_scene if text(c, s) not in asked]
    absent = [(c, s) for c, s in combos if (c, s) not in present_in_scene and text(c, s) not in asked]
    # Answer is a fair coin.  When the drawn answer is not possible (the one
    # object of a one-object scene was already asked about), give the slot to
    # another family instead of flipping the answer.  "no" is capped the same
    # way as "yes" (at most one "no" per distinct object kind in the scene),
    # otherwise small scenes would skew the family towards "no".
    if rng.random() < 0.5:
        if not present:
            return None
        colour, shape = rng.choice(present)
        return Question(text(colour, shape), "yes", "exists")
    asked_no = sum(text(c, s) in asked for c, s in combos if (c, s) not in present_in_scene)
    if not absent or asked_no >= len(present_in_scene):
        return None
    # For "no", prefer binding distractors: colour and shape both present but
    # never together (red square + blue circle -> "red circle?"), then one of
    # them present.  Those force the model to bind colour to shape instead of
    # answering from "is red anywhere".  Some plain absent combos remain.
    colour_seen = [c for c, s in absent if count_where(objects, colour=c)]
    shape_seen = [s for c, s in absent if count_where(objects, shape=s)]
    both_seen = [(c, s) for c, s in absent if c in colour_seen and s in shape_seen]
    one_seen = [(c, s) for c, s in absent if (c in colour_seen) != (s in shape_seen)]
    distractors = both_seen or one_seen
    colour, shape = pick_preferring(rng, distractors, absent, preference=0.8)
    return Question(text(colour, shape), "no", "exists")


def ask_count_of(objects: Scene, rng: random.Random, asked: set, attribute: str, values: tuple, template: str,
                 family: str) -> Optional[Question]:
    """How many objects have a value of `attribute`, mostly a present value: six colours but at
    most four objects, uniform picks would make "0" the most common answer; absent values give
    the "0" answers."""
    candidates = [v for v in values if template.format(v) not in asked]
    if not candidates:
        return None
    present = [v for v in candidates if count_where(objects, **{attribute: v})]
    absent = [v for v in candidates if not count_where(objects, **{attribute: v})]
    value = pick_preferring(rng, present, absent, preference=0.8)
    return Question(template.format(value), str(count_where(objects, **{attribute: value})), family)


def ask_count_shape(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    return ask_count_of(objects, rng, asked, "shape", SHAPES, "How many {}s are there?", "count_shape")


def ask_count_colour(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    return ask_count_of(objects, rng, asked, "colour", COLOURS, "How many {} objects are there?", "count_colour")


def ask_count_all(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    text = "How many objects are there?"
    if text in asked:
        return None
    return Question(text, str(len(objects)), "count_all")


def ask_about_the_unique(objects: Scene, rng: random.Random, asked: set, known: str, values: tuple, wanted: str,
                         template: str, family: str) -> Optional[Question]:
    """The `wanted` attribute of the one object whose `known` attribute has a given value; only
    unambiguous references (exactly one object with that value), not asked already."""
    unique = [v for v in values if count_where(objects, **{known: v}) == 1 and template.format(v) not in asked]
    if not unique:
        return None
    value = rng.choice(unique)
    (target,) = [o for o in objects if getattr(o, known) == value]
    return Question(template.format(value), getattr(target, wanted), family)


def ask_colour_of_shape(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    return ask_about_the_unique(objects, rng, asked, "shape", SHAPES, "colour", "What color is the {}?",
                                "colour_of_shape")


def ask_shape_of_colour(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    return ask_about_the_unique(objects, rng, asked, "colour", COLOURS, "shape", "What shape is the {} object?",
                                "shape_of_colour")


def ask_position(objects: Scene, grid: int, rng: random.Random, asked: set) -> Optional[Question]:
    def text(o):
        return f"Which side is the {o.colour} {o.shape} on?"

    unique = [
        o for o in objects
        if count_where(objects, colour=o.colour, shape=o.shape) == 1 and text(o) not in asked
    ]
    if not unique:
        return None
    target = rng.choice(unique)
    return Question(text(target), COLUMN_WORDS_BY_GRID[grid][target.col], "position")


@dataclasses.dataclass(frozen=True)
class Family:
    answer_type: str
    question_type: str  # the question's first words, as VQA's question_type
    weight: float
    ask: Callable[[Scene, int, random.Random, set], Optional[Question]]


# Target mix: yes/no ~30%, number ~30%, other ~40%.  The "other" families are
# infeasible on some scenes (no unique shape / colour), and their weight then
# goes to the feasible families, so they get a bit more than 40/3 each.
FAMILIES = {
    "exists": Family("yes/no", "is there a", 0.30, ask_exists),
    "count_shape": Family("number", "how many", 0.10, ask_count_shape),
    "count_colour": Family("number", "how many", 0.10, ask_count_colour),
    "count_all": Family("number", "how many", 0.10, ask_count_all),
    "colour_of_shape": Family("other", "what color is the", 0.15, ask_colour_of_shape),
    "shape_of_colour": Family("other", "what shape is the", 0.15, ask_shape_of_colour),
    "position": Family("other", "which side is the", 0.15, ask_position),
}


def sample_questions(objects: Scene, config: SyntheticConfig, rng: random.Random) -> list[Question]:
    asked: set = set()
    questions = []
    while len(questions) < config.questions_per_image:
        candidates = list(FAMILIES)
        question = None
        while candidates and question is None:
            family = rng.choices(candidates, weights=[FAMILIES[f].weight for f in candidates])[0]
            question = FAMILIES[family].ask(objects, config.grid, rng, asked)
            candidates.remove(family)
        if question is None:  # unreachable for questions_per_image <= 20
            raise RuntimeError("scene supports no more distinct questions")
        asked.add(question.text)
        questions.append(question)
    return questions


# ---------------------------------------------------------------------------
# Annotator answers
# ---------------------------------------------------------------------------

ANNOTATORS_PER_QUESTION = 10
ANNOTATOR_AGREEMENT = 0.85
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Disagreements a real annotator might make on these images.
CONFUSABLE_COLOURS = {
    "red": ("orange", "purple"),
    "orange": ("yellow", "red"),
    "yellow": ("orange", "green"),
    "green": ("yellow", "blue"),
    "blue": ("purple", "green"),
    "purple": ("blue", "red"),
}
NEIGHBOURING_SIDES = {"left": ("middle",), "middle": ("left", "right"), "right": ("middle",)}


def normalize_answer(answer: str) -> str:
    """Lowercase and map number words to digits: the form canonical answers use."""
    answer = answer.strip().lower()
    if answer in NUMBER_WORDS:
        return str(NUMBER_WORDS.index(answer))
    return answer


def plausible_wrong_answer(answer: str, rng: random.Random) -> str:
    if answer.isdigit():
        count = int(answer)
        return str(count + 1 if count == 0 or rng.random() < 0.5 else count - 1)
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer in CONFUSABLE_COLOURS:
        return rng.choice(CONFUSABLE_COLOURS[answer])
    if answer in SHAPES:
        return rng.choice([s for s in SHAPES if s != answer])
    if answer in NEIGHBOURING_SIDES:
        return rng.choice(NEIGHBOURING_SIDES[answer])
    raise ValueError(f"no disagreement model for answer {answer!r}")


def surface_form(answer: str, rng: random.Random) -> str:
    """How one annotator might type `answer`: '2' or 'two', 'Yes', 'center'."""
    if answer.isdigit() and int(answer) < len(NUMBER_WORDS) and rng.random() < 0.25:
        return NUMBER_WORDS[int(answer)]
    if answer == "middle" and rng.random() < 0.2:
        # Not mapped back by normalize_answer: like real VQA synonyms, it
        # earns partial credit only.
        return "center"
    if rng.random() < 0.08:
        return answer.capitalize()
    return answer


def is_strict_plurality(canonical: str, answers: list[str]) -> bool:
    votes = collections.Counter(normalize_answer(a) for a in answers)
    return all(votes[canonical] > n for answer, n in votes.items() if answer != canonical)


def annotator_answers(canonical: str, rng: random.Random) -> list[str]:
    """10 independent noisy answers whose normalised plurality is `canonical`.

    The noise makes the VQA metric's partial credit (min(#matches / 3, 1))
    matter, but the canonical answer always stays the clear majority choice.
    """
    while True:
        answers = [
            surface_form(
                canonical if rng.random() < ANNOTATOR_AGREEMENT else plausible_wrong_answer(canonical, rng),
                rng,
            )
            for _ in range(ANNOTATORS_PER_QUESTION)
        ]
        if is_strict_plurality(canonical, answers):
            return answers


# ---------------------------------------------------------------------------
# Conversations (LLaVA format)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Referent:
    """An object the conversation talked about, for 'it' follow-ups."""
    target: SceneObject
    known: frozenset  # attributes already said: subset of {"colour", "shape", "where"}


Turn = tuple[str, str, Optional[Referent]]  # question, answer, object it is about


def ask_about_object(objects: Scene, grid: int, rng: random.Random) -> Turn:
    """A fresh follow-up question; about a quarter are about absent objects."""
    kind = rng.choice(("colour_of_shape", "shape_of_colour", "where", "count", "mentioned"))
    if kind == "colour_of_shape":
        # Only shapes with zero or one instance: there is one right answer.
        present = [s for s in SHAPES if count_where(objects, shape=s) == 1]
        absent = [s for s in SHAPES if count_where(objects, shape=s) == 0]
        if present or absent:
            shape = pick_preferring(rng, present, absent, preference=0.7)
            question = f"What color is the {shape}?"
            if shape in absent:
                return question, NONE_ANSWER, None
            (target,) = [o for o in objects if o.shape == shape]
            return question, target.colour, Referent(target, frozenset({"colour", "shape"}))
    if kind == "shape_of_colour":
        present = [c for c in COLOURS if count_where(objects, colour=c) == 1]
        absent = [c for c in COLOURS if count_where(objects, colour=c) == 0]
        colour = pick_preferring(rng, present, absent, preference=0.7)
        question = f"What shape is the {colour} object?"
        if colour in absent:
            return question, NONE_ANSWER, None
        (target,) = [o for o in objects if o.colour == colour]
        return question, target.shape, Referent(target, frozenset({"colour", "shape"}))
    if kind == "where":
        combos = [(c, s) for c in COLOURS for s in SHAPES]
        present = [(c, s) for c, s in combos if count_where(objects, colour=c, shape=s) == 1]
        absent = [(c, s) for c, s in combos if count_where(objects, colour=c, shape=s) == 0]
        colour, shape = pick_preferring(rng, present, absent, preference=0.7)
        question = f"Where is the {colour} {shape}?"
        if (colour, shape) in absent:
            return question, NONE_ANSWER, None
        (target,) = [o for o in objects if o.colour == colour and o.shape == shape]
        answer = location_phrase(target.row, target.col, grid)
        return question, answer, Referent(target, frozenset({"colour", "shape", "where"}))
    if kind == "count":
        shape = rng.choice(SHAPES)
        return f"How many {shape}s are there?", str(count_where(objects, shape=shape)), None
    # Refers back to the caption turn.
    which = rng.choice(("first", "last")) if len(objects) > 1 else "first"
    target = objects[0] if which == "first" else objects[-1]
    question = f"What color is the {which} object you mentioned?"
    return question, target.colour, Referent(target, frozenset({"colour"}))


def ask_about_referent(referent: Referent, grid: int, rng: random.Random) -> Optional[Turn]:
    """'Where is it?' / 'What shape is it?' about the previous turn's object."""
    options = []
    if "where" not in referent.known:
        options.append(("Where is it?", location_phrase(referent.target.row, referent.target.col, grid)))
    if "shape" not in referent.known:
        options.append(("What shape is it?", referent.target.shape))
    if not options:
        return None
    question, answer = rng.choice(options)
    return question, answer, None


def conversation_for(objects: Scene, caption: str, grid: int, rng: random.Random) -> list[dict]:
    turns = [(f"{IMAGE_TOKEN}\nDescribe the image.", caption)]
    referent = None
    follow_ups = rng.choice((1, 2))  # 2-3 human turns in total
    while len(turns) < 1 + follow_ups:
        turn = None
        if referent is not None and rng.random() < 0.6:
            turn = ask_about_referent(referent, grid, rng)
        if turn is None:
            turn = ask_about_object(objects, grid, rng)
        question, answer, referent = turn
        if question not in [q for q, _ in turns]:
            turns.append((question, answer))
    conversation = []
    for question, answer in turns:
        conversation.append({"from": "human", "value": question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


# ---------------------------------------------------------------------------
# Dataset writing
# ---------------------------------------------------------------------------


def _features():
    from datasets import Features, Value

    string = Value("string")
    vqa = Features({
        "id": string,
        "image": string,
        "question": string,
        "answers": [string],
        "multiple_choice_answer": string,
        "answer_type": string,
        "question_type": string,
        "question_family": string,
    })
    captions = Features({
        "id": string,
        "image": string,
        "caption": string,
        "objects": [{
            "shape": string,
            "colour": string,
            "row": Value("int32"),
            "col": Value("int32"),
            "bbox": [Value("int32")],
        }],
    })
    conversations = Features({
        "id": string,
        "image": string,
        "conversations": [{"from": string, "value": string}],
    })
    return {"vqa": vqa, "captions": captions, "conversations": conversations}


def generate_split(config: SyntheticConfig, split: str, dataset_dir: Path, progress_bar) -> dict:
    """Draw, render and save one split's images; return its records."""
    # String seeds are hashed with SHA-512 by random.Random: stable across
    # processes and platforms, and independent per split.
    rng = random.Random(f"synthetic-vqa/{config.seed}/{split}")
    noise_rng = np.random.default_rng(rng.getrandbits(128))
    image_dir = dataset_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    records = {"vqa": [], "captions": [], "conversations": []}
    for index in range(config.images(split)):
        objects = sample_scene_for_split(config, split, rng)
        image_path = f"images/{split}/{index:06d}.png"
        render_scene(objects, config, noise_rng).save(dataset_dir / image_path, format="PNG")
        image_id = f"{split}-{index:06d}"
        for number, question in enumerate(sample_questions(objects, config, rng)):
            family = FAMILIES[question.family]
            records["vqa"].append({
                "id": f"{image_id}-q{number}",
                "image": image_path,
                "question": question.text,
                "answers": annotator_answers(question.answer, rng),
                "multiple_choice_answer": question.answer,
                "answer_type": family.answer_type,
                "question_type": family.question_type,
                "question_family": question.family,
            })
        caption = caption_for(objects, config.grid)
        records["captions"].append({
            "id": image_id,
            "image": image_path,
            "caption": caption_for(objects, config.grid, config.caption_summary),
            "objects": [o.record() for o in objects],
        })
        records["conversations"].append({
            "id": image_id,
            "image": image_path,
            "conversations": conversation_for(objects, caption, config.grid, rng),
        })
        progress_bar.update(1)
    return records


def split_counts(records: dict) -> dict:
    vqa = records["vqa"]
    answers_by_family = collections.defaultdict(collections.Counter)
    for r in vqa:
        answers_by_family[r["question_family"]][r["multiple_choice_answer"]] += 1
    return {
        "images": len(records["captions"]),
        "questions": len(vqa),
        "conversations": len(records["conversations"]),
        "answer_type": dict(sorted(collections.Counter(r["answer_type"] for r in vqa).items())),
        "question_family": dict(sorted(collections.Counter(r["question_family"] for r in vqa).items())),
        "answers_by_family": {
            family: dict(sorted(counts.items())) for family, counts in sorted(answers_by_family.items())
        },
    }


def _write_dataset(config: SyntheticConfig, dataset_dir: Path, progress: bool) -> dict:
    import datasets

    features = _features()
    split_records = {}
    total_images = sum(config.images(split) for split in SPLITS)
    with tqdm(total=total_images, desc="synthetic images", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            bar.set_postfix_str(split)
            split_records[split] = generate_split(config, split, dataset_dir, bar)

    # Saving takes well under a second; datasets' nine "Saving the dataset"
    # bars would only bury the one bar above.
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for kind in ("vqa", "captions", "conversations"):
            datasets.DatasetDict({
                split: datasets.Dataset.from_list(split_records[split][kind], features=features[kind])
                for split in SPLITS
            }).save_to_disk(str(dataset_dir / kind))
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()

    counts = {split: split_counts(split_records[split]) for split in SPLITS}
    meta = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(config), "counts": counts}
    # meta.json last: together with the final rename it marks a complete dataset.
    (dataset_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return counts


def _read_meta(out_dir: Path) -> Optional[dict]:
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        return None
    return json.loads(meta_path.read_text())


def _existing_counts(config: SyntheticConfig, out_dir: Path) -> Optional[dict]:
    """Counts of a complete dataset at out_dir made by this config, None if there is none.

    Raises if out_dir holds something else, rather than overwrite it.
    """
    meta = _read_meta(out_dir)
    if meta is None:
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists, is not empty and has no meta.json; "
                "it is not a complete synthetic dataset. Remove it or choose another --out."
            )
        return None
    wanted = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(config)}
    stored = meta.get("config")
    found = {"generator_version": meta.get("generator_version"),
             "config": {**ADDED_FIELDS, **stored} if isinstance(stored, dict) else stored}
    if found["generator_version"] == 2 and not config.caption_summary:
        found["generator_version"] = 3  # version 3 changed only the summary: without one, the same output
    if _made_before_the_rl_split(found, wanted, meta):
        return _add_split(config, out_dir, meta, "rl")
    if found != wanted:
        raise FileExistsError(
            f"{out_dir} holds a synthetic dataset made with a different config or generator "
            f"version:\n  found:  {json.dumps(found, sort_keys=True)}\n  wanted: "
            f"{json.dumps(wanted, sort_keys=True)}\nRemove it or choose another --out."
        )
    return meta["counts"]


def _made_before_the_rl_split(found: dict, wanted: dict, meta: dict) -> bool:
    """A dataset of this generator version written before the rl split existed: the same config
    but for rl_images. Its train / val / test are what this generator writes (the rl split has
    its own random stream), so it is completed in place rather than refused."""
    config = dict(found["config"] or {})
    return (found["generator_version"] == wanted["generator_version"] and "rl_images" not in config
            and "rl" not in meta.get("counts", {})
            and {**config, "rl_images": wanted["config"]["rl_images"]} == wanted["config"])


def _add_split(config: SyntheticConfig, out_dir: Path, meta: dict, split: str) -> dict:
    """Adds one split to a complete dataset; the other splits' records and images stay as they are.
    meta.json is rewritten last, so a killed run leaves the old meta and the next run redoes it."""
    import datasets

    print(f"synthetic dataset at {out_dir} was made before the {split} split existed; adding it "
          f"({config.images(split)} images; the other splits are unchanged)")
    features = _features()
    with tqdm(total=config.images(split), desc=f"synthetic {split} images", unit="img", disable=True) as bar:
        records = generate_split(config, split, out_dir, bar)
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for kind in ("vqa", "captions", "conversations"):
            existing = datasets.load_from_disk(str(out_dir / kind))
            splits = {name: existing[name] for name in existing if name != split}
            splits[split] = datasets.Dataset.from_list(records[kind], features=features[kind])
            tmp, old = out_dir / f"{kind}.tmp-{split}", out_dir / f"{kind}.old-{split}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
            datasets.DatasetDict(splits).save_to_disk(str(tmp))
            os.rename(out_dir / kind, old)
            os.rename(tmp, out_dir / kind)
            shutil.rmtree(old)
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()
    meta = {**meta, "config": dataclasses.asdict(config),
            "counts": {**meta["counts"], split: split_counts(records)}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta["counts"]


def generate(config: SyntheticConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Write the synthetic dataset to out_dir and return per-split counts.

    Layout: images/{split}/{n:06d}.png, vqa/, captions/, conversations/
    (datasets.DatasetDict via save_to_disk, splits train/val/test) and
    meta.json.  If out_dir already holds this exact dataset, nothing is
    regenerated.
    """
    out_dir = Path(out_dir)
    counts = _existing_counts(config, out_dir)
    if counts is not None:
        print(f"synthetic dataset at {out_dir} already exists with the same config; skipping generation")
        return counts

    # Build everything in a sibling temp dir and rename it into place at the
    # end: a killed run leaves only an `<name>.tmp-*` dir, never a half
    # dataset at out_dir that looks complete.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it 0700
        counts = _write_dataset(config, tmp_dir, progress)
        if out_dir.exists():
            out_dir.rmdir()  # empty: checked by _existing_counts
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            # Another process finished the same dataset first: use theirs.
            counts = _existing_counts(config, out_dir)
            if counts is None:
                raise
            shutil.rmtree(tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return counts


# ---------------------------------------------------------------------------
# Helpers for other modules
# ---------------------------------------------------------------------------


def corpus_texts(out_dir: str | Path, split: str = "train") -> Iterator[str]:
    """All question, answer, caption and conversation texts of one split
    (default train), e.g. to train a tokenizer.

    Annotator answers are included (they hold the surface variants "two",
    "Yes", "center"), each distinct string once per question.  The
    IMAGE_TOKEN placeholder is stripped from conversation turns: the
    tokenizer should add it as a special token, not learn it from text.
    """
    from datasets import load_from_disk

    out_dir = Path(out_dir)
    for batch in load_from_disk(str(out_dir / "vqa"))[split].iter(batch_size=1000):
        for question, answers in zip(batch["question"], batch["answers"]):
            yield question
            yield from dict.fromkeys(answers)
    for batch in load_from_disk(str(out_dir / "captions"))[split].iter(batch_size=1000):
        yield from batch["caption"]
    for batch in load_from_disk(str(out_dir / "conversations"))[split].iter(batch_size=1000):
        for conversation in batch["conversations"]:
            for turn in conversation:
                text = turn["value"].replace(IMAGE_TOKEN, "").strip()
                if text:
                    yield text


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point; returns the exit status (0), as `vqa-rlhf synthetic` expects."""
    parser = argparse.ArgumentParser(
        prog="vqa-rlhf synthetic",
        description=(
            "Generate the deterministic synthetic VQA dataset (shapes on a grid): "
            "images, VQA records, captions and conversations, with train/val/test "
            "splits that share no image and no scene. Record schema: data_prep/README.md."
        ),
        epilog=(
            "example: python -m data_prep.synthetic --out data/synthetic "
            "(re-running with the same config is a no-op)"
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", default=argparse.SUPPRESS,
        help="output dataset directory (created atomically)",
    )
    for field in dataclasses.fields(SyntheticConfig):
        if isinstance(field.default, bool):  # --caption-summary / --no-caption-summary
            parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=field.default,
                                action=argparse.BooleanOptionalAction, help=CONFIG_HELP[field.name])
            continue
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=type(field.default),
            metavar="X" if isinstance(field.default, float) else "N",
            default=field.default,
            help=CONFIG_HELP[field.name],
        )
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    args = parser.parse_args(argv)

    try:
        config = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    except ValueError as error:
        parser.error(str(error))
    try:
        counts = generate(config, args.out, progress=not args.no_progress)
    except FileExistsError as error:
        parser.exit(1, f"error: {error}\n")
    for split in SPLITS:
        c = counts[split]
        print(
            f"{split}: {c['images']} images, {c['questions']} questions, "
            f"answer types {c['answer_type']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
