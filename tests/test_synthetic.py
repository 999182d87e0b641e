"""Tests for data_prep/synthetic.py on tiny datasets."""

import collections
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict, load_from_disk
from PIL import Image

from data_prep import synthetic
from data_prep.synthetic import (
    COLOUR_JITTER,
    COLOUR_RGB,
    COLOURS,
    IMAGE_TOKEN,
    NONE_ANSWER,
    SHAPES,
    SPLITS,
    SceneObject,
    SyntheticConfig,
    caption_regions,
    generate,
    normalize_answer,
    shape_summary,
    side_phrase,
)

TINY = SyntheticConfig(train_images=60, val_images=15, test_images=15, rl_images=15, seed=3)
KINDS = ("vqa", "captions", "conversations")


def load_records(out_dir: Path) -> dict:
    """{kind: {split: [record, ...]}} for the whole dataset."""
    return {
        kind: {split: ds.to_list() for split, ds in load_from_disk(str(out_dir / kind)).items()}
        for kind in KINDS
    }


def scenes_by_image(records: dict) -> dict:
    return {
        r["image"]: r["objects"] for split in SPLITS for r in records["captions"][split]
    }


def all_vqa(records: dict) -> list:
    return [r for split in SPLITS for r in records["vqa"][split]]


def count(objects, **attributes) -> int:
    return sum(all(o[k] == v for k, v in attributes.items()) for o in objects)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("synthetic") / "data"
    generate(TINY, out_dir, progress=False)
    return out_dir


@pytest.fixture(scope="module")
def records(dataset_dir) -> dict:
    return load_records(dataset_dir)


def test_layout_and_load_from_disk(dataset_dir, records):
    for kind in KINDS:
        dataset = load_from_disk(str(dataset_dir / kind))
        assert isinstance(dataset, DatasetDict)
        assert set(dataset) == set(SPLITS)
    for split in SPLITS:
        images = TINY.images(split)
        assert len(records["captions"][split]) == images
        assert len(records["conversations"][split]) == images
        assert len(records["vqa"][split]) == images * TINY.questions_per_image
        for r in records["captions"][split]:
            assert (dataset_dir / r["image"]).is_file()
            assert re.fullmatch(rf"images/{split}/\d{{6}}\.png", r["image"])
    assert (dataset_dir / "meta.json").is_file()
    # No temp dir left next to the dataset.
    assert [p.name for p in dataset_dir.parent.iterdir()] == ["data"]


def test_vqa_record_schema(records):
    ids = [r["id"] for r in all_vqa(records)]
    assert len(ids) == len(set(ids))
    for r in all_vqa(records):
        assert set(r) == {
            "id", "image", "question", "answers", "multiple_choice_answer",
            "answer_type", "question_type", "question_family",
        }
        assert r["answer_type"] in ("yes/no", "number", "other")
        assert r["question"].lower().startswith(r["question_type"])


def test_same_seed_is_identical_and_other_seed_differs(dataset_dir, records, tmp_path):
    again = tmp_path / "again"
    generate(TINY, again, progress=False)
    assert load_records(again) == records
    for r in records["captions"]["train"] + records["captions"]["test"]:
        assert (again / r["image"]).read_bytes() == (dataset_dir / r["image"]).read_bytes()

    other = tmp_path / "other"
    generate(SyntheticConfig(train_images=60, val_images=15, test_images=15, seed=4), other, progress=False)
    other_records = load_records(other)
    assert other_records["vqa"] != records["vqa"]
    assert other_records["captions"] != records["captions"]
    first = "images/train/000000.png"
    assert not np.array_equal(
        np.asarray(Image.open(other / first)), np.asarray(Image.open(dataset_dir / first))
    )


