"""Captioning metrics in pure Python: BLEU-1..4 and CIDEr-D as the COCO caption evaluation
(tylin/coco-caption, pycocoevalcap `bleu/bleu_scorer.py` and `cider/cider_scorer.py`)
computes them, without its Java tokenizer.

- BLEU (Papineni et al. 2002), corpus level: clipped n-gram counts (clipped by the largest
  count in any one reference) summed over the corpus, geometric mean of the precisions,
  brevity penalty exp(1 - r/c) with r the sum of each caption's *closest* reference length
  (ties to the shorter). As coco-caption: precisions are (correct + 1e-15) / (total + 1e-9),
  so a corpus with no 4-gram at all gets BLEU-4 = (1e-6)^(1/4) times the others, not 0.
- CIDEr-D (Vedantam et al. 2015) as coco-caption's "CIDEr": tf-idf vectors of 1- to 4-grams,
  document frequency over the evaluated images' reference sets (an n-gram counts once per
  image), idf = log(images) - log(max(1, df)); per n the cosine with each reference, the
  candidate's weights clipped at the reference's (min), times the gaussian length penalty
  exp(-delta^2 / (2 * 6^2)); averaged over n and references, times 10, averaged over images.
  Quirk kept: coco-caption's length is the number of *bigrams* (words - 1).

Tokenization replaces the PTB tokenizer: lowercase, words and numbers kept (with inner
apostrophes), punctuation dropped; on plain captions this gives the same tokens.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Mapping, Sequence

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")
TINY, SMALL = 1e-15, 1e-9  # coco-caption's smoothing constants
SIGMA = 6.0


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _check(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list:
    missing = [key for key in candidates if not references.get(key)]
    if missing:
        raise ValueError(f"no reference captions for {len(missing)} image(s), e.g. {missing[0]!r}")
    return list(candidates)


def bleu(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n of {image: caption} against {image: [reference captions]}."""
    keys = _check(candidates, references)
    correct, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for key in keys:
        hyp = tokenize(candidates[key])
        refs = [tokenize(r) for r in references[key]]
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
        for n in range(1, max_n + 1):
            max_ref = Counter()
            for ref in refs:
                max_ref |= ngrams(ref, n)  # per n-gram, the largest count in one reference
            counts = ngrams(hyp, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            total[n - 1] += max(len(hyp) - n + 1, 0)
    ratio = (hyp_len + TINY) / (ref_len + SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + TINY) / (total[n] + SMALL)
        scores.append(product ** (1 / (n + 1)) * penalty)
    return scores


def _tfidf(words: list[str], df: Mapping, log_images: float, max_n: int):
    vectors, norms = [], []
    for n in range(1, max_n + 1):
        vec = {g: tf * (log_images - math.log(max(1.0, df.get(g, 0.0)))) for g, tf in ngrams(words, n).items()}
        vectors.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vectors, norms, max(len(words) - 1, 0)  # coco-caption's length: bigram count


def cider_d(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]], max_n: int = 4,
            sigma: float = SIGMA) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D (x10, as coco-caption) and the per-image scores."""
    keys = _check(candidates, references)
    refs = {key: [tokenize(r) for r in references[key]] for key in keys}
    df: defaultdict = defaultdict(float)
    for key in keys:
        for g in {g for ref in refs[key] for n in range(1, max_n + 1) for g in ngrams(ref, n)}:
            df[g] += 1
    log_images = math.log(float(len(keys))) if keys else 0.0
    per_image = {}
    for key in keys:
        hyp_vec, hyp_norm, hyp_len = _tfidf(tokenize(candidates[key]), df, log_images, max_n)
        total = [0.0] * max_n
        for ref in refs[key]:
            ref_vec, ref_norm, ref_len = _tfidf(ref, df, log_images, max_n)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * sigma ** 2))
            for n in range(max_n):
                value = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in hyp_vec[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    value /= hyp_norm[n] * ref_norm[n]
                total[n] += value * penalty
        per_image[key] = sum(total) / max_n / len(refs[key]) * 10.0
    score = sum(per_image.values()) / len(per_image) if per_image else 0.0
    return score, per_image


def caption_scores(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict:
    """BLEU-1..4 and CIDEr-D, in percent-free units as coco-caption prints them."""
    bleus = bleu(candidates, references)
    cider, _ = cider_d(candidates, references)
    return {**{f"bleu_{n}": round(b, 4) for n, b in enumerate(bleus, 1)}, "cider": round(cider, 4),
            "images": len(candidates)}
