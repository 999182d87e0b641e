"""Ask a trained model one question about an image; the answer is printed as it is generated.

    vqa-rlhf ask --model runs/default/instruct/final --image runs/default/data/images/test/000000.png "How many objects are there?"
    vqa-rlhf ask --model DIR "a question without an image"

The prompt is the processor's stock chat template (the format the model was trained on).
"""
from __future__ import annotations

import argparse
import sys

from vlm.stage_cli import decoding_arguments, open_session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf ask", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model dir (e.g. runs/default/instruct/final)")
    parser.add_argument("--image", help="image file the question is about (omit for a text-only question)")
    parser.add_argument("question", help="the question, e.g. \"Describe the image.\"")
    decoding_arguments(parser)
    args = parser.parse_args(argv)

    session = open_session(args, "ask")
    try:
        session.ask(args.question, stream=sys.stdout)
    except ValueError as exc:  # PromptTooLong included
        sys.exit(f"error: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
