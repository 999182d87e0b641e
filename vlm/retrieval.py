"""CLIP-GPT's second direction: caption -> predicted CLIP image embedding, and retrieval.

GPT-2 reads a caption followed by a special output token `<clip>`; a linear regression head
on that token's last hidden state predicts the image's pooled CLIP embedding. Trained
together with the first direction (image -> caption, the usual answer-only CE) with
loss = CE + mse_weight * MSE. Retrieval ranks an image index by cosine similarity to the
predicted embedding; recall@k is the share of captions whose own image is in the top k.

The pooled embedding is the CLS row of the vision features the feature cache stores
(vlm/features.py FeatureStore, built by `vqa-rlhf prep features`): the index is built
from the cache without running the vision tower again.

Wiring (`model.clip_head: true`, configs/seeds/clip-gpt.yaml): the head is the model's
`embedding_head` (vlm/projectors.py VLMForConditionalGeneration, saved with it as
safetensors); SFT's caption examples become CaptionEmbeddingExamples, EmbeddingCollator
adds their `caption <clip>` rows to the batch and VLMTrainer adds
`sft.clip_loss_weight * embedding_loss` to the CE. The target is the same CLS row the index
holds: the cached features' row 0, or the vision tower's CLS at `vision_feature_layer`.
`vqa-rlhf retrieval-eval` (stages/retrieval_eval.py) reports recall@1/5/10.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlm.data import IGNORE_INDEX, VLMCollator, pad
from vlm.image_input import PIXELS, ImageInputKind, input_kind_of, llava_of

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


def embedding_head(model) -> EmbeddingHead | None:
    """The model's `embedding_head` (model.clip_head), None when it has none."""
    return getattr(llava_of(model), "embedding_head", None)


def embedding_token_id(tokenizer) -> int:
    if EMBED_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no {EMBED_TOKEN} token: the model was not built with model.clip_head=true")
    return tokenizer.convert_tokens_to_ids(EMBED_TOKEN)


def caption_inputs(tokenizer, captions: list[str], embed_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `caption <clip>` rows and each row's `<clip>` position.

    " caption" is tokenized as SFT tokenizes a caption answer (data.answer_template " {answer}"),
    so retrieval reads the same ids the head was trained on."""
    rows = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] + [embed_token_id] for c in captions]
    return pad_embedding_rows(rows, tokenizer.pad_token_id)


def pad_embedding_rows(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = pad(rows, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "positions": torch.tensor([len(r) - 1 for r in rows])}


def predict_embeddings(model, head: EmbeddingHead, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, embed_dim]: the head on GPT-2's last hidden state at each row's `<clip>`."""
    language_model = llava_of(model).model.language_model
    device = language_model.get_input_embeddings().weight.device
    hidden = language_model(input_ids=inputs["input_ids"].to(device),
                            attention_mask=inputs["attention_mask"].to(device)).last_hidden_state
    return head(hidden[torch.arange(hidden.shape[0], device=device), inputs["positions"].to(device)])


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
                                                                        embed_token_id)).float().cpu())
    targets = torch.tensor([row[r["image"]] for r in records])
    return {**recall_at_k(torch.cat(predicted), index, targets), "queries": len(records), "index_size": len(images)}


# --- training the head in SFT (model.clip_head): examples, batches, loss ----------------------

EMBED_KEYS = ("embed_input_ids", "embed_attention_mask", "embed_positions", "embed_image_rows")


class CaptionEmbeddingExamples(torch.utils.data.Dataset):
    """Caption SFT examples (a SupervisedDataset of caption_items) that also carry
    `caption <clip>` ids for the head: the caption's supervised tokens without the EOS."""

    def __init__(self, captions, embed_token_id: int):
        self.captions = captions
        self.embed_token_id = embed_token_id

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        item = self.captions[index]
        caption = [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX][:-1]
        return {**item, "embed_ids": caption + [self.embed_token_id]}


class EmbeddingCollator(VLMCollator):
    """VLMCollator plus, for the rows that carry `embed_ids`, the padded `caption <clip>` rows
    (EMBED_KEYS) and which of the batch's stacked images is each row's target."""

    def __call__(self, batch: list[dict]) -> dict:
        out = super().__call__(batch)
        image_key = input_kind_of(batch[0]).key
        image_rows, rows, image_row = [], [], 0
        for item in batch:
            has_image = item.get(image_key) is not None
            if item.get("embed_ids") is not None:
                if not has_image:
                    raise ValueError("a caption -> embedding example without an image has no target")
                rows.append(item["embed_ids"])
                image_rows.append(image_row)
            image_row += has_image
        if rows:
            padded = pad_embedding_rows(rows, self.pad_token_id)
            out.update({"embed_input_ids": padded["input_ids"], "embed_attention_mask": padded["attention_mask"],
                        "embed_positions": padded["positions"], "embed_image_rows": torch.tensor(image_rows)})
        return out


def pop_embedding_inputs(inputs: dict) -> dict | None:
    """Takes EMBED_KEYS out of a batch (the model's forward must not see them); None if absent."""
    if "embed_input_ids" not in inputs:
        return None
    return {key: inputs.pop(key) for key in EMBED_KEYS}


def embedding_loss(model, embed_inputs: dict, images: torch.Tensor, kind: ImageInputKind) -> torch.Tensor:
    """MSE between the head's prediction at each `<clip>` and its image's pooled CLIP embedding."""
    targets = kind.pooled(model, images[embed_inputs["embed_image_rows"]])
    predicted = predict_embeddings(model, embedding_head(model), {
        "input_ids": embed_inputs["embed_input_ids"], "attention_mask": embed_inputs["embed_attention_mask"],
        "positions": embed_inputs["embed_positions"]})
    return F.mse_loss(predicted.float(), targets.float())


class TowerEmbeddings:
    """Stands in for a FeatureStore when there is no feature cache: each image's CLS row,
    computed once through the vision tower in batches. `store(image)` -> [1, width]."""

    def __init__(self, model, image_cache, images: list[str], batch_size: int = 64):
        self.rows: dict[str, torch.Tensor] = {}
        device = next(model.parameters()).device
        for start in tqdm(range(0, len(images), batch_size), desc="image index", unit="batch"):
            batch = images[start:start + batch_size]
            pixels = torch.stack([image_cache(image) for image in batch]).to(device)
            pooled = PIXELS.pooled(model, pixels).float().cpu()
            self.rows.update({image: row[None] for image, row in zip(batch, pooled)})

    def __call__(self, image: str) -> torch.Tensor:
        return self.rows[image]
