"""What every training stage shares: freezing, LoRA / QLoRA, per-part learning
rates, the HF Trainer set-up (DeepSpeed, checkpoints, resume) and the final save.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput

from vlm.config import TrainConfig
from vlm.data import VLMCollator
from vlm.files import writing
from vlm.image_input import input_kind_of, llava_of
from vlm.retrieval import EmbeddingCollator, embedding_head, embedding_loss, pop_embedding_inputs

_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")

# Parameter-name prefixes of the three parts of a LlavaForConditionalGeneration.
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."


# Cross-attention layers added to GPT-2 blocks (projector "cross-attention", vlm/projectors.py)
# are connector weights: new, trained with the projector.
CROSS_ATTENTION_PARTS = (".crossattention.", ".ln_cross_attn.")
PARTS = ("vision", "projector", "language")
_GPT2_BLOCK = re.compile(r"language_model\.(?:model\.)?h\.(\d+)\.")


def model_part(name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name (PEFT prefixes stripped)."""
    name = name.removeprefix("base_model.model.")
    if name.startswith(VISION_PREFIX):
        return "vision"
    if name.startswith(PROJECTOR_PREFIX) or any(part in name for part in CROSS_ATTENTION_PARTS):
        return "projector"
    return "language"


def gpt2_block(name: str) -> int | None:
    """The GPT-2 block index of a parameter name, None outside the blocks."""
    match = _GPT2_BLOCK.search(name)
    return int(match.group(1)) if match else None


def frozen_blocks(model: torch.nn.Module, config: TrainConfig) -> set[int]:
    """GPT-2 blocks that never train: the first `freeze_first_blocks` and last `freeze_last_blocks`."""
    first, last = config.freeze_first_blocks, config.freeze_last_blocks
    if not (first or last):
        return set()
    n_layer = llava_text_config(model).n_layer
    if first < 0 or last < 0 or first + last > n_layer:
        raise ValueError(f"freeze_first_blocks={first} + freeze_last_blocks={last}: GPT-2 has {n_layer} blocks")
    return set(range(first)) | set(range(n_layer - last, n_layer))


def llava_text_config(model):
    return llava_of(model).config.text_config


def schedule_phases(config: TrainConfig) -> list[tuple[str, int, set[str]]]:
    """`unfreeze_schedule` checked: [(unit "step"|"epoch", at, parts)] in order; [] without one.

    Each entry is {at_step: N, train: [parts]} or {at_epoch: N, train: [parts]}; parts are
    vision, projector, language or all. The first entry must start at 0, units not mixed."""
    schedule = config.unfreeze_schedule or []
    phases = []
    for i, entry in enumerate(schedule):
        where = f"unfreeze_schedule[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"at_step", "at_epoch", "train"} or "train" not in entry \
                or len(set(entry) & {"at_step", "at_epoch"}) != 1:
            raise ValueError(f"{where} is {entry!r}; expected {{at_step: N, train: [parts]}} or "
                             f"{{at_epoch: N, train: [parts]}}")
        unit = "step" if "at_step" in entry else "epoch"
        at = entry[f"at_{unit}"]
        parts = entry["train"] if isinstance(entry["train"], list) else [entry["train"]]
        unknown = [p for p in parts if p not in (*PARTS, "all")]
        if unknown or not isinstance(at, int) or at < 0:
            raise ValueError(f"{where}: train must list {', '.join(PARTS)} or all (got {parts!r}) and "
                             f"at_{unit} must be an integer >= 0 (got {at!r})")
        parts = set(PARTS) if "all" in parts else set(parts)
        frozen = {p for p in PARTS if getattr(config, f"freeze_{p}")}
        if parts & frozen:
            raise ValueError(f"{where} trains {sorted(parts & frozen)}, which freeze_* keeps frozen")
        if phases and (unit != phases[-1][0] or at <= phases[-1][1]):
            raise ValueError(f"{where}: entries must use one unit (at_step or at_epoch) in increasing order")
        phases.append((unit, at, parts))
    if phases and phases[0][1] != 0:
        raise ValueError(f"unfreeze_schedule must start at 0 (the first phase starts at {phases[0][1]})")
    if phases and (config.lora.enabled or config.deepspeed):
        raise ValueError("unfreeze_schedule works with full fine-tuning without DeepSpeed "
                         "(it toggles requires_grad between steps); unset lora.enabled / deepspeed")
    return phases


