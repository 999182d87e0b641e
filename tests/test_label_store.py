"""Label store: history, undo, final-label resolution, export contract, import, kappa, autolabel, sampling."""
import json
import sqlite3

import pytest

from vlm.data import RejectLog
from rewards.label_store import AUTO, LabelStore, StoreError, UnknownSample, cohen_kappa, resolve_sample

GT_RED = ["red"] * 10


def make_store(tmp_path, n=4, gt=GT_RED):
    store = LabelStore(tmp_path / "labels.db", create=True)
    rows = [{"question_id": f"q{i}", "image": f"images/{i}.png", "question": "What colour?", "answer": answer,
             "gt_answers": gt} for i in range(n) for answer in ("red", "blue")]
    store.add_samples(tmp_path, rows, {"checkpoint": "ckpt", "decoding": {"k": 2}})
    return store


def test_samples_merge_normalized_duplicates_and_keep_provenance(tmp_path):
    store = LabelStore(tmp_path / "labels.db", create=True)
    rows = [{"question_id": "q1", "image": "a.png", "question": "How many?", "answer": a, "greedy": a == "Two"}
            for a in ("Two", "two", " 2 ", "3")]
    assert store.add_samples(tmp_path, rows, {"checkpoint": "/ck", "decoding": {"k": 3}}) == {"added": 2, "merged": 2}
    assert [(s["answer"], s["greedy"]) for s in map(store.sample, (1, 2))] == [("Two", True), ("3", False)]
    assert store.sampled_question_ids("/ck") == {"q1"} and store.sampled_question_ids("/other") == set()
    with pytest.raises(StoreError, match="holds samples of"):
        store.add_samples(tmp_path / "elsewhere", rows)
    prov = sqlite3.connect(tmp_path / "labels.db").execute("SELECT checkpoint, decoding, created FROM provenance").fetchone()
    assert prov[0] == "/ck" and json.loads(prov[1]) == {"k": 3} and prov[2].startswith("20")


def test_relabel_keeps_history_and_undo_restores_the_previous_label(tmp_path):
    store = make_store(tmp_path)
    first = store.add_label(1, "ann", "correct")
    store.add_label(1, "ann", "incorrect")
    assert [(r["labeler"], r["label"]) for r in store.current_labels()] == [("ann", "incorrect")]
    assert store.undo("ann")["sample_id"] == 1
    assert [(r["id"], r["label"]) for r in store.current_labels()] == [(first, "correct")]
    history = store.all_labels()
    assert [r["label"] for r in history] == ["correct", "incorrect"] and history[1]["undone_at"] is not None
    assert store.undo("ann")["label_id"] == first and store.current_labels() == []
    assert store.undo("ann") is None
    assert len(store.all_labels()) == 2  # nothing is ever deleted


@pytest.mark.parametrize("sample_id, labeler, label, error", [
    (999, "ann", "correct", UnknownSample), ("1", "ann", "correct", StoreError), (1, "", "correct", StoreError),
    (1, "ann", "right", StoreError), (1, AUTO, "correct", StoreError), (True, "ann", "correct", StoreError),
])
def test_bad_labels_are_refused_and_change_nothing(tmp_path, sample_id, labeler, label, error):
    store = make_store(tmp_path)
    with pytest.raises(error):
        store.add_label(sample_id, labeler, label)
    assert store.all_labels() == []


def test_next_sample_skips_what_the_labeler_did_and_honours_per_item(tmp_path):
    store = make_store(tmp_path, n=2)
    assert store.next_sample("ann")["sample_id"] == 1
    assert store.next_sample("ann", exclude=[1])["sample_id"] == 2
    store.add_label(1, "ann", "correct")
    assert store.next_sample("bob")["sample_id"] == 2  # one person per item by default
    assert store.next_sample("bob", per_item=2)["sample_id"] == 2  # unlabeled items first
    for sid in (2, 3, 4):
        store.add_label(sid, "ann", "incorrect")
    assert store.next_sample("bob") is None
    assert store.next_sample("bob", per_item=2)["sample_id"] == 1  # overlap for kappa
    assert store.next_sample("ann", per_item=2) is None


