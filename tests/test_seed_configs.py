"""Every real-data seed config runs as its header says.

A directory stands in for the repository root on a user's GPU box: the official files in
their official formats and names (COCO captions JSON, Karpathy's Flickr30k JSON, VQA v2
questions / annotations, COCO image folders), and tiny local models saved under the hub
names the configs use (`gpt2`, `openai/clip-vit-base-patch32`: transformers loads a local
directory of that name before it would ask the hub, and HF_HUB_OFFLINE=1 forbids asking).
Then each header's command lines run there as written; the launch line with `--smoke`
(its full-run twin is not run), and an eval line on the smoke run's model.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from test_convert import annotation, jpeg, vqa_files, write_json
from test_submission import official_load_res

VENV_BIN = REPO / ".venv" / "bin"
REAL_DATA_SEEDS = ["gpt2-vision-coco", "clipxgpt-flickr30k", "visiongpt2-coco", "gpt2multimodal-vqav2", "clip-gpt-vqav2"]
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30), (150, 30, 150), (30, 150, 150)]


def tiny_hub_models(root: Path) -> None:
    """GPT-2 (12 blocks: a config may freeze the first 6) and a CLIP vision tower, tiny, saved
    under the hub names with their tokenizer and image processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from vlm.model import train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["a man rides a red bike down the street .", "what color is the car? red blue 2 yes no"]
                                * 20, 300)
    tokenizer.save_pretrained(root / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=12, n_head=2, vocab_size=len(tokenizer), n_positions=256)
                    ).save_pretrained(root / "gpt2")
    clip = root / "openai" / "clip-vit-base-patch32"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)


def coco_captions(root: Path, year: str, split: str, image_ids: list[int], prefix: str = "") -> None:
    folder = root / (f"coco/{split}{year}" if prefix else f"{split}{year}")
    images, annotations = [], []
    for n, image_id in enumerate(image_ids):
        name = f"{prefix}{image_id:012d}.jpg"
        jpeg(folder / name, COLOURS[n % len(COLOURS)])
        images.append({"id": image_id, "file_name": name, "height": 24, "width": 24})
        for k, caption in enumerate(("A red square on a grey table.", "Something coloured in the middle.")):
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
    (root / "annotations").mkdir(exist_ok=True)
    write_json(root / "annotations" / f"captions_{split}{year}.json",
               {"info": {}, "licenses": [], "images": images, "annotations": annotations})


def vqa_v2(root: Path) -> None:
    """VQA v2 train2014 / val2014 (questions + annotations) and test-dev2015 (questions only)."""
    asked = [("What color is the square?", "red", "other", "what color is the"),
             ("Is there a square?", "yes", "yes/no", "is there a"),
             ("How many squares are there?", "1", "number", "how many"),
             ("Is it blue?", "no", "yes/no", "is it")]
    for subtype, image_ids in (("train2014", [1, 2, 3]), ("val2014", [11, 12]), ("test-dev2015", [21, 22])):
        folder = root / "coco" / ("test2015" if subtype.startswith("test") else subtype)
        questions, annotations = [], []
        for n, image_id in enumerate(image_ids):
            image_prefix = "test2015" if subtype.startswith("test") else subtype
            jpeg(folder / f"COCO_{image_prefix}_{image_id:012d}.jpg", COLOURS[n % len(COLOURS)])
            for k, (question, answer, answer_type, question_type) in enumerate(asked):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append(annotation(qid, image_id, answer, answer_type=answer_type,
                                              question_type=question_type))
        vqa_files(root, subtype, questions, None if subtype.startswith("test") else annotations)


