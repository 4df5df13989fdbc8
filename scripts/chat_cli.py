"""Chat with your model in the terminal, the reply streamed as it is generated ('clear' starts over, 'quit' leaves).
Usage: python -m scripts.chat_cli (the latest SFT model), or -p "Why is the sky blue?" for one answer, then exit."""
import argparse
import contextlib

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import HelpFormatter, autodetect_device_type, exit_on
from nanochat.engine import Engine, add_sampling_args, sampling_from_args
from tasks.identity import load_persona

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
    p = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal", formatter_class=HelpFormatter)
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit (default: interactive)")
    add_checkpoint_args(p, "sft")
    add_sampling_args(p, temperature=0.6, max_tokens=1024)
    p.add_argument("--seed", type=int, default=42, help="sampling seed (the n-th reply uses seed + n)")
    p.add_argument("--system", default="", metavar="TEXT", help="a system message that opens every conversation")
    args = p.parse_args(argv)
    # out-of-range sampling flags stop here, before the slow model load
    params, device = sampling_from_args(args, args.seed), args.device or autodetect_device_type()
    with exit_on(FileNotFoundError, ValueError):  # ValueError: e.g. a LoRA adapter that does not fit its base
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine, bos = Engine(model, tokenizer), tokenizer.get_bos_token_id()
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    name = "nanochat"  # the replies' label, unless the model was fine-tuned with --persona (the meta keeps its path)
    with contextlib.suppress(KeyError, TypeError, OSError, ValueError):  # no persona, or its file since moved or broken
        name = load_persona(meta["user_config"]["persona"])["name"]
    # the conversation is kept as token ids, so tool calls and their forced outputs stay exactly as
    # the model saw them (tokenizing the text shown would not give them back)
    def prompt_tokens(history, text):
        # a base model never saw the chat tokens: it just continues the text
        if args.source == "base":
            return [bos] + tokenizer.encode(text)
        # rendered as chat_web renders a conversation (--system folds into its first user turn), less the <|bos|>
        system = [{"role": "system", "content": args.system}] if args.system and history == [bos] else []
        return history + tokenizer.render_for_completion({"messages": system + [{"role": "user", "content": text}]})[1:]
    # one-shot: the reply alone on stdout (so it can be piped), problems on stderr with exit status 1
    if args.prompt is not None:
        with exit_on(ValueError):  # the prompt does not fit the context
            stream_reply(engine, prompt_tokens([bos], args.prompt), params)
        return 0
    # interactive: a problem with one message is reported, and the conversation goes on
    print(f"nanochat ({args.source} model, step {meta.get('step')}, {device}): 'clear' starts over, 'quit' leaves")
    history = [bos]
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt: leave on a fresh line
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
        print(f"\n{name}: ", end="", flush=True)
        try:
            generated = stream_reply(engine, tokens, params)
        except (ValueError, KeyboardInterrupt) as e:  # the conversation outgrew the context; Ctrl-C stops a reply
            # the history is left as it was: the failed message is not part of the conversation
            print("\n(interrupted)" if isinstance(e, KeyboardInterrupt) else f"error: {e}. Type 'clear' to start over.")
            continue
        # the n-th reply samples with seed + n: a repeated question gets a fresh answer
        params.seed += 1
        # a reply cut off by --max-tokens still closes its turn
        history = tokens + generated + ([] if generated[-1:] == [assistant_end] else [assistant_end])

if __name__ == "__main__":
    raise SystemExit(main())