def test_final_label_latest_per_labeler_majority_humans_over_auto():
    assert resolve_sample({}) == {"status": "unlabeled"}
    assert resolve_sample({AUTO: "correct"}) == {"status": "auto", "label": "correct", "labeler": AUTO}
    assert resolve_sample({AUTO: "correct", "ann": "incorrect"})["label"] == "incorrect"
    assert resolve_sample({"ann": "unsure", AUTO: "incorrect"})["status"] == "auto"
    assert resolve_sample({"ann": "unsure"}) == {"status": "unsure"}
    assert resolve_sample({"ann": "correct", "bob": "incorrect"}) == {"status": "tie"}
    assert resolve_sample({"ann": "correct", "bob": "incorrect", "cy": "correct", AUTO: "incorrect"}) == {
        "status": "human", "label": "correct", "labeler": "ann,cy"}


def test_export_contract(tmp_path):
    from datasets import load_from_disk

    store = make_store(tmp_path, n=3, gt=GT_RED)
    store.add_samples(tmp_path, [{"question_id": "q9", "image": "images/9.png", "question": "Q?", "answer": "x"}])
    store.autolabel(0.6)  # every sample with ground truth gets an auto label
    store.add_label(1, "ann", "incorrect", at=100.0)
    store.add_label(1, "ann", "correct", at=200.0)  # latest wins
    store.add_label(2, "ann", "correct", at=300.0)  # overrides auto's "incorrect"
    store.add_label(3, "ann", "correct")
    store.add_label(3, "bob", "incorrect")  # tie: not exported
    store.add_label(4, "ann", "unsure")  # no decisive person: auto decides
    store.add_label(7, "ann", "unsure")  # sample 7 is "x" of q9: no ground truth, no auto label -> unsure

    out = tmp_path / "export"
    meta = store.export(out)
    dataset = load_from_disk(str(out))
    rows = {r["sample_id"]: r for r in dataset}
    assert set(rows) == {1, 2, 4, 5, 6}
    assert rows[1] == {"sample_id": 1, "question_id": "q0", "image": "images/0.png", "question": "What colour?",
                       "answer": "red", "label": "correct", "labeler": "ann", "label_source": "human",
                       "gt_answers": GT_RED}
    assert (rows[2]["label"], rows[2]["label_source"]) == ("correct", "human")
    assert (rows[4]["label"], rows[4]["labeler"], rows[4]["label_source"]) == ("incorrect", AUTO, "auto")
    assert rows[5]["label"] == "correct" and rows[6]["label"] == "incorrect"
    jsonl = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert jsonl == list(dataset)
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta and on_disk["image_root"] == str(tmp_path.resolve())
    assert on_disk["counts"] == {"exported": 5, "correct": 3, "incorrect": 2, "samples": 7, "human": 2,
                                 "auto": 3, "unsure": 1, "tie": 1, "unlabeled": 0, "pairs": 0, "pairs_compared": 0,
                                 "pairs_tie": 0, "pairs_both_right": 0, "pairs_both_wrong": 0}
    assert (out / "pairs.jsonl").read_text() == ""  # no pairwise judgements yet
    store.export(out)  # replacing an export works
    assert len(load_from_disk(str(out))) == 5


def test_export_of_an_empty_store_is_an_empty_dataset_with_the_schema(tmp_path):
    from datasets import load_from_disk

    store = make_store(tmp_path, n=1)
    store.export(tmp_path / "out")
    dataset = load_from_disk(str(tmp_path / "out"))
    assert len(dataset) == 0 and "gt_answers" in dataset.column_names


