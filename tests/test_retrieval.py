"""CLIP-GPT's caption -> embedding direction (vlm/retrieval.py): recall on planted indexes,
the index from the feature cache, and CE + MSE training reaching the head and GPT-2."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vlm.retrieval import (
    EMBED_TOKEN,
    EmbeddingHead,
    caption_inputs,
    image_index,
    predict_embeddings,
    recall_at_k,
    retrieval_recall,
)
from tests.conftest import REPO, TINY_MODEL

# Test-side helpers: the model code adds `<clip>` when it builds a model (vlm/model.py) and trains
# CE + MSE through the Trainer (vlm/train.py VLMTrainer); these do the same on an existing tiny model.

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


def clip_gpt_loss(model, head: EmbeddingHead, caption_batch: dict, embed_inputs: dict, targets: torch.Tensor,
                  mse_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + mse_weight * MSE, CE, MSE): image -> caption (answer-only CE on a VLMCollator batch)
    and caption -> embedding (MSE against the images' pooled CLIP embeddings)."""
    ce = model(**caption_batch).loss
    mse = F.mse_loss(predict_embeddings(model, head, embed_inputs), targets)
    return ce + mse_weight * mse, ce, mse


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
    from vlm.features import FeatureStore
    from data_prep.features import build_cache, dataset_images

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


# --- the wiring: model.clip_head in SFT, the saved head, the retrieval_eval stage ----------------

CLIP_HEAD = ["model.projector=prefix", "model.prefix_length=1", "model.clip_head=true", "data.caption_ratio=1.0",
             "eval.caption_max_images=6"]


@pytest.fixture
def clip_gpt_run(tiny_overrides):
    """A tiny CLIP-GPT SFT run (CE + MSE on caption examples), then retrieval_eval and the report."""
    from vlm.config import load_config
    from vlm.report import build_report
    from stages import sft
    from stages.retrieval_eval import evaluate_retrieval

    config = load_config(REPO / "configs/default.yaml",
                         # a frozen vision tower (as CLIP-GPT's CLIP): fixed targets
                         [*tiny_overrides, *CLIP_HEAD, "sft.steps=12", "sft.batch_size=8", "sft.lr=3e-3",
                          "sft.freeze_vision=true"])
    metrics = sft.train(config)
    retrieval = evaluate_retrieval(config, config.run_dir / "sft" / "final")
    return config, metrics, retrieval, build_report(config.run_dir)


def test_sft_with_clip_head_trains_the_head_on_captions_and_the_mse_falls(clip_gpt_run):
    _, metrics, _, _ = clip_gpt_run
    mses = [e["embedding_mse"] for e in metrics["log_history"] if "embedding_mse" in e]
    assert len(mses) == metrics["steps"] == 12  # every step's batch had caption rows (logging_steps=1)
    assert sum(mses[-3:]) / 3 < 0.5 * sum(mses[:3]) / 3


def test_retrieval_eval_reports_recall_over_the_split_and_in_the_report(clip_gpt_run):
    import json

    config, _, retrieval, report = clip_gpt_run
    saved = json.loads((config.run_dir / "eval/retrieval/metrics.json").read_text())
    assert saved == retrieval
    assert retrieval["index_size"] == 6 and retrieval["queries"] >= 6 and retrieval["index_from"] == "vision_tower"
    assert 0 <= retrieval["recall@1"] <= retrieval["recall@5"] <= retrieval["recall@10"] == 100.0  # 6 images
    assert retrieval["chance"] == {"recall@1": round(100 / 6, 2), "recall@5": round(500 / 6, 2), "recall@10": 100.0}
    assert report["stages"]["retrieval"]["recall@1"] == retrieval["recall@1"]
    assert "Caption -> image retrieval" in (config.run_dir / "report.md").read_text()


