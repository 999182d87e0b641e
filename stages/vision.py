"""Vision pretraining: the built-in run's own pretrained CLIP tower, made before SFT.

    vqa-rlhf vision configs/default.yaml [key=value ...]

Real configs start from a pretrained CLIP (model.vision_model: openai/clip-vit-base-patch32).
The built-in run cannot download one, and a tower trained from scratch only through the
language model never learns shape, so this stage makes one (vlm/vision.py):

setup: a CLIP vision tower from the model.* dimensions; per-region colour, shape and place
       targets read from the train split's captions (dense region-text alignment)
train: vision.steps of AdamW on the region loss; a checkpoint every vision.save_steps, and a
       killed run resumes from the newest one with the same batches
save:  <run>/vision/final, a stock CLIPVisionModel + its image processor (SFT builds on it with
       model.vision_model and keeps it frozen); metrics.json with the per-cell linear probe
       (shape, colour, place) of this tower and of an untrained one; the feature cache of the dataset
       for this tower in <run>/vision/features (vision.feature_cache)
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPVisionModel

from vlm.config import RunConfig
from vlm.features import signature
from vlm.model import announce_device, pick_device, scratch_configs
from vlm.regions import load_regions, probe_towers
from vlm.stage_cli import parse_stage_args, run_stage, write_json
from vlm.vision import RegionHeads, batch_indices, clip_image_processor, cosine_lr, patch_tokens, region_loss
from data_prep.features import build_cache


def new_tower(config: RunConfig, seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    vision, _ = scratch_configs(config.model, config.model.vocab_size)
    return CLIPVisionModel(vision)


def last_checkpoint(checkpoints: Path) -> Path | None:
    done = sorted(p for p in checkpoints.glob("step-*") if not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(checkpoints: Path, step: int, tower, heads, optimizer) -> None:
    """Written beside, then renamed: a kill mid-write leaves the previous checkpoint the newest."""
    final = checkpoints / f"step-{step:06d}"
    tmp = checkpoints / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {f"tower.{k}": v for k, v in tower.state_dict().items()}
    state.update({f"heads.{k}": v for k, v in heads.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    write_json(tmp / "state.json", {"step": step})
    tmp.rename(final)


def load_checkpoint(path: Path, tower, heads, optimizer) -> int:
    state = load_file(path / "model.safetensors")
    tower.load_state_dict({k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")})
    heads.load_state_dict({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")})
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((path / "state.json").read_text())["step"]


def train(config: RunConfig) -> dict:
    cfg = config.vision
    work_dir = config.paths.stage_dir("vision")
    checkpoints = work_dir / "checkpoints"
    work_dir.mkdir(parents=True, exist_ok=True)
    pixels, targets = load_regions(config, config.data.train_split)
    print(f"vision: {len(pixels)} captioned train images, {targets.labels['shape'].shape[1]} regions each, "
          f"objective {cfg.objective}", flush=True)
    device = pick_device(config.device)
    announce_device("vision", device, torch.float32)
    # On the device before the optimizer exists: a resumed optimizer's state follows its parameters.
    tower = new_tower(config, config.seed).to(device)
    heads = RegionHeads(tower.config.hidden_size, targets.classes).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, seconds = 0, 0.0
    resume_from = last_checkpoint(checkpoints)
    if resume_from is not None:
        step = load_checkpoint(resume_from, tower, heads, optimizer)
        log = [json.loads(l) for l in (work_dir / "log.jsonl").read_text().splitlines()] \
            if (work_dir / "log.jsonl").is_file() else []
        log = [entry for entry in log if entry["step"] <= step]
        seconds = log[-1]["train_seconds"] if log else 0.0
        print(f"vision: resuming from {resume_from} (step {step})", flush=True)
    else:
        log = []
    (work_dir / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    tower.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="vision", unit="step")
    last = time.perf_counter()
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup_steps)
        index = batch_indices(len(pixels), cfg.batch_size, config.seed, step)
        labels = {attr: value.to(device) for attr, value in targets.select(index).items()}
        loss = region_loss(heads, patch_tokens(tower, pixels[index].to(device)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        now = time.perf_counter()
        seconds, last = seconds + now - last, now
        bar.update(1)
        if step % 25 == 0 or step == cfg.steps:
            entry = {"step": step, "loss": round(loss.item(), 4), "train_seconds": round(seconds, 2)}
            with open(work_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=entry["loss"])
        if step % cfg.save_steps == 0 and step < cfg.steps:
            save_checkpoint(checkpoints, step, tower, heads, optimizer)
            last = time.perf_counter()
    bar.close()
    return {"steps": step, "seconds": round(seconds, 2), "tower": tower}


def save_tower(tower: CLIPVisionModel, config: RunConfig, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tower.save_pretrained(tmp)
    clip_image_processor(config.model.image_size).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def cache_features(config: RunConfig, tower: CLIPVisionModel) -> dict:
    """The dataset's features for the saved `tower`; a cache of an earlier tower is rebuilt (it is derived data)."""
    out = config.vision_features
    meta = out / "meta.json"
    if meta.is_file():
        expected = signature(tower, clip_image_processor(config.model.image_size), config.model.vision_feature_layer)
        if json.loads(meta.read_text()).get("signature") != expected:
            print(f"vision: {out} was made by an earlier tower; rebuilding it", flush=True)
            shutil.rmtree(out)
    return build_cache(str(config.vision_final), config.data_dir, out, config.model.vision_feature_layer,
                       device=config.device)


def main(argv=None) -> int:
    config = parse_stage_args("vision", __doc__, argv)
    if config.model.checkpoint or config.model.text_model:
        sys.exit("error: the vision stage pretrains a tower from model.* dimensions; this config builds on "
                 "pretrained parts or a checkpoint, so drop `vision` from its stages")
    work_dir = config.paths.stage_dir("vision")
    result = train(config)
    save_tower(result["tower"], config, config.vision_final)
    probes = probe_towers(config, {"trained": result["tower"], "untrained": new_tower(config, config.seed)})
    metrics = {"objective": config.vision.objective, "steps": result["steps"], "seconds": result["seconds"],
               "probe": probes["trained"], "probe_untrained": probes["untrained"],
               "probe_split": config.data.test_split, "checkpoint": str(config.vision_final)}
    if config.vision.feature_cache:
        counts = cache_features(config, result["tower"])
        metrics["feature_cache"] = {"path": str(config.vision_features), **counts}
    write_json(work_dir / "metrics.json", metrics)
    print(f"vision: done in {result['seconds']:.0f} s; per-cell probe on {config.data.test_split}: shape "
          f"{probes['trained']['shape']}% (untrained tower {probes['untrained']['shape']}%), colour "
          f"{probes['trained']['colour']}%; tower in {config.vision_final}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
