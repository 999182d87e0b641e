"""The model: stock-loadable, `<image>` never generated, chat template = training prompt."""
import subprocess
import sys

import torch

from vlm.config import DecodingConfig
from vlm.generate import generate

PROMPT = "USER: <image>\nWhat color is the circle?\nASSISTANT:"


def _pixels(processor, n=2):
    from PIL import Image

    images = [Image.new("RGB", (48, 48), c) for c in ("red", "blue")][:n]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def test_generation_never_emits_the_image_token_even_when_it_is_the_likeliest(tiny_model, tiny_processor):
    image_id = tiny_model.config.image_token_index
    with torch.no_grad():
        tiny_model.lm_head.weight[image_id] *= 0
        tiny_model.lm_head.weight[image_id] += 1.0  # huge logit for <image> on any hidden state...
    hidden = torch.ones(tiny_model.config.text_config.n_embd)
    assert (tiny_model.lm_head.weight @ hidden).argmax() == image_id
    for strategy in ("greedy", "sample", "beam"):
        answers = generate(tiny_model, tiny_processor.tokenizer, [PROMPT, PROMPT], _pixels(tiny_processor),
                           DecodingConfig(strategy=strategy, max_new_tokens=6), max_length=96)
        assert all("<image>" not in a for a in answers)  # generate() also raises if it slipped through
    # ...and the saved generation config suppresses it for stock generate() too.
    assert image_id in tiny_model.generation_config.suppress_tokens


def test_saved_model_loads_with_stock_transformers_and_answers_the_same(tiny_model, tiny_processor, tmp_path):
    from vlm.train import save_final

    save_final(tiny_model, tiny_processor, tmp_path / "final", {"note": "test"})
    ours = generate(tiny_model, tiny_processor.tokenizer, [PROMPT, PROMPT], _pixels(tiny_processor),
                    DecodingConfig(max_new_tokens=6), max_length=96)
    # A fresh interpreter that imports nothing of ours.
    script = f"""
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(tmp_path / 'final')!r})
processor = AutoProcessor.from_pretrained({str(tmp_path / 'final')!r})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What color is the circle?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
for colour in ("red", "blue"):
    inputs = processor(text=[prompt], images=[Image.new("RGB", (48, 48), colour)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    print(repr(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stock = [eval(line) for line in result.stdout.strip().splitlines()]
    assert stock == ours


def test_lm_head_starts_as_a_copy_of_the_embeddings_but_is_not_tied(tiny_model):
    wte = tiny_model.model.language_model.wte.weight
    assert torch.equal(tiny_model.lm_head.weight, wte)
    assert tiny_model.lm_head.weight.data_ptr() != wte.data_ptr()


def test_chat_template_renders_the_training_prompt(tiny_processor):
    from vlm.config import DataConfig
    from vlm.data import vqa_prompt

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    rendered = tiny_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == vqa_prompt(DataConfig().prompt_template, "What color is the circle?")


def test_pretrained_parts_load_from_local_dirs_and_keep_their_weights(tmp_path):
    """The real-config path (model.text_model / model.vision_model), on local tiny copies."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from vlm.config import ModelConfig
    from vlm.model import build_model, build_processor

    torch.manual_seed(0)
    from vlm.model import train_tokenizer

    tokenizer = train_tokenizer(["what color is the circle? red blue"] * 10, 290)
    tokenizer.save_pretrained(tmp_path / "gpt2")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer), n_positions=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip")

    config = ModelConfig(text_model=str(tmp_path / "gpt2"), vision_model=str(tmp_path / "clip"),
                         vision_feature_layer=-2)
    processor = build_processor(config)
    model = build_model(config, processor)
    assert model.config.image_seq_length == (32 // 16) ** 2 + 1
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index
    assert all(torch.equal(a, b) for a, b in zip(model.model.vision_tower.state_dict().values(),
                                                  clip.state_dict().values()))
    old_vocab = gpt2.config.vocab_size
    assert torch.equal(model.model.language_model.h[0].attn.c_attn.weight, gpt2.transformer.h[0].attn.c_attn.weight)
    assert torch.equal(model.lm_head.weight[:old_vocab], gpt2.lm_head.weight[:old_vocab])
    assert model.lm_head.weight.shape[0] == len(processor.tokenizer)
