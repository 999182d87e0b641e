"""What SFT trains on: VQA, captions or both (data.supervision), and a pipeline that skips the
stages a captions-only run cannot do instead of failing in them."""
import json

import pytest
from conftest import REPO

from vlm.config import ConfigError, DataConfig, load_config
from vlm.data import load_split, training_tasks


def dataset_with(tmp_path, **splits) -> object:
    """A dataset dir whose kinds hold these splits (only the index files training_tasks reads)."""
    for kind, names in splits.items():
        (tmp_path / kind).mkdir(parents=True)
        (tmp_path / kind / "dataset_dict.json").write_text(json.dumps({"splits": names}))
    return tmp_path


@pytest.mark.parametrize("held, supervision, caption_ratio, tasks", [
    ({"vqa": ["train"], "captions": ["train"]}, "auto", 0.25, {"vqa", "captions"}),
    ({"vqa": ["train"], "captions": ["train"]}, "auto", 0.0, {"vqa"}),
    ({"captions": ["train", "val"]}, "auto", 0.25, {"captions"}),  # COCO captions / Flickr30k alone
    ({"captions": ["train"]}, "auto", 0.0, {"captions"}),           # the ratio is a mix; nothing to mix here
    ({"vqa": ["train"]}, "auto", 0.25, {"vqa"}),
    ({"vqa": ["train"], "captions": ["train"]}, "captions", 0.25, {"captions"}),
    ({"vqa": ["train"], "captions": ["train"]}, "vqa", 0.25, {"vqa"}),
    ({"vqa": ["train"], "captions": ["train"]}, "both", 0.5, {"vqa", "captions"}),
])
def test_training_tasks_follow_the_setting_and_what_the_train_split_holds(tmp_path, held, supervision,
                                                                          caption_ratio, tasks):
    data = DataConfig(supervision=supervision, caption_ratio=caption_ratio)
    assert training_tasks(data, dataset_with(tmp_path, **held)) == tasks


def test_a_kind_the_dataset_lacks_is_an_error_naming_the_missing_split(tmp_path):
    flickr = dataset_with(tmp_path / "flickr", captions=["train", "val", "test"])
    with pytest.raises(FileNotFoundError, match=f"data.supervision=vqa needs {flickr}/vqa/train, which is not there"):
        training_tasks(DataConfig(supervision="vqa"), flickr)
    with pytest.raises(FileNotFoundError, match=f"{flickr}/vqa/train"):
        training_tasks(DataConfig(supervision="both"), flickr)
    only_val = dataset_with(tmp_path / "val-only", vqa=["val"], captions=["val"])
    with pytest.raises(FileNotFoundError, match="no vqa/train or captions/train split to train on"):
        training_tasks(DataConfig(), only_val)
    both = dataset_with(tmp_path / "both", vqa=["train"], captions=["train"])
    with pytest.raises(ValueError, match="caption_ratio, which is 0"):
        training_tasks(DataConfig(supervision="both", caption_ratio=0.0), both)


def test_a_typo_in_supervision_lists_the_choices():
    with pytest.raises(ConfigError, match=r"data.supervision' is 'caption'; allowed: \['auto', 'both', 'captions', 'vqa'\]"):
        load_config(REPO / "configs/default.yaml", ["data.supervision=caption"])


def test_captions_only_sft_trains_on_every_train_caption_and_tracks_held_out_caption_perplexity(tiny_overrides,
                                                                                                 tiny_data_dir):
    from stages import sft

    config = load_config(REPO / "configs/default.yaml",
                         [*tiny_overrides, "data.supervision=captions", "sft.eval_steps=2", "sft.eval_samples=4"])
    both = load_config(REPO / "configs/default.yaml", tiny_overrides)
    # one tokenizer for both: it is trained on everything the dataset holds, whatever SFT learns from
    assert list(sft.corpus(config)) == list(sft.corpus(both))
    metrics = sft.train(config)
    assert metrics["tasks"] == ["captions"]
    assert metrics["examples"] == len(load_split(tiny_data_dir, "captions", "train")) and metrics["rejected"] == 0
    curve = [json.loads(line) for line in (config.run_dir / "sft" / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in curve] == [0, 2, 4]
    assert all(1 < e["caption_perplexity"] < 400 and "vqa_accuracy" not in e for e in curve)
    from vlm.report import build_report

    report = build_report(config.run_dir)["stages"]["sft"]
    assert report["val_accuracy_curve"] == [] and len(report["val_caption_perplexity_curve"]) == 3


def test_the_pipeline_skips_vqa_stages_of_a_captions_only_run_and_says_why(tmp_path, tiny_data_dir, monkeypatch,
                                                                            capsys):
    from vlm import pipeline

    started = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda command: started.append(command[command.index("-m") + 1]) or 0)
    overrides = [f"output_root={tmp_path}", "name=captioner", f"data.dir={tiny_data_dir}", "data.supervision=captions"]
    config = load_config(REPO / "configs/default.yaml", overrides)
    stages = ["prep", "sft", "sample", "autolabel", "rm", "ppo", "instruct", "eval", "caption_eval"]
    assert pipeline.run(config, "configs/default.yaml", stages, overrides, False) == 0
    assert started == ["stages.prep", "stages.sft", "stages.caption_eval"]
    out = capsys.readouterr().out
    for stage in ("sample", "autolabel", "rm", "ppo", "instruct", "eval"):
        assert (f"== {stage}: skipped: it needs VQA, and SFT trains on captions only "
                f"(data.supervision=captions, dataset {tiny_data_dir})") in out
    assert not (tmp_path / "captioner" / "eval" / "done.json").exists()  # skipped is not done

    # ...and a VQA-only dataset skips caption scoring instead of failing in it
    started.clear()
    vqa_only = tmp_path / "vqa-only"
    (vqa_only / "vqa").mkdir(parents=True)
    (vqa_only / "vqa" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "val", "test"]}))
    overrides = [f"output_root={tmp_path}", "name=vqa-only", f"data.dir={vqa_only}"]
    config = load_config(REPO / "configs/default.yaml", overrides)
    assert pipeline.run(config, "configs/default.yaml", ["eval", "caption_eval"], overrides, False) == 0
    assert started == ["stages.evaluate"]
    assert f"== caption_eval: skipped: it scores captions, and {vqa_only} has no captions/test split" in \
        capsys.readouterr().out
