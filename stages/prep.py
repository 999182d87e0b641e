"""Stage 0: the dataset the other stages read, in the project's schema (data_prep/README.md).

    vqa-rlhf prep configs/default.yaml [key=value ...]

data.source=synthetic generates the built-in dataset into data.dir (default
<run>/data); it is skipped when that dir already holds the same generation.
data.source=disk checks that data.dir holds a converted dataset: the train, val and test
splits of what SFT trains on (VQA, captions or both: data.supervision).

Converting a public data set into such a dir (each has its own --help):

    vqa-rlhf prep vqav2 --questions Q.json [--annotations A.json] --images DIR --out OUT
    vqa-rlhf prep llava --data FILE.json --images DIR --out OUT
    vqa-rlhf prep coco-captions --captions FILE.json --images DIR --out OUT
    vqa-rlhf prep flickr30k --captions FILE.csv|FILE.json --images DIR --out OUT

then train on it with data.source=disk data.dir=OUT. With a frozen vision tower, cache its
features once (then data.feature_cache=FEATS):

    vqa-rlhf prep features --model CLIP_OR_VLM --data OUT --out FEATS
"""
from __future__ import annotations

import sys

from vlm.data import load_split, training_tasks
from vlm.stage_cli import parse_stage_args, run_stage
from data_prep import convert
from data_prep.synthetic import SyntheticConfig, generate


def prepare(config) -> dict:
    data = config.data
    if data.source == "synthetic":
        fields = {"seed": config.seed, **data.synthetic}
        try:
            synthetic = SyntheticConfig(**fields)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"error: data.synthetic: {exc}") from None
        return generate(synthetic, config.data_dir)
    # What SFT will train on must be there (a clear error now, not after a tokenizer is trained);
    # a captions-only dataset (COCO captions, Flickr30k) has no vqa/ at all.
    tasks = training_tasks(data, config.data_dir)
    counts = {}
    for kind in sorted(tasks):
        for split in dict.fromkeys((data.train_split, data.val_split, data.test_split)):
            counts[f"{kind}/{split}"] = len(load_split(config.data_dir, kind, split))
    return counts


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in convert.CONVERTERS:
        return convert.main(argv)
    if argv and argv[0] == "features":
        from data_prep import features

        return features.main(argv[1:])
    config = parse_stage_args("prep", __doc__, argv)
    counts = prepare(config)
    print(f"prep: dataset in {config.data_dir}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
