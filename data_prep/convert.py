"""Converters from the public data sets' own files to the project's record schema.

    vqa-rlhf prep vqav2 --questions Q.json [--annotations A.json] --images DIR --out OUT
    vqa-rlhf prep llava --data FILE.json --images DIR --out OUT
    vqa-rlhf prep coco-captions --captions FILE.json --images DIR --out OUT
    vqa-rlhf prep flickr30k --captions FILE.csv|FILE.json --images DIR --out OUT

Each writes one split of OUT/vqa, OUT/conversations or OUT/captions (a datasets.DatasetDict;
converting another split into the same OUT adds it and leaves the others alone), links
OUT/images/<name> to the image folder (nothing is copied; records say images/<name>/<file>),
appends a line per rejected record to OUT/rejects.jsonl and prints a summary. Every image is
opened and decoded once (--skip-image-check: paths only). Layout, schema and the rules each
converter applies: data_prep/README.md.
"""
from __future__ import annotations

import argparse
import codecs
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from vlm.data import MAX_IMAGE_PIXELS, RejectLog, check_image_path, load_rgb, move_image_token

IMAGE_TOKEN = "<image>"
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")  # what datasets accepts as a split name


class BadRecord(ValueError):
    """A record that cannot be converted: `category` groups the summary, the message names the field."""

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category


class InputError(ValueError):
    """A whole input file is unusable (missing, not JSON, wrong format): the run stops."""


# --- reading ------------------------------------------------------------------------------------