def test_cohen_kappa_against_a_hand_computed_value():
    # 10 items; ann: 6 correct 4 incorrect; bob: 5 correct 5 incorrect; they agree on 4 correct + 3 incorrect.
    # p_o = 7/10; p_e = 0.6*0.5 + 0.4*0.5 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    ann = ["correct"] * 6 + ["incorrect"] * 4
    bob = ["correct"] * 4 + ["incorrect"] * 2 + ["incorrect"] * 3 + ["correct"]
    assert cohen_kappa(list(zip(ann, bob))) == pytest.approx(0.4)
    assert cohen_kappa([("correct", "correct")] * 3) is None  # one category: undefined
    assert cohen_kappa([("correct", "incorrect"), ("incorrect", "correct")]) == pytest.approx(-1.0)


def test_stats_per_labeler_and_kappa_on_items_labeled_by_both(tmp_path):
    store = make_store(tmp_path, n=5)  # 10 samples
    ann = ["correct"] * 6 + ["incorrect"] * 4
    bob = ["correct"] * 4 + ["incorrect"] * 5 + ["correct"]
    for sid, (a, b) in enumerate(zip(ann, bob), 1):
        store.add_label(sid, "ann", a)
        store.add_label(sid, "bob", b)
    store.add_label(1, "cy", "unsure")
    stats = store.stats()
    assert stats["per_labeler"]["ann"] == {"correct": 6, "incorrect": 4, "unsure": 0, "total": 10}
    assert stats["per_labeler"]["cy"]["total"] == 1
    pairs = {tuple(p["labelers"]): p for p in stats["inter_labeler_agreement"]}
    assert pairs[("ann", "bob")]["items"] == 10 and pairs[("ann", "bob")]["kappa"] == pytest.approx(0.4)
    assert pairs[("ann", "cy")]["items"] == 1


def test_autolabel_uses_the_official_metric_and_reports_agreement(tmp_path):
    store = make_store(tmp_path, n=2, gt=["red"] * 8 + ["dark red"] * 2)
    store.add_samples(tmp_path, [{"question_id": "q5", "image": "images/5.png", "question": "Q?", "answer": "x"}])
    counts = store.autolabel(0.6)
    assert counts == {"written": 4, "unchanged": 0, "correct": 2, "incorrect": 2, "flipped": 0, "no_ground_truth": 1}
    labels = {r["sample_id"]: r["label"] for r in store.current_labels()}
    assert labels == {1: "correct", 2: "incorrect", 3: "correct", 4: "incorrect"}
    assert store.autolabel(0.6)["written"] == 0  # a re-run adds nothing
    # "dark red" matches 2 of 10 annotators: VQA accuracy 0.6 -> correct at 0.6, incorrect at 0.7
    store.add_samples(tmp_path, [{"question_id": "q0", "image": "images/0.png", "question": "What colour?",
                                  "answer": "dark red", "gt_answers": ["red"] * 8 + ["dark red"] * 2}])
    assert store.autolabel(0.6)["written"] == 1 and store.autolabel(0.7)["written"] == 1
    store.add_label(1, "ann", "correct")
    store.add_label(2, "ann", "correct")  # disagrees with auto
    assert store.stats()["auto_vs_human"] == {"items": 2, "agreement": 0.5, "kappa": 0.0}
    with pytest.raises(StoreError):
        store.autolabel(1.5)


def test_import_labels_counts_rejects_and_is_idempotent(tmp_path):
    store = make_store(tmp_path, n=1)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([
        json.dumps({"sample_id": 1, "label": "correct", "labeler": "ext", "time": 1700000000}),
        json.dumps({"sample_id": 2, "label": "incorrect", "labeler": "auto", "time": "2024-01-01T00:00:00Z"}),
        json.dumps({"sample_id": 99, "label": "correct", "labeler": "ext"}),
        "{not json",
        json.dumps({"sample_id": 1, "label": "maybe", "labeler": "ext"}),
        json.dumps({"sample_id": 1, "label": "correct", "labeler": "ext", "extra": 1}),
        json.dumps([1, 2]),
    ]) + "\n")
    rejects = RejectLog(tmp_path / "rejects.jsonl", "skip")
    assert store.import_labels(path, rejects) == {"imported": 2, "already_present": 0, "rejected": 5}
    reasons = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in reasons] == ["line 3", "line 4", "line 5", "line 6", "line 7"]
    assert "unknown sample_id 99" in reasons[0]["reason"] and "label" in reasons[2]["reason"]
    assert store.import_labels(path, RejectLog(None, "skip"))["already_present"] == 2
    assert len(store.all_labels()) == 2
    with pytest.raises(ValueError, match="line 3"):
        store.import_labels(path, RejectLog(None, "error"))
    assert len(store.all_labels()) == 2


