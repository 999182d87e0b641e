"""PPO with images: pixel values in every forward, <image> never sampled, LoRA, resume."""
from __future__ import annotations

import json

import pytest
import torch

from vlm.image_input import FEATURES, PIXELS
from tests.conftest import REPO


@pytest.fixture
def ppo_dirs(tiny_model, tiny_processor, tmp_path):
    """A saved tiny SFT policy and a reward model built on it (untrained head)."""
    from rewards.reward_model import RewardModel

    sft = tmp_path / "sft-final"
    tiny_model.save_pretrained(sft)
    tiny_processor.save_pretrained(sft)
    torch.manual_seed(0)
    reward = RewardModel.from_sft(sft)
    torch.nn.init.normal_(reward.score.weight, std=0.5)
    reward.save_pretrained(tmp_path / "rm-final")
    return sft, tmp_path / "rm-final"


def ppo_config(tiny_overrides, ppo_dirs, *extra):
    from vlm.config import load_config

    sft, rm = ppo_dirs
    return load_config(REPO / "configs/default.yaml", [
        *tiny_overrides, f"ppo.policy={sft}", f"ppo.reward_model={rm}", "ppo.steps=2", "ppo.batch_size=4",
        "ppo.mini_batches=2", "ppo.ppo_epochs=1", "ppo.eval_steps=0", "ppo.save_steps=0", "ppo.max_prompts=16",
        "ppo.lr=1e-3", *extra])


@pytest.fixture
def require_pixels(monkeypatch):
    """Every LlavaModel forward (policy, reference, value, reward) must get the image with the prompt."""
    from transformers.models.llava import modeling_llava

    calls = {"with_image": 0}
    original = modeling_llava.LlavaModel.forward

    def checked(self, input_ids=None, pixel_values=None, *args, **kwargs):
        if input_ids is not None and (input_ids == self.config.image_token_index).any():
            # generate() may encode the image once and pass the features (mm_encoder_outputs)
            if pixel_values is None and kwargs.get("mm_encoder_outputs") is None:
                raise AssertionError("a forward over <image> tokens without pixel_values")
            calls["with_image"] += 1
        return original(self, input_ids, pixel_values, *args, **kwargs)

    monkeypatch.setattr(modeling_llava.LlavaModel, "forward", checked)
    return calls


