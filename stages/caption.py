"""Caption images with a trained model: one line per image, "PATH<TAB>caption".

    vqa-rlhf caption --model runs/clipxgpt-captioner/sft/final IMAGE [IMAGE ...]

The model is asked the caption prompt it was trained with (data.caption_prompt through
data.prompt_template, from the training_config.json saved with the model; the defaults
of vlm/config.py DataConfig when there is none). Greedy decoding unless --temperature.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vlm.stage_cli import decoding_arguments, decoding_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model dir (e.g. runs/default/sft/final)")
    parser.add_argument("images", nargs="+", help="image files to caption")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate() call (default 16)")
    decoding_arguments(parser)
    args = parser.parse_args(argv)

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from tqdm.auto import tqdm

    from vlm.captioning import caption_batch, data_config_of
    from vlm.data import load_rgb
    from vlm.model import load_for_inference, trained_in_bf16

    try:
        model, processor = load_for_inference(args.model, args.device, trained_in_bf16(args.model), "caption")
        data = data_config_of(Path(args.model))
        decoding = decoding_config(args)
        max_length = model.config.text_config.n_positions
        starts = range(0, len(args.images), args.batch_size)
        for start in tqdm(starts, desc="captioning", unit="batch", disable=len(starts) < 2, file=sys.stderr):
            paths = args.images[start:start + args.batch_size]
            images = [load_rgb(Path(p)) for p in paths]
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                captions = caption_batch(model, processor, pixels, data, decoding, max_length)
            for path, caption in zip(paths, captions):
                print(f"{path}\t{caption}", flush=True)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