def test_splits_share_no_image_and_no_scene(records):
    images = {split: {r["image"] for r in records["captions"][split]} for split in SPLITS}
    signatures = {
        split: {
            tuple(sorted((o["shape"], o["colour"], o["row"], o["col"]) for o in r["objects"]))
            for r in records["captions"][split]
        }
        for split in SPLITS
    }
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not images[a] & images[b]
                if {a, b} != {"train", "rl"}:  # rl draws from train's slice of the scene space
                    assert not signatures[a] & signatures[b]
    for split in SPLITS:
        for kind in KINDS:
            assert {r["image"] for r in records[kind][split]} <= images[split]


def test_ten_answers_with_canonical_plurality(records):
    noisy = 0
    for r in all_vqa(records):
        canonical = r["multiple_choice_answer"]
        assert len(r["answers"]) == 10
        assert normalize_answer(canonical) == canonical
        votes = collections.Counter(normalize_answer(a) for a in r["answers"])
        assert all(votes[canonical] > n for a, n in votes.items() if a != canonical), r
        noisy += votes[canonical] < 10
    # Annotator noise is there, so the VQA metric's partial credit matters.
    assert noisy > len(all_vqa(records)) // 4


def test_every_family_and_answer_type_present(records):
    vqa = all_vqa(records)
    assert {r["answer_type"] for r in vqa} == {"yes/no", "number", "other"}
    assert {r["question_family"] for r in vqa} == set(synthetic.FAMILIES)
    assert {r["multiple_choice_answer"] for r in vqa if r["question_family"] == "exists"} == {"yes", "no"}


def test_questions_per_image_are_distinct(records):
    by_image = collections.defaultdict(list)
    for r in all_vqa(records):
        by_image[r["image"]].append(r["question"])
    for questions in by_image.values():
        assert len(questions) == len(set(questions)) == TINY.questions_per_image


def test_answers_match_the_scene(records):
    scenes = scenes_by_image(records)
    for r in all_vqa(records):
        objects, question, answer = scenes[r["image"]], r["question"], r["multiple_choice_answer"]
        family = r["question_family"]
        if family == "exists":
            colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question).groups()
            assert answer == ("yes" if count(objects, colour=colour, shape=shape) else "no")
        elif family == "count_shape":
            (shape,) = re.fullmatch(r"How many (\w+)s are there\?", question).groups()
            assert answer == str(count(objects, shape=shape))
        elif family == "count_colour":
            (colour,) = re.fullmatch(r"How many (\w+) objects are there\?", question).groups()
            assert answer == str(count(objects, colour=colour))
        elif family == "count_all":
            assert answer == str(len(objects))
        elif family == "shape_of_colour":
            (colour,) = re.fullmatch(r"What shape is the (\w+) object\?", question).groups()
            (target,) = [o for o in objects if o["colour"] == colour]
            assert answer == target["shape"]
        elif family == "position":
            colour, shape = re.fullmatch(r"Which side is the (\w+) (\w+) on\?", question).groups()
            (target,) = [o for o in objects if o["colour"] == colour and o["shape"] == shape]
            assert answer == ("left", "middle", "right")[target["col"]]