def set_trainable(model: torch.nn.Module, config: TrainConfig, parts: set[str] | None = None) -> None:
    """requires_grad by part (freeze_* flags, or `parts` when given) and frozen GPT-2 blocks.

    With an `unfreeze_schedule`, every part some phase trains starts trainable, so the
    optimizer holds them all; UnfreezeSchedule then narrows it to the current phase."""
    if parts is None:
        phases = schedule_phases(config)
        if phases:
            parts = set().union(*(phase for _, _, phase in phases))
        else:
            parts = {p for p in PARTS if not getattr(config, f"freeze_{p}")}
    blocks = frozen_blocks(model, config)
    for name, param in model.named_parameters():
        # Quantized (bitsandbytes int8 / packed 4-bit) weights cannot require gradients:
        # under QLoRA only the adapters and modules_to_save train.
        trainable = model_part(name) in parts and param.is_floating_point()
        if blocks and model_part(name) == "language" and gpt2_block(name) in blocks:
            trainable = False
        param.requires_grad_(trainable)


class TimeLimit(TrainerCallback):
    """Stops training after `max_train_seconds` (measured from this process's first step; the
    learning-rate schedule still spans `steps`). The final model is saved as after `steps`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = self.started or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.started >= self.seconds:
            control.should_training_stop = True
            if is_main_process():
                print(f"max_train_seconds={self.seconds:g} reached at step {state.global_step}", flush=True)


class TrainingClock(TrainerCallback, ExportableState):
    """Seconds of training across resumes.

    A killed run that resumes would otherwise report only the time since its last start. The
    count is saved in each checkpoint's trainer_state.json (the Trainer writes the `state()` of
    ExportableState callbacks there, in the same file that marks the checkpoint complete) and taken
    up again from the checkpoint a run resumes from, so it stays in step with the weights. Time spent
    inside `paused()` (evaluations) is not training time."""

    def __init__(self):
        self.seconds = 0.0
        self._last: float | None = None

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seconds": self.seconds}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        if isinstance(saved, list):  # several callbacks of one class: the Trainer keeps a list
            saved = saved[-1]
        self.seconds = saved["attributes"]["seconds"] if saved else 0.0
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds += now - self._last
        self._last = now

    @contextlib.contextmanager
    def paused(self):
        try:
            yield
        finally:
            self._last = time.perf_counter()


def mean_logged_loss(log_history: list[dict]) -> float | None:
    """Mean training loss per step over the logged steps, from the Trainer's log history.

    The Trainer's own `training_loss` averages only the steps of the current process, so a resumed
    run would report the mean of its last stretch. The log history is saved in every checkpoint and
    restored with it: the same figure whether the run was interrupted or not (each log entry's loss is
    the mean over the steps since the entry before)."""
    total, last_step = 0.0, 0
    for entry in log_history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - last_step)
            last_step = entry["step"]
    return total / last_step if last_step else None


class UnfreezeSchedule(TrainerCallback):
    """Staged unfreezing (`unfreeze_schedule`): before each step, the parts of the phase the
    step (or epoch) is in train and the others get no gradient. The optimizer was built
    with every scheduled part (set_trainable), and torch optimizers skip parameters whose
    gradient is None, so a part outside its phase is not updated, not even by weight decay.
    A resumed run finds its phase from the restored step."""

    def __init__(self, model, config: TrainConfig):
        self.model = model
        self.config = config
        self.phases = schedule_phases(config)
        self.current: set[str] | None = None

    def phase_at(self, step: int, epoch: float) -> set[str]:
        position = {"step": step, "epoch": epoch}
        parts = self.phases[0][2]
        for unit, at, phase_parts in self.phases:
            if position[unit] + 1e-9 >= at:
                parts = phase_parts
        return parts

    def on_step_begin(self, args, state, control, **kwargs):
        parts = self.phase_at(state.global_step, state.epoch or 0.0)
        if parts != self.current:
            set_trainable(self.model, self.config, parts)
            if self.current is not None and is_main_process():
                print(f"unfreeze_schedule: step {state.global_step}: training {sorted(parts)}", flush=True)
            self.current = parts


def apply_lora(model, config: TrainConfig, task_type: str | None = "CAUSAL_LM", extra_modules_to_save=()):
    """LoRA adapters on GPT-2's projections; the projector stays fully trainable.

    The reward model passes task_type=None (it is no causal LM: no generation wrapper) and
    its new head as an extra module trained and saved in full.

    The vision tower is frozen under LoRA unless explicitly trained (freeze_vision=false
    keeps it trainable as a whole module)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora = config.lora
    if lora.quantize_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    modules_to_save = ([] if config.freeze_projector else ["multi_modal_projector"]) + list(extra_modules_to_save)
    if not config.freeze_vision:
        modules_to_save.append("vision_tower")
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # Only the language model's layers: the vision tower has no c_attn/c_fc, and the
        # regex keeps "c_proj" from matching anything outside GPT-2.
        target_modules=r".*language_model.*\.(" + "|".join(lora.target_modules) + r")$",
        modules_to_save=modules_to_save or None,
        fan_in_fan_out=True,  # GPT-2 uses Conv1D (weights stored transposed)
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def quantization_config(bits: int | None):
    if not bits:
        return None

    # transformers 5 matches these from the start of a module's full name (or as its
    # suffix), so the parts are named by their full paths: a bare "vision_tower" matched
    # nothing and the projector and the vision tower were quantized too.
    skip = ["model.multi_modal_projector", "model.vision_tower", "lm_head", "embedding_head"]  # + model.clip_head's
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


