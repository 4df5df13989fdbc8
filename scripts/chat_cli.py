"""
Chat with your model in the terminal, the reply streamed as it is generated ('clear' starts over, 'quit' leaves).

    python -m scripts.chat_cli                            # interactive, the latest SFT model
    python -m scripts.chat_cli -p "Why is the sky blue?"  # one answer, then exit
"""
import argparse
import sys

import torch

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, add_sampling_args, sampling_from_args

def get_parser():
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    add_checkpoint_args(p, "sft")
    add_sampling_args(p, temperature=0.6, max_tokens=1024)
    p.add_argument("--seed", type=int, default=42, help="sampling seed (the n-th reply uses seed + n)")
    return p

def stream_reply(engine, tokens, params):
    """Generate after `tokens`, printing the text as it comes; returns the generated ids."""
    decoder = engine.decoder()
    row, = decoder.add(tokens, params)
    while decoder.num_rows:
        for _, text in decoder.step():
            print(text, end="", flush=True)
    print()
    return row.tokens

def main(argv=None):
    args = get_parser().parse_args(argv)
    params = sampling_from_args(args, args.seed)
    device = torch.device(args.device or autodetect_device_type())
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:  # ValueError: e.g. a LoRA adapter that does not fit its base
        print(f"error: {e}", file=sys.stderr)
        return 1
    engine, special = Engine(model, tokenizer), tokenizer.encode_special
    bos, assistant_end = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    chat = args.source != "base"  # a base model never saw the chat tokens: it just continues the text

    # the conversation is kept as token ids, so tool calls and their forced outputs stay exactly as
    # the model saw them (tokenizing the text shown would not give them back)
    def prompt_tokens(history, text):
        if not chat:
            return [bos] + tokenizer.encode(text)
        return history + [special("<|user_start|>"), *tokenizer.encode(text), special("<|user_end|>"),
                          special("<|assistant_start|>")]

    if args.prompt is not None:
        try:
            stream_reply(engine, prompt_tokens([bos], args.prompt), params)
            return 0
        except ValueError as e:  # the prompt does not fit the context
            print(f"error: {e}", file=sys.stderr)
            return 1

    print(f"nanochat ({args.source} model, step {meta.get('step')}, {device.type}): 'clear' starts over, 'quit' leaves")
    history = [bos]
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
            generated = stream_reply(engine, tokens, params)
        except (ValueError, KeyboardInterrupt) as e:  # the conversation outgrew the context; Ctrl-C stops a reply
            print("\n(interrupted)" if isinstance(e, KeyboardInterrupt) else f"error: {e}. Type 'clear' to start over.")
            continue
        params.seed += 1  # the n-th reply samples with seed + n
        # a reply cut off by --max-tokens still closes its turn
        history = tokens + generated + ([] if generated[-1:] == [assistant_end] else [assistant_end])

if __name__ == "__main__":
    sys.exit(main())
