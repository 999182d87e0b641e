"""The label store: one SQLite file (WAL) of candidate answers and people's judgements of them.

Tables (schema version in PRAGMA user_version):
  store_info  key/value: image_root (absolute dataset dir the sample images are relative to), created
  provenance  one row per `vqa-rlhf sample` run: checkpoint, decoding settings, split, time
  samples     image (relative to image_root), question, answer, ground-truth answers (JSON, [] if unknown)
  labels      (sample, labeler, label in correct|incorrect|unsure, time, undone_at): append-only history
  comparisons (sample_a, sample_b: two answers to one question as shown, labeler, verdict in
              a|b|both_right|both_wrong, time, undone_at): pairwise preferences, append-only

A re-label is a new row; the old one stays as history. The *current* label of a
labeler for a sample is their latest row (by time, then insertion order) that was
not undone. Undo marks a row `undone_at`, it never deletes it. The labeler named
`auto` is the ground-truth auto-labeler; every other labeler is a person.

Durability: every write is a transaction committed with synchronous=FULL (an fsync),
so a label that was acknowledged survives a crash or SIGKILL of the process.
An fsync costs milliseconds on a busy disk, so labels that arrive while one is
running are committed together by the next one (group commit): a caller returns
only after the transaction holding its label is on disk. Each store object has a
writer connection (under a lock) and a reader connection: in WAL mode reads run
beside a commit instead of waiting for its fsync.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import Iterable

from vlm.vqa_metric import clean_whitespace, normalize_answer, vqa_accuracy

SCHEMA_VERSION = 2
LABELS = ("correct", "incorrect", "unsure")
VERDICTS = ("a", "b", "both_right", "both_wrong")  # pairwise: A better, B better, both right, both wrong
AUTO = "auto"  # the auto-labeler's name; people cannot label under it
MAX_LABELER_LENGTH = 64

SCHEMA = f"""
CREATE TABLE store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE provenance (
    id INTEGER PRIMARY KEY,
    checkpoint TEXT NOT NULL,
    decoding TEXT NOT NULL,          -- JSON: k, temperature, top_p, max_new_tokens, seed, greedy, rlhf_round
    split TEXT,
    created TEXT NOT NULL            -- ISO 8601 UTC
);
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    question_id TEXT NOT NULL,
    image TEXT NOT NULL,             -- relative to store_info.image_root
    question TEXT NOT NULL,
    answer TEXT NOT NULL,            -- exact text of the first candidate with this normalized form
    answer_key TEXT NOT NULL,        -- normalized answer: identical keys are one sample
    gt_answers TEXT NOT NULL DEFAULT '[]',
    greedy INTEGER NOT NULL DEFAULT 0,
    provenance_id INTEGER REFERENCES provenance(id),
    human_labelers INTEGER NOT NULL DEFAULT 0,  -- people with a current label; recomputed on every change
    created REAL NOT NULL,
    UNIQUE (question_id, answer_key)
);
CREATE INDEX samples_by_need ON samples (human_labelers, id);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id INTEGER NOT NULL REFERENCES samples(id),
    labeler TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN {LABELS}),
    time REAL NOT NULL,              -- unix seconds
    undone_at REAL
);
CREATE INDEX labels_by_sample ON labels (sample_id, labeler);
CREATE INDEX labels_by_labeler ON labels (labeler, id);
-- The latest label of each labeler for each sample, undone rows excluded.
CREATE VIEW current_labels AS
SELECT l.* FROM labels l
WHERE l.undone_at IS NULL AND NOT EXISTS (
    SELECT 1 FROM labels m
    WHERE m.sample_id = l.sample_id AND m.labeler = l.labeler AND m.undone_at IS NULL
      AND (m.time > l.time OR (m.time = l.time AND m.id > l.id)));