def test_response_mask_keeps_the_answer_eos():
    from rewards.ppo_trainer import response_mask

    eos = 0
    responses = torch.tensor([[5, 6, eos, eos, eos], [7, eos, 9, eos, eos], [1, 2, 3, 4, 5]])
    assert response_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_ppo_step_passes_pixels_everywhere_and_saves(require_pixels, tiny_overrides, ppo_dirs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from rewards.reward_model import RewardModel
    from stages.ppo import train

    config = ppo_config(tiny_overrides, ppo_dirs, "ppo.eval_steps=2", "ppo.eval_samples=4")
    metrics = train(config)
    assert metrics["updates"] == 2 and metrics["world_size"] == 1
    # per update: generation prefill, policy, reference, value, reward, + one per minibatch (policy and value)
    assert require_pixels["with_image"] >= 2 * (5 + 2 * 2)
    log = [json.loads(l) for l in (config.run_dir / "ppo" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2]
    assert "val_vqa_accuracy" in log[0] and "val_vqa_accuracy" in log[2] and "val_vqa_accuracy" not in log[1]
    log = log[1:]
    for key in ("mean_reward", "kl", "response_length", "entropy", "rollout_vqa_accuracy", "rm_vqa_agreement"):
        assert all(isinstance(e[key], (int, float)) and e[key] == e[key] for e in log), key
    final = config.run_dir / "ppo" / "final"
    LlavaForConditionalGeneration.from_pretrained(final)  # stock-loadable policy
    AutoProcessor.from_pretrained(final)
    assert isinstance(RewardModel.from_pretrained(config.run_dir / "ppo" / "value_model"), RewardModel)


def test_image_token_is_never_sampled(tiny_overrides, ppo_dirs):
    """Even when the policy prefers <image> above everything, rollouts never contain it and its
    log-probs are those of the suppressed distribution (finite, as in generation)."""
    from rewards.ppo_run import PPORun

    run = PPORun(ppo_config(tiny_overrides, ppo_dirs))
    trainer = run.build()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    image_id = policy.config.image_token_index
    ref_model = trainer.ref_model

    def prefer_image(module, inputs, output):
        output = output.clone()
        output[..., image_id] += 1e4
        return output

    policy.lm_head.register_forward_hook(prefer_image)
    ref_model.lm_head.register_forward_hook(prefer_image)
    batch = next(iter(trainer.dataloader))
    torch.manual_seed(0)
    rollout = trainer.rollout(batch)
    assert not (rollout["responses"] == image_id).any()
    assert torch.isfinite(rollout["logprobs"]).all() and torch.isfinite(rollout["ref_logprobs"]).all()


def test_lora_ppo_step_uses_adapter_free_reference(require_pixels, tiny_overrides, ppo_dirs):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from rewards.ppo_run import PPORun
    from stages.ppo import train

    config = ppo_config(tiny_overrides, ppo_dirs, "ppo.lora.enabled=true", "ppo.lora.r=4")
    run = PPORun(config)
    trainer = run.build()
    assert trainer.ref_model is None and isinstance(trainer.accelerator.unwrap_model(trainer.model).policy, PeftModel)
    metrics = train(config)
    assert metrics["updates"] == 2
    merged = LlavaForConditionalGeneration.from_pretrained(config.run_dir / "ppo" / "final")
    base = LlavaForConditionalGeneration.from_pretrained(ppo_dirs[0])
    changed = [n for (n, a), (_, b) in zip(merged.state_dict().items(), base.state_dict().items())
               if not torch.equal(a, b)]
    assert changed, "LoRA PPO changed nothing"


def test_resume_after_kill_ends_like_an_uninterrupted_run(tiny_overrides, ppo_dirs, tmp_path):
    from safetensors.torch import load_file

    from stages import ppo as ppo_stage

    extra = ["ppo.steps=4", "ppo.save_steps=2"]
    straight = ppo_config(tiny_overrides, ppo_dirs, *extra, "name=straight")
    ppo_stage.train(straight)

    killed = ppo_config(tiny_overrides, ppo_dirs, *extra, "name=killed")
    original = ppo_stage.PPORun.on_update

    def die_at_3(self, trainer, update, rollout, metrics):
        original(self, trainer, update, rollout, metrics)
        if update == 3:
            raise KeyboardInterrupt("killed")

    ppo_stage.PPORun.on_update = die_at_3
    try:
        with pytest.raises(KeyboardInterrupt):
            ppo_stage.train(killed)
    finally:
        ppo_stage.PPORun.on_update = original
    state = killed.run_dir / "ppo" / "checkpoints" / "update-2" / "state.json"
    seconds_at_checkpoint = json.loads(state.read_text())["seconds"]
    resumed = ppo_stage.train(killed)
    # training time counts the updates before the kill (up to update-2) and those after it
    assert resumed["seconds"] > seconds_at_checkpoint > 0
    log = [json.loads(l)["step"] for l in (killed.run_dir / "ppo" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # update 3's entry from before the kill was dropped, then redone
    a = load_file(str(straight.run_dir / "ppo" / "final" / "model.safetensors"))
    b = load_file(str(killed.run_dir / "ppo" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_two_cpu_processes_share_the_rollouts(tiny_overrides, ppo_dirs, tmp_path):
    """trl's PPOTrainer builds its own Accelerator(): without CUDA each torchrun rank would train
    alone unless ACCELERATE_USE_CPU=true, which the stage sets itself (not set here). Ranks that
    really share the work run half the updates, each on its own half of the rollouts."""
    import subprocess
    import sys

    from tests.test_sft import child_env, free_port

    sft, rm = ppo_dirs
    env = child_env()
    env.pop("ACCELERATE_USE_CPU", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "stages.ppo", str(REPO / "configs/default.yaml"), *tiny_overrides,
        f"ppo.policy={sft}", f"ppo.reward_model={rm}", "ppo.steps=4", "ppo.batch_size=4", "ppo.mini_batches=2",
        "ppo.ppo_epochs=1", "ppo.eval_steps=0", "ppo.save_steps=0", "ppo.max_prompts=16", "eval.max_samples=8",
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    metrics = json.loads((tmp_path / "tiny" / "ppo" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["updates"] == 2  # 4 updates of one process, halved
    log = [json.loads(l) for l in (tmp_path / "tiny" / "ppo" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2]  # rank 0 writes the log once per shared update


# ---------------------------------------------------------------- the CLIP feature cache

@pytest.fixture
def feature_cache(ppo_dirs, tiny_data_dir, tmp_path):
    """A feature cache made by the SFT policy's vision tower (the reward model's is the same)."""
    from data_prep.features import build_cache

    out = tmp_path / "features"
    build_cache(str(ppo_dirs[0]), tiny_data_dir, out, batch_size=16)
    return out


def with_another_vision_tower(model_dir, out_dir, model_class):
    """A copy of a saved model whose CLIP tower has other weights (as after training it)."""
    model = model_class.from_pretrained(model_dir)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "vision_tower" in n and "weight" in n).add_(0.1)
    model.save_pretrained(out_dir)
    return out_dir


def count_tower_runs(*models) -> dict:
    calls = {}
    for model in models:
        tower = model.model.vision_tower
        calls[id(tower)] = 0
        tower.register_forward_hook(lambda module, inputs, output: calls.__setitem__(id(module), calls[id(module)] + 1))
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_with_a_matching_cache_ppo_trains_without_running_a_vision_tower(lora, tiny_overrides, ppo_dirs, feature_cache,
                                                                         monkeypatch):
    from transformers.models.clip import modeling_clip

    from stages.ppo import train

    def no_tower(*args, **kwargs):
        raise AssertionError("a vision tower ran although the feature cache holds its output")

    monkeypatch.setattr(modeling_clip.CLIPVisionModel, "forward", no_tower)
    config = ppo_config(tiny_overrides, ppo_dirs, f"data.feature_cache={feature_cache}", "ppo.eval_steps=2",
                        "ppo.eval_samples=4", f"ppo.lora.enabled={str(lora).lower()}", "ppo.lora.r=4")
    metrics = train(config)  # rollouts, minibatch steps and the held-out evaluation
    assert metrics["updates"] == 2
    log = [json.loads(l) for l in (config.run_dir / "ppo" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2] and "val_vqa_accuracy" in log[2]


def test_a_ppo_update_from_cached_features_equals_one_from_pixels(tiny_overrides, ppo_dirs, feature_cache):
    """Same prompts, same seed: the cache changes where the image comes from, not the rollout
    (answers, log-probs, reference, values, rewards) nor the update made from it."""
    from rewards.ppo_run import PPORun
    from rewards.ppo_trainer import PromptCollator

    def one_update(*extra):
        run = PPORun(ppo_config(tiny_overrides, ppo_dirs, *extra))
        trainer = run.build()
        batch = PromptCollator(run.processor.tokenizer.pad_token_id)([trainer.train_dataset[i] for i in range(4)])
        torch.manual_seed(0)
        rollout = trainer.rollout(batch)
        advantages, returns, values, _, _ = trainer.advantages(rollout)
        stats = trainer.ppo_update(rollout, advantages, returns, values, update=0)
        return trainer, rollout, stats

    cached, cached_rollout, cached_stats = one_update(f"data.feature_cache={feature_cache}", "name=cached")
    pixels, pixel_rollout, pixel_stats = one_update("name=pixels")
    assert (cached.policy_input, cached.critic_input) == (FEATURES, FEATURES)
    assert (pixels.policy_input, pixels.critic_input) == (PIXELS, PIXELS)
    assert list(cached_rollout["images"]) == [FEATURES.key] and list(pixel_rollout["images"]) == [PIXELS.key]
    assert torch.equal(cached_rollout["responses"], pixel_rollout["responses"])
    for key in ("logprobs", "ref_logprobs", "values", "scores"):
        torch.testing.assert_close(cached_rollout[key], pixel_rollout[key], atol=1e-4, rtol=1e-4, msg=key)
    for key in ("pg_loss", "vf_loss", "entropy", "approxkl"):
        assert cached_stats[key] == pytest.approx(pixel_stats[key], rel=1e-3, abs=1e-5), key
    trained = lambda trainer: trainer.accelerator.unwrap_model(trainer.model).policy.state_dict()
    for (name, a), b in zip(trained(cached).items(), trained(pixels).values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_a_reward_model_with_its_own_tower_reads_pixels_while_the_policy_reads_the_cache(
        tiny_overrides, ppo_dirs, feature_cache, tmp_path, capsys):
    from rewards.ppo_run import PPORun
    from rewards.reward_model import RewardModel

    own_tower = with_another_vision_tower(ppo_dirs[1], tmp_path / "rm-own-tower", RewardModel)
    run = PPORun(ppo_config(tiny_overrides, ppo_dirs, f"data.feature_cache={feature_cache}",
                            f"ppo.reward_model={own_tower}"))
    trainer = run.build()
    assert "the reward and value models read pixels" in capsys.readouterr().out
    assert (trainer.policy_input, trainer.critic_input) == (FEATURES, PIXELS)
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    runs = count_tower_runs(wrapper.policy, trainer.ref_model, wrapper.value_model, trainer.reward_model.model)
    batch = next(iter(trainer.dataloader))
    rollout = trainer.rollout(batch)
    trainer.ppo_update(rollout, *trainer.advantages(rollout)[:3], update=0)
    policy_runs, ref_runs, value_runs, reward_runs = runs.values()
    assert policy_runs == ref_runs == 0
    assert value_runs == 1 + 2 and reward_runs == 1  # rollout, then each of the 2 minibatches


def test_the_cache_is_not_used_when_ppo_trains_the_tower_and_refused_when_made_by_another(
        tiny_overrides, ppo_dirs, feature_cache, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm.features import FeatureCacheMismatch
    from rewards.ppo_run import PPORun

    trains_vision = PPORun(ppo_config(tiny_overrides, ppo_dirs, f"data.feature_cache={feature_cache}",
                                      "ppo.freeze_vision=false")).build()
    assert "data.feature_cache is not used by the PPO policy" in capsys.readouterr().out
    assert (trains_vision.policy_input, trains_vision.critic_input) == (PIXELS, PIXELS)

    other_policy = with_another_vision_tower(ppo_dirs[0], tmp_path / "other-policy", LlavaForConditionalGeneration)
    AutoProcessor.from_pretrained(ppo_dirs[0]).save_pretrained(other_policy)  # the processor travels with a policy
    with pytest.raises(FeatureCacheMismatch, match="vision tower weights differ"):
        PPORun(ppo_config(tiny_overrides, ppo_dirs, f"data.feature_cache={feature_cache}",
                          f"ppo.policy={other_policy}")).build()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_relative_algorithms_see_the_image(algo, require_pixels, tiny_overrides, ppo_dirs):
    """trl's GRPO / RLOO with our VLM: every forward over the prompt gets the image, and the
    reward model scores (image, question, answer)."""
    from transformers import LlavaForConditionalGeneration

    from stages.ppo import train

    config = ppo_config(tiny_overrides, ppo_dirs, f"ppo.algo={algo}", "ppo.num_generations=2", "ppo.steps=2")
    metrics = train(config)
    assert metrics["algo"] == algo and metrics["updates"] == 2
    assert require_pixels["with_image"] > 0
    log = [json.loads(l) for l in (config.run_dir / "ppo" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(e["rollout_vqa_accuracy"] is not None for e in log)
    LlavaForConditionalGeneration.from_pretrained(config.run_dir / "ppo" / "final")
