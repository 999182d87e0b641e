"""The built-in scenes' vocabulary and the grammar of their position-first captions.

One place for the words a scene is described with, because three readers must agree on them:
the generator writes captions with them (data_prep/synthetic.py), the vision stage reads the
regions back as training targets (vlm/regions.py), and the description metric parses a model's
descriptions with them (vlm/describe_metric.py)."""
from __future__ import annotations

import re

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")

# Answer words of the `position` family (the column of the object) for the
# default 3 x 3 grid, and the matching row words used in captions.
POSITIONS = ("left", "middle", "right")
ROW_WORDS = ("top", "middle", "bottom")

# Column / row words for each supported grid size.  Larger grids would need
# words like "second from the left", which the question templates do not
# support, so the config rejects them.
COLUMN_WORDS_BY_GRID = {1: ("middle",), 2: ("left", "right"), 3: POSITIONS}
ROW_WORDS_BY_GRID = {1: ("middle",), 2: ("top", "bottom"), 3: ROW_WORDS}


def cell_name(row: int, col: int, grid: int) -> str:
    """'top left', 'top', 'left', 'middle', ... (a middle row/column is dropped)."""
    row_word = ROW_WORDS_BY_GRID[grid][row]
    col_word = COLUMN_WORDS_BY_GRID[grid][col]
    if row_word == "middle":
        return col_word
    if col_word == "middle":
        return row_word
    return f"{row_word} {col_word}"


def _place_phrase(name: str) -> str:
    """'in the middle', 'on the left', 'at the top left': a place name with its preposition."""
    if name == "middle":
        return "in the middle"
    if name in ("left", "right"):
        return f"on the {name}"
    return f"at the {name}"


def location_phrase(row: int, col: int, grid: int) -> str:
    return _place_phrase(cell_name(row, col, grid))


def side_phrase(col: int, grid: int) -> str:
    """'on the left', 'in the middle', 'on the right': the column alone, in the words the
    `position` family answers with."""
    return _place_phrase(COLUMN_WORDS_BY_GRID[grid][col])


def caption_regions(caption: str, grid: int) -> dict[int, dict[str, str]]:
    """What a caption says is in each cell: {row * grid + col: {"colour": ..., "shape": ...}}.

    The inverse of `caption_for`, read from the text alone (the vision stage's region-text
    targets): every phrase is '<location> <article> <colour> <shape>'. A caption outside that
    grammar is a ValueError naming the phrase."""
    locations = {location_phrase(r, c, grid): r * grid + c for r in range(grid) for c in range(grid)}
    body = re.sub(r"^the [^.]*\. ", "", caption.strip()).removesuffix(".")  # a shape summary says no cell
    phrases = re.split(r", | and ", body)
    regions: dict[int, dict[str, str]] = {}
    for phrase in phrases:
        words = phrase.split()
        location = " ".join(words[:-3])
        if len(words) < 5 or location not in locations or words[-3] not in ("a", "an") \
                or words[-2] not in COLOURS or words[-1] not in SHAPES:
            raise ValueError(f"caption phrase {phrase!r} is not '<location> a <colour> <shape>' "
                             f"(caption: {caption!r})")
        regions[locations[location]] = {"colour": words[-2], "shape": words[-1]}
    return regions