"""

COMPARISONS = f"""
CREATE TABLE comparisons (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_a INTEGER NOT NULL REFERENCES samples(id),  -- the answer shown as A
    sample_b INTEGER NOT NULL REFERENCES samples(id),  -- the answer shown as B (same question and image)
    labeler TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN {VERDICTS}),
    time REAL NOT NULL,
    undone_at REAL
);
CREATE INDEX comparisons_by_labeler ON comparisons (labeler, sample_a, sample_b);
"""
SCHEMA += COMPARISONS

# Version n -> n+1 upgrades, applied in order by LabelStore on open.
MIGRATIONS: dict[int, str] = {1: COMPARISONS}  # 2: pairwise preferences


class StoreError(ValueError):
    """A request the store refuses; the message says why."""


class UnknownSample(StoreError):
    pass


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_labeler(labeler, allow_auto: bool = False) -> str:
    if not isinstance(labeler, str) or not labeler.strip():
        raise StoreError("field 'labeler' must be a non-empty string")
    labeler = labeler.strip()
    if len(labeler) > MAX_LABELER_LENGTH or not labeler.isprintable():
        raise StoreError(f"field 'labeler' must be at most {MAX_LABELER_LENGTH} printable characters")
    if labeler == AUTO and not allow_auto:
        raise StoreError(f"labeler name '{AUTO}' is reserved for ground-truth auto-labels")
    return labeler


def check_label(label) -> str:
    if label not in LABELS:
        raise StoreError(f"field 'label' must be one of {', '.join(LABELS)}, got {label!r}")
    return label


def answer_key(answer: str) -> str:
    """Candidates that the VQA metric cannot tell apart ("Two" / "two" / "2") are one sample."""
    return normalize_answer(clean_whitespace(answer))


class LabelStore:
    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"label store not found: {self.path} (`vqa-rlhf sample` creates it)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # the writer connection
        self._read_lock = threading.Lock()  # the reader connection
        self._pending_lock = threading.Lock()
        self._pending: list[_PendingLabel] = []  # labels waiting for the next group commit
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly one call.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._reader = None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # the commit is on disk before we answer
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            self._reader.row_factory = sqlite3.Row
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not a usable label store: {exc}") from None

    # -- schema ---------------------------------------------------------------

    def _migrate(self) -> None:
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
                if tables:
                    raise StoreError(f"{self.path}: a SQLite file that is not a label store")
                _execute_script(self._db, SCHEMA)
                self._db.execute("INSERT INTO store_info VALUES ('created', ?)", (now_iso(),))
                version = SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: schema version {version} is newer than this code's "
                                 f"{SCHEMA_VERSION}; upgrade vqa-rlhf")
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise StoreError(f"{self.path}: no migration from schema version {version}")
                _execute_script(self._db, MIGRATIONS[version])
                version += 1
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    class _Transaction:
        def __init__(self, store):
            self.store = store

        def __enter__(self):
            self.store._lock.acquire()
            self.store._db.execute("BEGIN IMMEDIATE")
            return self.store._db

        def __exit__(self, kind, exc, tb):
            try:
                if kind is None:
                    self.store._db.execute("COMMIT")
                elif self.store._db.in_transaction:
                    # SQLite has rolled back already after some errors (SQLITE_FULL: a full disk);
                    # a second ROLLBACK would fail and hide the error that matters.
                    self.store._db.execute("ROLLBACK")
            finally:
                self.store._lock.release()

    def _write(self) -> "_Transaction":
        return LabelStore._Transaction(self)

    def _read(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def check_integrity(self) -> str:
        return self._read("PRAGMA quick_check")[0][0]

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._reader.close()
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- samples --------------------------------------------------------------

    @property
    def image_root(self) -> Path | None:
        rows = self._read("SELECT value FROM store_info WHERE key='image_root'")
        return Path(rows[0][0]) if rows else None

    def add_samples(self, image_root: str | Path, rows: Iterable[dict], provenance: dict | None = None) -> dict:
        """Insert candidate answers: rows of {question_id, image, question, answer, gt_answers?, greedy?}.

        `image` is relative to `image_root` (the dataset dir); a store holds one image root.
        A candidate whose normalized answer the question already has is merged (counted, not added)."""
        image_root = str(Path(image_root).resolve())
        counts = {"added": 0, "merged": 0}
        with self._write() as db:
            known = db.execute("SELECT value FROM store_info WHERE key='image_root'").fetchone()
            if known is None:
                db.execute("INSERT INTO store_info VALUES ('image_root', ?)", (image_root,))
            elif known[0] != image_root:
                raise StoreError(f"{self.path} holds samples of {known[0]}, not {image_root}; use another --db")
            provenance_id = None
            if provenance is not None:
                provenance_id = db.execute(
                    "INSERT INTO provenance (checkpoint, decoding, split, created) VALUES (?, ?, ?, ?)",
                    (str(provenance.get("checkpoint", "")), json.dumps(provenance.get("decoding", {})),
                     provenance.get("split"), provenance.get("created") or now_iso()),
                ).lastrowid
            for row in rows:
                answer = clean_whitespace(row["answer"])
                key = answer_key(answer)
                if not key:
                    raise StoreError(f"question {row['question_id']}: empty answer")
                cursor = db.execute(
                    "INSERT OR IGNORE INTO samples (question_id, image, question, answer, answer_key, gt_answers,"
                    " greedy, provenance_id, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (str(row["question_id"]), row["image"], row["question"], answer, key,
                     json.dumps(list(row.get("gt_answers") or [])), int(bool(row.get("greedy"))),
                     provenance_id, time.time()),
                )
                counts["added" if cursor.rowcount else "merged"] += 1
        return counts

    def sampled_question_ids(self, checkpoint: str) -> set[str]:
        """Questions already sampled from this checkpoint (a re-run after a kill skips them)."""
        rows = self._read("SELECT DISTINCT s.question_id FROM samples s JOIN provenance p ON p.id = s.provenance_id"
                          " WHERE p.checkpoint = ?", (str(checkpoint),))
        return {r[0] for r in rows}

    def sample(self, sample_id: int) -> dict | None:
        rows = self._read("SELECT * FROM samples WHERE id = ?", (sample_id,))
        return _sample_dict(rows[0]) if rows else None

    def image_path(self, sample_id: int) -> Path | None:
        """The image file of a sample, or None; never a path outside the image root."""
        root = self.image_root
        sample = self.sample(sample_id)
        if root is None or sample is None:
            return None
        root = root.resolve()
        path = (root / sample["image"]).resolve()  # resolve(): `..` and symlinks cannot leave the root
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    def count_samples(self) -> int:
        return self._read("SELECT count(*) FROM samples")[0][0]

    # -- labels ---------------------------------------------------------------

    def _refresh_human_count(self, db, sample_id: int) -> None:
        db.execute("UPDATE samples SET human_labelers = (SELECT count(DISTINCT labeler) FROM labels"
                   " WHERE sample_id = ? AND labeler != ? AND undone_at IS NULL) WHERE id = ?",
                   (sample_id, AUTO, sample_id))

    def add_label(self, sample_id, labeler: str, label: str, at: float | None = None,
                  allow_auto: bool = False) -> int:
        """Append one label; returns its id once the label is on disk."""
        if not isinstance(sample_id, int) or isinstance(sample_id, bool):
            raise StoreError("field 'sample_id' must be an integer")
        if not -2**63 <= sample_id < 2**63:  # beyond SQLite's integers: no sample has it (and binding it overflows)
            raise UnknownSample(f"unknown sample_id {sample_id}")
        labeler = check_labeler(labeler, allow_auto)
        check_label(label)
        pending = _PendingLabel((sample_id, labeler, label, time.time() if at is None else at))
        with self._pending_lock:
            self._pending.append(pending)
        with self._lock:  # whoever gets the writer first commits every label queued so far
            if not pending.done:
                self._commit_pending()
        if pending.error is not None:
            raise pending.error
        return pending.label_id

    def _commit_pending(self) -> None:
        with self._pending_lock:
            batch, self._pending = self._pending, []
        try:
            with self._write() as db:
                for pending in batch:
                    sample_id = pending.row[0]
                    if db.execute("SELECT 1 FROM samples WHERE id = ?", (sample_id,)).fetchone() is None:
                        pending.error = UnknownSample(f"unknown sample_id {sample_id}")
                        continue
                    pending.label_id = db.execute(
                        "INSERT INTO labels (sample_id, labeler, label, time) VALUES (?, ?, ?, ?)", pending.row
                    ).lastrowid
                for sample_id in {p.row[0] for p in batch if p.error is None}:
                    self._refresh_human_count(db, sample_id)
        except Exception as exc:  # rolled back: nothing of this batch is stored
            for pending in batch:
                pending.label_id, pending.error = None, pending.error or exc
        finally:
            for pending in batch:
                pending.done = True

    def undo(self, labeler: str) -> dict | None:
        """Withdraw the labeler's most recently submitted label (kept, marked undone); its sample, or None."""
        labeler = check_labeler(labeler)
        with self._write() as db:
            row = db.execute("SELECT id, sample_id FROM labels WHERE labeler = ? AND undone_at IS NULL"
                             " ORDER BY id DESC LIMIT 1", (labeler,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE labels SET undone_at = ? WHERE id = ?", (time.time(), row["id"]))
            self._refresh_human_count(db, row["sample_id"])
        return {"label_id": row["id"], "sample_id": row["sample_id"]}

    def next_sample(self, labeler: str, per_item: int = 1, exclude: Iterable[int] = ()) -> dict | None:
        """A sample that needs a label from this labeler: fewer than `per_item` people labeled it,
        this labeler has not, and it is not in `exclude` (items leased to other labelers)."""
        exclude = sorted(set(exclude))
        marks = ",".join("?" * len(exclude))
        rows = self._read(
            "SELECT * FROM samples s WHERE s.human_labelers < ?"
            + (f" AND s.id NOT IN ({marks})" if exclude else "")
            + " AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sample_id = s.id AND l.labeler = ?"
              " AND l.undone_at IS NULL) ORDER BY s.human_labelers, s.id LIMIT 1",
            (per_item, *exclude, labeler),
        )
        return _sample_dict(rows[0]) if rows else None

    def has_label(self, sample_id: int, labeler: str) -> bool:
        return bool(self._read("SELECT 1 FROM labels WHERE sample_id = ? AND labeler = ? AND undone_at IS NULL",
                               (sample_id, labeler)))

    def progress(self, labeler: str | None = None, per_item: int = 1) -> dict:
        with self._read_lock:
            total = self._reader.execute("SELECT count(*) FROM samples").fetchone()[0]
            done = self._reader.execute("SELECT count(*) FROM samples WHERE human_labelers >= ?",
                                        (per_item,)).fetchone()[0]
            mine = None
            if labeler is not None:
                mine = self._reader.execute("SELECT count(DISTINCT sample_id) FROM labels WHERE labeler = ?"
                                            " AND undone_at IS NULL", (labeler,)).fetchone()[0]
        return {"samples": total, "done": done, "mine": mine}

    def current_labels(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT id, sample_id, labeler, label, time FROM current_labels")]

    def all_labels(self) -> list[dict]:
        """Every label row ever written, history and undone ones included."""
        return [dict(r) for r in self._read("SELECT * FROM labels ORDER BY id")]

    # -- auto-labels, import ---------------------------------------------------

    def autolabel(self, min_accuracy: float, error_rate: float = 0.0, seed: int = 0) -> dict:
        """Label samples that have ground truth as `auto`: correct iff official VQA accuracy >= min_accuracy.

        `error_rate` simulates a careless labeler: that share of the samples gets the other label. Which
        samples is fixed by (seed, sample id), so a re-run flips the same ones. Only changes are written
        (a re-run with the same settings adds nothing)."""
        if not 0.0 <= min_accuracy <= 1.0:
            raise StoreError(f"min_accuracy must be in [0, 1], got {min_accuracy}")
        if not 0.0 <= error_rate < 0.5:
            raise StoreError(f"error_rate must be in [0, 0.5), got {error_rate}")
        current = {r["sample_id"]: r["label"] for r in self.current_labels() if r["labeler"] == AUTO}
        counts = Counter()
        new_labels = []
        for row in self._read("SELECT id, answer, gt_answers FROM samples"):
            gt = json.loads(row["gt_answers"])
            if not gt:
                counts["no_ground_truth"] += 1
                continue
            # The metric's mean of ten thirds is inexact (2 of 10 matches gives 0.59999...): compare with a
            # tolerance, so that 0.6 means "at least two annotators" as it reads.
            right = vqa_accuracy(row["answer"], gt) >= min_accuracy - 1e-9
            if error_rate and random.Random(f"{seed}:{row['id']}").random() < error_rate:
                right = not right
                counts["flipped"] += 1
            label = "correct" if right else "incorrect"
            counts[label] += 1
            if current.get(row["id"]) == label:
                counts["unchanged"] += 1
            else:
                new_labels.append((row["id"], label))
        stamp = time.time()
        with self._write() as db:
            db.executemany("INSERT INTO labels (sample_id, labeler, label, time) VALUES (?, ?, ?, ?)",
                           [(sid, AUTO, label, stamp) for sid, label in new_labels])
        counts["written"] = len(new_labels)
        return {k: counts[k] for k in ("written", "unchanged", "correct", "incorrect", "flipped", "no_ground_truth")}

    def import_labels(self, path: str | Path, rejects) -> dict:
        """Labels made elsewhere: JSONL rows {"sample_id", "label", "labeler", "time"?}.

        `time` is unix seconds or ISO 8601 (default: now). A bad row is rejected with its line number
        (rejects: a vlm.data.RejectLog); a row equal to a stored label (same sample, labeler, label
        and time) is counted as already present, so importing a file twice adds nothing."""
        path = Path(path)
        good = []
        source = str(path)
        with open(path) as f, self._lock:
            known_ids = {r[0] for r in self._db.execute("SELECT id FROM samples")}
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"line {number}"
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise StoreError("not a JSON object")
                    unknown = set(row) - {"sample_id", "label", "labeler", "time"}
                    if unknown:
                        raise StoreError(f"unknown field(s) {sorted(unknown)}")
                    sample_id = row.get("sample_id")
                    if not isinstance(sample_id, int) or isinstance(sample_id, bool):
                        raise StoreError("field 'sample_id' must be an integer")
                    if sample_id not in known_ids:
                        raise StoreError(f"unknown sample_id {sample_id}")
                    labeler = check_labeler(row.get("labeler"), allow_auto=True)
                    label = check_label(row.get("label"))
                    at = _parse_time(row.get("time"))
                except (json.JSONDecodeError, StoreError) as exc:
                    rejects.reject(where, source, str(exc))
                    continue
                good.append((sample_id, labeler, label, at))
        present = 0
        with self._write() as db:
            for sample_id, labeler, label, at in good:
                if db.execute("SELECT 1 FROM labels WHERE sample_id=? AND labeler=? AND label=? AND time=?",
                              (sample_id, labeler, label, at)).fetchone():
                    present += 1
                    continue
                db.execute("INSERT INTO labels (sample_id, labeler, label, time) VALUES (?, ?, ?, ?)",
                           (sample_id, labeler, label, at))
            for sample_id in {g[0] for g in good}:
                self._refresh_human_count(db, sample_id)
        return {"imported": len(good) - present, "already_present": present, "rejected": rejects.count}

    # -- pairwise preferences -------------------------------------------------

    def add_comparison(self, sample_a, sample_b, labeler: str, verdict: str, at: float | None = None) -> int:
        """Append one judgement of two answers to the same question about the same image, as shown
        (A, B); returns its id once it is on disk."""
        for name, value in (("sample_a", sample_a), ("sample_b", sample_b)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(f"field '{name}' must be an integer")
        if sample_a == sample_b:
            raise StoreError("fields 'sample_a' and 'sample_b' must be two different samples")
        labeler = check_labeler(labeler)
        if verdict not in VERDICTS:
            raise StoreError(f"field 'verdict' must be one of {list(VERDICTS)}, got {verdict!r}")
        with self._write() as db:
            rows = {r["id"]: r for r in db.execute("SELECT id, question_id, image FROM samples WHERE id IN (?, ?)",
                                                   (sample_a, sample_b))}
            for sample_id in (sample_a, sample_b):
                if sample_id not in rows:
                    raise UnknownSample(f"unknown sample_id {sample_id}")
            a, b = rows[sample_a], rows[sample_b]
            if (a["question_id"], a["image"]) != (b["question_id"], b["image"]):
                raise StoreError(f"samples {sample_a} and {sample_b} answer different questions "
                                 f"({a['question_id']}, {b['question_id']}): only answers to one question compare")
            return db.execute("INSERT INTO comparisons (sample_a, sample_b, labeler, verdict, time) VALUES (?, ?, ?, ?, ?)",
                              (sample_a, sample_b, labeler, verdict, time.time() if at is None else at)).lastrowid

    def next_pair(self, labeler: str) -> tuple[dict, dict] | None:
        """Two answers to one question that this labeler has not compared yet (in either order)."""
        rows = self._read(
            "SELECT a.id AS a_id, b.id AS b_id FROM samples a JOIN samples b"
            " ON a.question_id = b.question_id AND a.image = b.image AND a.id < b.id"
            " WHERE NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.labeler = ? AND c.undone_at IS NULL"
            "   AND ((c.sample_a = a.id AND c.sample_b = b.id) OR (c.sample_a = b.id AND c.sample_b = a.id)))"
            " ORDER BY a.id, b.id LIMIT 1", (labeler,))
        return (self.sample(rows[0]["a_id"]), self.sample(rows[0]["b_id"])) if rows else None

    def comparisons_by(self, labeler: str) -> int:
        return self._read("SELECT count(*) FROM comparisons WHERE labeler = ? AND undone_at IS NULL", (labeler,))[0][0]

    def all_comparisons(self) -> list[dict]:
        return [dict(r) for r in self._read("SELECT * FROM comparisons ORDER BY id")]

    def resolve_pairs(self) -> tuple[list[dict], Counter]:
        """The final preference of every compared pair: each labeler's latest verdict counts (the pair
        in either order); the verdict most labelers gave wins; a tie is counted, not exported. Only
        'a better' / 'b better' make a (chosen, rejected) pair; both right / both wrong say nothing
        about the order and are counted."""
        latest: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
        for row in self.all_comparisons():  # in insertion order: later rows overwrite earlier ones
            if row["undone_at"] is not None:
                continue
            low, high = sorted((row["sample_a"], row["sample_b"]))
            verdict = row["verdict"]
            if verdict in ("a", "b"):  # as the better sample's id, whatever side it was shown on
                verdict = str(row["sample_a"] if verdict == "a" else row["sample_b"])
            latest[(low, high)][row["labeler"]] = verdict
        pairs, counts = [], Counter()
        for (low, high), verdicts in sorted(latest.items()):
            tally = Counter(verdicts.values()).most_common()
            counts["compared"] += 1
            if len(tally) > 1 and tally[0][1] == tally[1][1]:
                counts["tie"] += 1
                continue
            winner = tally[0][0]
            if winner in ("both_right", "both_wrong"):
                counts[winner] += 1
                continue
            chosen, rejected = (low, high) if int(winner) == low else (high, low)
            counts["preference"] += 1
            pairs.append({"chosen": self.sample(chosen), "rejected": self.sample(rejected),
                          "labelers": ",".join(sorted(name for name, v in verdicts.items() if v == winner))})
        return pairs, counts

    # -- resolution, agreement, export ----------------------------------------

    def resolve(self) -> tuple[list[dict], Counter]:
        """The final label of every sample (see `resolve_sample`), plus counts of outcomes."""
        by_sample: dict[int, dict[str, str]] = defaultdict(dict)
        for row in self.current_labels():
            by_sample[row["sample_id"]][row["labeler"]] = row["label"]
        resolved, counts = [], Counter()
        for row in self._read("SELECT * FROM samples ORDER BY id"):
            outcome = resolve_sample(by_sample.get(row["id"], {}))
            counts["samples"] += 1
            counts[outcome["status"]] += 1
            if outcome["status"] in ("human", "auto"):
                resolved.append({**_sample_dict(row), **outcome})
        return resolved, counts

    def stats(self) -> dict:
        current = self.current_labels()
        per_labeler: dict[str, Counter] = defaultdict(Counter)
        by_sample: dict[int, dict[str, str]] = defaultdict(dict)
        for row in current:
            per_labeler[row["labeler"]][row["label"]] += 1
            by_sample[row["sample_id"]][row["labeler"]] = row["label"]
        humans = sorted(name for name in per_labeler if name != AUTO)
        agreement = []
        for a, b in combinations(humans, 2):
            pairs = [(labels[a], labels[b]) for labels in by_sample.values() if a in labels and b in labels]
            if pairs:
                agreement.append({"labelers": [a, b], "items": len(pairs), **agreement_figures(pairs)})
        auto_pairs = []
        for labels in by_sample.values():
            human = resolve_sample({k: v for k, v in labels.items() if k != AUTO})
            if AUTO in labels and human["status"] == "human":
                auto_pairs.append((labels[AUTO], human["label"]))
        _, outcomes = self.resolve()
        return {
            "samples": self.count_samples(),
            "labels_written": self._read("SELECT count(*) FROM labels")[0][0],
            "per_labeler": {name: {label: per_labeler[name][label] for label in LABELS} | {
                "total": sum(per_labeler[name].values())} for name in sorted(per_labeler)},
            "inter_labeler_agreement": agreement,
            "auto_vs_human": {"items": len(auto_pairs), **agreement_figures(auto_pairs)} if auto_pairs
            else {"items": 0},
            "final": {k: outcomes[k] for k in ("human", "auto", "unsure", "tie", "unlabeled")},
        }

    def export(self, out_dir: str | Path) -> dict:
        """Write the export contract (README "Labeling"): a datasets.Dataset (save_to_disk) of one row
        per sample with a final correct|incorrect label, labels.jsonl with the same rows, meta.json.
        Written to a temporary sibling and renamed, so a reader never sees half an export."""
        from datasets import Dataset, Features, Sequence, Value

        out_dir = Path(out_dir)
        resolved, counts = self.resolve()
        rows = [{
            "sample_id": r["sample_id"], "question_id": r["question_id"], "image": r["image"],
            "question": r["question"], "answer": r["answer"], "label": r["label"], "labeler": r["labeler"],
            "label_source": r["status"], "gt_answers": r["gt_answers"],
        } for r in resolved]
        features = Features({
            "sample_id": Value("int64"), "question_id": Value("string"), "image": Value("string"),
            "question": Value("string"), "answer": Value("string"), "label": Value("string"),
            "labeler": Value("string"), "label_source": Value("string"), "gt_answers": Sequence(Value("string")),
        })
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        columns = {name: [row[name] for row in rows] for name in features}  # from_list([]) has no columns
        Dataset.from_dict(columns, features=features).save_to_disk(str(tmp), num_shards=1)  # 0 rows: 1 shard
        with open(tmp / "labels.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        pairs, pair_counts = self.resolve_pairs()
        with open(tmp / "pairs.jsonl", "w") as f:  # pairwise preferences: (chosen, rejected) answers
            for pair in pairs:
                chosen, rejected = pair["chosen"], pair["rejected"]
                f.write(json.dumps({
                    "question_id": chosen["question_id"], "image": chosen["image"], "question": chosen["question"],
                    "chosen": chosen["answer"], "rejected": rejected["answer"], "chosen_sample_id": chosen["sample_id"],
                    "rejected_sample_id": rejected["sample_id"], "labelers": pair["labelers"],
                    "gt_answers": chosen["gt_answers"]}) + "\n")
        meta = {
            "image_root": str(self.image_root) if self.image_root else None,
            "db": str(self.path.resolve()),
            "counts": {"exported": len(rows), "correct": sum(r["label"] == "correct" for r in rows),
                       "incorrect": sum(r["label"] == "incorrect" for r in rows),
                       **{k: counts[k] for k in ("samples", "human", "auto", "unsure", "tie", "unlabeled")},
                       "pairs": len(pairs), "pairs_compared": pair_counts["compared"],
                       "pairs_tie": pair_counts["tie"], "pairs_both_right": pair_counts["both_right"],
                       "pairs_both_wrong": pair_counts["both_wrong"]},
            "exported_at": now_iso(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return meta


class _PendingLabel:
    """A label waiting for a group commit; `done` once its transaction committed or failed."""
    __slots__ = ("row", "done", "label_id", "error")

    def __init__(self, row: tuple):
        self.row, self.done, self.label_id, self.error = row, False, None, None


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    """Statement by statement inside the open transaction (executescript would commit it first)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ""


def _sample_dict(row: sqlite3.Row) -> dict:
    return {"sample_id": row["id"], "question_id": row["question_id"], "image": row["image"],
            "question": row["question"], "answer": row["answer"], "gt_answers": json.loads(row["gt_answers"]),
            "greedy": bool(row["greedy"])}


def _parse_time(value) -> float:
    if value is None:
        return time.time()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise StoreError(f"field 'time' is not ISO 8601: {value!r}") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    raise StoreError(f"field 'time' must be unix seconds or ISO 8601, got {value!r}")


def resolve_sample(labels: dict[str, str]) -> dict:
    """The final label of one sample from its current labels {labeler: label}.

    1. People's correct/incorrect labels decide by majority; the winners are the `labeler`
       (comma-joined). A tie is not exported (status "tie").
    2. Otherwise (no person labeled it, or people only said unsure) the `auto` label is used.
    3. Otherwise "unsure" if someone said unsure, else "unlabeled"."""
    votes = Counter(label for name, label in labels.items() if name != AUTO and label != "unsure")
    if votes:
        ranked = votes.most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            return {"status": "tie"}
        winner = ranked[0][0]
        names = sorted(name for name, label in labels.items() if name != AUTO and label == winner)
        return {"status": "human", "label": winner, "labeler": ",".join(names)}
    if labels.get(AUTO) in ("correct", "incorrect"):
        return {"status": "auto", "label": labels[AUTO], "labeler": AUTO}
    return {"status": "unsure" if labels else "unlabeled"}


def cohen_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of two raters over items they both rated; None when chance agreement is 1
    (both raters used one and the same category throughout: kappa is undefined)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(first[c] * second[c] for c in set(first) | set(second)) / (n * n)
    if expected == 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def agreement_figures(pairs: list[tuple[str, str]]) -> dict:
    kappa = cohen_kappa(pairs)
    return {"agreement": round(sum(a == b for a, b in pairs) / len(pairs), 4),
            "kappa": None if kappa is None else round(kappa, 4)}
