"""Projector registry (vlm/projectors.py) and training schedules (vlm/train.py).

Each projector type: image token count, output shapes, save/load round trip, the
feature-cache path, gradients reaching its new modules; schedules: gradients reach only
the parts the current phase unfreezes, frozen GPT-2 blocks, optimizer choice."""
import pytest
import torch
from conftest import REPO, TINY_MODEL

from vlm.config import DecodingConfig, TrainConfig, load_config
from vlm.data import encode_example
from vlm.model import build_model, load_model
from vlm.train import build_trainer, model_part, save_final, set_trainable

PROMPT = "USER: <image>\nWhat color is the circle?\nASSISTANT:"
# type -> image tokens `<image>` expands to with the tiny model (48 px, 16 px patches: 9 + CLS)
EXPECTED_TOKENS = {"llava": 10, "mlp": 10, "linear-ln-transformer": 10, "prefix": 3, "cross-attention": 1}


def _model(tiny_processor, projector, *extra):
    torch.manual_seed(0)
    config = load_config(REPO / "configs/default.yaml",
                         [*TINY_MODEL, f"model.projector={projector}", "model.prefix_length=3", *extra])
    return build_model(config.model, tiny_processor)


def _batch(model, tokenizer, n=2):
    encoded = encode_example(tokenizer, PROMPT, " red", model.config.image_seq_length, 96)
    torch.manual_seed(1)
    return {"input_ids": torch.tensor([encoded.input_ids] * n), "labels": torch.tensor([encoded.labels] * n),
            "pixel_values": torch.randn(n, 3, 48, 48)}


@pytest.mark.parametrize("projector", list(EXPECTED_TOKENS))
def test_image_token_count_shapes_and_save_load_round_trip(tiny_processor, tmp_path, projector):
    model = _model(tiny_processor, projector)
    assert model.config.image_seq_length == EXPECTED_TOKENS[projector]
    batch = _batch(model, tiny_processor.tokenizer)
    image_id = model.config.image_token_index
    assert (batch["input_ids"][0] == image_id).sum() == EXPECTED_TOKENS[projector]
    width = model.config.text_config.n_embd
    features = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
    tokens_out = 10 if projector == "cross-attention" else EXPECTED_TOKENS[projector]  # cross-attn: all CLIP tokens
    assert [tuple(f.shape) for f in features] == [(tokens_out, width)] * 2
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)

    save_final(model, tiny_processor, tmp_path / "final", {"note": "test"})
    loaded, _ = load_model(tmp_path / "final")
    assert type(loaded) is type(model)
    assert loaded.config.model_type == ("llava" if projector == "llava" else "vlm_llava")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)


def test_default_projector_is_the_stock_llava_model(tiny_processor, tiny_model):
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    model = _model(tiny_processor, "llava")
    assert type(model) is LlavaForConditionalGeneration
    assert type(model.model.multi_modal_projector) is LlavaMultiModalProjector
    # the config key's default builds exactly what the tiny_model fixture (configs/default.yaml) builds
    assert model.config.to_dict() == tiny_model.config.to_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), tiny_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_added_image_embedding_starts_as_the_image_token_embedding(tiny_processor):
    model = _model(tiny_processor, "linear-ln-transformer")
    wte = model.model.language_model.wte.weight
    assert torch.equal(model.model.multi_modal_projector.image_token_embedding, wte[model.config.image_token_index])


