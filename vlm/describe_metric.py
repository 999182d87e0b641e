"""Description quality on the built-in synthetic scenes: what a generated description says,
scored against the scene's ground truth (captions records' `objects`).

A description is read as the generator writes captions ("at the top left a red circle, in
the middle a blue square and on the right a green triangle."): it is cut into clauses at
commas, "and" and full stops; each clause that names a colour or a shape is one object
mentioned, at the cell of the longest location phrase in it (the generator's own phrases,
vlm.scene.location_phrase, so the parser is the caption writer's inverse).

Scores, micro-averaged over images, in percent:
  objects    an object mentioned is right when colour, shape and cell all match a ground-truth
             object (one-to-one); precision = right / mentioned, recall = right / in the scenes
  colour_shape, colours, shapes, cells   the same for one attribute (or pair) at a time
  count      images whose number of objects mentioned equals the number in the scene
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from vlm.scene import COLOURS, SHAPES, location_phrase

ATTRIBUTES = ("objects", "colour_shape", "colours", "shapes", "cells")


@dataclass(frozen=True)
class Mention:
    colour: str | None
    shape: str | None
    cell: tuple[int, int] | None  # (row, col), None when no location phrase was found


def _location_phrases(grid: int) -> list[tuple[str, tuple[int, int]]]:
    """Every cell's phrase, longest first ("at the top left" before "at the top")."""
    phrases = [(location_phrase(row, col, grid), (row, col)) for row in range(grid) for col in range(grid)]
    return sorted(phrases, key=lambda item: -len(item[0]))


def _word(text: str, words) -> str | None:
    """The first of `words` in text as a whole word (a plural 's' allowed: "circles")."""
    found = [(m.start(), w) for w in words for m in [re.search(rf"\b{w}s?\b", text)] if m]
    return min(found)[1] if found else None


def parse_description(text: str, grid: int = 3) -> list[Mention]:
    """The objects a description mentions, in order."""
    phrases = _location_phrases(grid)
    mentions = []
    for clause in re.split(r",|\.|;|\band\b", text.lower()):
        colour, shape = _word(clause, COLOURS), _word(clause, SHAPES)
        if colour is None and shape is None:
            continue
        cell = next((c for phrase, c in phrases if re.search(rf"\b{phrase}\b", clause)), None)
        mentions.append(Mention(colour, shape, cell))
    return mentions


def _keys(attribute: str, colour, shape, cell):
    return {
        "objects": (colour, shape, cell),
        "colour_shape": (colour, shape),
        "colours": colour,
        "shapes": shape,
        "cells": cell,
    }[attribute]


@dataclass
class DescriptionScore:
    """Running totals over images; `result()` gives the percentages."""

    right: Counter = field(default_factory=Counter)
    mentioned: Counter = field(default_factory=Counter)
    present: Counter = field(default_factory=Counter)
    images: int = 0
    count_right: int = 0

    def add(self, mentions: list[Mention], objects: list[dict]) -> dict:
        """Adds one image (`objects`: its ground truth, {shape, colour, row, col} each);
        returns this image's counts of right objects, mentions and scene objects."""
        self.images += 1
        self.count_right += len(mentions) == len(objects)
        for attribute in ATTRIBUTES:
            said = Counter(_keys(attribute, m.colour, m.shape, m.cell) for m in mentions)
            truth = Counter(_keys(attribute, o["colour"], o["shape"], (o["row"], o["col"])) for o in objects)
            # One-to-one: a key with a part the description left out (None) matches nothing.
            right = sum((said & truth).values())
            self.right[attribute] += right
            self.mentioned[attribute] += len(mentions)
            self.present[attribute] += len(objects)
            if attribute == "objects":
                image = {"right": right, "mentioned": len(mentions), "present": len(objects)}
        return image

    def result(self) -> dict:
        def percent(a: int, b: int) -> float:
            return round(100.0 * a / b, 2) if b else 0.0

        out = {"images": self.images, "count_accuracy": percent(self.count_right, self.images)}
        for attribute in ATTRIBUTES:
            out[attribute] = {
                "precision": percent(self.right[attribute], self.mentioned[attribute]),
                "recall": percent(self.right[attribute], self.present[attribute]),
            }
        return out
