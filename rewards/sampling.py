"""Candidate answers for labeling: K sampled answers per question plus the greedy one.

Candidates whose normalized form (vlm.vqa_metric.normalize_answer after whitespace
cleaning: "Two", "two" and "2" are one) is the same are merged; the exact text of the
first one is kept, the greedy answer first. Empty answers are dropped and counted.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from vlm.config import DecodingConfig
from vlm.data import vqa_prompt
from vlm.generate import generate
from vlm.vqa_metric import clean_whitespace, normalize_answer


def merge_candidates(greedy: str, sampled: list[str]) -> tuple[list[tuple[str, bool]], int]:
    """[(answer, is_greedy)] without normalized duplicates, greedy first; and the count of empty answers."""
    seen: dict[str, int] = {}
    out: list[tuple[str, bool]] = []
    empty = 0
    for index, text in enumerate([greedy, *sampled]):
        text = clean_whitespace(text)
        key = normalize_answer(text)
        if not key:
            empty += 1
            continue
        if key not in seen:
            seen[key] = len(out)
            out.append((text, index == 0))
    return out, empty


@torch.no_grad()
def sample_candidates(model, processor, records, images, prompt_template: str, k: int, decoding: DecodingConfig,
                      batch_size: int, max_length: int, progress: bool = True, seed: int | None = None,
                      skip=frozenset()):
    """Yields (record, [(answer, is_greedy)], empty_count) per record, batch by batch.

    `decoding` gives temperature, top_p and max_new_tokens of the K sampled answers. With `seed`,
    each batch of `records` draws from its own seed (seed + the index of its first record), so a
    batch's answers do not depend on the batches before it: a run that resumes with `skip` (ids of
    questions already sampled; batches of only those are not generated, their records not yielded)
    samples the rest exactly as a run that was never interrupted."""
    model.eval()
    greedy_decoding = replace(decoding, strategy="greedy")
    sample_decoding = replace(decoding, strategy="sample")
    for start in tqdm(range(0, len(records), batch_size), desc="sampling", unit="batch", disable=not progress):
        batch = records[start:start + batch_size]
        if all(str(r["id"]) in skip for r in batch):
            continue
        if seed is not None:
            torch.manual_seed(seed + start)
        pixel_values = torch.stack([images(r["image"]) for r in batch])
        prompts = [vqa_prompt(prompt_template, r["question"]) for r in batch]
        greedy = generate(model, processor.tokenizer, prompts, pixel_values, greedy_decoding, max_length,
                          image_kind=images.kind)
        sampled = generate(model, processor.tokenizer, prompts, pixel_values, sample_decoding, max_length,
                           num_return_sequences=k, image_kind=images.kind) if k > 0 else []
        for i, record in enumerate(batch):
            if str(record["id"]) in skip:
                continue
            # generate() returns the K sequences of a prompt next to each other
            candidates, empty = merge_candidates(greedy[i], sampled[i * k:(i + 1) * k])
            yield record, candidates, empty