def flickr30k_karpathy(root: Path) -> None:
    images = []
    for n, (name, split) in enumerate((("101.jpg", "train"), ("102.jpg", "train"), ("103.jpg", "restval"),
                                       ("104.jpg", "val"), ("105.jpg", "test"), ("106.jpg", "test"))):
        jpeg(root / "flickr30k-images" / name, COLOURS[n])
        images.append({"filename": name, "imgid": n, "split": split, "sentences": [
            {"raw": "Two young guys with shaggy hair look at their hands .", "tokens": [], "imgid": n, "sentid": 2 * n},
            {"raw": "A dog runs across the grass .", "tokens": [], "imgid": n, "sentid": 2 * n + 1}]})
    write_json(root / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": images})


@pytest.fixture(scope="module")
def box(tmp_path_factory) -> dict:
    """The stand-in repository root, shared by the configs (commands already run are not run again:
    two configs converting the same files into the same data dir write the same thing)."""
    root = tmp_path_factory.mktemp("gpu-box")
    for name in ("launch.sh", "configs", ".venv"):
        (root / name).symlink_to(REPO / name)
    tiny_hub_models(root)
    coco_captions(root, "2017", "train", [1, 2, 3, 4])
    coco_captions(root, "2017", "val", [5, 6])
    coco_captions(root, "2014", "train", [1, 2, 3], prefix="COCO_train2014_")
    coco_captions(root, "2014", "val", [11, 12], prefix="COCO_val2014_")
    vqa_v2(root)
    flickr30k_karpathy(root)
    return {"root": root, "done": {}}


def header_commands(config: Path) -> list[str]:
    """The command lines of a config's header: comment lines that start with a command."""
    lines = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if text.startswith(("vqa-rlhf ", "./launch.sh ")):
            lines.append(text)
    return lines


def run_line(box: dict, line: str, name: str) -> subprocess.CompletedProcess:
    if line in box["done"]:
        return box["done"][line]
    argv = shlex.split(line)
    if argv[:2] == ["vqa-rlhf", "eval"]:
        argv.append(f"name={name}-smoke")  # the model of the smoke run, not of the full run
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=box["root"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    box["done"][line] = done
    return done


@pytest.mark.parametrize("name", REAL_DATA_SEEDS)
def test_a_real_data_seed_config_runs_its_header_on_official_format_files(box, name):
    config = REPO / "configs" / "seeds" / f"{name}.yaml"
    lines = header_commands(config)
    launch = f"./launch.sh configs/seeds/{name}.yaml"
    assert f"{launch} --smoke" in lines and launch in lines  # the check, and the real run
    outputs = [run_line(box, line, name) for line in lines if line != launch]
    run_dir = box["root"] / "runs" / f"{name}-smoke"
    report = json.loads((run_dir / "report.json").read_text())
    sft = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert sft["steps"] == 4 and sft["examples"] > 0 and sft["rejected"] == 0
    saved = json.loads((run_dir / "sft" / "final" / "training_config.json").read_text())
    assert saved["model"]["text_model"] == "gpt2" and saved["model"]["vision_model"] == "openai/clip-vit-base-patch32"

    if "captions" in sft["tasks"]:
        captions = report["stages"]["caption_eval"]
        assert captions["images"] > 0 and captions["cider"] >= 0 and captions["perplexity"] > 1
    if sft["tasks"] == ["captions"]:  # a captioner on captions alone: no VQA anywhere
        assert not (box["root"] / saved["data"]["dir"] / "vqa").exists()
        from stages.caption import main as caption

        image = sorted((box["root"] / "val2017").glob("*.jpg"))[0]
        assert caption(["--model", str(run_dir / "sft" / "final"), str(image), "--max-new-tokens", "4"]) == 0
    if "vqa" in sft["tasks"]:
        assert 0 <= report["stages"]["sft"]["vqa_accuracy"] <= 100
        metrics = json.loads((run_dir / "eval" / "sft" / "metrics.json").read_text())
        assert metrics["results_checked_against"] == "v2_OpenEnded_mscoco_val2014_questions.json"
        official_load_res(run_dir / "eval" / "sft" / "results.json",
                          box["root"] / "v2_OpenEnded_mscoco_val2014_questions.json")
        # the header's test-dev line: a results file for the server, no scores
        assert f"vqa-rlhf eval configs/seeds/{name}.yaml eval.split=test_dev --tag test-dev" in lines
        assert "results file for the VQA challenge server" in outputs[-1].stdout
        results = official_load_res(run_dir / "eval" / "test-dev" / "results.json",
                                    box["root"] / "v2_OpenEnded_mscoco_test-dev2015_questions.json")
        assert len(results) == 8
    if name == "clip-gpt-vqav2":
        assert 0 <= report["stages"]["retrieval"]["recall@1"] <= 100
