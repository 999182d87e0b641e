"""`vqa-rlhf eval` writes the results file the VQA challenge server takes: every question of the
split exactly once, answers post-processed as the challenge's answer processor does, checked
against the questions file before it is written; on test-dev (no answers) that file is the output."""
import json
import subprocess
import sys

import pytest
from conftest import REPO
from test_convert import jpeg, prep, vqa_files

from vlm.config import load_config
from vlm.vqa_metric import check_results, submission_answer


def official_load_res(results_path, questions_path) -> list:
    """The checks of the official loader, GT-Vision-Lab/VQA PythonHelperTools/vqaTools/vqa.py
    VQA.loadRes (one results set per questions set), plus the server's one answer per id."""
    anns = json.loads(results_path.read_text())
    assert type(anns) == list, "results is not an array of objects"
    ids = [ann["question_id"] for ann in anns]
    questions = json.loads(questions_path.read_text())["questions"]
    assert set(ids) == {q["question_id"] for q in questions}, "Results do not correspond to current VQA set"
    assert len(ids) == len(set(ids))
    return anns


@pytest.mark.parametrize("raw, submitted", [
    ("Two.", "2"), ("The red Circle!", "red circle"), ("  yes\n", "yes"), ("a dog, two cats", "dog 2 cats"),
    ("1,000", "1000"), ("dont know", "don't know"), ("left", "left"),
])
def test_answers_go_to_the_server_as_the_challenge_answer_processor_leaves_them(raw, submitted):
    assert submission_answer(raw) == submitted


def test_the_results_check_names_the_record_and_field_that_breaks_a_rule():
    ids = [1, 2, 3]

    def check(results):
        return check_results(results, ids, "R.json", "Q.json")

    assert check([{"question_id": q, "answer": "yes"} for q in ids]) == 3
    with pytest.raises(ValueError, match="R.json: expected a JSON array"):
        check({"question_id": 1})
    with pytest.raises(ValueError, match=r"R.json: record 3 \(question_id 1\): field 'question_id': duplicate"):
        check([{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}, {"question_id": 1, "answer": "c"}])
    with pytest.raises(ValueError, match=r"record 1 \(question_id 9\): field 'question_id': not in Q.json"):
        check([{"question_id": 9, "answer": "a"}])
    with pytest.raises(ValueError, match=r"record 1 \(question_id 1\): field 'answer': expected a string"):
        check([{"question_id": 1, "answer": 2}])
    with pytest.raises(ValueError, match=r"R.json: record 1: missing field 'question_id'"):
        check([{"answer": "a"}])
    with pytest.raises(ValueError, match=r"no result for 2 of 3 questions of Q.json \(question_id 2, 3\)"):
        check([{"question_id": 1, "answer": "a"}])


@pytest.fixture
def test_dev(tmp_path):
    """VQA v2 test-dev in its official format: questions only, images under test2015 names."""
    images = tmp_path / "test2015"
    for image_id, colour in ((1, (200, 30, 30)), (2, (30, 30, 200))):
        jpeg(images / f"COCO_test2015_{image_id:012d}.jpg", colour)
    questions = [{"image_id": 1, "question": "What color is it?", "question_id": 1000},
                 {"image_id": 1, "question": "Is it red?", "question_id": 1001},
                 {"image_id": 2, "question": "How many?", "question_id": 2000}]
    q, _ = vqa_files(tmp_path, "test-dev2015", questions, None)
    out = tmp_path / "data"
    assert prep("vqav2", "--questions", q, "--images", images, "--out", out) == 0
    return q, images, out


