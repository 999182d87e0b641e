"""Stage 3 (stages/instruct.py) as a specification: LLaVA conversations to assistant-only labels,
the chat template, text-only rows, a short instruct run, and `ask` / `chat` in a pseudo-terminal."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from vlm.config import DataConfig, load_config
from vlm.data import (
    IGNORE_INDEX,
    ImageCache,
    RejectLog,
    SupervisedDataset,
    VLMCollator,
    conversation_items,
    conversation_turns,
    encode_turns,
    move_image_token,
    prompt_ids,
)

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
IMAGE_CONVERSATION = [
    {"from": "human", "value": "<image>\nDescribe the image."},
    {"from": "gpt", "value": "at the top left a red circle and in the middle a blue square."},
    {"from": "human", "value": "What color is the triangle?"},
    {"from": "gpt", "value": "there is none"},
    {"from": "human", "value": "Where is the red circle?"},
    {"from": "gpt", "value": "at the top left"},
]
TEXT_CONVERSATION = [
    {"from": "human", "value": "What colours are there?"},
    {"from": "gpt", "value": "red, green and blue"},
    {"from": "human", "value": "Which one is first?"},
    {"from": "gpt", "value": "red"},
]


@pytest.fixture(autouse=True)
def _tensorboard_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tensorboard"))


def messages_of(conversation: list[dict], with_image: bool) -> list[dict]:
    """LLaVA turns as chat messages, the image as a content part of the first user message."""
    messages = []
    for index, turn in enumerate(conversation):
        text = turn["value"].replace("<image>\n", "")
        if turn["from"] == "gpt":
            messages.append({"role": "assistant", "content": text})
        elif index == 0 and with_image:
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
    return messages


# --- <image> placement --------------------------------------------------------------------------

def test_image_placeholder_is_moved_to_the_front_of_the_first_human_turn():
    turns = [
        {"from": "human", "value": "What is in this picture?\n<image>"},
        {"from": "gpt", "value": "shapes"},
    ]
    assert move_image_token(turns, True)[0]["value"] == "<image>\nWhat is in this picture?"
    # From a later turn too, and only one placeholder is left.
    later = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
             {"from": "human", "value": "<image> what is this?"}, {"from": "gpt", "value": "a circle"}]
    moved = move_image_token(later, True)
    assert [t["value"] for t in moved] == ["<image>\nHi", "Hello", "what is this?", "a circle"]
    # Already in place: unchanged (idempotent); no placeholder with an image: one is added.
    assert move_image_token(IMAGE_CONVERSATION, True) == IMAGE_CONVERSATION
    assert move_image_token(TEXT_CONVERSATION, True)[0]["value"] == "<image>\nWhat colours are there?"
    assert move_image_token(TEXT_CONVERSATION, False) == TEXT_CONVERSATION
    with pytest.raises(ValueError, match="2 <image> placeholders for one image"):
        move_image_token([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], True)
    with pytest.raises(ValueError, match="without an image"):
        move_image_token(IMAGE_CONVERSATION, False)
    with pytest.raises(ValueError, match="a gpt turn"):
        move_image_token([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image> x"}], True)
    with pytest.raises(ValueError, match="nothing but <image>"):
        move_image_token([*TEXT_CONVERSATION[:2], {"from": "human", "value": "<image>"},
                          {"from": "gpt", "value": "x"}], True)


# --- labels: assistant turns only ---------------------------------------------------------------

@pytest.mark.parametrize("conversation, with_image", [(IMAGE_CONVERSATION, True), (TEXT_CONVERSATION, False)])
def test_only_assistant_turns_and_their_eos_are_supervised(tiny_processor, conversation, with_image):
    tok = tiny_processor.tokenizer
    turns = conversation_turns(move_image_token(conversation, with_image), DataConfig())
    encoded = encode_turns(tok, turns, 10, 1000)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert encoded.input_ids.count(image_id) == (10 if with_image else 0)
    # Walk the spans: every prompt token masked, every answer token (+ EOS) its own label.
    position = 0
    for prompt, answer in turns:
        n_prompt = len(prompt_ids(tok, prompt, 10))
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert encoded.labels[position:position + n_prompt] == [IGNORE_INDEX] * n_prompt
        position += n_prompt
        assert encoded.labels[position:position + len(answer_ids)] == answer_ids
        assert encoded.input_ids[position:position + len(answer_ids)] == answer_ids
        position += len(answer_ids)
    assert position == len(encoded.input_ids)
    supervised = [label for label in encoded.labels if label != IGNORE_INDEX]
    expected = sum((tok(" " + t["value"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    for t in conversation if t["from"] == "gpt"), [])
    assert supervised == expected


@pytest.mark.parametrize("conversation, with_image", [(IMAGE_CONVERSATION, True), (TEXT_CONVERSATION, False)])
def test_training_text_and_ids_equal_the_stock_chat_template(tiny_processor, conversation, with_image):
    tok = tiny_processor.tokenizer
    turns = conversation_turns(move_image_token(conversation, with_image), DataConfig())
    messages = messages_of(conversation, with_image)
    rendered = tiny_processor.apply_chat_template(messages)
    training_text = "".join(prompt + answer + tok.eos_token for prompt, answer in turns)
    assert rendered == training_text + "\n"  # the template ends each assistant turn with EOS + newline
    # Token for token: the whole rendered conversation tokenized at once = the span-by-span ids.
    assert prompt_ids(tok, rendered.removesuffix("\n"), 10) == encode_turns(tok, turns, 10, 1000).input_ids
    # At inference: the prompt before the last answer = the training prompt up to that answer.
    prompt = tiny_processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert prompt == training_text[: training_text.rindex(turns[-1][1] + tok.eos_token)]


# --- bad records: counted, never cut -------------------------------------------------------------

def records(*conversations):
    return [{"id": f"r{i}", "image": image, "conversations": conv} for i, (image, conv) in enumerate(conversations)]


def test_a_record_too_long_for_the_context_is_rejected_not_cut(tiny_processor, tiny_data_dir, tmp_path):
    tok = tiny_processor.tokenizer
    long_answer = " ".join(["red circle"] * 80)
    batch = records(("images/train/000000.png", IMAGE_CONVERSATION),
                    ("images/train/000001.png", [IMAGE_CONVERSATION[0], {"from": "gpt", "value": long_answer}]))
    rejects = RejectLog(tmp_path / "rejects.jsonl", "skip")
    dataset = SupervisedDataset(conversation_items(batch, DataConfig(), "conv/train", rejects), tok,
                                ImageCache(tiny_processor.image_processor, tiny_data_dir), 10, 128, rejects)
    assert len(dataset) == 1 and rejects.count == 1
    (entry,) = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert entry["id"] == "r1" and entry["source_file"] == "conv/train"
    assert "longer than data.max_length=128" in entry["reason"]
    # The kept record is whole: its last answer ends in its EOS.
    assert dataset[0]["labels"][-1] == tok.eos_token_id
    strict = RejectLog(None, "error")
    with pytest.raises(ValueError, match="record r1: .*longer than data.max_length"):
        SupervisedDataset(conversation_items(batch, DataConfig(), "conv/train", strict), tok,
                          ImageCache(tiny_processor.image_processor, tiny_data_dir), 10, 128, strict)


def test_records_without_a_supervised_answer_or_out_of_order_are_counted_rejects(tiny_processor):
    bad = records(
        (None, [{"from": "human", "value": "hello"}]),  # no answer: nothing to supervise
        (None, [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "  "}]),  # empty answer
        (None, [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "hello"}]),  # wrong order
        (None, IMAGE_CONVERSATION),  # <image> in a text-only record
        (None, TEXT_CONVERSATION),  # fine
    )
    rejects = RejectLog(None, "skip")
    kept = list(conversation_items(bad, DataConfig(), "conv", rejects))
    assert [item[0] for item in kept] == ["r4"] and rejects.count == 4


# --- text-only rows beside image rows ------------------------------------------------------------

def test_a_batch_mixing_image_and_text_only_rows_computes_each_row_as_alone(tiny_processor, tiny_model,
                                                                            tiny_data_dir):
    tok = tiny_processor.tokenizer
    images = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    batch = records(("images/train/000000.png", IMAGE_CONVERSATION), (None, TEXT_CONVERSATION),
                    ("images/train/000001.png", IMAGE_CONVERSATION[:2]))
    rejects = RejectLog(None, "error")
    dataset = SupervisedDataset(conversation_items(batch, DataConfig(), "conv", rejects), tok, images, 10, 128,
                                rejects)
    items = [dataset[i] for i in range(3)]
    assert items[1]["pixel_values"] is None
    collate = VLMCollator(tok.pad_token_id)
    mixed = collate(items)
    assert mixed["pixel_values"].shape == (2, 3, 48, 48)  # the image rows' pixels, in row order
    assert "pixel_values" not in collate([items[1]])
    tiny_model.eval()
    with torch.no_grad():
        together = tiny_model(**mixed).logits
        for row, item in enumerate(items):
            alone = tiny_model(**collate([item])).logits[0]
            n = len(item["input_ids"])
            torch.testing.assert_close(together[row, :n], alone[:n], atol=1e-5, rtol=1e-4)
        assert torch.isfinite(tiny_model(**mixed).loss)


# --- a short instruct run ------------------------------------------------------------------------

def llava_style_dataset(tiny_data_dir: Path, out: Path) -> Path:
    """A conversations dataset like the LLaVA-1.5 mix: image records (one with its placeholder
    after the question), text-only records, a record with no answer and one too long."""
    from datasets import Dataset, DatasetDict

    short = [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "on the left"}]
    rows = [{"id": f"image-{i}", "image": f"images/train/{i:06d}.png", "conversations": short} for i in range(8)]
    rows[0] = dict(rows[0], conversations=[{"from": "human", "value": "What color is the circle?\n<image>"},
                                           *short[1:]])
    rows += [{"id": f"text-{i}", "image": None, "conversations": TEXT_CONVERSATION} for i in range(4)]
    rows.append({"id": "no-answer", "image": None, "conversations": [{"from": "human", "value": "hello?"}]})
    rows.append({"id": "too-long", "image": None, "conversations": [
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": " ".join(["red circle"] * 80)}]})
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(out / "conversations"))
    shutil.copytree(tiny_data_dir / "images", out / "images")
    return out


def test_instruct_run_from_an_sft_checkpoint_writes_final_and_metrics(tiny_overrides, tiny_model, tiny_processor,
                                                                      tiny_data_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from stages import instruct

    init = tmp_path / "tiny" / "sft" / "final"  # where the run's SFT stage leaves its model
    tiny_model.save_pretrained(init)
    tiny_processor.save_pretrained(init)
    llava_dir = llava_style_dataset(tiny_data_dir, tmp_path / "llava")
    config = load_config(DEFAULT_CONFIG, [
        *tiny_overrides, "instruct.steps=3", "instruct.batch_size=4", "instruct.save_steps=2",
        "instruct.logging_steps=1", "instruct.warmup_steps=0", f"instruct.data_dir={llava_dir}",
        "instruct.vqa_replay_ratio=0.5", "instruct.describe_samples=4", "instruct.describe_max_new_tokens=8",
        "eval.max_samples=8",
    ])
    assert instruct.init_model_dir(config) == init
    metrics = instruct.train(config)

    work = config.run_dir / "instruct"
    saved = json.loads((work / "metrics.json").read_text())
    assert {"vqa_accuracy_before", "vqa_accuracy_after", "description_precision", "description_recall",
            "seconds"} <= set(saved)
    assert saved["conversations"] == 12 and saved["text_only"] == 4 and saved["rejected"] == 2
    assert saved["vqa_replayed"] == 6 and saved["steps"] == 3
    rejected = {r["id"]: r["reason"] for r in map(json.loads, (work / "rejects.jsonl").read_text().splitlines())}
    assert "human turn with no gpt answer" in rejected["no-answer"]
    assert "longer than data.max_length" in rejected["too-long"]
    assert metrics["vqa_accuracy_before"] == json.loads(
        (config.run_dir / "eval" / "instruct-before" / "metrics.json").read_text())["vqa_accuracy"]
    descriptions = (config.run_dir / "eval" / "instruct" / "descriptions.jsonl").read_text().splitlines()
    assert len(descriptions) == 4
    # The final model loads with stock transformers and differs from the start.
    final = LlavaForConditionalGeneration.from_pretrained(work / "final")
    assert not torch.equal(final.lm_head.weight, tiny_model.lm_head.weight)
    assert json.loads((work / "final" / "training_config.json").read_text())["instruct"]["steps"] == 3
    # The run report gains stages.instruct with exactly the stage's headline figures.
    from vlm.report import build_report

    assert build_report(config.run_dir)["stages"]["instruct"] == {
        key: saved[key] for key in ("vqa_accuracy_before", "vqa_accuracy_after", "description_precision",
                                    "description_recall", "seconds")}


def test_instruct_with_lora_and_resume_from_its_last_checkpoint(tiny_overrides, tiny_model, tiny_processor,
                                                                 tiny_data_dir, tmp_path, capsys):
    from stages import instruct

    init = tmp_path / "init"
    tiny_model.save_pretrained(init)
    tiny_processor.save_pretrained(init)
    overrides = [*tiny_overrides, f"instruct.init_from={init}", "instruct.batch_size=4", "instruct.save_steps=2",
                 "instruct.warmup_steps=0", "instruct.max_train_samples=8", "instruct.describe_samples=2",
                 "instruct.describe_max_new_tokens=4", "eval.max_samples=4", "instruct.lora.enabled=true"]
    first = instruct.train(load_config(DEFAULT_CONFIG, [*overrides, "instruct.steps=2"]))
    assert first["steps"] == 2
    # Longer run in the same dir: it continues from checkpoint-2 instead of starting over.
    second = instruct.train(load_config(DEFAULT_CONFIG, [*overrides, "instruct.steps=3"]))
    assert second["steps"] == 3
    assert "instruct: resuming from" in capsys.readouterr().out
    final = tmp_path / "tiny" / "instruct" / "final"
    assert (final / "model.safetensors").is_file() and not list(final.glob("adapter_*"))  # merged


# --- ask and chat in a pseudo-terminal -----------------------------------------------------------

@pytest.fixture
def talking_model(tiny_model, tiny_processor, tmp_path) -> Path:
    """The tiny model, made to answer only in lowercase words (readable in a terminal): a large
    ln_f bias along one direction u, and every lm_head row given +1 (a word) or -1 (anything
    else) along u. Which word still depends on the input."""
    tok = tiny_processor.tokenizer
    words = [i for i in range(len(tok)) if re.fullmatch(r" [a-z]+", tok.decode([i]))]
    assert len(words) > 10
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(tiny_model.lm_head.weight.shape[1]), dim=0)
        weight = tiny_model.lm_head.weight
        weight -= (weight @ u)[:, None] * u[None, :]
        sign = -torch.ones(weight.shape[0])
        sign[words] = 1.0
        weight += sign[:, None] * u[None, :]
        tiny_model.model.language_model.ln_f.bias += 50.0 * u
    out = tmp_path / "talking"
    tiny_model.save_pretrained(out)
    tiny_processor.save_pretrained(out)
    return out


def expected_answers(model_dir: Path, image: Path, questions: list[str], max_new_tokens: int) -> list[str]:
    from vlm.chat import ChatSession
    from vlm.config import DecodingConfig

    session = ChatSession(model_dir, DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens))
    session.set_image(image)
    return [session.ask(q) for q in questions]


def spawn(*args: str):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return pexpect.spawn(sys.executable, ["-m", "stages.cli", *args], cwd=str(REPO), env=env,
                         encoding="utf-8", timeout=120)


def test_streamer_prints_an_answer_in_pieces_as_it_is_generated(talking_model, tiny_data_dir):
    from vlm.chat import ChatSession
    from vlm.config import DecodingConfig

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    session = ChatSession(talking_model, DecodingConfig(strategy="greedy", max_new_tokens=6))
    session.set_image(tiny_data_dir / "images/test/000000.png")
    out = Recorder()
    answer = session.ask("Describe the image.", stream=out)
    assert len(answer.split()) == 6
    pieces = [w for w in out.writes if w.strip()]
    assert len(pieces) >= 5  # word by word, not one block at the end
    assert "".join(out.writes) == answer + "\n"


def test_ask_prints_the_answer(talking_model, tiny_data_dir):
    pexpect = pytest.importorskip("pexpect")
    image = tiny_data_dir / "images/test/000000.png"
    (expected,) = expected_answers(talking_model, image, ["How many objects are there?"], 6)
    child = spawn("ask", "--model", str(talking_model), "--image", str(image), "--max-new-tokens", "6",
                  "How many objects are there?")
    child.expect(pexpect.EOF)
    output = child.before.replace("\r\n", "\n")
    child.close()
    assert child.exitstatus == 0, output
    assert output.strip().splitlines()[-1] == expected


def test_chat_keeps_the_conversation_and_ends_on_quit_or_eof(talking_model, tiny_data_dir):
    pexpect = pytest.importorskip("pexpect")
    image = tiny_data_dir / "images/test/000000.png"
    questions = ["Describe the image.", "Where is it?"]
    expected = expected_answers(talking_model, image, questions, 6)
    assert expected[0] != expected[1]
    child = spawn("chat", "--model", str(talking_model), "--image", str(image), "--max-new-tokens", "6")
    child.expect_exact("you> ")
    for question, answer in zip(questions, expected):
        child.sendline(question)
        child.expect_exact("model> ")
        child.expect_exact("you> ")
        # The second answer is the one given the first turn as context.
        assert child.before.replace("\r\n", "\n").strip() == answer
    child.sendline("/image " + str(tiny_data_dir / "images/test/000001.png"))
    child.expect_exact("(new conversation about")
    child.expect_exact("you> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = spawn("chat", "--model", str(talking_model), "--image", str(image))
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_chat_without_an_image_and_one_past_the_context(talking_model):
    from vlm.chat import ChatSession
    from vlm.config import DecodingConfig

    session = ChatSession(talking_model, DecodingConfig(strategy="greedy", max_new_tokens=6))
    session.set_image(None)
    assert len(session.ask("What is red?").split()) == 6
    assert "<image>" not in session.prompt()
    # Turns that no longer fit the context are dropped oldest first, never cut mid-turn.
    for _ in range(12):
        session.ask("What colour is the circle at the top left of the image?")
    assert session.messages[0]["role"] == "user"
    assert len(session.messages) < 2 * 13
