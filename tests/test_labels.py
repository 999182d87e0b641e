"""Answer-only labels: built span by span, padding masked by position, EOS kept."""
import pytest
import torch
from PIL import Image

from vlm.data import IGNORE_INDEX, PromptTooLong, VLMCollator, encode_example, expand_image_tokens

PROMPT = "USER: <image>\nWhat color is the circle?\nASSISTANT:"


def test_image_placeholder_expands_to_one_token_per_patch_plus_cls(tiny_processor, tiny_model):
    seq = tiny_model.config.image_seq_length
    assert seq == (48 // 16) ** 2 + 1
    image_id = tiny_model.config.image_token_index
    ids = encode_example(tiny_processor.tokenizer, PROMPT, " red", seq, 96).input_ids
    assert ids.count(image_id) == seq
    # The same ids as the stock processor produces for the prompt.
    stock = tiny_processor(text=[PROMPT], images=[Image.new("RGB", (48, 48))])["input_ids"][0]
    assert ids[: len(stock)] == list(stock)


def test_only_answer_and_its_eos_are_supervised(tiny_processor):
    tok = tiny_processor.tokenizer
    example = encode_example(tok, PROMPT, " purple triangle", 10, 96)
    answer_ids = tok(" purple triangle", add_special_tokens=False)["input_ids"]
    assert len(answer_ids) > 1  # a multi-token answer
    supervised = [label for label in example.labels if label != IGNORE_INDEX]
    assert supervised == answer_ids + [tok.eos_token_id]
    assert example.labels[-len(supervised):] == example.input_ids[-len(supervised):]
    assert all(label == IGNORE_INDEX for label in example.labels[: -len(supervised)])


def test_answer_ending_exactly_at_the_context_limit_is_kept_whole(tiny_processor):
    tok = tiny_processor.tokenizer
    length = len(encode_example(tok, PROMPT, " red", 10, 1000).input_ids)
    example = encode_example(tok, PROMPT, " red", 10, max_length=length)
    assert example.labels[-1] == tok.eos_token_id
    with pytest.raises(PromptTooLong, match="longer than data.max_length"):
        encode_example(tok, PROMPT, " red", 10, max_length=length - 1)


def test_empty_answer_is_an_error_not_an_example_without_targets(tiny_processor):
    with pytest.raises(ValueError, match="at least one supervised token"):
        encode_example(tiny_processor.tokenizer, PROMPT, "", 10, 96)


def test_collator_masks_padding_but_keeps_the_answer_eos(tiny_processor):
    tok = tiny_processor.tokenizer
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # GPT-2 convention: padding is EOS
    short = encode_example(tok, PROMPT, " red", 10, 96)
    long = encode_example(tok, PROMPT, " purple triangle at the top left", 10, 96)
    pixels = torch.zeros(3, 48, 48)
    batch = VLMCollator(eos)([
        {"input_ids": short.input_ids, "labels": short.labels, "pixel_values": pixels},
        {"input_ids": long.input_ids, "labels": long.labels, "pixel_values": pixels},
    ])
    n = len(short.input_ids)
    row = batch["labels"][0]
    assert row[n - 1] == eos  # the answer's EOS is a target...
    assert (row[n:] == IGNORE_INDEX).all()  # ...the EOS tokens used as padding are not
    assert (batch["input_ids"][0, n:] == eos).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][1].tolist() == long.labels
    assert batch["pixel_values"].shape == (2, 3, 48, 48)


def test_expand_image_tokens_leaves_other_tokens_alone():
    assert expand_image_tokens([1, 9, 2], image_token_id=9, image_seq_length=3) == [1, 9, 9, 9, 2]


def test_packed_questions_are_one_conversation_that_matches_the_chat_template(tiny_processor):
    from vlm.config import DataConfig
    from vlm.data import RejectLog, encode_turns, vqa_items

    data = DataConfig(questions_per_example=2)
    records = [
        {"id": f"q{i}", "image": "img.png", "question": q, "answers": [a] * 10, "multiple_choice_answer": a}
        for i, (q, a) in enumerate([("What color is the circle?", "red"), ("How many squares are there?", "2"),
                                    ("Is there a blue square?", "no")])
    ]
    items = list(vqa_items(records, data, "test", RejectLog(None, "error")))
    assert [(i[0], len(i[3])) for i in items] == [("q0+q1", 2), ("q2", 1)]  # grouped per image, 2 per example

    tok = tiny_processor.tokenizer
    encoded = encode_turns(tok, items[0][3], 10, 200)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many squares are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "2"}]},
    ]
    rendered = tiny_processor.apply_chat_template(messages).removesuffix("\n")
    stock = expand_image_tokens(tok(rendered, add_special_tokens=False)["input_ids"],
                                tok.convert_tokens_to_ids("<image>"), 10)
    assert encoded.input_ids == stock
    supervised = [t for t in encoded.labels if t != IGNORE_INDEX]
    assert tok.decode(supervised) == " red<|endoftext|> 2<|endoftext|>"
