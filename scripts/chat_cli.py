"""
Chat with your model in the terminal, streaming the reply as it is generated.

    python -m scripts.chat_cli                          # interactive, the latest SFT model
    python -m scripts.chat_cli -p "Why is the sky blue?"  # one answer, then exit
    python -m scripts.chat_cli --source base -p "Once upon a time"  # a base model continues text

Interactive commands: 'clear' starts a new conversation, 'quit' (or Ctrl-D) leaves.
The conversation is kept as token ids, so tool calls and their forced outputs stay exactly
as the model saw them (re-tokenizing the shown text would not reproduce them).
"""
import argparse
import sys

import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, SamplingParams


def get_parser():
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "dpo"], help="which training stage's checkpoints to load")
    p.add_argument("--model-tag", default=None, help="checkpoint folder, e.g. d20, or d20_lora for a LoRA adapter "
                                                     "(merged into its base on load) (default: the largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--device", default=None, choices=["cuda", "mps", "cpu"], help="device type (default: autodetect)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (the n-th reply uses seed + n)")
    return p


def stream_reply(engine, tokens, params, out):
    """Generate after `tokens`, printing text as it comes; returns the generated token ids."""
    decoder = engine.decoder()
    row, = decoder.add(tokens, params)
    while decoder.num_rows:
        for step in decoder.step():
            if step.text:
                out.write(step.text)
                out.flush()
    out.write("\n")
    out.flush()
    return row.tokens


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or args.max_tokens < 1 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise SystemExit("error: need --temperature >= 0, --top-k >= 0, --max-tokens >= 1, --top-p in (0, 1]")
    from nanochat.checkpoint_manager import load_model
    device = torch.device(args.device or autodetect_device_type())
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:  # ValueError: e.g. a LoRA adapter that does not fit its base
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, tokenizer)
    special = tokenizer.encode_special
    bos, assistant_end = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    chat = args.source != "base"  # a base model never saw the chat tokens: it just continues text

    def params(turn):
        return SamplingParams(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                              max_tokens=args.max_tokens, seed=args.seed + turn)

    def prompt_tokens(history, text):
        if not chat:
            return [bos] + tokenizer.encode(text)
        return history + [special("<|user_start|>")] + tokenizer.encode(text) + \
            [special("<|user_end|>"), special("<|assistant_start|>")]

    if args.prompt is not None:
        tokens = prompt_tokens([bos], args.prompt)
        try:
            stream_reply(engine, tokens, params(0), sys.stdout)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    print(f"nanochat ({args.source} model, step {meta.get('step')}) on {device.type}. "
          f"Type 'clear' for a new conversation, 'quit' to leave.")
    history, turn = [bos], 0
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text.lower() in ("quit", "exit"):
            return 0
        if text.lower() == "clear":
            history = [bos]
            print("(new conversation)")
            continue
        if not text:
            continue
        tokens = prompt_tokens(history, text)
        print("\nnanochat: ", end="", flush=True)
        try:
            generated = stream_reply(engine, tokens, params(turn), sys.stdout)
        except ValueError as e:  # the conversation outgrew the context
            print(f"error: {e}. Type 'clear' to start over.")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the program
            print("\n(interrupted)")
            continue
        turn += 1
        if chat:
            if not generated or generated[-1] != assistant_end:
                generated = generated + [assistant_end]  # a cut-off reply still closes its turn
            history = tokens + generated


if __name__ == "__main__":
    sys.exit(main())
