"""One device rule for every stage and command that runs a model (vlm/model.py pick_device): CUDA
when there is one (LOCAL_RANK's GPU under torchrun), else the CPU; `device` forces one. Inference
in the run's precision on the GPU, fp32 on the CPU; batches follow the model. bf16 reaches the RL
trainers from the config. A killed evaluation resumes without answering a question twice.

No GPU here: CUDA's presence is patched, and bf16 on the CPU stands in for "another device and
dtype" where a path must move the model and its batches."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from vlm.config import ConfigError, load_config
from vlm.model import inference_dtype, load_for_inference, pick_device


def test_the_device_rule_picks_cuda_when_there_is_one_and_local_ranks_gpu_under_torchrun(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cpu") == torch.device("cpu")  # forced: also on a GPU machine


def test_without_cuda_the_rule_picks_the_cpu_and_a_forced_cuda_is_an_error_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="config key 'device' is 'cuda'"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="config key 'device' is 'gpu'"):
        pick_device("gpu")
    with pytest.raises(ConfigError, match=r"device.*allowed"):
        load_config(REPO / "configs/default.yaml", ["device=gpu"])


def test_bf16_only_on_the_gpu_where_the_run_asks_for_it():
    assert inference_dtype(torch.device("cuda", 0), bf16=True) == torch.bfloat16
    assert inference_dtype(torch.device("cuda", 0), bf16=False) == torch.float32
    assert inference_dtype(torch.device("cpu"), bf16=True) == torch.float32
    assert load_config(REPO / "configs/gpt2-clip-vqav2.yaml").inference_bf16
    assert not load_config(REPO / "configs/default.yaml").inference_bf16


def test_a_loaded_model_names_its_device_and_dtype_first(saved_tiny_model, capsys):
    model, _ = load_for_inference(saved_tiny_model, "cpu", bf16=True, what="eval[x]")
    assert next(model.parameters()).device.type == "cpu" and model.dtype == torch.float32 and not model.training
    assert capsys.readouterr().err.splitlines()[0] == "eval[x]: device cpu, dtype float32"


class Spy:
    """Records the device and dtype of the model and of the image batch of every generate() call."""

    def __init__(self, monkeypatch, dtype):
        import transformers

        from vlm import model as model_module

        self.calls = []
        original_generate = transformers.GenerationMixin.generate
        original_dtype = model_module.inference_dtype
        spy = self

        def generate(model, *args, **kwargs):
            images = kwargs.get("pixel_values", kwargs.get("image_features"))
            spy.calls.append((next(model.parameters()).device.type, model.dtype,
                              None if images is None else images.dtype, kwargs["input_ids"].device.type))
            return original_generate(model, *args, **kwargs)

        monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
        # bf16 on the CPU stands in for a GPU's bf16: what the path does with the chosen dtype shows
        monkeypatch.setattr(model_module, "inference_dtype", lambda device, bf16: dtype if bf16 else original_dtype(device, bf16))

    def check(self, dtype):
        assert self.calls, "no generate() call"
        assert all(call == ("cpu", dtype, dtype, "cpu") or call == ("cpu", dtype, None, "cpu") for call in self.calls), self.calls


@pytest.fixture
def bf16_config(tiny_overrides):
    return load_config(REPO / "configs/default.yaml", [*tiny_overrides, "sft.bf16=true", "device=cpu",
                                                       "eval.max_samples=6", "eval.train_check_samples=0"])


def test_eval_runs_the_model_and_its_batches_in_the_runs_dtype(monkeypatch, bf16_config, saved_tiny_model):
    from vlm.evaluation import evaluate

    spy = Spy(monkeypatch, torch.bfloat16)
    metrics = evaluate(bf16_config, saved_tiny_model, "bf16")
    spy.check(torch.bfloat16)
    assert (metrics["device"], metrics["dtype"]) == ("cpu", "bfloat16")


def test_sampling_for_labels_runs_in_the_runs_dtype(monkeypatch, bf16_config, saved_tiny_model, tmp_path):
    import dataclasses

    from stages.sample import sample_to_store

    spy = Spy(monkeypatch, torch.bfloat16)
    config = dataclasses.replace(bf16_config, sample=dataclasses.replace(
        bf16_config.sample, model=str(saved_tiny_model), max_questions=4, k=2, db=str(tmp_path / "l.db")))
    sample_to_store(config, progress=False)
    spy.check(torch.bfloat16)


def test_instruct_descriptions_run_in_the_runs_dtype(monkeypatch, bf16_config, saved_tiny_model):
    import dataclasses

    from stages.instruct import evaluate_descriptions

    spy = Spy(monkeypatch, torch.bfloat16)
    config = dataclasses.replace(bf16_config, instruct=dataclasses.replace(bf16_config.instruct, describe_samples=3,
                                                                           describe_max_new_tokens=4))
    evaluate_descriptions(config, saved_tiny_model, "bf16")
    spy.check(torch.bfloat16)


def test_caption_eval_runs_in_the_runs_dtype(monkeypatch, bf16_config, saved_tiny_model):
    import dataclasses

    from stages.caption_eval import evaluate_captions

    spy = Spy(monkeypatch, torch.bfloat16)
    config = dataclasses.replace(bf16_config, eval=dataclasses.replace(
        bf16_config.eval, caption_max_images=3, caption_max_new_tokens=4))
    evaluate_captions(config, saved_tiny_model)
    spy.check(torch.bfloat16)


def test_ask_and_caption_run_in_the_precision_the_model_was_trained_in(monkeypatch, saved_tiny_model, tiny_data_dir,
                                                                         capsys):
    from vlm.chat import ChatSession
    from vlm.config import DecodingConfig
    from stages import caption

    (saved_tiny_model / "training_config.json").write_text(json.dumps({"sft": {"bf16": True}}))
    spy = Spy(monkeypatch, torch.bfloat16)
    image = sorted((tiny_data_dir / "images").rglob("*.png"))[0]
    session = ChatSession(saved_tiny_model, DecodingConfig(max_new_tokens=3), "cpu")
    session.set_image(image)
    session.ask("What is left?")
    caption.main(["--model", str(saved_tiny_model), "--max-new-tokens", "3", "--device", "cpu", str(image)])
    spy.check(torch.bfloat16)
    err = capsys.readouterr().err.splitlines()
    assert "chat: device cpu, dtype bfloat16" in err and "caption: device cpu, dtype bfloat16" in err


def test_bf16_reaches_the_ppo_and_grpo_configs(tiny_overrides, tmp_path, monkeypatch):
    from rewards.group_rl import algo_arguments
    from rewards.ppo_run import PPORun

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for bf16 in (False, True):
        config = load_config(REPO / "configs/default.yaml", [*tiny_overrides, f"ppo.bf16={bf16}", "ppo.algo=grpo"])
        assert PPORun(config, tmp_path / "ppo")._trl_args().bf16 is bf16
        assert algo_arguments(config, 5, tmp_path / "grpo").bf16 is bf16
        rloo = load_config(REPO / "configs/default.yaml", [*tiny_overrides, f"ppo.bf16={bf16}", "ppo.algo=rloo"])
        assert algo_arguments(rloo, 5, tmp_path / "rloo").bf16 is bf16


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of answering (pytest stops the session on KeyboardInterrupt)."""