def test_colour_of_shape_is_unique_and_drawn_in_that_colour(dataset_dir, records):
    scenes = scenes_by_image(records)
    checked = 0
    for r in all_vqa(records):
        if r["question_family"] != "colour_of_shape":
            continue
        (shape,) = re.fullmatch(r"What color is the (\w+)\?", r["question"]).groups()
        matching = [o for o in scenes[r["image"]] if o["shape"] == shape]
        assert len(matching) == 1
        (target,) = matching
        assert r["multiple_choice_answer"] == target["colour"]

        x0, y0, x1, y1 = target["bbox"]
        pixel = np.asarray(Image.open(dataset_dir / r["image"]).convert("RGB"))[(y0 + y1) // 2, (x0 + x1) // 2]
        difference = np.abs(pixel.astype(int) - np.array(COLOUR_RGB[target["colour"]]))
        assert difference.max() <= COLOUR_JITTER, (r, pixel)
        checked += 1
    assert checked > 0


def test_objects_stay_in_their_cells(records):
    cell = TINY.cell_size
    for objects in scenes_by_image(records).values():
        assert 1 <= len(objects) <= TINY.max_objects
        assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            assert o["col"] * cell <= x0 <= x1 < (o["col"] + 1) * cell
            assert o["row"] * cell <= y0 <= y1 < (o["row"] + 1) * cell
            assert 0.6 * cell - 1 <= x1 - x0 + 1 <= 0.9 * cell + 1
            assert o["shape"] in SHAPES and o["colour"] in COLOURS


def test_captions_mention_every_object(records):
    for split in SPLITS:
        for r in records["captions"][split]:
            caption = r["caption"]
            position = 0
            for o in r["objects"]:  # row-major order, as described
                where = synthetic.location_phrase(o["row"], o["col"], TINY.grid)
                phrase = f"{where} {synthetic.article(o['colour'])} {o['colour']} {o['shape']}"
                found = caption.find(phrase, position)
                assert found >= 0, (phrase, caption)
                position = found + len(phrase)
            assert caption.endswith(".")


def test_conversations_format(records):
    none_answers = 0
    for split in SPLITS:
        captions = {r["image"]: r["caption"] for r in records["captions"][split]}
        for r in records["conversations"][split]:
            turns = r["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert 2 <= len(turns) // 2 <= 3
            assert turns[0]["value"] == f"{IMAGE_TOKEN}\nDescribe the image."
            assert turns[1]["value"] == captions[r["image"]]
            assert all(IMAGE_TOKEN not in t["value"] for t in turns[1:])
            none_answers += sum(t["value"] == NONE_ANSWER for t in turns)
    assert none_answers > 0


def test_corpus_texts(dataset_dir, records):
    texts = list(synthetic.corpus_texts(dataset_dir))
    assert all(isinstance(t, str) and t and IMAGE_TOKEN not in t for t in texts)
    texts = set(texts)
    train = records["vqa"]["train"]
    assert {r["question"] for r in train} <= texts
    assert {a for r in train for a in r["answers"]} <= texts
    assert {r["caption"] for r in records["captions"]["train"]} <= texts
    assert "Describe the image." in texts
    # Only train text: val-only questions must not leak into the tokenizer corpus.
    val_only = {r["question"] for r in records["vqa"]["val"]} - {r["question"] for r in train}
    assert not val_only & texts


def test_existing_dataset_same_config_skips_other_config_raises(dataset_dir, capsys):
    meta_before = (dataset_dir / "meta.json").stat().st_mtime_ns
    counts = generate(TINY, dataset_dir, progress=False)
    assert "skipping" in capsys.readouterr().out
    assert (dataset_dir / "meta.json").stat().st_mtime_ns == meta_before
    assert counts["train"]["questions"] == TINY.train_images * TINY.questions_per_image

    with pytest.raises(FileExistsError, match="different config"):
        generate(SyntheticConfig(train_images=61, val_images=15, test_images=15, rl_images=15, seed=3), dataset_dir)


def test_non_dataset_dir_is_not_overwritten(tmp_path):
    out_dir = tmp_path / "busy"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="no meta.json"):
        generate(TINY, out_dir, progress=False)
    assert (out_dir / "notes.txt").read_text() == "mine"


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "caption_for", crash)
    with pytest.raises(KeyboardInterrupt):
        generate(TINY, tmp_path / "data", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_counts_and_meta(dataset_dir, records):
    import json

    meta = json.loads((dataset_dir / "meta.json").read_text())
    assert meta["config"] == {
        "image_size": 48, "grid": 3, "max_objects": 4, "questions_per_image": 4,
        "train_images": 60, "val_images": 15, "test_images": 15, "rl_images": 15, "seed": 3,
        "min_object_scale": 0.6, "max_object_scale": 0.9, "position_jitter": 1.0, "caption_summary": False,
    }
    for split in SPLITS:
        vqa = records["vqa"][split]
        assert meta["counts"][split]["answer_type"] == dict(
            sorted(collections.Counter(r["answer_type"] for r in vqa).items())
        )


def test_cli(tmp_path, capsys):
    status = synthetic.main([
        "--out", str(tmp_path / "cli"), "--train-images", "8", "--val-images", "2",
        "--test-images", "2", "--rl-images", "2", "--questions-per-image", "2", "--seed", "5", "--no-progress",
    ])
    assert status == 0
    assert load_from_disk(str(tmp_path / "cli" / "vqa"))["train"].num_rows == 16
    assert "train: 8 images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0
    assert "--max-objects" in capsys.readouterr().out


@pytest.mark.parametrize(
    "bad", [dict(grid=4), dict(max_objects=10), dict(max_objects=0), dict(questions_per_image=0), dict(val_images=-1),
            dict(caption_summary="maybe")]
)
def test_invalid_config_raises(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_two_by_two_grid(tmp_path):
    config = SyntheticConfig(image_size=32, grid=2, max_objects=3, train_images=20, val_images=5, test_images=5,
                             rl_images=5)
    generate(config, tmp_path / "g2", progress=False)
    vqa = load_from_disk(str(tmp_path / "g2" / "vqa"))["train"]
    sides = {r["multiple_choice_answer"] for r in vqa if r["question_family"] == "position"}
    assert sides <= {"left", "right"}


def test_position_jitter_zero_centres_every_object_in_its_cell(tmp_path):
    config = SyntheticConfig(train_images=20, val_images=2, test_images=2, rl_images=2, seed=1, position_jitter=0.0)
    synthetic.generate(config, tmp_path / "centred", progress=False)
    from datasets import load_from_disk

    cell = config.cell_size
    for record in load_from_disk(str(tmp_path / "centred" / "captions"))["train"]:
        for o in record["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            size = x1 - x0 + 1
            assert abs((x0 - o["col"] * cell) - (cell - size) / 2) <= 0.5
            assert abs((y0 - o["row"] * cell) - (cell - size) / 2) <= 0.5


# ---------------------------------------------------------------- the rl split

def split_digests(out_dir: Path, splits) -> dict:
    """A digest per split of its records (every kind) and its image files' bytes."""
    import hashlib
    import json

    digests = {}
    for split in splits:
        digest = hashlib.sha256()
        for kind in KINDS:
            for record in load_from_disk(str(out_dir / kind))[split]:
                digest.update(json.dumps(record, sort_keys=True).encode())
        for path in sorted((out_dir / "images" / split).iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digests[split] = digest.hexdigest()[:16]
    return digests


# Digests of train / val / test written by the generator before the rl split existed (commit
# 1a8cacf), for the tests' tiny config and the default run's: other runs' measurements were
# made on exactly these, so adding a split must not change a byte of them.
BEFORE_THE_RL_SPLIT = {
    "tiny": ({"train_images": 30, "val_images": 6, "test_images": 6},
             {"train": "07fd01f231ac5ba2", "val": "010183ece339bf71", "test": "02f8c21780b67690"}),
    "default": ({}, {"train": "8e174a0b7dbae528", "val": "6b8673af87548f31", "test": "f5002d7037dc007e"}),
}


@pytest.mark.parametrize("name", list(BEFORE_THE_RL_SPLIT))
def test_train_val_test_are_byte_identical_to_before_the_rl_split(name, tmp_path):
    sizes, expected = BEFORE_THE_RL_SPLIT[name]
    generate(SyntheticConfig(seed=0, **sizes), tmp_path / name, progress=False)
    assert split_digests(tmp_path / name, ("train", "val", "test")) == expected


def test_rl_split_is_new_images_from_the_train_distribution(records):
    rl = records["captions"]["rl"]
    assert len(rl) == TINY.rl_images
    assert {r["image"] for r in rl}.isdisjoint({r["image"] for r in records["captions"]["train"]})
    signature = lambda r: synthetic.split_of_signature(
        synthetic.scene_signature([synthetic.SceneObject(o["shape"], o["colour"], o["row"], o["col"], (), ())
                                   for o in r["objects"]]), TINY.seed)
    assert {signature(r) for r in rl} == {"train"}  # never a val or test layout
    assert {r["question_family"] for r in records["vqa"]["rl"]} == set(synthetic.FAMILIES)


def test_a_dataset_made_before_the_rl_split_gets_it_added_and_keeps_the_rest(dataset_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dataset_dir, old)
    before = split_digests(old, ("train", "val", "test"))
    # what the generator wrote before: no rl split, no rl_images in its config
    meta = json.loads((old / "meta.json").read_text())
    del meta["config"]["rl_images"], meta["counts"]["rl"]
    (old / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(old / "images" / "rl")
    for kind in KINDS:
        without = DatasetDict({s: d for s, d in load_from_disk(str(dataset_dir / kind)).items() if s != "rl"})
        shutil.rmtree(old / kind)
        without.save_to_disk(str(old / kind))

    counts = generate(TINY, old, progress=False)
    assert counts["rl"]["images"] == TINY.rl_images
    assert split_digests(old, ("train", "val", "test")) == before
    assert split_digests(old, ("rl",)) == split_digests(dataset_dir, ("rl",))  # as a fresh run writes it
    assert json.loads((old / "meta.json").read_text())["config"]["rl_images"] == TINY.rl_images
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in dataset_dir.iterdir())


def test_caption_summary_opens_each_caption_with_a_lookup_by_shape(tmp_path):
    """data.synthetic.caption_summary: every colour word of the opening sentence follows its
    shape; the rest of the caption, its region targets and the conversations' descriptions are
    what they are without it."""
    kwargs = dict(train_images=12, val_images=2, test_images=2, rl_images=2, seed=5)
    generate(SyntheticConfig(**kwargs), tmp_path / "plain", progress=False)
    generate(SyntheticConfig(**kwargs, caption_summary=True), tmp_path / "summed", progress=False)
    plain, summed = load_records(tmp_path / "plain"), load_records(tmp_path / "summed")
    for before, after in zip(plain["captions"]["train"], summed["captions"]["train"]):
        summary, rest = after["caption"].split(". ", 1)
        assert rest == before["caption"]
        for obj in before["objects"]:
            side = side_phrase(obj["col"], 3)
            assert re.search(rf"the {obj['shape']}s? (is|are) [a-z, ]*\b{obj['colour']} {side}\b", summary)
        assert caption_regions(after["caption"], 3) == caption_regions(before["caption"], 3)
    assert summed["conversations"] == plain["conversations"]
    assert summed["vqa"] == plain["vqa"]


def test_shape_summary_wording():
    objects = [SceneObject("circle", "red", 0, 0, (0, 0, 9, 9), (255, 0, 0)),
               SceneObject("square", "blue", 0, 1, (16, 0, 25, 9), (0, 0, 255)),
               SceneObject("square", "green", 2, 2, (32, 32, 41, 41), (0, 255, 0))]
    assert shape_summary(objects, 3) == \
        "the circle is red on the left, the squares are blue in the middle and green on the right."
    assert shape_summary(objects[:2], 2) == "the circle is red on the left, the square is blue on the right."


def test_a_dataset_written_before_caption_summary_existed_is_still_the_same_config(dataset_dir, tmp_path):
    """A stored config without the field means the field's old behaviour (off): no refusal."""
    copy = tmp_path / "old"
    shutil.copytree(dataset_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    del meta["config"]["caption_summary"]
    (copy / "meta.json").write_text(json.dumps(meta))
    assert generate(TINY, copy, progress=False) == meta["counts"]


def test_a_version_2_dataset_is_reused_without_a_summary_and_refused_with_one(dataset_dir, tmp_path):
    """Generator version 3 changed only the summary's words (sides added)."""
    copy = tmp_path / "old"
    shutil.copytree(dataset_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["generator_version"] = 2
    (copy / "meta.json").write_text(json.dumps(meta))
    assert generate(TINY, copy, progress=False) == meta["counts"]
    meta["config"]["caption_summary"] = True
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="different config or generator version"):
        generate(dataclasses.replace(TINY, caption_summary=True), copy, progress=False)
