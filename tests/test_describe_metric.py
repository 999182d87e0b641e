"""Description quality (vlm/describe_metric.py) against hand-computed values."""
from datasets import load_from_disk

from vlm.describe_metric import DescriptionScore, Mention, parse_description


def score_descriptions(descriptions: list[str], scenes: list[list[dict]], grid: int = 3) -> dict:
    """Percent precision / recall of what `descriptions` say about `scenes` (same order)."""
    if len(descriptions) != len(scenes):
        raise ValueError(f"{len(descriptions)} descriptions for {len(scenes)} scenes")
    score = DescriptionScore()
    for text, objects in zip(descriptions, scenes):
        score.add(parse_description(text, grid), objects)
    return score.result()



def obj(colour, shape, row, col):
    return {"colour": colour, "shape": shape, "row": row, "col": col}


SCENE_A = [obj("red", "circle", 0, 0), obj("blue", "square", 1, 1), obj("green", "triangle", 2, 2)]
SCENE_B = [obj("orange", "square", 0, 1)]
# One object with the wrong shape, one not in the scene at all.
TEXT_A = ("at the top left a red circle, in the middle a blue triangle and at the bottom right a green "
          "triangle and on the left a yellow square.")
TEXT_B = "at the top an orange square."


def test_descriptions_are_read_as_the_generator_writes_them():
    assert parse_description(TEXT_A) == [
        Mention("red", "circle", (0, 0)), Mention("blue", "triangle", (1, 1)),
        Mention("green", "triangle", (2, 2)), Mention("yellow", "square", (1, 0)),
    ]
    assert parse_description(TEXT_B) == [Mention("orange", "square", (0, 1))]
    # No location phrase: no cell; a clause naming neither colour nor shape is no object.
    assert parse_description("a red circles. nothing else") == [Mention("red", "circle", None)]


def test_precision_and_recall_by_hand():
    result = score_descriptions([TEXT_A, TEXT_B], [SCENE_A, SCENE_B])
    # objects: A 2 right of 4 said, 3 present; B 1 of 1, 1 present -> 3/5, 3/4
    assert result["objects"] == {"precision": 60.0, "recall": 75.0}
    assert result["colour_shape"] == {"precision": 60.0, "recall": 75.0}
    # colours: A red, blue, green right (yellow not): 3/4; B 1/1 -> 4/5, 4/4
    assert result["colours"] == {"precision": 80.0, "recall": 100.0}
    assert result["shapes"] == {"precision": 80.0, "recall": 100.0}  # circle, triangle, square of A's 4 said
    assert result["cells"] == {"precision": 80.0, "recall": 100.0}
    assert result["count_accuracy"] == 50.0 and result["images"] == 2
    unplaced = score_descriptions(["a red circle"], [[obj("red", "circle", 0, 0)]])
    assert unplaced["objects"] == {"precision": 0.0, "recall": 0.0}
    assert unplaced["colour_shape"] == {"precision": 100.0, "recall": 100.0}


def test_the_generators_own_captions_score_100(tiny_data_dir):
    captions = load_from_disk(str(tiny_data_dir / "captions"))["train"]
    result = score_descriptions(captions["caption"], captions["objects"])
    assert result["objects"] == {"precision": 100.0, "recall": 100.0}
    assert result["count_accuracy"] == 100.0