def test_a_killed_eval_resumes_without_answering_a_question_twice(monkeypatch, tiny_overrides, saved_tiny_model,
                                                                   tmp_path):
    from vlm import evaluation

    overrides = [*tiny_overrides, "eval.batch_size=2", "eval.train_check_samples=0"]
    whole = evaluation.evaluate(load_config(REPO / "configs/default.yaml", [*overrides, "name=whole"]),
                                saved_tiny_model, "sft")
    original = evaluation.answer_questions
    asked, kills = [], []

    def answering(model, processor, records, *args, **kwargs):
        if len(asked) == 4 and not kills:  # killed while answering the third batch
            kills.append(len(asked))
            raise Killed
        asked.extend(str(r["id"]) for r in records)
        return original(model, processor, records, *args, **kwargs)

    monkeypatch.setattr(evaluation, "answer_questions", answering)
    config = load_config(REPO / "configs/default.yaml", [*overrides, "name=killed"])
    with pytest.raises(Killed):
        evaluation.evaluate(config, saved_tiny_model, "sft")
    partial = evaluation.partial_path(config.paths.eval_dir("sft"), 0, 1)
    with open(partial, "a") as f:
        f.write('{"question_id": "torn')  # killed in the middle of a write
    resumed = evaluation.evaluate(config, saved_tiny_model, "sft")

    assert len(asked) == len(set(asked)) == whole["count"]  # every question answered once
    assert not partial.exists()
    read = lambda name: (tmp_path / name / "eval" / "sft" / "results.json").read_text()
    assert read("killed") == read("whole")  # same answers, same order as an uninterrupted run
    assert resumed["vqa_accuracy"] == whole["vqa_accuracy"]


