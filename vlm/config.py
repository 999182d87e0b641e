"""Run configuration: one YAML file of nested sections, plus `key=value` overrides.

    ./launch.sh configs/default.yaml sft.lr=3e-4 eval.batch_size=64

Every section is a dataclass, so a typo is an error that names the key and the
closest valid ones instead of a silently ignored setting. The resolved config is
saved next to every checkpoint (`training_config.yaml`), nanoGPT-style.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


@dataclass
class ModelConfig:
    # Where weights come from, in order of precedence:
    #   checkpoint   a directory written by an earlier stage (save_pretrained)
    #   text_model / vision_model   hub names or local dirs (e.g. gpt2, openai/clip-vit-base-patch32)
    #   neither      tiny models built from the dimensions below (the CPU default)
    checkpoint: str | None = None
    text_model: str | None = None
    vision_model: str | None = None
    # Dimensions used when building from scratch.
    text_layers: int = 4
    text_width: int = 128
    text_heads: int = 4
    max_positions: int = 128
    vocab_size: int = 512  # BPE vocabulary trained on the built-in corpus
    vision_layers: int = 2
    vision_width: int = 128
    vision_heads: int = 4
    image_size: int = 48
    patch_size: int = 16
    dropout: float = 0.0
    # Which vision hidden state feeds the projector; LLaVA uses -2 with pretrained CLIP.
    vision_feature_layer: int = -1
    projector_act: str = "gelu"
    # How CLIP features reach GPT-2 (vlm/projectors.py): llava (stock Linear-GELU-Linear,
    # loads with plain transformers) | mlp (GPT-2 Vision) | linear-ln-transformer
    # (GPT2MultiModal) | prefix (ClipCap / CLIPxGPT) | cross-attention (VisionGPT-2).
    projector: str = "llava"
    prefix_length: int = 4  # prefix: image tokens K the pooled CLIP embedding becomes
    projector_layers: int = 1  # prefix, linear-ln-transformer: transformer encoder layers
    # CLIP-GPT's second direction (vlm/retrieval.py): a `<clip>` token and a regression head that
    # predicts the image's CLIP embedding from a caption; SFT trains it on caption examples
    # (sft.clip_loss_weight), `retrieval_eval` reports recall@1/5/10. Needs projector != llava.
    clip_head: bool = False


@dataclass
class VisionConfig:
    """Vision pretraining (`vision:`, stages/vision.py): a CLIP tower built from `model`'s
    dimensions learns the built-in captions' regions before SFT, then SFT builds on it
    (model.vision_model) and keeps it frozen. Real configs name a pretrained CLIP instead."""
    objective: Literal["region_text"] = "region_text"  # region_text: each patch token learns its region's caption phrase
    steps: int = 500
    batch_size: int = 64
    lr: float = 1.0e-3
    warmup_steps: int = 25
    weight_decay: float = 0.01
    save_steps: int = 250
    # Train images the linear probe (per-cell shape, colour and place) is fitted on; it is scored on data.test_split.
    probe_images: int = 2000
    # Cache the tower's features of every image of the dataset (<run>/vision/features) for the
    # stages that keep it frozen (data.feature_cache).
    feature_cache: bool = True


@dataclass
class DataConfig:
    # "synthetic": the built-in generator writes the dataset into `dir`;
    # "disk": `dir` already holds a dataset in the project's schema (data_prep/README.md).
    source: Literal["synthetic", "disk"] = "synthetic"
    dir: str | None = None  # default: <run dir>/data
    synthetic: dict = field(default_factory=dict)  # data_prep.synthetic.SyntheticConfig fields
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    # Images SFT never trains on, whose questions are the prompts for sampling answers to label
    # and for RL (the built-in generator's `rl` split). RL on SFT's own training prompts teaches
    # remembered answers, not better seeing. A converted dataset names its own (e.g. a slice of
    # VQA v2 train held out of SFT).
    rl_split: str = "rl"
    max_train_samples: int | None = None
    # Written answers are scarce: only the first N images of the train split carry them (their VQA
    # answers and captions are what SFT learns from); None: every train image. The vision stage still
    # reads every train image's captions (standing in for CLIP's web pretraining). The default run
    # sets it: few written answers, many cheap judgments on the rl images (docs: RLHF).
    answer_images: int | None = None
    # Prompt formats; {question} is filled in, the answer follows the prompt.
    prompt_template: str = "USER: <image>\n{question}\nASSISTANT:"
    answer_template: str = " {answer}"
    followup_template: str = "\nUSER: {question}\nASSISTANT:"  # later turns of a conversation
    # VQA questions about one image packed into one multi-turn example (LLaVA-1.5 does
    # this for VQA v2): the image is encoded once for several supervised answers.
    questions_per_example: int = 1
    caption_prompt: str = "Describe the image."
    # What SFT learns from (vlm/data.py training_tasks): auto (whatever the dataset holds:
    # VQA, captions or both) | vqa | captions (a captioner: every train caption, no VQA;
    # the pipeline then skips the stages that need VQA) | both.
    supervision: Literal["auto", "vqa", "captions", "both"] = "auto"
    # Co-train on captions (dense supervision; LLaVA's alignment data) when VQA is there too.
    caption_ratio: float = 0.25  # caption examples per VQA question
    max_length: int = 96
    on_bad_record: Literal["skip", "error"] = "skip"  # skip (counted, written to rejects.jsonl) | error
    # CLIP features cached by `vqa-rlhf prep features` (data_prep/features.py): used instead of
    # the images when the vision tower is frozen; a cache made by another tower is an error.
    feature_cache: str | None = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # GPT-2's attention and MLP projections; the multimodal projector is trained fully.
    target_modules: list = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])
    quantize_bits: Literal[4, 8] | None = None  # 4 or 8: QLoRA (bitsandbytes); needs pretrained weights


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3  # language model
    lr_vision: float | None = None  # default: lr
    lr_projector: float | None = None  # default: lr
    weight_decay: float = 0.01
    warmup_steps: int = 50
    schedule: str = "cosine"  # any transformers SchedulerType
    max_grad_norm: float = 1.0
    # Any transformers TrainingArguments.optim: adamw_torch, adafactor, sgd, adamw_torch_fused, ...
    optim: str = "adamw_torch_fused"  # transformers' default; CPU runs are bit-reproducible with it
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_language: bool = False
    # GPT-2 blocks kept frozen throughout: the first N / the last N (embeddings and lm_head train).
    freeze_first_blocks: int = 0
    freeze_last_blocks: int = 0
    # Staged unfreezing (vlm/train.py UnfreezeSchedule), e.g. the connector first, then GPT-2, then all:
    #   [{at_step: 0, train: [projector]}, {at_step: 500, train: [projector, language]}, {at_step: 1000, train: [all]}]
    # or with at_epoch. Parts: vision, projector, language, all. Empty: the freeze_* flags decide.
    unfreeze_schedule: list = field(default_factory=list)
    # Stop after this many seconds of training (comparisons at equal wall-clock); None: `steps` decides.
    max_train_seconds: float | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: str | None = None  # path to a DeepSpeed JSON config (configs/deepspeed/)
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 25
    eval_steps: int = 250  # held-out VQA accuracy during training (0: off)
    eval_samples: int = 256
    resume: bool = True  # continue from the newest complete checkpoint in the output dir
    num_workers: int = 0
    # model.clip_head: loss = CE + clip_loss_weight * MSE(predicted, CLIP embedding) on caption examples
    clip_loss_weight: float = 1.0


@dataclass
class InstructConfig(TrainConfig):
    """Stage 3 (stages/instruct.py): LLaVA-format conversations, loss on assistant turns only.
    The TrainConfig keys mean what they mean for sft; these are instruct's own."""
    # The model to start from; default <run>/ppo/final if it exists, else <run>/sft/final.
    init_from: str | None = None
    # Conversations dataset dir in the project's schema (default: data.dir's conversations/).
    data_dir: str | None = None
    max_train_samples: int | None = None  # conversation records used (None: all)
    # Packed VQA examples replayed per conversation example, to keep VQA accuracy.
    vqa_replay_ratio: float = 0.5
    # Held-out images evaluated for description quality ("Describe the image.") and for
    # follow-up answers in conversations (None: all of eval.split).
    describe_samples: int | None = None
    describe_max_new_tokens: int = 64  # longest description / follow-up answer generated


