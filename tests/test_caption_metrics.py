"""Caption metrics (vlm/caption_metrics.py) against values worked out by hand below."""
import math

import pytest

from vlm.caption_metrics import bleu, cider_d, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red circle, on the LEFT.") == ["a", "red", "circle", "on", "the", "left"]
    assert tokenize("it's 2 squares!") == ["it's", "2", "squares"]


def test_corpus_bleu_by_hand():
    candidates = {"A": "a red circle on the left", "B": "two squares"}
    references = {"A": ["a red circle on the right", "the red circle is on the left side"],
                  "B": ["two blue squares", "two squares"]}
    # A (6 words): 1-grams 6/6; 2-grams a-red, red-circle, circle-on, on-the (ref 1), the-left (ref 2): 5/5;
    #   3-grams a-red-circle, red-circle-on, circle-on-the (ref 1), on-the-left (ref 2): 4/4;
    #   4-grams a-red-circle-on, red-circle-on-the (ref 1) match, circle-on-the-left in neither: 2/3.
    #   closest reference length: 6.
    # B (2 words): 1-grams 2/2, 2-grams 1/1, no 3- or 4-grams (0/0); closest reference length 2.
    # corpus: correct [8, 6, 4, 2], total [8, 6, 4, 3]; c = 8 = r: no brevity penalty.
    scores = bleu(candidates, references)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(1.0)
    assert scores[2] == pytest.approx(1.0)
    assert scores[3] == pytest.approx((1 * 1 * 1 * 2 / 3) ** (1 / 4))  # 0.9036


def test_bleu_brevity_penalty_and_coco_smoothing():
    # 3 words against a 6-word reference: precisions 3/3, 2/2, 1/1, and 0/0 4-grams, which
    # coco-caption smooths to (0 + 1e-15) / (0 + 1e-9) = 1e-6. Brevity penalty exp(1 - 6/3) = e^-1.
    scores = bleu({"A": "a red circle"}, {"A": ["a red circle on the left"]})
    assert scores[2] == pytest.approx(math.exp(-1))
    assert scores[3] == pytest.approx((1e-6) ** (1 / 4) * math.exp(-1), rel=1e-6)


def test_cider_d_by_hand():
    candidates = {"1": "a red circle", "2": "a blue circle"}
    references = {"1": ["a red circle"], "2": ["a blue square"]}
    # 2 images: log(2) =: L. Document frequency: "a" in both images' references (idf log2 - log2 = 0),
    # every other reference n-gram in one (idf L); "circle" for image 2's candidate: df 1 (image 1).
    # Image 1 equals its reference: cosine 1 for n = 1, 2, 3; no 4-grams (norms 0, value 0);
    #   length delta 0: (1 + 1 + 1 + 0) / 4 * 10 = 7.5.
    # Image 2: unigrams a:0, blue:L, circle:L vs a:0, blue:L, square:L: L^2 / (sqrt2 L)^2 = 0.5;
    #   bigrams a-blue, blue-circle vs a-blue, blue-square (all weight L): 0.5; trigrams differ: 0;
    #   (0.5 + 0.5 + 0 + 0) / 4 * 10 = 2.5.
    score, per_image = cider_d(candidates, references)
    assert per_image["1"] == pytest.approx(7.5)
    assert per_image["2"] == pytest.approx(2.5)
    assert score == pytest.approx(5.0)


def test_cider_d_clipping_and_length_penalty_by_hand():
    candidates = {"1": "red circle red circle", "2": "blue square"}
    references = {"1": ["red circle"], "2": ["blue square"]}
    # Every n-gram has df <= 1: weight L = log 2 for all (a df of 0 counts as 1).
    # Image 1, unigrams: candidate red:2L, circle:2L (norm 2*sqrt2 L), reference L, L (norm sqrt2 L);
    #   clipped: min(2L, L) * L * 2 = 2L^2, / (4 L^2) = 0.5.
    #   bigrams: red-circle:2L, circle-red:L (norm sqrt5 L) vs red-circle:L: min(2L, L) * L / (sqrt5 L^2) = 1/sqrt5.
    #   3- and 4-grams: the reference has none: 0.
    #   length (bigram count) 3 vs 1: delta 2, penalty exp(-4 / 72) = exp(-1/18).
    # Image 2 equals its reference: (1 + 1 + 0 + 0) / 4 * 10 = 5.
    expected_1 = (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-1 / 18) * 10
    score, per_image = cider_d(candidates, references)
    assert per_image["1"] == pytest.approx(expected_1)
    assert per_image["2"] == pytest.approx(5.0)
    assert score == pytest.approx((expected_1 + 5.0) / 2)


def test_cider_d_averages_over_references():
    # A second, unrelated reference for image 1 halves its score (its n-grams share nothing).
    candidates = {"1": "a red circle", "2": "a blue circle"}
    one = cider_d(candidates, {"1": ["a red circle"], "2": ["a blue square"]})[1]["1"]
    two = cider_d(candidates, {"1": ["a red circle", "green triangle"], "2": ["a blue square"]})[1]["1"]
    # the new reference changes no df of image 1's n-grams ("green", "triangle" are new), and shares
    # no n-gram with the candidate; its length 1 vs 2 does not matter for a zero score.
    assert two == pytest.approx(one / 2)


def test_missing_references_are_an_error():
    with pytest.raises(ValueError, match="no reference"):
        bleu({"x": "a"}, {})
