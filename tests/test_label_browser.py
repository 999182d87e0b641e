"""The labeling page in a real headless Chromium (Debian's, driven by Playwright): keyboard labels and undo."""
import pytest

from rewards.label_browser import CHROMIUM, labeling_page
from rewards.label_store import LabelStore
from tests.test_label_app import make_dataset

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed "
                                                         "(.ci/run installs it: apt-get install chromium)")


@pytest.mark.parametrize("token", [None, "t0ken"])
def test_label_three_items_with_the_keyboard_and_undo_one(tmp_path, token):
    from playwright.sync_api import expect

    root = tmp_path / "data"
    store = LabelStore(tmp_path / "labels.db", create=True)
    store.add_samples(root, make_dataset(root, 5))
    try:
        with labeling_page(store, "labeler=alice" + (f"&token={token}" if token else ""), token) as (page, errors):
            item = page.locator("#item")
            expect(item).to_have_attribute("data-sample-id", "1")
            expect(page.locator("#question")).to_have_text("Question 0?")
            assert page.evaluate("document.getElementById('image').naturalWidth") == 8  # the image loaded
            assert page.locator("#truth").is_hidden()  # ground truth hidden by default
            for key, next_id in (("c", "2"), ("x", "3"), ("u", "4")):
                page.keyboard.press(key)
                expect(item).to_have_attribute("data-sample-id", next_id)
            expect(page.locator("#progress")).to_contain_text("3 by you")
            page.keyboard.press("z")  # undo: the third item (sample 3, "unsure") comes back
            expect(item).to_have_attribute("data-sample-id", "3")
            expect(page.locator("#status")).to_have_text("undone #3")
            page.keyboard.press("g")
            expect(page.locator("#truth")).to_have_text("ground truth: " + ", ".join(["yes"] * 10))
            assert errors == []
        current = {r["sample_id"]: r["label"] for r in store.current_labels()}
        assert current == {1: "correct", 2: "incorrect"}
        history = store.all_labels()
        assert [(r["sample_id"], r["label"], r["labeler"], r["undone_at"] is not None) for r in history] == [
            (1, "correct", "alice", False), (2, "incorrect", "alice", False), (3, "unsure", "alice", True)]
    finally:
        store.close()


def test_pairwise_mode_judges_two_answers_with_the_keyboard(tmp_path):
    from playwright.sync_api import expect

    root = tmp_path / "data"
    store = LabelStore(tmp_path / "labels.db", create=True)
    rows = make_dataset(root, 2)
    store.add_samples(root, rows + [{**rows[0], "answer": "no"}, {**rows[1], "answer": "no"}])  # pairs 1-3, 2-4
    try:
        with labeling_page(store, "labeler=alice&mode=pairs") as (page, errors):
            pair = page.locator("#pair")
            expect(pair).to_have_attribute("data-pair", "1-3")
            expect(page.locator("#title")).to_have_text("Which answer is better?")
            expect(page.locator("#answer-a")).to_have_text("A: yes")
            expect(page.locator("#answer-b")).to_have_text("B: no")
            assert page.evaluate("document.getElementById('pair-image').naturalWidth") == 8
            page.keyboard.press("b")
            expect(pair).to_have_attribute("data-pair", "2-4")
            page.keyboard.press("w")
            expect(page.locator("#done")).to_be_visible()
            assert errors == []
        assert [(c["sample_a"], c["sample_b"], c["verdict"], c["labeler"]) for c in store.all_comparisons()] == [
            (1, 3, "b", "alice"), (2, 4, "both_wrong", "alice")]
    finally:
        store.close()


def test_docs_pictures_copy_a_runs_plots_and_screenshot_its_labeling_page(tmp_path, monkeypatch):
    """`vqa-rlhf docs --pictures RUN --store RUN` fills docs/img/ and docs/reports/ from a finished run."""
    from stages import docs

    run, repo = tmp_path / "runs" / "default", tmp_path / "repo"
    (run / "ppo").mkdir(parents=True)
    (run / "labels").mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
    (run / "report.png").write_bytes(png)
    (run / "ppo" / "ppo.png").write_bytes(png)
    (run / "report.json").write_text('{"stages": {}}')
    store = LabelStore(run / "labels" / "labels.db", create=True)
    store.add_samples(tmp_path / "data", make_dataset(tmp_path / "data", 2))
    store.close()
    monkeypatch.setattr(docs, "REPO", repo)
    (repo / "docs").mkdir(parents=True)
    assert docs.main(["--store", str(run), "--pictures", str(run)]) == 0
    assert (repo / "docs/reports/default/report.json").read_text() == '{"stages": {}}'
    assert (repo / "docs/img/report.png").read_bytes() == png == (repo / "docs/img/ppo.png").read_bytes()
    shot = (repo / "docs/img/labeling.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 5000  # a real screenshot of the page, not an empty file