@dataclass
class RewardTrainConfig(TrainConfig):
    """Reward model training (`rm:`): TrainConfig's fields plus what the labels need."""
    # pointwise: a scalar head on the policy's backbone, BCE on correct / incorrect | pairwise: that head,
    # correct vs incorrect answers to one question | likelihood: the policy's own LM scores an answer by
    # the probability it gives it, trained by BCE on that probability (rewards/answer_likelihood.py)
    # dpo: the policy's own LM trained by DPO on (correct, incorrect) pairs of a question (a policy, for the
    # peers of `vqa-rlhf bench rlhf`; as a reward it reads like likelihood)
    objective: Literal["pointwise", "pairwise", "likelihood", "dpo"] = "pointwise"
    dpo_beta: float = 0.1
    # Train on the answers labeled correct only: with objective=likelihood that is SFT on them, i.e.
    # rejection-sampling fine-tuning (ReST / RAFT), the simple peer RLHF must beat
    only_correct: bool = False
    labels: str | None = None  # an export dir (vqa-rlhf label export); default: exported from sample.db
    base: str | None = None  # the VLM whose backbone the reward model starts from; default: <run>/sft/final
    heldout_fraction: float = 0.2  # labels held out for evaluation, split by image
    # Training labels each class (correct, incorrect) needs, checked before training: a reward model
    # learns nothing from one class. 0 accepts one class with a warning (--smoke: an untrained model
    # answers everything wrong).
    min_labels_per_class: int = 1
    # Fact-augmented reward model (LLaVA-RLHF's Fact-RLHF): it also reads the image's reference facts
    # (its captions, from the labels' dataset) before the question, at training and scoring time.
    # Trained into <run>/rm-fact (ppo.reward=fact_model reads it), beside the plain one in <run>/rm.
    facts: bool = False
    facts_template: str = "Facts: {facts}\n"
    # Train on the official VQA accuracy of each answer against its ground truth (soft BCE targets)
    # instead of the correct / incorrect label where the ground truth is known; metrics still use labels.
    soft_targets: bool = False
    best_of_n: int = 8  # diagnostics: best-of-n by the reward on held-out questions (0: off)
    best_of_n_questions: int = 400  # of the eval split, the first N questions
    # diagnostics: for the eval split's first N questions, every candidate answer of the question's family
    # (the answers that family has) is scored; `candidate_top1` is how often the best is on top (0: off)
    candidate_questions: int = 800