class JsonStream:
    """A JSON file decoded value by value from a sliding text buffer read in blocks, so memory
    holds one block and the values kept, never the whole file. Bytes that are not UTF-8 become
    lone surrogates: the record holding them is rejected (clean_text), the file still reads."""

    BLOCK = 1 << 24
    MAX_VALUE = 1 << 28  # one JSON value (a record) larger than this is an error, not a reason to read on

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.file = open(self.path, "rb")
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.lines_before, self.eof = "", 0, 0, False
        while not self.buf and self._more():
            pass
        if self.buf.startswith("\ufeff"):  # a byte-order mark
            self.pos = 1

    def _more(self) -> bool:
        """Appends the next block, dropping what was decoded already; False at the end of the file."""
        if self.eof:
            return False
        data = self.file.read(self.BLOCK)
        self.eof = not data
        if self.eof:
            self.file.close()
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos:] + self.utf8.decode(data, final=self.eof)
        self.pos = 0
        return True

    def fail(self, pos: int, message: str):
        line = self.lines_before + self.buf.count("\n", 0, pos) + 1
        column = pos - self.buf.rfind("\n", 0, pos)
        raise InputError(f"{self.path}: not valid JSON at line {line} column {column}: {message}")

    def peek(self) -> str:
        """The next non-space character ('' at the end)."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos:self.pos + 1]

    def expect(self, chars: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            self.fail(self.pos, f"expected one of {chars!r}")
        self.pos += 1
        return char

    def value(self):
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:  # cut off by the block's end, or really broken
                if len(self.buf) - self.pos < self.MAX_VALUE and self._more():
                    continue
                self.fail(exc.pos, exc.msg)
            if end == len(self.buf) and self._more():
                continue  # a number at the block's end may go on in the next block
            self.pos = end
            return value

    def array(self, key):
        """The elements of the array whose '[' was just read."""
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield key, self.value()
            if self.expect(",]") == "]":
                return


_SPACE = re.compile(r"[ \t\n\r]*")


def json_records(path: Path, keys: tuple[str, ...] = (), header: dict | None = None) -> Iterator[tuple[str | None, object]]:
    """The elements of a JSON file's big arrays, one at a time: (None, element) for a top-level
    array, (key, element) for the arrays under the top-level `keys`. Other top-level values go
    into `header`. Each element is decoded on its own (json's C scanner) from a block-wise
    buffer, so a 1 GB file never becomes one giant Python object nor one giant string."""
    stream = JsonStream(path)
    if not keys:
        stream.expect("[")
        yield from stream.array(None)
    else:
        stream.expect("{")
        if stream.peek() == "}":
            stream.pos += 1
        else:
            while True:
                key = stream.value()
                if not isinstance(key, str):
                    stream.fail(stream.pos, "expected a string key")
                stream.expect(":")
                if key in keys and stream.peek() == "[":
                    stream.pos += 1
                    yield from stream.array(key)
                else:
                    value = stream.value()
                    if header is not None:
                        header[key] = value
                if stream.expect(",}") == "}":
                    break
    if stream.peek():
        stream.fail(stream.pos, "extra data after the end")


# --- checks -------------------------------------------------------------------------------------

# C0/C1 control characters except tab/newline/CR, and lone surrogates (bytes that were not UTF-8).
_BAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_text(value, field: str, allow_empty: bool = False, placeholder_ok: bool = False) -> str:
    """A text field stripped of surrounding white space, or BadRecord naming the field. Outside
    LLaVA turns an `<image>` in the text would become a second image slot in the prompt."""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not text"
        raise BadRecord("missing field", f"field '{field}' is {what}")
    bad = _BAD_TEXT.search(value)
    if bad:
        char = bad.group()
        if "\ud800" <= char <= "\udfff":
            raise BadRecord("not UTF-8", f"field '{field}' holds bytes that are not valid UTF-8")
        raise BadRecord("control character", f"field '{field}' holds control character {char!r}")
    if not placeholder_ok and IMAGE_TOKEN in value:
        raise BadRecord("image placeholder", f"field '{field}' holds {IMAGE_TOKEN}, which is reserved for the image")
    value = value.strip()
    if not value and not allow_empty:
        raise BadRecord("empty text", f"field '{field}' is empty")
    return value


def int_field(record: dict, field: str) -> int:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRecord("missing field", f"field '{field}' must be a non-negative integer, got {value!r}")
    return value


def record_id(record, field: str, fallback: str) -> str:
    value = record.get(field) if isinstance(record, dict) else None
    return fallback if value is None or isinstance(value, (dict, list)) else str(value)


# --- one conversion run -------------------------------------------------------------------------

class Conversion:
    """Shared machinery of a converter run: the image link, rejects, image checks, writing a split."""

    def __init__(self, args, kind: str, sources: list[Path]):
        self.kind = kind
        self.sources = [str(s) for s in sources]
        self.out = Path(args.out).absolute()
        self.max_pixels = args.max_pixels
        self.check_images = not args.skip_image_check
        self.workers = args.workers
        self.read = collections.Counter()      # records read, by source file
        self.rejected = collections.Counter()  # rejects, by category
        for source in sources:
            if not Path(source).is_file():
                raise InputError(f"{source}: no such file")
        self.images_root = Path(args.images).resolve()
        if not self.images_root.is_dir():
            raise InputError(f"--images {args.images}: no such directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.image_prefix = self._link_images()
        self.rejects = RejectLog(self.out / "rejects.jsonl", args.on_bad_record)
        self._drop_old_rejects()

    def _link_images(self) -> str:
        """OUT/images/<name> -> the image folder (absolute), so records stay relative to OUT."""
        out = self.out.resolve()
        if self.images_root.is_relative_to(out):  # the images already live inside OUT
            return self.images_root.relative_to(out).as_posix()
        links = self.out / "images"
        links.mkdir(exist_ok=True)
        base, n = self.images_root.name or "images", 1
        while True:
            name = base if n == 1 else f"{base}-{n}"
            link = links / name
            if link.is_symlink() and Path(os.readlink(link)) == self.images_root:
                return f"images/{name}"
            if not link.exists() and not link.is_symlink():
                link.symlink_to(self.images_root, target_is_directory=True)
                return f"images/{name}"
            n += 1

    def _drop_old_rejects(self) -> None:
        """A re-run replaces the rejects of its own source files and keeps everyone else's."""
        path = self.rejects.path
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("source_file") not in self.sources]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    def reject(self, rid, source, error: BadRecord) -> None:
        self.rejected[error.category] += 1
        self.rejects.reject(rid, str(source), str(error))  # raises under --on-bad-record error

    def progress(self, iterable, source: Path):
        for item in tqdm(iterable, desc=f"{self.kind} {Path(source).name}", unit=" records", mininterval=0.5):
            self.read[str(source)] += 1
            yield item

    def image_path(self, relative) -> str:
        """A record's image (relative to --images) as stored: images/<name>/<relative>."""
        try:
            return f"{self.image_prefix}/{check_image_path(relative)}"
        except ValueError:
            raise BadRecord("image path escapes the image root", f"field 'image' is {relative!r}") from None

    def _image_problem(self, stored: str) -> str | None:
        path = self.out / stored
        try:
            if not path.resolve().is_relative_to(self.images_root):
                return f"image path escapes the image root: {stored} leads to {path.resolve()}"
            load_rgb(path, self.max_pixels)
        except (ValueError, FileNotFoundError) as exc:  # "image not found: ...", "image too large: ..."
            return str(exc)
        except Exception as exc:  # a decoder plugin's own error on a broken file must not end the run
            return f"image unreadable: {path}: {type(exc).__name__}: {exc}"
        return None

    def drop_bad_images(self, columns: dict, sources: list) -> dict:
        """Opens and decodes every distinct image once (threads: PIL decodes without the GIL);
        records whose image is missing, empty, corrupt, too large or outside the root are rejected."""
        if not self.check_images:
            return columns

        unique = sorted({image for image in columns["image"] if image is not None})
        with ThreadPoolExecutor(self.workers) as pool:
            problems = dict(zip(unique, tqdm(pool.map(self._image_problem, unique, chunksize=64), total=len(unique),
                                             desc=f"{self.kind} images", unit=" images", mininterval=0.5)))
        keep = []
        for i, image in enumerate(columns["image"]):
            problem = problems.get(image)
            if problem:
                category, _, detail = problem.partition(": ")
                self.reject(columns["id"][i], sources[i], BadRecord(category, f"field 'image': {detail}"))
            else:
                keep.append(i)
        if len(keep) < len(columns["id"]):
            for values in columns.values():
                values[:] = [values[i] for i in keep]  # in place: the converter's own lists shrink too
        return columns

    def write(self, split: str, columns: dict, features) -> int:
        """One split of OUT/<kind>, atomically; the DatasetDict's other splits stay as they are."""
        n = len(columns["id"])
        if n == 0:
            raise InputError(f"{', '.join(self.sources)}: no usable records for split '{split}' (see {self.rejects.path})")
        kind_dir = self.out / self.kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        tmp, old, target = kind_dir / f".{split}.tmp-{os.getpid()}", kind_dir / f".{split}.old-{os.getpid()}", kind_dir / split
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run with a recycled pid
        write_arrow_split(tmp, columns, features)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        index = kind_dir / "dataset_dict.json"
        splits = json.loads(index.read_text())["splits"] if index.exists() else []
        write_json_atomic(index, {"splits": sorted(set(splits) | {split})})
        return n

    def finish(self, name: str, written: dict[str, int], seconds: float) -> None:
        meta_path = self.out / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        for split, n in written.items():
            meta.setdefault("converted", {}).setdefault(self.kind, {})[split] = {
                "converter": name, "sources": self.sources, "images": str(self.images_root),
                "images_checked": self.check_images, "records": n,
            }
        write_json_atomic(meta_path, meta)
        # entries: questions, annotations, image-table entries, lines, LLaVA records (per file)
        read = ", ".join(f"{n:,} entries from {Path(s).name}" for s, n in self.read.items())
        print(f"prep {name}: read {read}")
        for split, n in written.items():
            print(f"  written: {n:,} records to {self.out / self.kind / split}")
        print(f"  rejected: {sum(self.rejected.values()):,}" + (f" (each with its reason in {self.rejects.path})"
                                                               if self.rejected else ""))
        for category, n in self.rejected.most_common():
            print(f"    {n:>9,}  {category}")
        print(f"  {seconds:.1f} s" + ("" if self.check_images else "; images not opened (--skip-image-check)"))