class VLMTrainer(Trainer):
    """HF Trainer with one learning rate per model part (vision / projector / language)."""

    def __init__(self, *args, part_lrs: dict[str, float], embedding_loss_weight: float = 0.0, **kwargs):
        self.part_lrs = part_lrs
        self.embedding_loss_weight = embedding_loss_weight  # model.clip_head: weight of the MSE
        self._embedding_mse: list[float] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        embed_inputs = pop_embedding_inputs(inputs)  # caption -> CLIP embedding rows (EmbeddingCollator)
        kind = input_kind_of(inputs)
        images = inputs.get(kind.key)
        if kind.cached:  # cached vision features: projected here, merged by Llava
            inputs.update(kind.model_inputs(model, inputs.pop(kind.key)))
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if embed_inputs is None or not self.embedding_loss_weight:
            return out
        mse = embedding_loss(model, embed_inputs, images, kind)
        self._embedding_mse.append(mse.item())
        extra = self.embedding_loss_weight * mse
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # The CE is already normalised over the accumulated micro-batches, so the Trainer
            # will not divide the sum by grad_accum; the per-micro-batch MSE needs it.
            extra = extra / self.current_gradient_accumulation_steps
        return (out[0] + extra, out[1]) if return_outputs else out + extra

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._embedding_mse and "loss" in logs:  # mean caption -> embedding MSE since the last log
            logs["embedding_mse"] = round(sum(self._embedding_mse) / len(self._embedding_mse), 6)
            self._embedding_mse.clear()
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], list] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                groups.setdefault((model_part(name), name in decay_names), []).append(param)
        param_groups = [
            {
                "params": params,
                "lr": self.part_lrs[part],
                "weight_decay": self.args.weight_decay if decay else 0.0,
            }
            for (part, decay), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Trainer.train, except from a checkpoint of the last step (a run killed while saving its final
        model): the stock Trainer skips the batches already trained on and then takes one step more
        before it checks max_steps, so the resumed run would end one step past an uninterrupted one.
        From such a checkpoint the weights and the trainer state are loaded and nothing is trained."""
        state_file = Path(resume_from_checkpoint or "") / "trainer_state.json"
        if not (resume_from_checkpoint and state_file.is_file()) or self.is_deepspeed_enabled \
                or self.is_fsdp_enabled:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        state = TrainerState.load_from_json(str(state_file))
        if state.global_step < self.args.max_steps:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        self._load_from_checkpoint(resume_from_checkpoint)
        self.state = state
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TrainingClock):  # the training seconds saved with the checkpoint
                TrainingClock.on_train_begin(callback, self.args, self.state, self.control)
        return TrainOutput(state.global_step, mean_logged_loss(state.log_history), {})

    def _save_checkpoint(self, model, trial):
        # A full disk while writing checkpoint-N: one clear error (vlm.files.writing); the
        # half-written checkpoint has no trainer_state.json and is never resumed from.
        with writing(self.args.output_dir):
            super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Full-model weights of a checkpoint, loaded through `from_pretrained`.

        `save_pretrained` writes Llava in its original key layout (`language_model.model.h.*`),
        and the stock Trainer loads checkpoints by raw key names with strict=False: no key
        matched, a warning was logged and a resumed run silently went on from freshly
        initialised weights. `from_pretrained` maps the keys; strict loading makes any
        mismatch an error. PEFT adapters and DeepSpeed checkpoints keep the stock path."""
        from peft import PeftModel

        model = self.model if model is None else model
        checkpoint = Path(resume_from_checkpoint)
        full_weights = (checkpoint / "model.safetensors").is_file() or (
            checkpoint / "model.safetensors.index.json"
        ).is_file()
        if isinstance(model, PeftModel) or self.is_deepspeed_enabled or self.is_fsdp_enabled or not full_weights:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(str(checkpoint), dtype=model.dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved


def part_learning_rates(config: TrainConfig) -> dict[str, float]:
    return {
        "language": config.lr,
        "vision": config.lr_vision if config.lr_vision is not None else config.lr,
        "projector": config.lr_projector if config.lr_projector is not None else config.lr,
    }


def training_arguments(config: TrainConfig, output_dir: Path, seed: int, device: str = "auto",
                       **overrides) -> TrainingArguments:
    """The HF Trainer's arguments of a stage. `device` is the run's config key: the Trainer places the
    model itself (LOCAL_RANK's GPU under torchrun), and only needs telling when it must stay on the CPU."""
    from vlm.model import announce_device, pick_device

    chosen = pick_device(device)
    announce_device("train", chosen, torch.bfloat16 if config.bf16 else torch.float32)
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.schedule,
        optim=config.optim,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        save_only_model=False,
        seed=seed,
        data_seed=seed,
        bf16=config.bf16,
        use_cpu=chosen.type == "cpu",
        deepspeed=config.deepspeed,
        report_to=tensorboard_logging(output_dir),
        remove_unused_columns=False,
        dataloader_num_workers=config.num_workers,
        disable_tqdm=False,
    )
    if config.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def tensorboard_logging(output_dir: Path) -> list[str]:
    """`report_to` of every trainer here (SFT, instruct, rm, PPO, GRPO / RLOO): TensorBoard logs
    in <stage dir>/tensorboard, beside the checkpoints dir `output_dir`.

    transformers 5 takes the TensorBoard dir from the environment only. A dir the user set
    wins; otherwise each run logs next to its own output (a setdefault would send every later
    run in the same process to the first run's dir)."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(Path(output_dir).parent / "tensorboard")
    return ["tensorboard"]


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """Newest `checkpoint-N` whose trainer_state.json exists: the Trainer writes that file
    last, so a checkpoint cut short by a kill is never resumed from."""
    if not output_dir.is_dir():
        return None
    complete = [
        path for path in output_dir.glob("checkpoint-*")
        if path.name.split("-")[-1].isdigit() and (path / "trainer_state.json").is_file()
    ]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gathered_parameters(trainer):
    """A context in which a ZeRO-3 model's weights are whole on every rank; elsewhere a no-op.

    ZeRO-3 leaves each rank an empty placeholder per weight (its slice lives in the
    DeepSpeed engine), so saving `trainer.model` as is writes 0-element tensors. Gathering
    is a collective: every rank must enter the context, and only rank 0 then saves."""
    params = [p for p in trainer.model.parameters() if hasattr(p, "ds_id")]
    if not (trainer.is_deepspeed_enabled and params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_final(model, processor, out_dir: Path, run_config: dict) -> Path:
    """Weights (safetensors) + processor + the config that produced them.

    LoRA adapters are merged so the result is a plain Llava model that stock
    transformers loads; under QLoRA the adapter is merged into a full-precision copy."""
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # what a kill left of an earlier save
    from peft import PeftModel

    with writing(out_dir.parent):  # a full disk: one clear error, the model before (if any) kept
        if isinstance(model, PeftModel):
            model.save_pretrained(str(out_dir.with_name(out_dir.name + "-adapter")))
            model = merge_adapter(model)
        model.save_pretrained(str(tmp_dir), safe_serialization=True)
        processor.save_pretrained(str(tmp_dir))
        (tmp_dir / "training_config.json").write_text(json.dumps(run_config, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)  # a half-written final model is never mistaken for a finished one
    return out_dir


def merge_adapter(model):
    """A plain (unquantized) model with the LoRA weights folded in."""
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        import tempfile

        from peft import PeftModel

        from vlm.projectors import class_for_saved

        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir)
            full = class_for_saved(base.name_or_path).from_pretrained(base.name_or_path, dtype=torch.float32)
            return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    return model.merge_and_unload()


# --- one training run of a stage: model preparation, trainer, resume, final save -------------

def prepare_for_training(model, processor, config: TrainConfig, base_dir: Path | None, work_dir: Path,
                         section: str):
    """QLoRA (re-load quantized), freezing and LoRA, as a stage's TrainConfig says.

    `base_dir` is where the model's weights are on disk (None: built fresh in memory);
    quantization happens at load, so a fresh model is first saved to <work_dir>/base-model."""
    bits = config.lora.quantize_bits
    if bits:
        if not config.lora.enabled:
            raise ValueError(f"{section}.lora.quantize_bits needs {section}.lora.enabled=true (QLoRA)")
        if base_dir is None:
            base_dir = work_dir / "base-model"
            if is_main_process() and not (base_dir / "config.json").is_file():
                model.save_pretrained(base_dir)
                processor.save_pretrained(base_dir)
        from vlm.projectors import class_for_saved  # stock Llava or a vlm/projectors.py type

        model = class_for_saved(base_dir).from_pretrained(
            base_dir, quantization_config=quantization_config(bits), dtype=torch.float32
        )
    set_trainable(model, config)
    if config.lora.enabled:
        from vlm.retrieval import embedding_head

        # model.clip_head: the new head trains and is saved in full, as the projector is
        model = apply_lora(model, config, extra_modules_to_save=["embedding_head"] if embedding_head(model) is not None else ())
    return model


def build_trainer(model, processor, dataset, config: TrainConfig, work_dir: Path, seed: int,
                  callbacks=(), device: str = "auto") -> VLMTrainer:
    """The HF Trainer of a stage: checkpoints in <work_dir>/checkpoints, per-part learning rates."""
    if schedule_phases(config):
        callbacks = [UnfreezeSchedule(model, config), *callbacks]
    if not any(isinstance(c, TrainingClock) for c in callbacks):
        callbacks = [*callbacks, TrainingClock()]
    if config.max_train_seconds:
        callbacks = [*callbacks, TimeLimit(config.max_train_seconds)]
    # model.clip_head: caption rows also train the caption -> CLIP embedding head
    with_head = embedding_head(model) is not None
    return VLMTrainer(
        model=model,
        args=training_arguments(config, work_dir / "checkpoints", seed, device),
        train_dataset=dataset,
        data_collator=(EmbeddingCollator if with_head else VLMCollator)(processor.tokenizer.pad_token_id),
        callbacks=list(callbacks),
        part_lrs=part_learning_rates(config),
        embedding_loss_weight=config.clip_loss_weight if with_head else 0.0,
    )


def training_clock(trainer) -> TrainingClock:
    return next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingClock))


def train_and_save(trainer: VLMTrainer, processor, config: TrainConfig, work_dir: Path, run_config: dict,
                   stage: str):
    """Trains (from the newest complete checkpoint when `config.resume`), then saves
    <work_dir>/final. Returns (TrainOutput, seconds of training across resumes, final dir)."""
    resume_from = last_complete_checkpoint(work_dir / "checkpoints") if config.resume else None
    if resume_from and is_main_process():
        print(f"{stage}: resuming from {resume_from}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = training_clock(trainer).seconds
    final_dir = work_dir / "final"
    with gathered_parameters(trainer):  # ZeRO-3: every rank takes part in gathering the weights
        if trainer.is_world_process_zero():
            save_final(trainer.model, processor, final_dir, run_config)
    return result, seconds, final_dir