@dataclass
class PPOConfig:
    """RL fine-tuning of the SFT policy against the reward model (`ppo:`), through TRL 1.12."""
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    policy: str | None = None  # default: <run>/sft/final
    # What RL maximises (rewards/registry.py): model (the learned reward model) | fact_model (the
    # fact-augmented one, rm.facts) | vqa_accuracy (official VQA accuracy against the record's
    # answers: verifiable) | similarity (MiniLM vs the reference answers); or several joined by
    # '+' (model+vqa_accuracy), mixed as a weighted sum with reward_weights.
    reward: str = "model"
    reward_weights: dict = field(default_factory=dict)  # reward name -> weight when mixing (default 1 each)
    reward_model: str | None = None  # default: <run>/rm/final
    fact_model: str | None = None  # default: <run>/rm-fact/final
    prompt_split: str | None = None  # the split RL prompts come from; default: data.rl_split
    steps: int = 60  # PPO updates (each: one batch of rollouts, ppo_epochs passes over it)
    batch_size: int = 64  # rollouts per update per process
    mini_batches: int = 2
    ppo_epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    max_new_tokens: int = 8  # VQA answers are a few tokens
    missing_eos_penalty: float | None = 1.0  # an answer cut off at max_new_tokens loses this much reward
    whiten_rewards: bool = False
    num_generations: int = 4  # grpo / rloo: answers per prompt
    freeze_vision: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    deepspeed: str | None = None  # grpo / rloo (HF Trainer); ppo takes DeepSpeed from `accelerate launch` configs
    bf16: bool = False  # bf16 mixed precision of the RL updates (Ampere or newer GPUs), as sft.bf16
    max_prompts: int | None = None  # questions of the prompt split used as queries (default: all)
    save_steps: int = 20
    eval_steps: int = 20  # held-out VQA accuracy every N updates (0: off)
    # Val questions of that accuracy, which the guard below keeps the best policy by. Against a
    # policy near 99%, 256 questions hide a fall: 98.75 -> 98.13 on 256, 98.97 -> 97.62 on 1,200.
    eval_samples: int = 1200
    resume: bool = True
    # Reward-hacking guard (ppo): the alarm fires when the last hacking_window updates' mean reward is
    # above the first hacking_window updates' while the reward's agreement with the ground truth
    # (official VQA accuracy of the same rollouts) is hacking_drop points below theirs; the stage then
    # stops and keeps the best held-out checkpoint. With 64 rollouts an update's agreement varies by
    # about 6 points, so a 10-update mean by about 2: a 10-point drop is not noise.
    stop_on_hacking: bool = True
    hacking_window: int = 10
    hacking_drop: float = 10.0
    # Oracle control: after the run, the same PPO budget again with ppo.reward=vqa_accuracy (into
    # <run>/ppo-oracle), so the report shows how much of the gap is the reward's. Off by default:
    # it doubles the stage's time.
    oracle_control: bool = False

    def as_train_config(self) -> TrainConfig:
        """This section seen as a TrainConfig, for set_trainable / apply_lora (PPO, GRPO, RLOO alike)."""
        return TrainConfig(freeze_vision=self.freeze_vision, lora=self.lora, lr=self.lr)


