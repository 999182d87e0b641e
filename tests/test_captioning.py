"""Captioning as a task: SFT with a non-default projector, caption evaluation (CIDEr-D, BLEU,
perplexity) into the report, `vqa-rlhf caption`, and `vqa-rlhf compare` side by side."""
import json
import math

import pytest
from conftest import REPO

from vlm.config import load_config


@pytest.fixture
def captioned_run(tiny_overrides):
    """A 4-step SFT run of a prefix-projector model, then caption_eval, then the report."""
    from vlm.report import build_report
    from stages import sft
    from stages.caption_eval import evaluate_captions

    config = load_config(REPO / "configs/default.yaml",
                         [*tiny_overrides, "model.projector=prefix", "model.prefix_length=2",
                          "eval.caption_max_new_tokens=6", "eval.caption_max_images=4", "data.caption_ratio=1.0"])
    sft.train(config)
    metrics = evaluate_captions(config, config.run_dir / "sft" / "final")
    return config, metrics, build_report(config.run_dir)


def test_caption_eval_scores_each_image_against_its_references_and_reports(captioned_run):
    from vlm.caption_metrics import bleu, cider_d

    config, metrics, report = captioned_run
    lines = [json.loads(l) for l in (config.run_dir / "eval/captions/predictions.jsonl").read_text().splitlines()]
    assert metrics["images"] == len(lines) == 4
    candidates = {l["image"]: l["caption"] for l in lines}
    references = {l["image"]: l["references"] for l in lines}
    assert metrics["cider"] == round(cider_d(candidates, references)[0], 4)
    assert metrics["bleu_4"] == round(bleu(candidates, references)[3], 4)
    # an untrained-ish model: perplexity finite, above 1, below the uniform vocabulary's
    assert 1 < metrics["perplexity"] < 400
    assert report["stages"]["caption_eval"]["cider"] == metrics["cider"]


def test_caption_perplexity_is_exp_of_the_mean_token_nll(tiny_model, tiny_processor, tiny_data_dir):
    import torch

    from vlm.captioning import caption_perplexity
    from vlm.config import DataConfig
    from vlm.data import ImageCache, RejectLog, encode_turns, load_split

    records = [load_split(tiny_data_dir, "captions", "val")[i] for i in range(2)]
    images = ImageCache(tiny_processor.image_processor, tiny_data_dir)
    data = DataConfig()
    ppl = caption_perplexity(tiny_model, tiny_processor, records, images, data, 8, RejectLog(None, "error"))
    nll, count = 0.0, 0
    for r in records:  # one at a time, by hand
        encoded = encode_turns(tiny_processor.tokenizer, [(data.prompt_template.format(question=data.caption_prompt),
                               " " + r["caption"].strip())], tiny_model.config.image_seq_length, data.max_length)
        ids, labels = torch.tensor([encoded.input_ids]), torch.tensor(encoded.labels)
        with torch.no_grad():
            logp = tiny_model(input_ids=ids, pixel_values=images(r["image"])[None]).logits[0].log_softmax(-1)
        for t in range(1, len(labels)):
            if labels[t] != -100:
                nll -= logp[t - 1, labels[t]].item()
                count += 1
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_caption_command_prints_one_caption_per_image(captioned_run, tiny_data_dir, capsys):
    from stages.caption import main

    config, _, _ = captioned_run
    images = sorted((tiny_data_dir / "images" / "test").glob("*.png"))[:3]
    assert main(["--model", str(config.run_dir / "sft" / "final"), *map(str, images), "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [l.split("\t")[0] for l in lines] == list(map(str, images))


def test_compare_tabulates_runs_side_by_side(tmp_path, capsys):
    from stages.compare import main

    for name, acc, cider, steps, seconds, batch, projector in (
            ("default", 70.5, None, 100, 50.0, 32, "llava"), ("gpt2-vision", 60.25, 1.5, 200, 40.0, 16, "mlp")):
        run = tmp_path / name
        (run / "sft" / "final").mkdir(parents=True)
        (run / "sft" / "final" / "training_config.json").write_text(json.dumps(
            {"model": {"projector": projector}, "sft": {"batch_size": batch, "grad_accum": 1}}))
        stages = {"sft": {"vqa_accuracy": acc, "steps": steps, "seconds": seconds,
                          "checkpoint": str(run / "sft" / "final")}}
        if cider is not None:
            stages["caption_eval"] = {"cider": cider, "bleu_4": 0.25, "perplexity": 3.5}
        (run / "report.json").write_text(json.dumps({"stages": stages, "baselines": {"majority_answer": 22.6}}))
    out = tmp_path / "cmp"
    assert main([str(tmp_path / "default"), str(tmp_path / "gpt2-vision"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert table in printed
    rows = [line for line in table.splitlines() if line.startswith("| default") or line.startswith("| gpt2-vision")]
    assert rows[0].split(" | ")[1:] == ["llava", "70.50", "22.60", "-", "-", "-", "100", "50.00", "64.00 |"]
    assert rows[1].split(" | ")[1:] == ["mlp", "60.25", "22.60", "1.50", "0.25", "3.50", "200", "40.00", "80.00 |"]
    assert (out / "compare.png").stat().st_size > 1000
    assert json.loads((out / "compare.json").read_text())[1]["train_samples_per_second"] == 80.0