def test_the_head_saves_as_safetensors_and_loads_back_with_the_clip_token(tiny_data_dir, tmp_path):
    from safetensors import safe_open

    from vlm.config import load_config
    from vlm.model import build_model, build_processor, load_model
    from vlm.retrieval import embedding_head, embedding_token_id
    from vlm.train import save_final
    from stages.sft import corpus

    config = load_config(REPO / "configs/default.yaml", [*TINY_MODEL, *CLIP_HEAD, f"data.dir={tiny_data_dir}"])
    processor = build_processor(config.model, corpus(config))
    model = build_model(config.model, processor)
    clip_id = embedding_token_id(processor.tokenizer)
    assert model.get_input_embeddings().weight.shape[0] > clip_id
    assert clip_id in model.generation_config.suppress_tokens  # never generated
    with torch.no_grad():
        embedding_head(model).proj.weight.normal_()
    save_final(model, processor, tmp_path / "final", {})
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert "embedding_head.proj.weight" in f.keys()
    loaded, loaded_processor = load_model(tmp_path / "final")
    assert embedding_token_id(loaded_processor.tokenizer) == clip_id
    for name, value in embedding_head(model).state_dict().items():
        assert torch.equal(embedding_head(loaded).state_dict()[name], value), name


def test_clip_head_with_the_stock_llava_projector_is_a_clear_error(tiny_data_dir):
    from vlm.config import load_config
    from vlm.model import build_model, build_processor
    from stages.sft import corpus
    config = load_config(REPO / "configs/default.yaml", [*TINY_MODEL, "model.clip_head=true",
                                                         f"data.dir={tiny_data_dir}"])
    with pytest.raises(ValueError, match="model.clip_head needs a model.projector other than llava"):
        build_model(config.model, build_processor(config.model, corpus(config)))


def test_retrieval_eval_of_a_model_without_the_head_says_so(tiny_model, tiny_processor, tiny_overrides, tmp_path):
    from vlm.config import load_config
    from stages.retrieval_eval import evaluate_retrieval

    tiny_model.save_pretrained(tmp_path / "plain")
    tiny_processor.save_pretrained(tmp_path / "plain")
    config = load_config(REPO / "configs/default.yaml", tiny_overrides)
    with pytest.raises(ValueError, match="no caption -> CLIP embedding head; train it with model.clip_head=true"):
        evaluate_retrieval(config, tmp_path / "plain")


def test_with_the_feature_cache_the_targets_and_index_are_the_towers_cls_rows(tiny_overrides, tiny_data_dir, tmp_path):
    """Training reads cached features (frozen tower) and eval's index comes from the cache;
    both equal what the vision tower computes from pixels, so recall is the same either way."""
    from vlm.config import load_config
    from vlm.data import ImageCache
    from vlm.features import FeatureStore
    from vlm.image_input import PIXELS
    from vlm.model import build_model, build_processor
    from data_prep.features import build_cache
    from stages import sft
    from stages.retrieval_eval import evaluate_retrieval
    from stages.sft import corpus

    base = load_config(REPO / "configs/default.yaml", [*tiny_overrides, *CLIP_HEAD])
    processor = build_processor(base.model, corpus(base))
    model = build_model(base.model, processor)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    build_cache(str(tmp_path / "model"), tiny_data_dir, tmp_path / "features", batch_size=16)
    store = FeatureStore(tmp_path / "features")
    images = sorted(store.rows)[:4]
    pixels = torch.stack([ImageCache(processor.image_processor, tiny_data_dir)(i) for i in images])
    assert torch.allclose(PIXELS.pooled(model, pixels),
                          torch.stack([store(i)[0] for i in images]), atol=1e-5)

    cached = load_config(REPO / "configs/default.yaml", [
        *tiny_overrides, *CLIP_HEAD, f"model.checkpoint={tmp_path / 'model'}",
        f"data.feature_cache={tmp_path / 'features'}", "sft.freeze_vision=true", "sft.steps=3"])
    metrics = sft.train(cached)
    assert len([e for e in metrics["log_history"] if "embedding_mse" in e]) == 3
    from_cache = evaluate_retrieval(cached, cached.run_dir / "sft" / "final")
    uncached = load_config(REPO / "configs/default.yaml", [*tiny_overrides, *CLIP_HEAD, "name=uncached"])
    from_tower = evaluate_retrieval(uncached, cached.run_dir / "sft" / "final")
    assert from_cache["index_from"] == "feature_cache" and from_tower["index_from"] == "vision_tower"
    assert {k: v for k, v in from_cache.items() if k.startswith("recall@")} == \
        {k: v for k, v in from_tower.items() if k.startswith("recall@")}
