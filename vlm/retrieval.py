"""CLIP-GPT's second direction: caption -> predicted CLIP image embedding, and retrieval.

GPT-2 reads a caption followed by a special output token `<clip>`; a linear regression head
on that token's last hidden state predicts the image's pooled CLIP embedding. Trained
together with the first direction (image -> caption, the usual answer-only CE) with
loss = CE + mse_weight * MSE. Retrieval ranks an image index by cosine similarity to the
predicted embedding; recall@k is the share of captions whose own image is in the top k.

The pooled embedding is the CLS row of the vision features the feature cache stores
(vlm/features.py FeatureStore, built by `vqa-rlhf prep features`): the index is built
from the cache without running the vision tower again.

Not wired into a stage yet: these are the pieces (head, loss, index, recall) and their tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.features import llava_of

EMBED_TOKEN = "<clip>"


def image_index(store, images: list[str]) -> torch.Tensor:
    """[len(images), d]: each image's pooled CLIP embedding (the cached CLS row), L2-normalised."""
    return F.normalize(torch.stack([store(image)[0] for image in images]), dim=-1)


def recall_at_k(queries: torch.Tensor, index: torch.Tensor, targets: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Percent of queries whose target row of `index` is among the k most cosine-similar rows.
    A target's rank is the number of rows strictly more similar (ties go the target's way)."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(index.float(), dim=-1).T
    target_sims = sims.gather(1, targets.view(-1, 1))
    ranks = (sims > target_sims).sum(dim=1)
    return {f"recall@{k}": round(float((ranks < k).float().mean()) * 100, 2) for k in ks}


class EmbeddingHead(nn.Module):
    """Regression head: GPT-2's hidden state at `<clip>` -> a CLIP image embedding."""

    def __init__(self, text_width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(text_width, embed_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def add_embedding_token(processor, model) -> int:
    """Adds `<clip>` to the tokenizer and a row for it to GPT-2's embeddings (and lm_head); its id."""
    tokenizer = processor.tokenizer
    if EMBED_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [EMBED_TOKEN]},
                                     replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(EMBED_TOKEN)
    if token_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return token_id


def caption_inputs(tokenizer, captions: list[str], embed_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `caption <clip>` rows and each row's `<clip>` position."""
    rows = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] + [embed_token_id] for c in captions]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "positions": torch.tensor([len(r) - 1 for r in rows])}


def predict_embeddings(model, head: EmbeddingHead, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, embed_dim]: the head on GPT-2's last hidden state at each row's `<clip>`."""
    language_model = llava_of(model).model.language_model
    hidden = language_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    return head(hidden[torch.arange(hidden.shape[0]), inputs["positions"]])


def clip_gpt_loss(model, head: EmbeddingHead, caption_batch: dict, embed_inputs: dict, targets: torch.Tensor,
                  mse_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + mse_weight * MSE, CE, MSE): image -> caption (answer-only CE on a VLMCollator batch)
    and caption -> embedding (MSE against the images' pooled CLIP embeddings)."""
    ce = model(**caption_batch).loss
    mse = F.mse_loss(predict_embeddings(model, head, embed_inputs), targets)
    return ce + mse_weight * mse, ce, mse


@torch.no_grad()
def retrieval_recall(model, head: EmbeddingHead, tokenizer, embed_token_id: int, store, records,
                     batch_size: int = 64) -> dict[str, float]:
    """recall@1/5/10 of caption records ({image, caption}) against the index of their images."""
    images = sorted({r["image"] for r in records})
    row = {image: i for i, image in enumerate(images)}
    index = image_index(store, images)
    predicted = []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        predicted.append(predict_embeddings(model, head, caption_inputs(tokenizer, [r["caption"] for r in batch],
                                                                        embed_token_id)))
    targets = torch.tensor([row[r["image"]] for r in records])
    return {**recall_at_k(torch.cat(predicted), index, targets), "queries": len(records), "index_size": len(images)}
