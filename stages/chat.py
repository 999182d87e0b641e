"""Chat with a trained model about an image in the terminal; answers stream as they are generated.

    vqa-rlhf chat --model runs/default/instruct/final --image runs/default/data/images/test/000000.png

Each question is answered with the whole conversation so far as context (rendered with
the processor's stock chat template, the training format). Commands:
    /image PATH   start a new conversation about another image
    /reset        forget the conversation, keep the image
    /quit         end (so does Ctrl-D)
"""
from __future__ import annotations

import argparse
import sys

from vlm.stage_cli import decoding_arguments, open_session

PROMPT = "you> "
REPLY = "model> "


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqa-rlhf chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model dir (e.g. runs/default/instruct/final)")
    parser.add_argument("--image", help="image file to talk about (omit for a text-only chat; /image PATH later)")
    decoding_arguments(parser)
    args = parser.parse_args(argv)

    session = open_session(args, "chat")
    from vlm.data import PromptTooLong

    print(f"chatting with {args.model}" + (f" about {args.image}" if args.image else " (no image)") +
          "; /image PATH, /reset, /quit", flush=True)
    while True:
        try:
            line = input(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.messages = []
            print("(conversation reset)", flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(path or None)
            except (FileNotFoundError, ValueError) as exc:
                print(f"error: {exc}", flush=True)
                continue
            print(f"(new conversation about {path})" if path else "(new conversation, no image)", flush=True)
            continue
        if line.startswith("/"):
            print("commands: /image PATH, /reset, /quit", flush=True)
            continue
        sys.stdout.write(REPLY)
        sys.stdout.flush()
        try:
            session.ask(line, stream=sys.stdout)
        except PromptTooLong as exc:
            print(f"\nerror: {exc}; try a shorter question", flush=True)


if __name__ == "__main__":
    sys.exit(main())
