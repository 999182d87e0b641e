"""CLIP-GPT's caption -> embedding direction (vlm/retrieval.py): recall on planted indexes,
the index from the feature cache, and CE + MSE training reaching the head and GPT-2."""
import copy

import pytest
import torch

from vlm.retrieval import (EmbeddingHead, add_embedding_token, caption_inputs, clip_gpt_loss, image_index,
                           recall_at_k, retrieval_recall)


def test_recall_on_a_planted_index():
    index = torch.eye(12)  # 12 images, orthogonal embeddings
    e = torch.eye(12)
    queries = torch.stack([
        e[0],                                  # target 0 first: rank 0
        e[1] + 2 * e[2],                       # image 2 more similar: rank 1
        e[2] + 2 * e[3:8].sum(0),              # 5 images more similar: rank 5 (outside the top 5)
        e[3] + 2 * (e[4:12].sum(0) + e[0] + e[1]),  # 10 more similar: outside the top 10
    ])
    recall = recall_at_k(queries, index, torch.tensor([0, 1, 2, 3]))
    assert recall == {"recall@1": 25.0, "recall@5": 50.0, "recall@10": 75.0}


def test_index_from_the_feature_cache_retrieves_each_image_from_its_own_embedding(
        tiny_model, tiny_processor, tiny_data_dir, tmp_path):
    from data_prep.features import build_cache, dataset_images
    from vlm.features import FeatureStore

    tiny_model.save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    build_cache(str(tmp_path / "model"), tiny_data_dir, tmp_path / "features", batch_size=16)
    store = FeatureStore(tmp_path / "features")
    images = [i for i in dataset_images(tiny_data_dir) if "/test/" in i]
    index = image_index(store, images)
    assert index.shape == (len(images), tiny_model.config.vision_config.hidden_size)
    assert torch.allclose(index.norm(dim=-1), torch.ones(len(images)))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    planted = torch.stack([store(images[i])[0] for i in order])  # exactly each image's own embedding
    assert recall_at_k(planted, index, order)["recall@1"] == 100.0


@pytest.fixture
def own_processor(tiny_processor):
    """A copy: adding <clip> must not change the session-wide processor other tests use."""
    return copy.deepcopy(tiny_processor)


def test_ce_plus_mse_training_reaches_the_head_and_gpt2_and_lowers_the_mse(tiny_model, own_processor,
                                                                          tiny_data_dir):
    tiny_processor = own_processor
    from vlm.data import ImageCache, VLMCollator, encode_example, load_split

    model, tokenizer = tiny_model, tiny_processor.tokenizer
    embed_id = add_embedding_token(tiny_processor, model)
    assert tokenizer.convert_ids_to_tokens(embed_id) == "<clip>"
    assert model.get_input_embeddings().weight.shape[0] > embed_id
    records = [load_split(tiny_data_dir, "captions", "train")[i] for i in range(6)]
    images = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    pixels = torch.stack([images(r["image"]) for r in records])
    with torch.no_grad():  # targets: pooled CLIP embeddings (CLS at the feature layer)
        targets = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 0]
    prompt = "USER: <image>\nDescribe the image.\nASSISTANT:"
    caption_batch = VLMCollator(tokenizer.pad_token_id)([
        {**vars(encode_example(tokenizer, prompt, " " + r["caption"], model.config.image_seq_length, 128)),
         "pixel_values": p} for r, p in zip(records, pixels)])
    embed_inputs = caption_inputs(tokenizer, [r["caption"] for r in records], embed_id)
    assert (embed_inputs["input_ids"][torch.arange(6), embed_inputs["positions"]] == embed_id).all()
    head = EmbeddingHead(model.config.text_config.n_embd, targets.shape[-1])
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad] + list(head.parameters()),
                                 lr=3e-3)
    mses = []
    for step in range(25):
        loss, ce, mse = clip_gpt_loss(model, head, caption_batch, embed_inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert head.proj.weight.grad.abs().sum() > 0
            assert model.model.language_model.wte.weight.grad[embed_id].abs().sum() > 0
            assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0  # the CE direction
        optimizer.step()
        mses.append(mse.item())
    assert mses[-1] < 0.5 * mses[0]


def test_retrieval_recall_over_caption_records(tiny_model, own_processor):
    tiny_processor = own_processor
    class Store:  # stands in for FeatureStore: image -> [seq, d] features
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.features = {f"img{i}": torch.randn(3, 8, generator=g) for i in range(4)}

        def __call__(self, image):
            return self.features[image]

    embed_id = add_embedding_token(tiny_processor, tiny_model)
    store = Store()

    class Oracle(EmbeddingHead):  # predicts each caption's own image embedding: the wiring is tested
        def forward(self, hidden):
            return self.planted

    head = Oracle(tiny_model.config.text_config.n_embd, 8)
    records = [{"image": f"img{i}", "caption": f"caption {i}"} for i in (2, 0, 3, 1)]
    head.planted = torch.stack([store(r["image"])[0] for r in records])
    result = retrieval_recall(tiny_model, head, tiny_processor.tokenizer, embed_id, store, records)
    assert result["recall@1"] == 100.0 and result["index_size"] == 4 and result["queries"] == 4


def test_the_shared_processor_is_untouched(tiny_processor):
    assert "<clip>" not in tiny_processor.tokenizer.get_vocab()
