"""Ask a trained model one question about an image; the answer is printed as it is generated.

    vqa-rlhf ask --model runs/default/instruct/final --image runs/default/data/images/test/000000.png "How many objects are there?"
    vqa-rlhf ask --model DIR "a question without an image"

The prompt is the processor's stock chat template (the format the model was trained on).
"""
from __future__ import annotations

import argparse
import os
import sys


def decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above 0: sampling at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def decoding_config(args):
    import torch

    from vlm.config import DecodingConfig

    torch.manual_seed(args.seed)
    if args.temperature > 0:
        return DecodingConfig(strategy="sample", temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens)
    return DecodingConfig(strategy="greedy", max_new_tokens=args.max_new_tokens)


def open_session(args):
    """A ChatSession on --model about --image (None: text only), or exit with the reason."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the answer, not library notices
    from transformers.utils import logging

    logging.disable_progress_bar()
    from vlm.chat import ChatSession

    try:
        session = ChatSession(args.model, decoding_config(args))
        session.set_image(args.image)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    return session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf ask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model dir (e.g. runs/default/instruct/final)")
    parser.add_argument("--image", help="image file the question is about (omit for a text-only question)")
    parser.add_argument("question", help="the question, e.g. \"Describe the image.\"")
    decoding_arguments(parser)
    args = parser.parse_args(argv)

    session = open_session(args)
    try:
        session.ask(args.question, stream=sys.stdout)
    except ValueError as exc:  # PromptTooLong included
        sys.exit(f"error: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