@pytest.mark.parametrize("projector", ["mlp", "linear-ln-transformer", "prefix", "cross-attention"])
def test_every_new_module_gets_gradients_and_maps_to_its_part(tiny_processor, projector):
    model = _model(tiny_processor, projector)
    model(**_batch(model, tiny_processor.tokenizer)).loss.backward()
    projector_params = {n: p for n, p in model.named_parameters() if model_part(n) == "projector"}
    if projector == "cross-attention":
        assert any(".crossattention." in n for n in projector_params)  # the new GPT-2 layers count as connector
    assert all(n.startswith("model.multi_modal_projector.") or ".crossattention." in n or ".ln_cross_attn." in n
               for n in projector_params)
    no_grad = [n for n, p in projector_params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad
    assert all(model_part(n) == "vision" for n, _ in model.named_parameters() if ".vision_tower." in n)


@pytest.mark.parametrize("projector", ["prefix", "cross-attention"])
def test_cached_features_give_the_same_logits_as_pixels(tiny_processor, projector):
    from vlm.image_input import FEATURES, vision_features

    model = _model(tiny_processor, projector).eval()
    batch = _batch(model, tiny_processor.tokenizer)
    with torch.no_grad():
        from_pixels = model(**batch).logits
        features = vision_features(model.model.vision_tower, batch.pop("pixel_values"), -1)
        from_cache = model(**batch, **FEATURES.model_inputs(model, features)).logits
    assert torch.allclose(from_pixels, from_cache, atol=1e-5)
    from vlm.generate import generate

    decoding = DecodingConfig(max_new_tokens=4)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        cached = vision_features(model.model.vision_tower, pixels, -1)
    assert generate(model, tiny_processor.tokenizer, [PROMPT] * 2, cached, decoding, 96,
                    image_kind=FEATURES) == \
        generate(model, tiny_processor.tokenizer, [PROMPT] * 2, pixels, decoding, 96)


@pytest.mark.parametrize("projector", ["prefix", "cross-attention"])
def test_cached_generation_equals_a_full_recompute_greedy_loop(tiny_processor, projector):
    """generate() (KV cache; cross-attention gets the image at every step) against a loop that
    re-runs the whole sequence each step; beam search runs too."""
    from vlm.generate import generate

    model = _model(tiny_processor, projector).eval()
    tokenizer = tiny_processor.tokenizer
    pixels = torch.randn(2, 3, 48, 48)
    answers = generate(model, tokenizer, [PROMPT, PROMPT], pixels, DecodingConfig(max_new_tokens=5), 96)
    ids = torch.tensor([encode_example(tokenizer, PROMPT, None, model.config.image_seq_length, 96).input_ids] * 2)
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=ids, pixel_values=pixels).logits[:, -1]
            logits[:, model.config.image_token_index] = -float("inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    n_prompt = ids.shape[1] - 5
    expected = []
    for row in ids[:, n_prompt:]:
        row = row.tolist()
        row = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        expected.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    assert answers == expected
    beams = generate(model, tokenizer, [PROMPT, PROMPT], pixels, DecodingConfig(strategy="beam", max_new_tokens=4), 96)
    assert len(beams) == 2


def _train(model, tokenizer, tmp_path, config: TrainConfig):
    """Runs config.steps optimizer steps; returns, per step, the parts whose parameters had a gradient
    at the optimizer step, and the set of parameter names that received one."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.parts, self.names = [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            self.parts.append({model_part(n) for n in with_grad})
            self.names.append(with_grad)

    set_trainable(model, config)
    batch = _batch(model, tokenizer, n=1)
    dataset = [{"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(),
                "pixel_values": batch["pixel_values"][0]}] * 8
    record = Record()
    trainer = build_trainer(model, _Proc(tokenizer), dataset, config, tmp_path, 0, [record])
    trainer.train()
    return record


class _Proc:  # build_trainer only reads processor.tokenizer
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def _config(**kwargs) -> TrainConfig:
    base = dict(steps=4, batch_size=2, save_steps=100, logging_steps=100, warmup_steps=0, eval_steps=0, lr=1e-2)
    return TrainConfig(**{**base, **kwargs})


@pytest.mark.parametrize("projector", ["cross-attention", "prefix"])
def test_unfreeze_schedule_gradients_reach_only_the_current_phase(tiny_processor, tmp_path, projector):
    model = _model(tiny_processor, projector)
    vision_before = {n: p.detach().clone() for n, p in model.named_parameters() if model_part(n) == "vision"}
    schedule = [{"at_step": 0, "train": ["projector"]}, {"at_step": 2, "train": ["projector", "language"]},
                {"at_step": 3, "train": ["all"]}]
    record = _train(model, tiny_processor.tokenizer, tmp_path, _config(unfreeze_schedule=schedule))
    assert record.parts == [{"projector"}, {"projector"}, {"projector", "language"},
                            {"vision", "projector", "language"}]
    # the optimizer held the later phases' parameters from the start: vision moved in the last step
    assert any(not torch.equal(p, vision_before[n]) for n, p in model.named_parameters() if n in vision_before)


def test_unfreeze_schedule_by_epoch_and_bad_schedules(tiny_processor, tmp_path):
    model = _model(tiny_processor, "mlp")
    schedule = [{"at_epoch": 0, "train": ["projector"]}, {"at_epoch": 1, "train": ["all"]}]
    # 8 examples, batch 2: 4 steps per epoch
    record = _train(model, tiny_processor.tokenizer, tmp_path, _config(steps=6, unfreeze_schedule=schedule))
    assert record.parts == [{"projector"}] * 4 + [{"vision", "projector", "language"}] * 2
    for bad in ([{"at_step": 5, "train": ["projector"]}], [{"at_step": 0, "train": ["gpt"]}],
                [{"at_step": 0, "train": ["projector"]}, {"at_epoch": 1, "train": ["all"]}],
                [{"at_step": 0, "train": ["vision"]}]):
        with pytest.raises(ValueError, match="unfreeze_schedule"):
            set_trainable(model, _config(unfreeze_schedule=bad, freeze_vision=True))


def test_frozen_first_and_last_blocks_get_no_gradient(tiny_processor, tmp_path):
    model = _model(tiny_processor, "llava", "model.text_layers=3")
    record = _train(model, tiny_processor.tokenizer, tmp_path,
                    _config(steps=1, freeze_first_blocks=1, freeze_last_blocks=1, optim="sgd"))
    names = record.names[0]
    blocks = {int(n.split(".h.")[1].split(".")[0]) for n in names if ".h." in n}
    assert blocks == {1}
    assert any("wte" in n for n in names) and any(n.startswith("model.multi_modal_projector.") for n in names)
    with pytest.raises(ValueError, match="blocks"):
        set_trainable(model, _config(freeze_first_blocks=2, freeze_last_blocks=2))


@pytest.mark.parametrize("optim", ["adafactor", "sgd"])
def test_optimizer_choice_is_passed_through(tiny_processor, tmp_path, optim):
    model = _model(tiny_processor, "mlp")
    config = _config(steps=1, optim=optim)
    set_trainable(model, config)
    trainer = build_trainer(model, _Proc(tiny_processor.tokenizer), [], config, tmp_path, 0)
    optimizer = trainer.create_optimizer()
    assert type(optimizer).__name__.lower() == optim
    # one parameter group per (part, weight decay) with the part's learning rate, whatever the optimizer
    assert {group["lr"] for group in optimizer.param_groups} == {config.lr}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_max_train_seconds_stops_training_early(tiny_processor, tmp_path):
    record = _train(_model(tiny_processor, "llava"), tiny_processor.tokenizer, tmp_path,
                    _config(steps=1000, max_train_seconds=1e-6))
    assert len(record.parts) == 1  # stopped after the first step


@pytest.mark.parametrize("seed", ["gpt2-vision", "clip-gpt", "visiongpt2", "gpt2multimodal", "clipxgpt-captioner"])
def test_seed_configs_load_and_build_their_projector_type(tiny_processor, seed):
    from vlm.train import schedule_phases

    config = load_config(REPO / "configs" / "seeds" / f"{seed}.yaml", TINY_MODEL)
    schedule_phases(config.sft)  # a schedule in a seed config is valid
    model = build_model(config.model, tiny_processor)
    expected = {"gpt2-vision": "mlp", "clip-gpt": "prefix", "visiongpt2": "cross-attention",
                "gpt2multimodal": "linear-ln-transformer", "clipxgpt-captioner": "prefix"}[seed]
    assert model.config.projector_type == expected
