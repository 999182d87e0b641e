"""The converters (data_prep/convert.py) and image handling (vlm/data.py) as a specification.

Every fixture is written here in the source's official format, with each bad case in it; the
converted dataset is checked record by record, and every reject reason appears with its id.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from datasets import load_from_disk
from PIL import Image

from vlm.data import ImageCache, check_image_path, check_vqa_record, load_rgb
from data_prep import convert

# --- helpers ------------------------------------------------------------------------------------

def jpeg(path: Path, colour=(200, 30, 30), size=(24, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few hundred bytes: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def write_json(path: Path, data, raw_replace: tuple[bytes, bytes] | None = None) -> Path:
    """JSON as the official files are written; raw_replace swaps bytes afterwards (non-UTF-8 input)."""
    payload = json.dumps(data).encode()
    if raw_replace:
        assert raw_replace[0] in payload
        payload = payload.replace(*raw_replace)
    path.write_bytes(payload)
    return path


def prep(*argv) -> int:
    return convert.main([str(a) for a in argv])


def rejects_of(out: Path) -> dict[str, list[dict]]:
    rejects: dict[str, list[dict]] = {}
    for line in (out / "rejects.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert set(record) == {"id", "source_file", "reason"}
        rejects.setdefault(record["id"], []).append(record)
    return rejects


def assert_rejected(rejects: dict, expected: dict[str, str], source: Path | None = None) -> None:
    """Exactly these ids rejected, each with its reason (and file)."""
    assert set(rejects) == set(expected), (sorted(rejects), sorted(expected))
    for rid, reason in expected.items():
        assert any(reason in r["reason"] for r in rejects[rid]), (rid, rejects[rid])
        if source is not None:
            assert all(r["source_file"] == str(source) for r in rejects[rid])


# --- VQA v2 -------------------------------------------------------------------------------------

def vqa_answers(answer: str, n: int = 10) -> list[dict]:
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1} for k in range(n)]


def vqa_files(directory: Path, subtype: str, questions: list[dict], annotations: list[dict] | None,
              raw_replace=None) -> tuple[Path, Path | None]:
    q = write_json(directory / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
                   {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                    "data_subtype": subtype, "questions": questions}, raw_replace)
    if annotations is None:
        return q, None
    a = write_json(directory / f"v2_mscoco_{subtype}_annotations.json",
                   {"info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations})
    return q, a


def annotation(question_id, image_id, answer="red", n=10, answer_type="other", question_type="what color is the"):
    return {"question_type": question_type, "multiple_choice_answer": answer, "answers": vqa_answers(answer, n),
            "image_id": image_id, "answer_type": answer_type, "question_id": question_id}


@pytest.fixture
def coco_2014(tmp_path) -> Path:
    images = tmp_path / "train2014"
    for image_id, colour in [(1, (200, 30, 30)), (2, (30, 30, 200))]:
        jpeg(images / f"COCO_train2014_{image_id:012d}.jpg", colour)
        jpeg(images / f"COCO_val2014_{image_id:012d}.jpg", colour)
    (images / "COCO_train2014_000000000004.jpg").write_bytes(b"")                       # zero bytes
    good = (images / "COCO_train2014_000000000001.jpg").read_bytes()
    (images / "COCO_train2014_000000000005.jpg").write_bytes(good[: len(good) // 2])    # truncated
    (images / "COCO_train2014_000000000006.jpg").write_bytes(png_header_only(100_000, 100_000))  # bomb
    (images / "COCO_train2014_000000000007.jpg").write_bytes(b"not an image at all")     # corrupt
    return images


def vqa_train_fixture(directory: Path):
    questions = [
        {"image_id": 1, "question": "What color is the car?", "question_id": 1001},
        {"image_id": 1, "question": "  Is it parked? ", "question_id": 1002},
        {"image_id": 2, "question": "How many cars?", "question_id": 2001},
        {"image_id": 2, "question": "Repeated id?", "question_id": 1001},               # duplicate id
        {"image_id": 2, "question": "   ", "question_id": 2002},                         # empty question
        {"image_id": 2, "question": "Bell\x07 here?", "question_id": 2003},              # control char
        {"image_id": 2, "question": "Latin NONUTF8 text?", "question_id": 2004},         # not UTF-8
        {"image_id": 2, "question": "No annotation?", "question_id": 2005},              # no annotation
        {"image_id": 2, "question": "Nine answers?", "question_id": 2006},               # 9 answers
        {"image_id": 2, "question": "Is <image> here?", "question_id": 2007},            # a second image slot
        {"image_id": 3, "question": "Missing image?", "question_id": 3001},              # no such file
        {"image_id": 4, "question": "Empty image?", "question_id": 4001},
        {"image_id": 5, "question": "Truncated image?", "question_id": 5001},
        {"image_id": 6, "question": "Bomb?", "question_id": 6001},
        {"image_id": 7, "question": "Corrupt image?", "question_id": 7001},
    ]
    annotations = [
        annotation(1001, 1, "red"), annotation(1002, 1, "yes", answer_type="yes/no", question_type="is it"),
        annotation(2001, 2, "2", answer_type="number", question_type="how many"),
        annotation(2002, 2), annotation(2003, 2), annotation(2004, 2), annotation(2006, 2, n=9), annotation(2007, 2),
        annotation(3001, 3), annotation(4001, 4), annotation(5001, 5), annotation(6001, 6), annotation(7001, 7),
        annotation(9999, 2),                                                               # no such question
    ]
    expected = {
        "1001": "duplicate id", "2002": "empty text: field 'question' is empty",
        "2003": "control character: field 'question'", "2004": "not UTF-8: field 'question'",
        "2005": "question without annotation", "2007": "image placeholder: field 'question' holds <image>", "2006": "not 10 answers: field 'answers' must list 10 answers, got 9",
        "3001": "image not found", "4001": "image empty", "5001": "image unreadable", "6001": "image too large",
        "7001": "image unreadable", "9999": "annotation without question",
    }
    q, a = vqa_files(directory, "train2014", questions, annotations, raw_replace=(b"NONUTF8", b"\xe9\xff"))
    return q, a, expected


def test_vqav2_converts_every_good_record_and_rejects_each_bad_one_with_its_reason(tmp_path, coco_2014, capsys):
    q, a, expected = vqa_train_fixture(tmp_path)
    out = tmp_path / "out"
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", coco_2014, "--out", out) == 0

    train = load_from_disk(str(out / "vqa"))["train"]
    assert train.to_list() == [
        {"id": "1001", "image": "images/train2014/COCO_train2014_000000000001.jpg", "question": "What color is the car?",
         "answers": ["red"] * 10, "multiple_choice_answer": "red", "answer_type": "other", "question_type": "what color is the"},
        {"id": "1002", "image": "images/train2014/COCO_train2014_000000000001.jpg", "question": "Is it parked?",
         "answers": ["yes"] * 10, "multiple_choice_answer": "yes", "answer_type": "yes/no", "question_type": "is it"},
        {"id": "2001", "image": "images/train2014/COCO_train2014_000000000002.jpg", "question": "How many cars?",
         "answers": ["2"] * 10, "multiple_choice_answer": "2", "answer_type": "number", "question_type": "how many"},
    ]
    # Images are linked, not copied, and every stored path opens relative to OUT.
    assert (out / "images" / "train2014").is_symlink()
    assert os.readlink(out / "images" / "train2014") == str(coco_2014.resolve())
    assert all(load_rgb(out / r["image"]).mode == "RGB" for r in train)
    assert all(check_vqa_record(r) is None for r in train)

    rejects = rejects_of(out)
    assert_rejected(rejects, expected)
    assert rejects["9999"][0]["source_file"] == str(a) and rejects["2005"][0]["source_file"] == str(a)
    assert rejects["2002"][0]["source_file"] == str(q)
    summary = capsys.readouterr().out
    assert "read 15 entries from v2_OpenEnded_mscoco_train2014_questions.json, 14 entries from v2_mscoco_train2014_annotations.json" in summary
    assert "written: 3 records" in summary and "rejected: 13" in summary
    assert "        2  image unreadable" in summary and "        1  duplicate id" in summary


def test_vqav2_splits_add_up_in_one_dir_and_a_rerun_replaces_only_its_own_split_and_rejects(tmp_path, coco_2014):
    q, a, expected = vqa_train_fixture(tmp_path)
    out = tmp_path / "out"
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", coco_2014, "--out", out) == 0
    train_before = load_from_disk(str(out / "vqa"))["train"].to_list()
    val_q, val_a = vqa_files(tmp_path, "val2014", [{"image_id": 2, "question": "Which colour?", "question_id": 50}],
                             [annotation(50, 2, "blue")])
    assert prep("vqav2", "--questions", val_q, "--annotations", val_a, "--images", coco_2014, "--out", out) == 0

    vqa = load_from_disk(str(out / "vqa"))
    assert set(vqa) == {"train", "val"}
    assert vqa["train"].to_list() == train_before
    assert vqa["val"]["image"] == ["images/train2014/COCO_val2014_000000000002.jpg"]  # same folder, same link
    assert sorted(p.name for p in (out / "images").iterdir()) == ["train2014"]
    assert json.loads((out / "meta.json").read_text())["converted"]["vqa"]["val"]["records"] == 1

    # Converting train again: the same rejects once, not twice; the val split untouched.
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", coco_2014, "--out", out) == 0
    assert sum(len(v) for v in rejects_of(out).values()) == len(expected) == 13
    assert load_from_disk(str(out / "vqa"))["val"]["id"] == ["50"]


def test_vqav2_test_dev_without_annotations_converts_for_inference_only_and_training_refuses_it(tmp_path, coco_2014):
    images = tmp_path / "test2015"
    jpeg(images / "COCO_test2015_000000000009.jpg")
    q, _ = vqa_files(tmp_path, "test-dev2015", [{"image_id": 9, "question": "What is it?", "question_id": 90}], None)
    out = tmp_path / "out"
    assert prep("vqav2", "--questions", q, "--images", images, "--out", out) == 0
    record, = load_from_disk(str(out / "vqa"))["test_dev"].to_list()
    assert record == {"id": "90", "image": "images/test2015/COCO_test2015_000000000009.jpg", "question": "What is it?",
                      "answers": [], "multiple_choice_answer": "", "answer_type": "", "question_type": ""}
    assert "inference-only" in check_vqa_record(record)

    # train/val questions without their answers are an error, not an unlabeled training set.
    train_q, _ = vqa_files(tmp_path, "train2014", [{"image_id": 1, "question": "What?", "question_id": 1}], None)
    assert prep("vqav2", "--questions", train_q, "--images", coco_2014, "--out", out) == 1


def test_vqav2_finds_images_under_the_2017_naming(tmp_path):
    images = tmp_path / "train2017"
    jpeg(images / "000000000001.jpg")
    q, a = vqa_files(tmp_path, "train2014", [{"image_id": 1, "question": "What?", "question_id": 7}], [annotation(7, 1)])
    out = tmp_path / "out"
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", images, "--out", out) == 0
    assert load_from_disk(str(out / "vqa"))["train"]["image"] == ["images/train2017/000000000001.jpg"]


def test_on_bad_record_error_stops_naming_file_record_and_field(tmp_path, coco_2014, capsys):
    q, a, _ = vqa_train_fixture(tmp_path)
    out = tmp_path / "out"
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", coco_2014, "--out", out,
                "--on-bad-record", "error") == 1
    assert f"error: {q}: record 1001: duplicate id: field 'question_id' 1001" in capsys.readouterr().err
    assert not (out / "vqa").exists()


def test_a_broken_json_file_is_an_error_naming_file_and_line(tmp_path, coco_2014, capsys):
    q = tmp_path / "v2_OpenEnded_mscoco_train2014_questions.json"
    q.write_text('{"data_subtype": "train2014",\n "questions": [{"image_id": 1, "question": "x", "question_id": 1},\n {oops}]}')
    assert prep("vqav2", "--questions", q, "--images", coco_2014, "--out", tmp_path / "out") == 1
    assert f"{q}: not valid JSON at line 3" in capsys.readouterr().err


# --- LLaVA --------------------------------------------------------------------------------------

def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


def test_llava_places_image_keeps_text_only_and_rejects_bad_conversations_and_escaping_paths(tmp_path):
    images = tmp_path / "llava-images"
    jpeg(images / "coco" / "train2017" / "000000000001.jpg")
    jpeg(images / "gqa" / "images" / "2354786.jpg")
    outside = jpeg(tmp_path / "secret.jpg")
    (images / "coco" / "link.jpg").symlink_to(outside)
    data = [
        {"id": "a", "image": "coco/train2017/000000000001.jpg", "conversations": turns("What is this?\n<image>", "A car.")},
        {"id": "a", "image": "coco/train2017/000000000001.jpg", "conversations": turns("<image>\nColour?", "Red.")},
        {"id": "text", "conversations": turns("Write a haiku.", "Autumn moonlight...")},
        {"id": "later", "image": "gqa/images/2354786.jpg",
         "conversations": turns("Describe it.", "A street.", "<image> Any cars?", "Yes.")},
        {"id": "added", "image": "gqa/images/2354786.jpg", "conversations": turns("Describe it.", "A street.")},
        {"id": "two", "image": "gqa/images/2354786.jpg", "conversations": turns("<image> <image> Hi", "Hi.")},
        {"id": "gpt-first", "image": "gqa/images/2354786.jpg", "conversations": turns("x", "y")[::-1]},
        {"id": "no-alternation", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "ends-human", "conversations": turns("a", "b", "c")},
        {"id": "text-with-image", "conversations": turns("<image>\nWhat?", "Nothing.")},
        {"id": "empty-turn", "conversations": turns("Hi", "  ")},
        {"id": "dotdot", "image": "../secret.jpg", "conversations": turns("<image>\nx", "y")},
        {"id": "absolute", "image": str(outside), "conversations": turns("<image>\nx", "y")},
        {"id": "encoded", "image": "%2e%2e/secret.jpg", "conversations": turns("<image>\nx", "y")},
        {"id": "symlink-out", "image": "coco/link.jpg", "conversations": turns("<image>\nx", "y")},
        {"id": "missing", "image": "coco/train2017/000000000404.jpg", "conversations": turns("<image>\nx", "y")},
    ]
    source = write_json(tmp_path / "llava_v1_5_mix665k.json", data)
    out = tmp_path / "out"
    assert prep("llava", "--data", source, "--images", images, "--out", out) == 0

    records = load_from_disk(str(out / "conversations"))["train"].to_list()
    prefix = "images/llava-images"
    assert records == [
        {"id": "a", "image": f"{prefix}/coco/train2017/000000000001.jpg",
         "conversations": turns("<image>\nWhat is this?", "A car.")},
        {"id": "a-2", "image": f"{prefix}/coco/train2017/000000000001.jpg",
         "conversations": turns("<image>\nColour?", "Red.")},
        {"id": "text", "image": None, "conversations": turns("Write a haiku.", "Autumn moonlight...")},
        {"id": "later", "image": f"{prefix}/gqa/images/2354786.jpg",
         "conversations": turns("<image>\nDescribe it.", "A street.", "Any cars?", "Yes.")},
        {"id": "added", "image": f"{prefix}/gqa/images/2354786.jpg",
         "conversations": turns("<image>\nDescribe it.", "A street.")},
    ]
    assert_rejected(rejects_of(out), {
        "two": "image placeholder: field 'conversations': 2 <image> placeholders for one image",
        "gpt-first": "turns out of order: field 'conversations[0].from' is 'gpt'",
        "no-alternation": "turns out of order: field 'conversations[1].from' is 'human'",
        "ends-human": "turns out of order: field 'conversations' ends with a human turn",
        "text-with-image": "image placeholder: field 'conversations': 1 <image> placeholder(s) in a record without an image",
        "empty-turn": "empty text: field 'conversations[1].value' is empty",
        "dotdot": "image path escapes the image root", "absolute": "image path escapes the image root",
        "encoded": "image path escapes the image root", "symlink-out": "image path escapes the image root",
        "missing": "image not found",
    }, source)


# --- COCO captions and Flickr30k ------------------------------------------------------------------

def test_coco_captions(tmp_path):
    images = tmp_path / "train2017"
    jpeg(images / "000000000001.jpg")
    jpeg(images / "000000000002.jpg")
    source = write_json(tmp_path / "captions_train2017.json", {
        "info": {}, "licenses": [],
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 24, "width": 24},
                   {"id": 2, "file_name": "000000000002.jpg"}, {"id": 3, "file_name": "../../etc/passwd"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A red square.\n"},
            {"id": 11, "image_id": 2, "caption": "A blue square "},
            {"id": 10, "image_id": 2, "caption": "Same id again."},
            {"id": 12, "image_id": 2, "caption": ""},
            {"id": 13, "image_id": 99, "caption": "No such image."},
            {"id": 14, "image_id": 3, "caption": "Escaping file name."},
            {"id": 15, "image_id": 1, "caption": "A <image> token."},
        ]})
    out = tmp_path / "out"
    assert prep("coco-captions", "--captions", source, "--images", images, "--out", out) == 0
    assert load_from_disk(str(out / "captions"))["train"].to_list() == [
        {"id": "10", "image": "images/train2017/000000000001.jpg", "caption": "A red square."},
        {"id": "11", "image": "images/train2017/000000000002.jpg", "caption": "A blue square"},
    ]
    assert_rejected(rejects_of(out), {"10": "duplicate id", "12": "empty text: field 'caption'",
                                      "13": "unknown image: field 'image_id' 99",
                                      "14": "image path escapes the image root",
                                      "15": "image placeholder: field 'caption'"}, source)


def test_flickr30k_results_csv_needs_a_split_and_rejects_malformed_lines(tmp_path, capsys):
    images = tmp_path / "flickr30k_images"
    jpeg(images / "1000092795.jpg")
    jpeg(images / "10002456.jpg")
    source = tmp_path / "results.csv"
    source.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"          # the Kaggle file's broken line
        "10002456.jpg| 0| The same id twice .\n"
        "10002456.jpg| 1|   \n"
        "404.jpg| 0| An image that is not there .\n")
    out = tmp_path / "out"
    assert prep("flickr30k", "--captions", source, "--images", images, "--out", out) == 1
    assert "pass --split" in capsys.readouterr().err
    assert prep("flickr30k", "--captions", source, "--images", images, "--out", out, "--split", "train") == 0
    assert load_from_disk(str(out / "captions"))["train"].to_list() == [
        {"id": "1000092795.jpg#0", "image": "images/flickr30k_images/1000092795.jpg",
         "caption": "Two young guys with shaggy hair look at their hands ."},
        {"id": "1000092795.jpg#1", "image": "images/flickr30k_images/1000092795.jpg",
         "caption": "Two young , White males are outside near many bushes ."},
        {"id": "10002456.jpg#0", "image": "images/flickr30k_images/10002456.jpg",
         "caption": "Several men in hard hats are operating a giant pulley system ."},
    ]
    assert_rejected(rejects_of(out), {"line 5": "malformed line", "10002456.jpg#0": "duplicate id",
                                      "10002456.jpg#1": "empty text: field 'comment'", "404.jpg#0": "image not found"},
                    source)


def test_flickr30k_karpathy_json_writes_its_own_splits(tmp_path):
    images = tmp_path / "flickr30k-images"
    for name in ("1.jpg", "2.jpg", "3.jpg", "4.jpg"):
        jpeg(images / name)
    source = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "One."}, {"raw": "Uno."}]},
        {"filename": "2.jpg", "imgid": 1, "split": "restval", "sentences": [{"raw": "Two."}]},
        {"filename": "3.jpg", "imgid": 2, "split": "val", "sentences": [{"raw": "Three."}, {"raw": ""}]},
        {"filename": "4.jpg", "imgid": 3, "split": "test", "sentences": [{"raw": "Four."}]},
        {"imgid": 4, "split": "test", "sentences": [{"raw": "No file name."}]},
    ]})
    out = tmp_path / "out"
    assert prep("flickr30k", "--captions", source, "--images", images, "--out", out) == 0
    captions = load_from_disk(str(out / "captions"))
    assert {split: captions[split]["id"] for split in captions} == {
        "train": ["1.jpg#0", "1.jpg#1", "2.jpg#0"], "val": ["3.jpg#0"], "test": ["4.jpg#0"]}
    assert_rejected(rejects_of(out), {"3.jpg#1": "empty text: field 'sentences[1].raw'", "4": "malformed record"}, source)


# --- images ---------------------------------------------------------------------------------------

def saved(image: Image.Image, format: str, **params) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format, **params)
    buffer.seek(0)
    return Image.open(buffer)


def test_every_image_mode_loads_as_rgb_with_the_right_colours(tmp_path):
    red = (255, 0, 0)
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(255, 0, 0, 255), (0, 0, 0, 0)])          # opaque red, fully transparent black
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 255), (0, 0)])
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    cases = {
        "cmyk.tiff": (Image.new("CMYK", (1, 1), (0, 255, 255, 0)), [red]),
        "l.png": (Image.new("L", (1, 1), 77), [(77, 77, 77)]),
        "la.png": (la, [(0, 0, 0), (255, 255, 255)]),              # transparent -> white, not black
        "rgba.png": (rgba, [red, (255, 255, 255)]),
        "p.png": (palette, [red, (0, 0, 255)]),
        "p-transparent.png": (palette, [(255, 255, 255), (0, 0, 255)]),
        "i16.png": (sixteen, [(0, 0, 0), (128, 128, 128), (255, 255, 255)]),  # scaled, not clipped at 255
    }
    for name, (image, pixels) in cases.items():
        path = tmp_path / name
        image.save(path, transparency=0) if name == "p-transparent.png" else image.save(path)
        with Image.open(path) as opened:
            assert opened.mode == {"cmyk.tiff": "CMYK", "l.png": "L", "la.png": "LA", "rgba.png": "RGBA",
                                   "i16.png": "I;16"}.get(name, "P"), name
        rgb = load_rgb(path)
        assert rgb.mode == "RGB", name
        assert [rgb.getpixel((x, 0)) for x in range(rgb.width)] == pixels, name


def test_decompression_bombs_zero_byte_truncated_and_corrupt_images_are_errors_not_crashes(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(ValueError, match="image too large"):
        load_rgb(bomb)
    big = jpeg(tmp_path / "big.jpg", size=(64, 64))
    with pytest.raises(ValueError, match="image too large: .* is 64x64, more than 4000 pixels"):
        load_rgb(big, max_pixels=4000)
    assert load_rgb(big).size == (64, 64)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="image empty"):
        load_rgb(tmp_path / "empty.jpg")
    (tmp_path / "half.jpg").write_bytes(big.read_bytes()[:300])
    with pytest.raises(ValueError, match="image unreadable"):
        load_rgb(tmp_path / "half.jpg")
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_rgb(tmp_path / "nope.jpg")


def test_max_pixels_flag_rejects_large_images_in_a_conversion(tmp_path):
    images = tmp_path / "train2017"
    jpeg(images / "000000000001.jpg", size=(64, 64))
    jpeg(images / "000000000002.jpg", size=(8, 8))
    source = write_json(tmp_path / "captions_train2017.json", {"images": [
        {"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}], "annotations": [
        {"id": 1, "image_id": 1, "caption": "Big."}, {"id": 2, "image_id": 2, "caption": "Small."}]})
    out = tmp_path / "out"
    assert prep("coco-captions", "--captions", source, "--images", images, "--out", out, "--max-pixels", 1000) == 0
    assert load_from_disk(str(out / "captions"))["train"]["id"] == ["2"]
    assert_rejected(rejects_of(out), {"1": "image too large"})


@pytest.mark.parametrize("path", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "%2e%2e/x.jpg", "a/%2E%2E/%2e%2e/x.jpg",
                                  "..\\x.jpg", "C:\\x.jpg", ""])
def test_image_paths_that_escape_the_root_are_refused(path):
    with pytest.raises(ValueError, match="escapes the image root"):
        check_image_path(path)


def test_training_time_image_cache_follows_a_symlinked_image_root_but_refuses_escapes(tmp_path, tiny_processor):
    real = tmp_path / "real-images"
    jpeg(real / "a.jpg")
    jpeg(tmp_path / "outside.jpg")
    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    (dataset / "images" / "coco").symlink_to(real)
    cache = ImageCache(tiny_processor.image_processor, dataset)
    assert cache("images/coco/a.jpg").ndim == 3
    for escape in ["../outside.jpg", "images/../../outside.jpg", str(tmp_path / "outside.jpg")]:
        with pytest.raises(ValueError, match="escapes the image root"):
            cache(escape)


# --- the stages read it -----------------------------------------------------------------------------

def test_a_converted_vqa_dataset_trains_in_sft(tmp_path, coco_2014, tiny_overrides):
    from vlm.config import load_config
    from stages import sft

    q, a, _ = vqa_train_fixture(tmp_path)
    out = tmp_path / "vqa-data"
    assert prep("vqav2", "--questions", q, "--annotations", a, "--images", coco_2014, "--out", out) == 0
    val_q, val_a = vqa_files(tmp_path, "val2014", [{"image_id": 2, "question": "Which colour?", "question_id": 50}],
                             [annotation(50, 2, "blue")])
    assert prep("vqav2", "--questions", val_q, "--annotations", val_a, "--images", coco_2014, "--out", out) == 0
    overrides = [*tiny_overrides, "data.source=disk", f"data.dir={out}", "data.test_split=val",
                 f"output_root={tmp_path / 'runs'}", "sft.steps=3", "sft.save_steps=3", "sft.batch_size=2"]
    config = load_config(REPO / "configs/default.yaml", overrides)
    metrics = sft.train(config)
    assert metrics["steps"] == 3 and metrics["examples"] == 3 and metrics["rejected"] == 0
    assert (config.run_dir / "sft" / "final" / "model.safetensors").is_file()
    # ...and evaluation scores its val split (VQA v2 has no test answers: val stands in for test).
    from vlm import evaluation as evaluate

    config = load_config(REPO / "configs/default.yaml", [*overrides, "eval.split=val"])
    scored = evaluate.evaluate(config, config.run_dir / "sft" / "final", "sft")
    assert scored["count"] == 1 and 0 <= scored["vqa_accuracy"] <= 100


# --- commands -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["prep", "vqav2"], ["prep", "llava"], ["prep", "coco-captions"],
                                     ["prep", "flickr30k"], ["bench", "convert"]])
def test_converter_commands_explain_themselves(command):
    done = subprocess.run([sys.executable, "-m", "stages.cli", *command, "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vqa-rlhf " + " ".join(command))


def test_prep_with_a_config_still_works_and_its_help_lists_the_converters(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stages.cli", "prep", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "vqa-rlhf prep vqav2 --questions" in done.stdout and "configs/default.yaml" in done.stdout


def test_bench_convert_prints_seconds_records_per_second_and_peak_memory(capsys):
    from bench import convert_vqav2

    assert convert_vqav2.main(["--questions", "300"]) == 0
    printed = capsys.readouterr().out
    assert "300 records written" in printed and "records/s" in printed and "s CPU, peak RSS" in printed


@pytest.mark.parametrize("block", [1, 7, 64])
def test_json_streaming_across_block_boundaries_gives_the_same_records(tmp_path, monkeypatch, block):
    # Tiny blocks cut every value, number, multi-byte UTF-8 character and invalid byte somewhere.
    data = [{"id": 12345678, "image": "a/ü/€.jpg", "conversations": turns("Grüße, 𝔘nicode?", "Ja.")},
            {"id": "x", "value": [1.5e3, True, None, False, "bad \xff byte"]}, {"id": 9, "nested": {"a": [[], {}]}}]
    path = write_json(tmp_path / "data.json", data, raw_replace=(b"\\u00ff", b"\xff"))
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"}, {", b"},\n {"))  # a BOM, and newlines
    expected = [element for _, element in convert.json_records(path)]
    assert expected[0] == data[0] and expected[1]["value"][4] == "bad \udcff byte"
    monkeypatch.setattr(convert.JsonStream, "BLOCK", block)
    assert [element for _, element in convert.json_records(path)] == expected
    header = {}
    wrapped = write_json(tmp_path / "wrapped.json", {"before": {"k": 1}, "items": data[:1], "after": 7})
    assert list(convert.json_records(wrapped, ("items",), header)) == [("items", data[0])]
    assert header == {"before": {"k": 1}, "after": 7}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"a": 1},\n {"b": 2},\n {"c": ]')
    with pytest.raises(convert.InputError, match="not valid JSON at line 3 column"):
        list(convert.json_records(broken))