def test_schema_version_is_checked_on_open(tmp_path):
    make_store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "labels.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("PRAGMA user_version=7")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer"):
        LabelStore(tmp_path / "labels.db")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    with pytest.raises(StoreError, match="not a label store"):
        LabelStore(tmp_path / "other.db")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError):
        LabelStore(tmp_path / "junk.db")
    with pytest.raises(FileNotFoundError):
        LabelStore(tmp_path / "missing.db")


def test_sample_command_puts_candidates_with_provenance_in_the_store(tiny_model, tiny_processor, tiny_data_dir,
                                                                      tmp_path):
    from stages.sample import main

    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tiny_processor.save_pretrained(model_dir)
    db = tmp_path / "labels.db"
    argv = ["--model", str(model_dir), "--data", str(tiny_data_dir), "--split", "train", "--db", str(db),
            "--max-questions", "6", "--k", "3", "--batch-size", "4", "--temperature", "1.5"]
    assert main(argv) == 0
    store = LabelStore(db)
    summary = json.loads((tmp_path / "sample.json").read_text())
    assert summary["questions"] == 6 and summary["samples_in_store"] == store.count_samples()
    # 4 candidates per question (greedy + 3) minus merged duplicates and empty answers
    assert summary["added"] + summary["merged"] + summary["empty"] == 6 * 4
    samples = [store.sample(i) for i in range(1, store.count_samples() + 1)]
    assert {s["question_id"] for s in samples} == set(store.sampled_question_ids(str(model_dir.resolve())))
    assert sum(s["greedy"] for s in samples) <= 6 and all(len(s["gt_answers"]) == 10 for s in samples)
    assert store.image_root == tiny_data_dir.resolve() and store.image_path(1).is_file()
    prov = sqlite3.connect(db).execute("SELECT checkpoint, decoding FROM provenance").fetchone()
    assert prov[0] == str(model_dir.resolve()) and json.loads(prov[1])["temperature"] == 1.5
    store.close()
    assert main(argv) == 0  # a re-run skips the questions already sampled from this checkpoint
    assert json.loads((tmp_path / "sample.json").read_text())["skipped_already_sampled"] == 6
    assert LabelStore(db).count_samples() == summary["samples_in_store"]