def test_a_test_dev_split_gets_a_validated_submission_file_and_no_scores(tmp_path, test_dev, saved_tiny_model):
    from vlm import evaluation as evaluate

    q, _, out = test_dev
    config = load_config(REPO / "configs/default.yaml", [f"output_root={tmp_path}", "name=sub", "data.source=disk", "data.feature_cache=null",
                                                          f"data.dir={out}", "eval.split=test_dev"])
    metrics = evaluate.evaluate(config, saved_tiny_model, "test-dev")
    eval_dir = tmp_path / "sub" / "eval" / "test-dev"
    assert metrics["scored"] == 0 and metrics["count"] == 3
    assert metrics["results"] == str(eval_dir / "results.json")
    assert metrics["results_checked_against"] == str(q)  # the file the split was converted from
    assert not (eval_dir / "metrics.json").exists()
    results = official_load_res(eval_dir / "results.json", q)
    assert [r["question_id"] for r in results] == [1000, 1001, 2000]  # integers, as the official files have them
    raw = {int(p["question_id"]): p["prediction"]
           for p in map(json.loads, (eval_dir / "predictions.jsonl").read_text().splitlines())}
    assert {r["question_id"]: r["answer"] for r in results} == {qid: submission_answer(p) for qid, p in raw.items()}
    # the project's own validator, on the command line
    done = subprocess.run([sys.executable, "-m", "stages.cli", "score", "--results", str(eval_dir / "results.json"),
                           "--questions", str(q)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "valid results file, one answer for each of the 3 questions" in done.stdout


def test_a_question_the_converter_rejected_stops_the_submission_naming_it(tmp_path, test_dev, saved_tiny_model):
    from vlm import evaluation as evaluate

    q, images, out = test_dev
    questions = json.loads(q.read_text())
    questions["questions"].append({"image_id": 3, "question": "Where is its image?", "question_id": 3000})
    q.write_text(json.dumps(questions))
    assert prep("vqav2", "--questions", q, "--images", images, "--out", out) == 0  # 3000: "image not found"
    config = load_config(REPO / "configs/default.yaml", [f"output_root={tmp_path}", "name=sub", "data.source=disk", "data.feature_cache=null",
                                                          f"data.dir={out}", "eval.split=test_dev"])
    with pytest.raises(ValueError, match=rf"no result for 1 of 4 questions of {q} \(question_id 3000\)"):
        evaluate.evaluate(config, saved_tiny_model, "test-dev")
    assert not (tmp_path / "sub" / "eval" / "test-dev" / "results.json").exists()
    done = subprocess.run([sys.executable, "-m", "stages.cli", "eval", "configs/default.yaml", "--model",
                           str(saved_tiny_model), f"output_root={tmp_path}", "data.source=disk", f"data.dir={out}",
                           "eval.split=test_dev"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and "error:" in done.stderr and "question_id 3000" in done.stderr


def test_a_split_with_answers_writes_the_same_file_beside_its_scores(tmp_path, tiny_data_dir, saved_tiny_model):
    from vlm import evaluation as evaluate
    from vlm.data import load_split

    overrides = [f"output_root={tmp_path}", "name=scored", f"data.dir={tiny_data_dir}", "data.feature_cache=null"]
    config = load_config(REPO / "configs/default.yaml", overrides)
    metrics = evaluate.evaluate(config, saved_tiny_model, "sft")
    eval_dir = tmp_path / "scored" / "eval" / "sft"
    test = load_split(tiny_data_dir, "vqa", "test")
    assert metrics["count"] == metrics["scored"] == len(test)
    assert metrics["results_checked_against"] == str(tiny_data_dir / "vqa" / "test")  # no questions file: the split
    results = json.loads((eval_dir / "results.json").read_text())
    assert [r["question_id"] for r in results] == test["id"]  # the built-in ids are strings and stay so
    predictions = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in results] == [submission_answer(p["prediction"]) for p in predictions]
    assert json.loads((eval_dir / "metrics.json").read_text())["results"] == str(eval_dir / "results.json")

    partial = evaluate.evaluate(load_config(REPO / "configs/default.yaml", [*overrides, "eval.max_samples=5"]),
                                saved_tiny_model, "sft")
    assert "not a complete submission" in partial["results_checked_against"]
    assert len(json.loads((eval_dir / "results.json").read_text())) == 5