@dataclass
class DecodingConfig:
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 3
    max_new_tokens: int = 8


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 128
    max_samples: int | None = None
    # Also scored: the first N training questions (memorisation check: far above the test
    # split's figure, the model memorised its training images); 0: off.
    train_check_samples: int = 600
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # caption_eval stage (stages/caption_eval.py): the captions/ split eval.split, BLEU / CIDEr-D / perplexity
    caption_max_new_tokens: int = 32
    caption_max_images: int | None = None  # the split's first N images (None: all)


@dataclass
class SampleConfig:
    """Candidate answers for labeling (`vqa-rlhf sample`, rewards/sampling.py): K sampled answers
    per question plus the greedy one, duplicates merged, into the label store."""
    model: str | None = None  # checkpoint to sample from; default: <run>/sft/final
    split: str | None = None  # default: data.rl_split (images SFT never trained on)
    max_questions: int | None = 2000  # the split's first N questions (None: all)
    k: int = 4  # sampled answers per question, besides the greedy one
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 8
    batch_size: int = 64
    db: str | None = None  # the label store; default: <run>/labels/labels.db


@dataclass
class AutolabelConfig:
    # An answer is auto-labeled correct when its official VQA accuracy against the
    # question's ground truth is at least this (0.6: at least two of ten annotators gave it).
    min_accuracy: float = 0.6
    # The simulated labeler errs on this share of the answers (the label flipped; which ones is fixed by
    # the run's seed and the sample id): robustness to careless labelers, measured rather than assumed.
    error_rate: float = 0.0


@dataclass
class RLHFConfig:
    """Online RLHF (`rlhf:`): sample -> label -> rm -> ppo, repeated from the improved policy, as Llama 2
    and LLaVA-RLHF iterate (one round cannot get past its policy's own best-of-n). Round r samples
    and labels answers of round r-1's policy (sample.max_questions per round; the label store keeps
    every round's, and each round's reward model learns from all of them), trains its reward model
    from that policy and runs PPO from it. Rounds before the last write <run>/rounds/<r>/<stage>;
    the last writes <run>/<stage>, where instruct and the report read."""
    rounds: int = 1
    round: int = 0  # set by the pipeline for each round's stages (1..rounds); 0: the last round
    # The reference line the report sets RLHF against: a stored report.json of the same task with written
    # answers for every training image (configs/full-answers.yaml); None: no reference line.
    reference_report: str | None = None


