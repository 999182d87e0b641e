"""What every training stage shares: freezing, LoRA / QLoRA, per-part learning
rates, the HF Trainer set-up (DeepSpeed, checkpoints, resume) and the final save.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from vlm.config import TrainConfig

_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")

# Parameter-name prefixes of the three parts of a LlavaForConditionalGeneration.
VISION_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.multi_modal_projector."


def model_part(name: str) -> str:
    """'vision' | 'projector' | 'language' for a parameter name (PEFT prefixes stripped)."""
    name = name.removeprefix("base_model.model.")
    if name.startswith(VISION_PREFIX):
        return "vision"
    if name.startswith(PROJECTOR_PREFIX):
        return "projector"
    return "language"


def set_trainable(model: torch.nn.Module, config: TrainConfig) -> None:
    frozen = {
        "vision": config.freeze_vision,
        "projector": config.freeze_projector,
        "language": config.freeze_language,
    }
    for name, param in model.named_parameters():
        # Quantized (bitsandbytes int8 / packed 4-bit) weights cannot require gradients:
        # under QLoRA only the adapters and modules_to_save train.
        param.requires_grad_(not frozen[model_part(name)] and param.is_floating_point())


def apply_lora(model, config: TrainConfig):
    """LoRA adapters on GPT-2's projections; the projector stays fully trainable.

    The vision tower is frozen under LoRA unless explicitly trained (freeze_vision=false
    keeps it trainable as a whole module)."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = config.lora
    if lora.quantize_bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    modules_to_save = [] if config.freeze_projector else ["multi_modal_projector"]
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
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def quantization_config(bits: int | None):
    if not bits:
        return None
    from transformers import BitsAndBytesConfig

    # transformers 5 matches these from the start of a module's full name (or as its
    # suffix), so the parts are named by their full paths: a bare "vision_tower" matched
    # nothing and the projector and the vision tower were quantized too.
    skip = ["model.multi_modal_projector", "model.vision_tower", "lm_head"]
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

    def __init__(self, *args, part_lrs: dict[str, float], **kwargs):
        self.part_lrs = part_lrs
        super().__init__(*args, **kwargs)

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


def training_arguments(config: TrainConfig, output_dir: Path, seed: int, **overrides) -> TrainingArguments:
    use_cuda = torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.schedule,
        max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        save_only_model=False,
        seed=seed,
        data_seed=seed,
        bf16=config.bf16,
        use_cpu=not use_cuda,
        deepspeed=config.deepspeed,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        dataloader_num_workers=config.num_workers,
        disable_tqdm=False,
    )
    if config.gradient_checkpointing:
        kwargs["activation_checkpointing"] = True
    kwargs.update(overrides)
    # transformers 5 takes the TensorBoard dir from the environment only. A dir the user set
    # wins; otherwise each run logs next to its own output (a setdefault would send every later
    # run in the same process to the first run's dir).
    os.environ["TENSORBOARD_LOGGING_DIR"] = _USER_TENSORBOARD_DIR or str(Path(output_dir).parent / "tensorboard")
    return TrainingArguments(**kwargs)


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
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(str(out_dir.with_name(out_dir.name + "-adapter")))
        model = merge_adapter(model)
    model.save_pretrained(str(tmp_dir), safe_serialization=True)
    processor.save_pretrained(str(tmp_dir))
    (tmp_dir / "training_config.json").write_text(json.dumps(run_config, indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)  # a half-written final model is never mistaken for a finished one
    return out_dir


def merge_adapter(model):
    """A plain (unquantized) model with the LoRA weights folded in."""
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        from peft import PeftModel
        from transformers import LlavaForConditionalGeneration
        import tempfile

        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir)
            full = LlavaForConditionalGeneration.from_pretrained(base.name_or_path, dtype=torch.float32)
            return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload()
    return model.merge_and_unload()