def test_a_partial_of_another_model_is_not_reused(tmp_path):
    from vlm.evaluation import read_partial

    path = tmp_path / "answers.partial.jsonl"
    path.write_text(json.dumps({"partial_of": {"model": "a"}}) + "\n" + '{"question_id": "1", "answer": "x"}\n')
    assert read_partial(path, {"model": "a"}) == {"1": "x"}
    assert read_partial(path, {"model": "b"}) == {} and not path.exists()


def test_bench_gpu_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stages.cli", "bench", "gpu", "--out", str(tmp_path / "gpu.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count("\n") == 0 and "no CUDA" in done.stdout
    assert not (tmp_path / "gpu.json").exists()


def test_training_stages_stay_on_the_cpu_when_the_config_says_so(monkeypatch, tmp_path, capsys):
    from vlm.config import TrainConfig
    from vlm.train import training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    assert training_arguments(TrainConfig(optim="adamw_torch"), tmp_path, 0, "cpu").use_cpu
    assert "train: device cpu, dtype float32" in capsys.readouterr().err


def test_under_torchrun_ranks_answer_disjoint_shards_and_rank_0_writes_the_one_results_file(
        tiny_overrides, saved_tiny_model, tmp_path):
    overrides = [*tiny_overrides, "eval.batch_size=4", "eval.train_check_samples=0"]
    command = ["-m", "stages.evaluate", str(REPO / "configs/default.yaml"), "--model", str(saved_tiny_model),
               *overrides]
    one = subprocess.run([sys.executable, *command, "name=one"], capture_output=True, text=True, cwd=REPO)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29561", *command, "name=two"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    read = lambda name, file: (tmp_path / name / "eval" / "saved-model" / file).read_text()
    assert read("two", "results.json") == read("one", "results.json")
    assert json.loads(read("two", "metrics.json"))["ranks"] == 2
    assert two.stdout.count("VQA accuracy") == 1  # rank 0 reports; rank 1's shard is in its file
    assert not list((tmp_path / "two" / "eval" / "saved-model").glob("answers.partial*"))


def test_bench_gpu_prints_a_failing_rows_error_and_goes_on_to_the_next(monkeypatch, tmp_path, capsys):
    from bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Test GPU")
    commands = {
        "sft": lambda result: [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
        "eval": lambda result: [sys.executable, "-c",
                                f"import json; open({str(result)!r}, 'w').write(json.dumps({{'questions_s': 12.5}}))"],
    }
    monkeypatch.setattr(gpu, "launcher", lambda row, result: commands[row](result))
    out = tmp_path / "gpu.json"
    assert gpu.main(["--rows", "sft,eval", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bench gpu: Test GPU") and "dtype bfloat16" in lines[0]
    assert lines[1].startswith("sft") and "error: exit 3: boom" in lines[1]
    assert lines[2].startswith("eval") and "questions_s 12.5" in lines[2]
    table = json.loads(out.read_text())
    assert table["gpu"] == "Test GPU" and table["rows"]["eval"]["questions_s"] == 12.5
    assert "error" in table["rows"]["sft"]
