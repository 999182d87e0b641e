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
from typing import Any

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
class DataConfig:
    # "synthetic": the built-in generator writes the dataset into `dir`;
    # "disk": `dir` already holds a dataset in the project's schema (data_prep/README.md).
    source: str = "synthetic"
    dir: str | None = None  # default: <run dir>/data
    synthetic: dict = field(default_factory=dict)  # data_prep.synthetic.SyntheticConfig fields
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_samples: int | None = None
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
    supervision: str = "auto"
    # Co-train on captions (dense supervision; LLaVA's alignment data) when VQA is there too.
    caption_ratio: float = 0.25  # caption examples per VQA question
    max_length: int = 96
    on_bad_record: str = "skip"  # skip (counted, written to rejects.jsonl) | error
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
    quantize_bits: int | None = None  # 4 or 8: QLoRA (bitsandbytes); needs pretrained weights


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
    objective: str = "pointwise"  # pointwise (BCE on correct / incorrect) | pairwise (correct vs incorrect, same question)
    labels: str | None = None  # an export dir (vqa-rlhf export-labels); default: exported from sample.db
    base: str | None = None  # the VLM whose backbone the reward model starts from; default: <run>/sft/final
    heldout_fraction: float = 0.2  # labels held out for evaluation, split by image


@dataclass
class PPOConfig:
    """RL fine-tuning of the SFT policy against the reward model (`ppo:`), through TRL 1.12."""
    algo: str = "ppo"  # ppo | grpo | rloo
    policy: str | None = None  # default: <run>/sft/final
    reward_model: str | None = None  # default: <run>/rm/final
    steps: int = 60  # PPO updates (each: one batch of rollouts, ppo_epochs passes over it)
    batch_size: int = 64  # rollouts per update per process
    mini_batches: int = 2
    ppo_epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 | k3
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
    max_prompts: int | None = None  # train-split questions used as queries (default: all)
    save_steps: int = 20
    eval_steps: int = 20  # held-out VQA accuracy every N updates (0: off)
    eval_samples: int = 256
    resume: bool = True


@dataclass
class DecodingConfig:
    strategy: str = "greedy"  # greedy | sample | beam
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 3
    max_new_tokens: int = 8


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 128
    max_samples: int | None = None
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # caption_eval stage (stages/caption_eval.py): the captions/ split eval.split, BLEU / CIDEr-D / perplexity
    caption_max_new_tokens: int = 32
    caption_max_images: int | None = None  # the split's first N images (None: all)


@dataclass
class SampleConfig:
    """Candidate answers for labeling (`vqa-rlhf sample`, rewards/sampling.py): K sampled answers
    per question plus the greedy one, duplicates merged, into the label store."""
    model: str | None = None  # checkpoint to sample from; default: <run>/sft/final
    split: str = "train"
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


@dataclass
class RunConfig:
    name: str = "default"
    output_root: str = "runs"
    seed: int = 0
    stages: list = field(default_factory=lambda: ["prep", "sft", "eval"])
    # Distributed launch of training stages: none | torchrun | deepspeed
    launcher: str = "none"
    nproc_per_node: int = 1
    hostfile: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    instruct: InstructConfig = field(default_factory=InstructConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autolabel: AutolabelConfig = field(default_factory=AutolabelConfig)
    rm: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_root) / self.name

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else self.run_dir / "data"

    @property
    def sft_final(self) -> Path:
        """The run's SFT model: what later stages start from and evaluate by default."""
        return self.run_dir / "sft" / "final"

    @property
    def ppo_policy(self) -> Path:
        """The policy RL starts from: ppo.policy, else the run's SFT model."""
        return Path(self.ppo.policy) if self.ppo.policy else self.sft_final

    @property
    def ppo_reward_model(self) -> Path:
        """The reward model RL trains against: ppo.reward_model, else the run's."""
        return Path(self.ppo.reward_model) if self.ppo.reward_model else self.run_dir / "rm" / "final"

    @property
    def labels_db(self) -> Path:
        """The label store: candidate answers and their labels (rewards/label_store.py)."""
        return Path(self.sample.db) if self.sample.db else self.run_dir / "labels" / "labels.db"


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, where: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """YAML reads `3e-4` as a string and `1` where a float is meant: convert by the field's type."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
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
    _check_choices(config)
    return config


def _check_choices(config: RunConfig) -> None:
    choices = {
        "data.source": (config.data.source, {"synthetic", "disk"}),
        "data.on_bad_record": (config.data.on_bad_record, {"skip", "error"}),
        "data.supervision": (config.data.supervision, {"auto", "vqa", "captions", "both"}),
        "eval.decoding.strategy": (config.eval.decoding.strategy, {"greedy", "sample", "beam"}),
        "launcher": (config.launcher, {"none", "torchrun", "deepspeed"}),
        "sft.lora.quantize_bits": (config.sft.lora.quantize_bits, {None, 4, 8}),
        "rm.objective": (config.rm.objective, {"pointwise", "pairwise"}),
        "ppo.algo": (config.ppo.algo, {"ppo", "grpo", "rloo"}),
        "ppo.kl_estimator": (config.ppo.kl_estimator, {"k1", "k3"}),
        "instruct.lora.quantize_bits": (config.instruct.lora.quantize_bits, {None, 4, 8}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is {value!r}; allowed: {sorted(map(str, allowed))}")
    unknown_stages = [s for s in config.stages if s not in STAGES]
    if unknown_stages:
        raise ConfigError(f"unknown stage(s) {unknown_stages}; stages are {list(STAGES)}")


# The pipeline's stages in the order they run.
STAGES = ("prep", "sft", "sample", "autolabel", "rm", "ppo", "instruct", "eval", "caption_eval", "retrieval_eval")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
