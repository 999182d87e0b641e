"""Conversion speed and memory of `vqa-rlhf prep vqav2` on a VQA v2-sized annotation set.

    vqa-rlhf bench convert [--questions 443757] [--keep DIR]

Writes questions + annotations in the official format (v2_OpenEnded_mscoco_train2014_questions.json,
v2_mscoco_train2014_annotations.json: 10 answers per question with answer_confidence and
answer_id, multiple_choice_answer, answer_type, question_type; COCO-style image ids, about 5.4
questions per image as in VQA v2 train) into a temp dir, converts them in a child process
without images (--skip-image-check) and prints wall seconds, records/s and the child's peak
RSS. Targets (issue 3): under 60 s and under 4 GB for the full 443,757 questions.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_SECONDS, TARGET_BYTES = 60, 4 * 1024**3

# (question_type, answer_type, answers) drawn like VQA v2's mix of yes/no, number and other.
QUESTION_KINDS = [
    ("is the", "yes/no", ["yes", "no"]),
    ("are there", "yes/no", ["yes", "no"]),
    ("how many", "number", ["1", "2", "3", "4", "5", "0", "6", "10"]),
    ("what color is the", "other", ["red", "white", "black", "blue", "green", "brown", "yellow", "gray"]),
    ("what is the man", "other", ["surfing", "skiing", "eating", "playing tennis", "sitting", "talking on phone"]),
    ("what sport is", "other", ["tennis", "baseball", "frisbee", "soccer", "skateboarding"]),
    ("where is the", "other", ["on table", "in sky", "beach", "kitchen", "street", "on wall"]),
]


def write_vqa_files(directory: Path, n_questions: int, seed: int = 0) -> tuple[Path, Path]:
    """Official-format files, written record by record (never one giant object in memory)."""
    rng = random.Random(seed)
    n_images = max(1, round(n_questions / 5.36))
    image_ids = sorted(rng.sample(range(1, 581_930), n_images))
    questions_path = directory / "v2_OpenEnded_mscoco_train2014_questions.json"
    annotations_path = directory / "v2_mscoco_train2014_annotations.json"
    with open(questions_path, "w") as q, open(annotations_path, "w") as a:
        q.write('{"info": {"description": "synthetic VQA v2-sized set"}, "task_type": "Open-Ended", '
                '"data_type": "mscoco", "license": {"name": "none"}, "data_subtype": "train2014", "questions": [')
        a.write('{"info": {"description": "synthetic VQA v2-sized set"}, "license": {"name": "none"}, '
                '"data_subtype": "train2014", "annotations": [')
        for i in range(n_questions):
            image_id = image_ids[i * n_images // n_questions]
            question_id = image_id * 1000 + i % 1000
            question_type, answer_type, vocabulary = QUESTION_KINDS[rng.randrange(len(QUESTION_KINDS))]
            canonical = rng.choice(vocabulary)
            answers = [
                {"answer": canonical if rng.random() < 0.8 else rng.choice(vocabulary),
                 "answer_confidence": rng.choice(["yes", "yes", "yes", "maybe", "no"]), "answer_id": k + 1}
                for k in range(10)
            ]
            separator = ", " if i else ""
            q.write(separator + json.dumps({"image_id": image_id, "question": f"{question_type.capitalize()} "
                                            f"object number {i % 97} in this picture?", "question_id": question_id}))
            a.write(separator + json.dumps({"question_type": question_type, "multiple_choice_answer": canonical,
                                            "answers": answers, "image_id": image_id, "answer_type": answer_type,
                                            "question_id": question_id}))
        q.write("]}")
        a.write("]}")
    return questions_path, annotations_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf bench convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=443_757, help="questions to generate (VQA v2 train: 443,757)")
    parser.add_argument("--keep", help="write the inputs and the converted dataset here instead of a temp dir")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        work = Path(args.keep or tmp)
        (work / "train2014").mkdir(parents=True, exist_ok=True)  # an empty image folder: images are not opened
        started = time.perf_counter()
        questions, annotations = write_vqa_files(work, args.questions)
        print(f"generated {args.questions:,} questions / {args.questions * 10:,} answers in "
              f"{time.perf_counter() - started:.1f} s: {questions.stat().st_size / 1e6:.0f} MB + "
              f"{annotations.stat().st_size / 1e6:.0f} MB of JSON")
        command = [sys.executable, "-m", "stages.cli", "prep", "vqav2", "--questions", str(questions),
                   "--annotations", str(annotations), "--images", str(work / "train2014"),
                   "--out", str(work / "converted"), "--skip-image-check"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
            return 1
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = child.ru_maxrss * 1024  # Linux: KiB
        cpu = child.ru_utime + child.ru_stime  # unlike wall time, barely moved by other processes
        from datasets import load_from_disk

        written = len(load_from_disk(str(work / "converted" / "vqa"))["train"])
        assert written == args.questions, (written, args.questions)
        print(done.stdout.rstrip())
        print(f"\nconversion (child process, {written:,} records written): {seconds:.1f} s wall, "
              f"{written / seconds:,.0f} records/s, {cpu:.1f} s CPU, peak RSS {peak / 1024**3:.2f} GB")
        if args.questions == 443_757:
            ok = seconds < TARGET_SECONDS and peak < TARGET_BYTES
            print(f"target (< {TARGET_SECONDS} s, < {TARGET_BYTES / 1024**3:.0f} GB): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