def test_autolabel_export_import_commands(tmp_path, capsys):
    from datasets import load_from_disk

    from rewards import export_labels, import_labels
    from stages import autolabel

    make_store(tmp_path / "run" / "labels", n=2).close()  # the config's default place: <run>/labels/labels.db
    db = tmp_path / "run" / "labels" / "labels.db"
    # the pipeline-stage form: run config + overrides
    assert autolabel.main([f"output_root={tmp_path}", "name=run", "autolabel.min_accuracy=0.6"]) == 0
    assert "2 correct, 2 incorrect" in capsys.readouterr().out
    report = json.loads((db.parent / "autolabel.json").read_text())
    assert report["written"] == 4 and report["auto_vs_human"] == {"items": 0}
    labels = tmp_path / "ext.jsonl"
    labels.write_text(json.dumps({"sample_id": 1, "label": "incorrect", "labeler": "ann"}) + "\n{oops\n")
    assert import_labels.main(["--db", str(db), "--labels", str(labels)]) == 0
    assert "imported 1 labels" in capsys.readouterr().out
    assert "line 2" in (tmp_path / "ext.jsonl.rejects.jsonl").read_text()
    # the flag form
    assert autolabel.main(["--db", str(db), "--min-accuracy", "0.6"]) == 0
    assert "agreement with people on 1 samples: 0.0%" in capsys.readouterr().out
    assert export_labels.main(["--db", str(db), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "exported 4 labeled samples (1 correct, 3 incorrect; 1 by people, 3 auto)" in out
    assert len(load_from_disk(str(tmp_path / "out"))) == 4
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["per_labeler"]["ann"]["incorrect"] == 1
    with pytest.raises(SystemExit, match="label store not found"):
        export_labels.main(["--db", str(tmp_path / "nope.db"), "--out", str(tmp_path / "o2")])


@pytest.mark.parametrize("subcommand", ["sample", "label", "autolabel", "label export", "label import",
                                        "bench labels"])
def test_labeling_subcommands_explain_themselves(subcommand):
    import subprocess
    import sys

    from tests.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "stages.cli", *subcommand.split(), "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "usage: vqa-rlhf " + subcommand in result.stdout


# ---------------------------------------------------------------- pairwise preferences

def make_pair_store(tmp_path):
    """Two questions with three candidate answers each (samples 1-3: q0, 4-6: q1)."""
    store = LabelStore(tmp_path / "labels.db", create=True)
    rows = [{"question_id": f"q{i}", "image": f"images/{i}.png", "question": "What colour?", "answer": answer,
             "gt_answers": GT_RED} for i in range(2) for answer in ("red", "blue", "green")]
    store.add_samples(tmp_path, rows)
    return store


def test_pairwise_preferences_round_trip_through_the_store_and_the_export(tmp_path):
    from datasets import load_from_disk

    store = make_pair_store(tmp_path)
    assert [s["sample_id"] for s in store.next_pair("ann")] == [1, 2]
    store.add_comparison(1, 2, "ann", "a")  # red better than blue
    assert [s["sample_id"] for s in store.next_pair("ann")] == [1, 3]
    store.add_comparison(3, 1, "ann", "b")  # shown the other way round: red better than green
    store.add_comparison(1, 3, "bob", "a")
    store.add_comparison(2, 3, "ann", "both_wrong")
    store.add_comparison(4, 5, "ann", "a")
    store.add_comparison(4, 5, "bob", "b")  # a tie between people: not exported
    store.add_comparison(4, 6, "ann", "b")
    store.add_comparison(4, 6, "ann", "both_right")  # a re-judgement: the latest counts, nothing is lost
    assert len(store.all_comparisons()) == 8 and store.comparisons_by("ann") == 6
    store.add_label(1, "ann", "correct")  # pointwise labels live beside the pairs
    meta = store.export(tmp_path / "export")
    pairs = [json.loads(l) for l in (tmp_path / "export" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"], p["labelers"]) for p in pairs] == [("red", "blue", "ann"),
                                                                          ("red", "green", "ann,bob")]
    assert pairs[0]["question_id"] == "q0" and pairs[0]["gt_answers"] == GT_RED
    counts = meta["counts"]
    assert (counts["pairs"], counts["pairs_compared"], counts["pairs_tie"], counts["pairs_both_wrong"],
            counts["pairs_both_right"]) == (2, 5, 1, 1, 1)
    assert len(load_from_disk(str(tmp_path / "export"))) == 1

    with pytest.raises(StoreError, match="answer different questions"):
        store.add_comparison(1, 4, "ann", "a")
    with pytest.raises(StoreError, match="verdict"):
        store.add_comparison(1, 2, "ann", "A")
    with pytest.raises(UnknownSample):
        store.add_comparison(1, 99, "ann", "a")
    with pytest.raises(StoreError, match="two different samples"):
        store.add_comparison(1, 1, "ann", "a")


def test_a_version_1_store_gains_the_comparisons_table_and_keeps_its_labels(tmp_path):
    store = make_store(tmp_path)
    store.add_label(1, "ann", "correct")
    store.close()
    db = sqlite3.connect(tmp_path / "labels.db")
    db.executescript("DROP TABLE comparisons; PRAGMA user_version=1;")  # as version 1 wrote it
    db.close()
    with LabelStore(tmp_path / "labels.db") as store:
        assert [r["label"] for r in store.all_labels()] == ["correct"]
        store.add_comparison(1, 2, "ann", "a")
        assert len(store.all_comparisons()) == 1