# The stages a round of online RLHF repeats (rlhf.rounds), in pipeline order.
ROUND_STAGES = ("sample", "autolabel", "rm", "ppo")


@dataclass
class RunConfig:
    name: str = "default"
    output_root: str = "runs"
    seed: int = 0
    stages: list = field(default_factory=lambda: ["prep", "sft", "eval"])
    # Distributed launch of training stages
    launcher: Literal["none", "torchrun", "deepspeed"] = "none"
    nproc_per_node: int = 1
    hostfile: str | None = None
    # Where every stage and command runs its model (vlm/model.py pick_device): auto (CUDA when
    # there is one, LOCAL_RANK's GPU under torchrun; else the CPU) | cuda (an error without one) |
    # cpu (also on a GPU machine, e.g. to reproduce the CPU figures). Inference runs in bf16 on
    # CUDA when the run trains in bf16 (sft.bf16), in fp32 on the CPU.
    device: Literal["auto", "cuda", "cpu"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autolabel: AutolabelConfig = field(default_factory=AutolabelConfig)
    rm: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rlhf: RLHFConfig = field(default_factory=RLHFConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.name

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir, self.round_root(self.round))

    @property
    def round(self) -> int:
        """The RLHF round these settings run (1..rlhf.rounds)."""
        return self.rlhf.round or self.rlhf.rounds

    def round_root(self, round: int) -> Path | None:
        """Where round `round`'s stages write: <run>/rounds/<round>, None for the last round (<run>)."""
        return None if round >= self.rlhf.rounds else self.run_dir / "rounds" / str(round)

    def round_tag(self, tag: str) -> str:
        """An evaluation's tag in this round (<run>/eval/<tag>): `tag` in the last round, `tag-round<r>` before."""
        return tag if self.round_root(self.round) is None else f"{tag}-round{self.round}"

    @property
    def round_start_policy(self) -> Path:
        """The policy this round samples from, builds its reward model on and trains: the SFT model in
        round 1, the previous round's PPO policy after."""
        if self.round <= 1:
            return self.sft_final
        return RunPaths(self.run_dir, self.round_root(self.round - 1)).final("ppo")

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.paths.data

    @property
    def vision_final(self) -> Path:
        """The tower the vision stage trains (a stock CLIPVisionModel dir)."""
        return self.paths.vision_final

    @property
    def vision_features(self) -> Path:
        """The feature cache the vision stage writes for that tower."""
        return self.paths.vision_features

    @property
    def sft_final(self) -> Path:
        """The run's SFT model: what later stages start from and evaluate by default."""
        return self.paths.final("sft")

    @property
    def ppo_policy(self) -> Path:
        """The policy RL starts from: ppo.policy, else the round's start (the run's SFT model in round 1)."""
        return Path(self.ppo.policy) if self.ppo.policy else self.round_start_policy

    @property
    def ppo_reward_model(self) -> Path:
        """The reward model RL trains against: ppo.reward_model, else the run's."""
        return Path(self.ppo.reward_model) if self.ppo.reward_model else self.paths.final("rm")

    @property
    def ppo_fact_model(self) -> Path:
        """The fact-augmented reward model (ppo.reward=fact_model): ppo.fact_model, else the run's."""
        return Path(self.ppo.fact_model) if self.ppo.fact_model else self.paths.final("rm-fact")

    @property
    def rm_dir(self) -> Path:
        """Where the rm stage trains: <run>/rm, or <run>/rm-fact for the fact-augmented model."""
        return self.paths.stage_dir("rm-fact" if self.rm.facts else "rm")

    @property
    def inference_bf16(self) -> bool:
        """Inference (eval, sample, best-of-n, descriptions, captions) in bf16 where the run trains in
        bf16: the precision SFT trained the model in (sft.bf16). Applies on CUDA only (vlm/model.py)."""
        return self.sft.bf16

    @property
    def ppo_prompt_split(self) -> str:
        return self.ppo.prompt_split or self.data.rl_split

    @property
    def sample_split(self) -> str:
        return self.sample.split or self.data.rl_split

    @property
    def labels_db(self) -> Path:
        """The label store: candidate answers and their labels (rewards/label_store.py)."""
        return Path(self.sample.db) if self.sample.db else self.paths.labels_db


@dataclass(frozen=True)
class RunPaths:
    """A run directory's layout, named once: every stage writes and reads its own and other
    stages' outputs through these names (the report reads a run dir with no config)."""
    root: Path
    round_root: Path | None = None  # an RLHF round before the last (RunConfig.round_root): its stages' home

    def stage_dir(self, stage: str) -> Path:
        """<run>/<stage>: a stage's checkpoints, final model, metrics.json and done.json (a round before
        the last: <run>/rounds/<r>/<stage> for the stages a round repeats)."""
        if self.round_root is not None and stage in ROUND_STAGES:
            return self.round_root / stage
        return self.root / stage

    def final(self, stage: str) -> Path:
        """The model a training stage saves (stock-loadable, with its processor)."""
        return self.stage_dir(stage) / "final"

    def metrics(self, stage: str) -> Path:
        return self.stage_dir(stage) / "metrics.json"

    def done_marker(self, stage: str) -> Path:
        """Written by the pipeline when a stage finished, with the config it finished with."""
        return self.stage_dir(stage) / "done.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def vision_final(self) -> Path:
        return self.final("vision")

    @property
    def vision_features(self) -> Path:
        return self.stage_dir("vision") / "features"

    @property
    def labels_db(self) -> Path:
        return self.root / "labels" / "labels.db"

    @property
    def eval_root(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, tag: str) -> Path:
        """<run>/eval/<tag>: one evaluation (sft, ppo, instruct, captions, retrieval, ...)."""
        return self.eval_root / tag

    def eval_metrics(self, tag: str) -> Path:
        return self.eval_dir(tag) / "metrics.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def _choice(value: Any, allowed: tuple, key: str) -> Any:
    """A choice field (typed Literal[...], maybe | None): the value must be one of its options."""
    options = [option for kind in allowed if typing.get_origin(kind) is Literal for option in typing.get_args(kind)]
    options += [None] if type(None) in allowed else []
    if any(value == option and type(value) is type(option) for option in options):
        return value
    raise ConfigError(f"config key '{key}' is {value!r}; allowed: {sorted(map(str, options))}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML reads `3e-4` as a string and `1` where a float is meant: convert by the field's type."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    if any(typing.get_origin(kind) is Literal for kind in allowed):
        return _choice(value, allowed, key)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key '{key}' cannot be null")
    for kind in (bool, int, float, str, list, dict):
        if kind in allowed:
            if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
                try:
                    return float(value)
                except ValueError:
                    continue
            if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
                return value
    raise ConfigError(f"config key '{key}' must be {' or '.join(getattr(t, '__name__', str(t)) for t in allowed)}, "
                      f"got {value!r}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where.rstrip('.') or '<root>'}' must be a mapping, got {values!r}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            raise _unknown_key(key, where, list(types))
        if dataclasses.is_dataclass(types[key]):
            value = _build(types[key], value or {}, f"{where}{key}.")
        else:
            value = _coerce(value, types[key], f"{where}{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=1 c=x` -> {"a": {"b": 1}, "c": "x"}; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        config = _build(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None
    _expand_run_dir(config, config.run_dir)
    _check_stages(config)
    _check_ranges(config)
    return config


RUN_DIR = "{run_dir}"


def _expand_run_dir(section, run_dir: Path) -> None:
    """String values may name the run's own outputs: "{run_dir}/vision/final" is
    <output_root>/<name>/vision/final once name and output_root are known."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _expand_run_dir(value, run_dir)
        elif isinstance(value, str) and RUN_DIR in value:
            setattr(section, f.name, value.replace(RUN_DIR, str(run_dir)))


def _check_ranges(config: RunConfig) -> None:
    """Values a type cannot rule out, checked before any stage starts (the error names the key)."""
    if config.data.answer_images is not None and config.data.answer_images < 1:
        raise ConfigError(f"config key 'data.answer_images' must be at least 1 (or null: every train image), "
                          f"got {config.data.answer_images}")
    if config.rlhf.rounds < 1 or not 0 <= config.rlhf.round <= config.rlhf.rounds:
        raise ConfigError(f"config keys 'rlhf.rounds' (at least 1) and 'rlhf.round' (0..rounds, set by the pipeline): "
                          f"got rounds={config.rlhf.rounds}, round={config.rlhf.round}")
    if config.rm.min_labels_per_class < 0:
        raise ConfigError(f"config key 'rm.min_labels_per_class' must be >= 0, got {config.rm.min_labels_per_class}")
    if not 0.0 <= config.autolabel.error_rate < 0.5:
        raise ConfigError(f"config key 'autolabel.error_rate' must be in [0, 0.5) (the share of labels the simulated "
                          f"labeler gets wrong), got {config.autolabel.error_rate}")


def _check_stages(config: RunConfig) -> None:
    unknown_stages = [s for s in config.stages if s not in STAGES]
    if unknown_stages:
        raise ConfigError(f"unknown stage(s) {unknown_stages}; stages are {list(STAGES)}")


@dataclass(frozen=True)
class Stage:
    """A pipeline step: `python -m <module> CONFIG [key=value ...]`, each in its own process.
    The pipeline, the config check, the CLI (`vqa-rlhf <name>`) and the report read this."""
    module: str
    summary: str  # one line for `vqa-rlhf --help`
    # A training stage: started under torchrun / the DeepSpeed launcher when `launcher` says so.
    distributed: bool = False
    # What the stage needs of the data, else the pipeline skips it saying why: "vqa" (it asks the
    # SFT model VQA questions or learns from its answers; not when SFT trains on captions alone),
    # "captions" (it scores captions: not without a captions split), or None.
    needs: Literal["vqa", "captions"] | None = None
    # Keys of <run>/<stage>/metrics.json the run report shows (vlm/report.py; a stage with a
    # richer entry has its own reader there).
    report: tuple[str, ...] = ()


# The pipeline's stages in the order they run. A new stage is its module plus one line here.
STAGES = {
    "prep": Stage("stages.prep", "write the dataset a config trains on (built-in synthetic or converted)"),
    "vision": Stage("stages.vision", "vision pretraining: the built-in run's own CLIP tower (region-text), before SFT",
                    report=("objective", "steps", "seconds", "probe", "probe_untrained", "probe_split", "checkpoint")),
    "sft": Stage("stages.sft", "stage 1: answer-only supervised fine-tuning on VQA", distributed=True),
    # right after SFT: later stages that compare with the SFT model reuse this evaluation
    # distributed: under the run's launcher the ranks answer disjoint shards (vlm/evaluation.py)
    "eval": Stage("stages.evaluate", "answer a split and score it with the official VQA metric", distributed=True,
                  needs="vqa"),
    "sample": Stage("stages.sample", "K sampled + the greedy answer per question into the label store, for labeling",
                    needs="vqa"),
    "autolabel": Stage("stages.autolabel", "label samples with ground truth by official VQA accuracy, as labeler auto",
                       needs="vqa"),
    "rm": Stage("stages.rm", "train the multimodal reward model on exported labels, with baselines",
                distributed=True, needs="vqa"),
    "ppo": Stage("stages.ppo", "PPO / GRPO / RLOO of the SFT policy against a reward, images in every forward",
                 distributed=True, needs="vqa"),
    "instruct": Stage("stages.instruct", "stage 3: LLaVA instruction tuning on conversations, loss on assistant turns",
                      distributed=True, needs="vqa", report=(
                          "vqa_accuracy_before", "vqa_accuracy_after", "description_precision",
                          "description_recall", "seconds")),
    "caption_eval": Stage("stages.caption_eval", "caption a split's images: BLEU-1..4, CIDEr-D (pure Python), perplexity",
                          needs="captions"),
    "retrieval_eval": Stage("stages.retrieval_eval",
                            "CLIP-GPT caption -> image retrieval: recall@1/5/10 (model.clip_head)", needs="captions"),
}


def to_dict(config) -> dict:
    return dataclasses.asdict(config)