def write_arrow_split(directory: Path, columns: dict, features, batch_rows: int = 20_000) -> None:
    """The files datasets' save_to_disk writes for one split (an Arrow stream file, state.json,
    dataset_info.json), written batch by batch straight from the Python columns: no whole-split
    Arrow table in memory, and none of datasets' per-row feature encoding (Dataset.from_dict
    took 2/3 of a VQA v2 conversion; save_to_disk of an in-memory table doubled peak memory)."""
    import datasets
    import pyarrow as pa

    directory.mkdir(parents=True)
    schema = features.arrow_schema  # carries the features as metadata: load_from_disk restores them
    data_file = "data-00000-of-00001.arrow"
    n = len(columns["id"])
    with pa.OSFile(str(directory / data_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, n, batch_rows):
            batch = {name: values[start:start + batch_rows] for name, values in columns.items()}
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema))
    state = {"_data_files": [{"filename": data_file}], "_fingerprint": os.urandom(8).hex(), "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    datasets.DatasetInfo(features=features).write_to_directory(str(directory))


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def infer_split(args, *names: str, table: dict, default: str | None = None) -> str:
    """--split, else the first known split word in the given names (file names, data_subtype)."""
    if args.split:
        if not SPLIT_NAME.match(args.split):
            raise InputError(f"--split {args.split!r}: use letters, digits and '_' (e.g. train, val, test_dev)")
        return args.split
    for name in names:
        for pattern, split in table.items():
            if re.search(pattern, name or ""):
                return split
    if default:
        return default
    raise InputError(f"cannot tell the split from {', '.join(n for n in names if n)}: pass --split (e.g. --split train)")


def features(kind: str):
    from datasets import Features, Value

    string = Value("string")
    if kind == "vqa":
        return Features({"id": string, "image": string, "question": string, "answers": [string],
                         "multiple_choice_answer": string, "answer_type": string, "question_type": string})
    if kind == "captions":
        return Features({"id": string, "image": string, "caption": string})
    return Features({"id": string, "image": string, "conversations": [{"from": string, "value": string}]})


# --- VQA v2 -------------------------------------------------------------------------------------

VQA_SPLITS = {r"test-dev20\d\d": "test_dev", r"train20\d\d": "train", r"val20\d\d": "val", r"test20\d\d": "test"}


def vqa_image_naming(args, conv: Conversion, image_ids: list[int], subtype: str | None) -> str:
    """COCO 2014 names (COCO_train2014_000000123456.jpg) or 2017 names (000000123456.jpg)."""
    if args.image_naming != "auto":
        return args.image_naming
    votes = collections.Counter()
    for image_id in image_ids[:20]:
        if subtype and (conv.images_root / f"COCO_{subtype}_{image_id:012d}.jpg").exists():
            votes["coco2014"] += 1
        if (conv.images_root / f"{image_id:012d}.jpg").exists():
            votes["coco2017"] += 1
    if votes:
        return votes.most_common(1)[0][0]
    return "coco2014" if subtype else "coco2017"


@dataclasses.dataclass
class VQAQuestions:
    """A VQA v2 questions file, read: the kept questions in order, and the ids rejected."""
    ids: list = dataclasses.field(default_factory=list)
    image_ids: list = dataclasses.field(default_factory=list)
    questions: list = dataclasses.field(default_factory=list)
    index_of: dict = dataclasses.field(default_factory=dict)
    dropped: set = dataclasses.field(default_factory=set)


def read_vqa_questions(questions_file: Path, conv: Conversion, header: dict) -> VQAQuestions:
    read = VQAQuestions()
    for _, q in conv.progress(json_records(questions_file, ("questions",), header), questions_file):
        rid = record_id(q, "question_id", f"#{conv.read[str(questions_file)]}")
        try:
            if not isinstance(q, dict):
                raise BadRecord("malformed record", "a question must be a JSON object")
            int_field(q, "question_id")
            if rid in read.index_of or rid in read.dropped:
                raise BadRecord("duplicate id", f"field 'question_id' {rid} appears more than once")
            image_id = int_field(q, "image_id")
            question = clean_text(q.get("question"), "question")
        except BadRecord as bad:
            read.dropped.add(rid)
            conv.reject(rid, questions_file, bad)
            continue
        read.index_of[rid] = len(read.ids)
        read.ids.append(rid)
        read.image_ids.append(image_id)
        read.questions.append(question)
    return read


def checked_annotation(a, rid, i, questions: VQAQuestions, questions_file: Path, seen: set):
    """(answers, multiple-choice answer, answer type, question type) of one annotation, or BadRecord;
    None for an annotation of a question rejected already (with its reason)."""
    if not isinstance(a, dict):
        raise BadRecord("malformed record", "an annotation must be a JSON object")
    if rid in seen:
        raise BadRecord("duplicate id", f"field 'question_id' {rid} has more than one annotation")
    seen.add(rid)
    if i is None:
        if rid in questions.dropped:
            return None
        raise BadRecord("annotation without question", f"field 'question_id' {rid} is not in {questions_file.name}")
    if a.get("image_id") != questions.image_ids[i]:
        raise BadRecord("image mismatch", f"field 'image_id' {a.get('image_id')!r} differs from the "
                                          f"question's image_id {questions.image_ids[i]}")
    raw = a.get("answers")
    if not isinstance(raw, list) or len(raw) != 10:
        got = len(raw) if isinstance(raw, list) else raw
        raise BadRecord("not 10 answers", f"field 'answers' must list 10 answers, got {got!r}")
    texts = [r.get("answer") if isinstance(r, dict) else None for r in raw]
    joined = "".join(t for t in texts if isinstance(t, str))
    if not all(isinstance(t, str) for t in texts) or _BAD_TEXT.search(joined) or IMAGE_TOKEN in joined:
        for k, text in enumerate(texts):
            clean_text(text, f"answers[{k}].answer", allow_empty=True)
    return (texts, clean_text(a.get("multiple_choice_answer"), "multiple_choice_answer"),
            clean_text(a.get("answer_type"), "answer_type"), clean_text(a.get("question_type"), "question_type"))


def read_vqa_annotations(annotations_file: Path, conv: Conversion, questions: VQAQuestions, questions_file: Path):
    """Each kept question's 10 answers, multiple-choice answer, answer and question type, and which
    questions are bad (a bad annotation, or none): -> (answers, mc, answer types, question types, bad)."""
    n = len(questions.ids)
    answers, mc_answers, answer_types, question_types = [None] * n, [""] * n, [""] * n, [""] * n
    bad = [False] * n
    seen = set()
    for _, a in conv.progress(json_records(annotations_file, ("annotations",)), annotations_file):
        rid = record_id(a, "question_id", f"#{conv.read[str(annotations_file)]}")
        i = questions.index_of.get(rid)
        try:
            checked = checked_annotation(a, rid, i, questions, questions_file, seen)
        except BadRecord as problem:
            if i is not None:
                bad[i] = True
            conv.reject(rid, annotations_file, problem)
            continue
        if checked is None:
            continue  # its question was rejected already, with its reason
        texts, mc, answer_type, question_type = checked
        answers[i] = [sys.intern(t) for t in texts]  # "yes", "no", "2": a few thousand distinct strings
        mc_answers[i], answer_types[i], question_types[i] = sys.intern(mc), sys.intern(answer_type), sys.intern(question_type)
    for i in range(n):
        if answers[i] is None and not bad[i]:
            bad[i] = True
            conv.reject(questions.ids[i], annotations_file, BadRecord(
                "question without annotation", f"question {questions.ids[i]} has no entry in {annotations_file.name} "
                "(train/val questions need their 10 answers)"))
    return answers, mc_answers, answer_types, question_types, bad


def vqa_image_pattern(args, conv: Conversion, questions_file: Path, subtype_name: str | None, image_ids) -> str:
    """The image path of an image id, as a format string (COCO 2014 or 2017 file names)."""
    subtype = re.search(r"(train|val|test|test-dev)20\d\d", subtype_name or questions_file.name)
    subtype = subtype.group(0) if subtype else None
    if subtype and subtype.startswith("test"):
        subtype = "test2015"  # test-dev questions are about test2015 images
    naming = vqa_image_naming(args, conv, image_ids, subtype)
    if naming == "coco2014" and not subtype:
        raise InputError(f"{questions_file}: cannot tell the COCO image prefix (COCO_train2014_...) from the "
                         "file name or data_subtype; pass --image-naming coco2017 or rename the file")
    return f"{conv.image_prefix}/COCO_{subtype}_{{:012d}}.jpg" if naming == "coco2014" else f"{conv.image_prefix}/{{:012d}}.jpg"


def convert_vqav2(args, conv: Conversion) -> dict[str, int]:
    questions_file = Path(args.questions)
    header: dict = {}
    read = read_vqa_questions(questions_file, conv, header)
    subtype_name = header.get("data_subtype") if isinstance(header.get("data_subtype"), str) else None
    split = infer_split(args, questions_file.name, subtype_name, table=VQA_SPLITS)
    n = len(read.ids)
    if args.annotations:
        answers, mc_answers, answer_types, question_types, bad = read_vqa_annotations(
            Path(args.annotations), conv, read, questions_file)
    elif split in ("train", "val"):
        raise InputError(f"{questions_file}: split '{split}' needs --annotations (its 10 answers per question); "
                         "questions without answers convert for inference only (e.g. --split test_dev)")
    else:
        answers = [[] for _ in range(n)]  # inference only: check_vqa_record keeps these out of training
        mc_answers, answer_types, question_types, bad = [""] * n, [""] * n, [""] * n, [False] * n

    pattern = vqa_image_pattern(args, conv, questions_file, subtype_name, read.image_ids)
    path_of = {image_id: pattern.format(image_id) for image_id in set(read.image_ids)}
    keep = [i for i in range(n) if not bad[i]]
    columns = {
        "id": [read.ids[i] for i in keep],
        "image": [path_of[read.image_ids[i]] for i in keep],
        "question": [read.questions[i] for i in keep],
        "answers": [answers[i] for i in keep],
        "multiple_choice_answer": [mc_answers[i] for i in keep],
        "answer_type": [answer_types[i] for i in keep],
        "question_type": [question_types[i] for i in keep],
    }
    columns = conv.drop_bad_images(columns, [str(questions_file)] * len(keep))
    return {split: conv.write(split, columns, features("vqa"))}


# --- LLaVA instruction data -----------------------------------------------------------------------

def llava_turns(turns, has_image: bool) -> list[tuple[str, str]]:
    """Checked (from, value) turns (tuples: a third of a dict's memory, Arrow takes them as structs); `<image>` moved to the start of the first human turn as LLaVA's
    preprocess_multimodal puts it ("<image>\\n" + text), added there if a record with an image lacks it."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord("malformed record", "field 'conversations' must be a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        expected = "human" if k % 2 == 0 else "gpt"
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker != expected:
            raise BadRecord("turns out of order", f"field 'conversations[{k}].from' is {speaker!r}, expected "
                                                  f"{expected!r} (turns alternate human/gpt, starting with human)")
        value = clean_text(turn.get("value"), f"conversations[{k}].value", placeholder_ok=True)
        out.append([expected, value])  # `expected`: one shared "human"/"gpt" string, not a copy per turn
    if len(out) % 2:
        raise BadRecord("turns out of order", f"field 'conversations' ends with a human turn (turn {len(out) - 1}) "
                                              "that has no gpt answer")
    try:  # the placement rules are the training side's (vlm.data.move_image_token)
        moved = move_image_token([{"from": speaker, "value": value} for speaker, value in out], has_image)
    except ValueError as exc:
        raise BadRecord("image placeholder", f"field 'conversations': {exc}") from None
    return [(turn["from"], turn["value"]) for turn in moved]


def convert_llava(args, conv: Conversion) -> dict[str, int]:
    data_file = Path(args.data)
    split = infer_split(args, table={}, default="train")  # instruction data is training data
    ids, images, conversations, taken, uses = [], [], [], set(), collections.Counter()
    for _, record in conv.progress(json_records(data_file), data_file):
        rid = record_id(record, "id", f"#{conv.read[str(data_file)]}")
        try:
            if not isinstance(record, dict):
                raise BadRecord("malformed record", "a record must be a JSON object")
            image = record.get("image")
            if image is not None and image != "":
                if not isinstance(image, str):
                    raise BadRecord("malformed record", f"field 'image' must be a path, got {image!r}")
                image = conv.image_path(image)
            else:
                image = None  # text-only conversation, kept as such
            turns = llava_turns(record.get("conversations"), image is not None)
        except BadRecord as bad:
            conv.reject(rid, data_file, bad)
            continue
        # LLaVA files reuse an id for several conversations about one image (LLaVA-Instruct-150K
        # uses the COCO image id): the later ones get -2, -3, ... so ids stay unique.
        unique_id = rid
        while unique_id in taken:
            uses[rid] += 1
            unique_id = f"{rid}-{uses[rid] + 1}"
        taken.add(unique_id)
        ids.append(unique_id)
        images.append(image)
        conversations.append(turns)
    columns = {"id": ids, "image": images, "conversations": conversations}
    columns = conv.drop_bad_images(columns, [str(data_file)] * len(ids))
    return {split: conv.write(split, columns, features("conversations"))}


# --- captions: COCO and Flickr30k -----------------------------------------------------------------

CAPTION_SPLITS = {r"train20\d\d": "train", r"val20\d\d": "val", r"test20\d\d": "test"}


def caption_columns(rows: list[tuple[str, str, str]], conv: Conversion, source: Path) -> dict:
    """(id, image relative to --images, caption) rows as columns, duplicates and bad paths rejected."""
    columns, seen, stored = {"id": [], "image": [], "caption": []}, set(), {}
    for rid, image, caption in rows:
        try:
            if rid in seen:
                raise BadRecord("duplicate id", f"caption id {rid} appears more than once")
            if image not in stored:
                stored[image] = conv.image_path(image)
        except BadRecord as bad:
            conv.reject(rid, source, bad)
            continue
        seen.add(rid)
        columns["id"].append(rid)
        columns["image"].append(stored[image])
        columns["caption"].append(caption)
    return conv.drop_bad_images(columns, [str(source)] * len(columns["id"]))


def convert_coco_captions(args, conv: Conversion) -> dict[str, int]:
    captions_file = Path(args.captions)
    header: dict = {}
    file_names, captions = {}, []
    for key, element in conv.progress(json_records(captions_file, ("images", "annotations"), header), captions_file):
        if key == "images":  # the image table, not a record: a broken entry rejects its captions below
            if isinstance(element, dict) and isinstance(element.get("id"), int) and isinstance(element.get("file_name"), str):
                file_names[element["id"]] = element["file_name"]
            continue
        rid = record_id(element, "id", f"#{len(captions)}")
        try:
            if not isinstance(element, dict):
                raise BadRecord("malformed record", "an annotation must be a JSON object")
            int_field(element, "id")
            captions.append((rid, int_field(element, "image_id"), clean_text(element.get("caption"), "caption")))
        except BadRecord as bad:
            conv.reject(rid, captions_file, bad)
    split = infer_split(args, captions_file.name, table=CAPTION_SPLITS)
    rows = []
    for rid, image_id, caption in captions:
        if image_id not in file_names:
            conv.reject(rid, captions_file, BadRecord(
                "unknown image", f"field 'image_id' {image_id} has no entry (with id and file_name) in 'images'"))
            continue
        rows.append((rid, file_names[image_id], caption))
    return {split: conv.write(split, caption_columns(rows, conv, captions_file), features("captions"))}


KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def flickr_csv_rows(path: Path, conv: Conversion):
    """Kaggle results.csv: 'image_name| comment_number| comment' (pipes, spaces, a header line).
    Read line by line; the id is '<image_name>#<comment_number>' as in Flickr30k's own token file."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as lines:
        head = lines.readline().lstrip("\ufeff")
        if [h.strip() for h in head.split("|")] != ["image_name", "comment_number", "comment"]:
            raise InputError(f"{path}: line 1 is {head.strip()!r}, expected the header "
                             "'image_name| comment_number| comment' (Flickr30k results.csv)")
        for number, line in enumerate(conv.progress(lines, path), start=2):
            if not line.strip():
                continue
            parts = [p.strip() for p in line.rstrip("\r\n").split("|", 2)]
            rid = f"{parts[0]}#{parts[1]}" if len(parts) == 3 else f"line {number}"
            try:
                if len(parts) != 3:
                    raise BadRecord("malformed line", f"line {number} lacks the fields image_name| comment_number| comment")
                if not parts[1].isdigit():
                    raise BadRecord("malformed line", f"field 'comment_number' on line {number} is {parts[1]!r}")
                yield "train", (rid, clean_text(parts[0], "image_name"), clean_text(parts[2], "comment"))
            except BadRecord as bad:
                conv.reject(rid, path, bad)


def flickr_karpathy_rows(path: Path, conv: Conversion):
    """Karpathy's dataset_flickr30k.json: one entry per image with its split and 5 sentences."""
    for _, image in conv.progress(json_records(path, ("images",)), path):
        name = image.get("filename") if isinstance(image, dict) else None
        split = image.get("split") if isinstance(image, dict) else None
        split = KARPATHY_SPLITS.get(split) if isinstance(split, str) else None
        sentences = image.get("sentences") if isinstance(image, dict) else None
        if not isinstance(name, str) or split is None or not isinstance(sentences, list):
            conv.reject(record_id(image, "imgid", f"#{conv.read[str(path)]}"), path, BadRecord(
                "malformed record", "an image entry needs 'filename', 'split' (train/restval/val/test) and 'sentences'"))
            continue
        for k, sentence in enumerate(sentences):
            rid = f"{name}#{k}"
            try:
                raw = sentence.get("raw") if isinstance(sentence, dict) else None
                yield split, (rid, name, clean_text(raw, f"sentences[{k}].raw"))
            except BadRecord as bad:
                conv.reject(rid, path, bad)


def convert_flickr30k(args, conv: Conversion) -> dict[str, int]:
    captions_file = Path(args.captions)
    if captions_file.suffix.lower() == ".json":
        by_split = collections.defaultdict(list)
        for split, row in flickr_karpathy_rows(captions_file, conv):
            by_split[split].append(row)
        if args.split:  # one split of the Karpathy file
            by_split = {args.split: by_split.get(args.split, [])}
    else:
        split = infer_split(args, captions_file.name, table=CAPTION_SPLITS)
        by_split = {split: [row for _, row in flickr_csv_rows(captions_file, conv)]}
    return {split: conv.write(split, caption_columns(rows, conv, captions_file), features("captions"))
            for split, rows in sorted(by_split.items())}


# --- command line ---------------------------------------------------------------------------------

# name -> (converter, dataset kind, input flags, what it reads)
CONVERTERS = {
    "vqav2": (convert_vqav2, "vqa", ("questions",),
              "VQA v2: v2_OpenEnded_mscoco_<split>_questions.json [+ v2_mscoco_<split>_annotations.json] "
              "and the COCO image folder"),
    "llava": (convert_llava, "conversations", ("data",),
              "LLaVA-Instruct-150K / llava_v1_5_mix665k.json conversations and their image folder"),
    "coco-captions": (convert_coco_captions, "captions", ("captions",),
                      "COCO captions_<split>2017.json and the COCO image folder"),
    "flickr30k": (convert_flickr30k, "captions", ("captions",),
                  "Flickr30k captions: Kaggle results.csv or Karpathy's dataset_flickr30k.json"),
}


def parser_for(name: str) -> argparse.ArgumentParser:
    function, kind, _, reads = CONVERTERS[name]
    parser = argparse.ArgumentParser(
        prog=f"vqa-rlhf prep {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Converts {reads}\ninto OUT/{kind}/<split> (project schema, data_prep/README.md).\n"
                    "Images are linked (OUT/images/<name> -> --images), not copied. Rejected records are\n"
                    "listed with their reason in OUT/rejects.jsonl.")
    if name == "vqav2":
        parser.add_argument("--questions", required=True, help="v2_OpenEnded_mscoco_<split>_questions.json")
        parser.add_argument("--annotations", help="v2_mscoco_<split>_annotations.json (leave out for test-dev/test: "
                                                  "inference only, answers empty)")
        parser.add_argument("--image-naming", choices=["auto", "coco2014", "coco2017"], default="auto",
                            help="COCO_train2014_000000123456.jpg (coco2014) or 000000123456.jpg (coco2017); "
                                 "auto: whichever exists in --images (default)")
    elif name == "llava":
        parser.add_argument("--data", required=True, help="llava_instruct_150k.json, llava_v1_5_mix665k.json, ...")
    elif name == "coco-captions":
        parser.add_argument("--captions", required=True, help="captions_train2017.json / captions_val2017.json")
    else:
        parser.add_argument("--captions", required=True, help="results.csv (Kaggle) or dataset_flickr30k.json (Karpathy)")
    parser.add_argument("--images", required=True, help="the image folder the records' file names are relative to")
    parser.add_argument("--out", required=True, help="dataset directory (created; other splits/kinds in it are kept)")
    parser.add_argument("--split", help="split name to write (default: from the file name, e.g. train2014 -> train; "
                                        "llava: train; Karpathy JSON: its own split field, --split picks one)")
    parser.add_argument("--on-bad-record", choices=["skip", "error"], default="skip",
                        help="skip: reject it into OUT/rejects.jsonl and go on (default); error: stop, naming it")
    parser.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                        help=f"larger images are rejected undecoded (decompression bombs); default {MAX_IMAGE_PIXELS:,}")
    parser.add_argument("--skip-image-check", action="store_true",
                        help="do not open the images (paths are still checked); for benchmarks and dry runs")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="threads decoding images")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in CONVERTERS:
        print(f"usage: vqa-rlhf prep {{{','.join(CONVERTERS)}}} ... (--help for each)", file=sys.stderr)
        return 2
    name = argv[0]
    args = parser_for(name).parse_args(argv[1:])
    function, kind, input_flags, _ = CONVERTERS[name]
    sources = [Path(getattr(args, flag)) for flag in input_flags]
    if getattr(args, "annotations", None):
        sources.append(Path(args.annotations))
    started = time.perf_counter()
    try:
        conv = Conversion(args, kind, sources)
        written = function(args, conv)
        conv.finish(name, written, time.perf_counter() - started)
    except ValueError as exc:  # InputError, or a BadRecord under --on-bad-record error
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
