"""Export a checkpoint as a Hugging Face `transformers` model folder, verified to be the same model (exit 1 if not).

    python -m scripts.export --source sft --out ./nanochat-d20-hf
    # then: AutoModelForCausalLM.from_pretrained("./nanochat-d20-hf"), AutoTokenizer too: transformers (>= 5.0)
    # ships our architecture as its own NanoChat class, so no trust_remote_code and no code of ours in the folder"""
import argparse
import functools
import importlib.util
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

from nanochat.checkpoint_manager import add_checkpoint_args, build_model, load_model
from nanochat.common import HelpFormatter, atomic_write, get_base_dir

# transformers' own NanoChat (5.0+) is our architecture under other names: ours -> its, in this order
NATIVE_NAMES = [("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                (".attn.c_q.", ".self_attn.q_proj."), (".attn.c_k.", ".self_attn.k_proj."),
                (".attn.c_v.", ".self_attn.v_proj."), (".attn.c_proj.", ".self_attn.o_proj."),
                (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]

# -----------------------------------------------------------------------------
# The tokenizer, for HF `tokenizers`: our split pattern, our vocabulary, merges derived from our ranks
def bytes_to_unicode():
    """GPT-2's byte-level alphabet: byte -> a printable character, so that token bytes can be JSON strings."""
    # printable Latin-1 bytes stand for themselves; the others, in order, for chr(256), chr(257), ...
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}

def bpe_merges(ranks):
    """The merge that makes each multi-byte token, in rank order: replay BPE on the token's own
    bytes using only lower-ranked tokens (what tiktoken does) until two parts are left."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            # merge the adjacent pair of the lowest rank, as BPE would, among tokens older than this one
            r, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
            if r >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges

def hf_tokenizer_json(tokenizer):
    """tokenizer.json contents equivalent to our tiktoken encoding (checked by verify_with_transformers)."""
    enc, ranks = tokenizer.enc, tokenizer.enc._mergeable_ranks
    if sorted(len(t) for t, r in ranks.items() if r < 256) != [1] * 256:
        raise ValueError("the tokenizer's ranks 0..255 must be the 256 single bytes (byte-level BPE)")
    byte_char = bytes_to_unicode()
    # every token as a JSON-safe string; merge parts are tokens too (each was merged from lower-ranked ones)
    as_str = {token: "".join(byte_char[b] for b in token) for token in ranks}
    vocab = {as_str[token]: rank for token, rank in ranks.items()}
    merges = [f"{as_str[a]} {as_str[b]}" for a, b in bpe_merges(ranks)]
    specials, bos = sorted(enc._special_tokens.items(), key=lambda kv: kv[1]), "<|bos|>"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            byte_level]},
        # every document starts with <|bos|>, as in pretraining
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [tokenizer.get_bos_token_id()], "tokens": [bos]}}},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a piece that is itself a token stays whole, as in tiktoken
                  "vocab": vocab, "merges": merges},
    }

# The conversation format of Tokenizer.render_conversation, in Jinja: <|bos|>, a system message
# folded into the first user turn, user turns, assistant turns (text, or parts with tool calls).
CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- set ns = namespace(system='') -%}{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|assistant_end|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)

# -----------------------------------------------------------------------------
# The folder (an architecture switch that transformers' NanoChat lacks would need code of its own, shipped with
# trust_remote_code: gpt.py has none today):
#   model.safetensors         the weights, under transformers' NanoChat names (NATIVE_NAMES)
#   config.json               its NanoChatConfig
#   generation_config.json    stops at <|assistant_end|> (and <|bos|>)
#   tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
#   nanochat_meta.json, verification.json   provenance, and the check's report
def write_export(out_dir, model, tokenizer, meta=None, dtype=torch.float32):
    """Write every file of the HF folder into out_dir (created)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg, bos, assistant_end = model.config, tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    state = {functools.reduce(lambda k, names: k.replace(*names), NATIVE_NAMES, k):
             v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer_json = hf_tokenizer_json(tokenizer)
    specials = tokenizer_json["added_tokens"]  # every special token, in id order
    token_map = {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"}
    # transformers' NanoChatConfig: F.rms_norm's default eps (fp32's), parameter-free norms, relu^2, rotary base 1e4
    write_json(os.path.join(out_dir, "config.json"), {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "hidden_act": "relu2", "max_position_embeddings": cfg.sequence_len,
        "rms_norm_eps": torch.finfo(torch.float32).eps, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "final_logit_softcapping": 15.0, "vocab_size": cfg.vocab_size, "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": bos, "eos_token_id": assistant_end,
        "pad_token_id": bos})
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": bos, "eos_token_id": [assistant_end, bos], "pad_token_id": bos})
    write_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_json)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", **token_map,
        "additional_special_tokens": [t["content"] for t in specials if t["content"] not in token_map.values()],
        # transformers wants the entries of tokenizer.json's added_tokens again, keyed by id
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in specials},
        "model_max_length": cfg.sequence_len, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), token_map)
    atomic_write(os.path.join(out_dir, "chat_template.jinja"), CHAT_TEMPLATE)
    write_json(os.path.join(out_dir, "nanochat_meta.json"), meta or {})

def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

# -----------------------------------------------------------------------------
# Verification: the folder, loaded by transformers on CPU, must be our model, token for token
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "In 1905, Einstein published 4 papers; the third (on special relativity) ran to 31 pages!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42\n",
    "Ünïcödé wörks too: naïve café, 東京, Москва, emoji 🙂 and tabs\tand   spaces.\n\n\nEnd.",
]
SAMPLE_CONVERSATION = {"messages": [  # a system message, two turns, and a tool call with its output
    {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*7"},
                                      {"type": "python_output", "text": "84"}, {"type": "text", "text": " It is 84."}]},
    {"role": "user", "content": "Thanks! And 84 minus 2?"}, {"role": "assistant", "content": "82."}]}

class VerificationError(RuntimeError):
    pass

def _verify(ok, message):
    if not ok:
        raise VerificationError(message)

def verify_with_transformers(out_dir, model, tokenizer, texts=SAMPLE_TEXTS, new_tokens=16, tolerance=1e-4):
    """A report of how the folder, loaded by transformers, matches our model; VerificationError where it does not."""
    # both on CPU in fp32, so that only the order of float ops differs (well under --tolerance); more is a bug
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never touch the network
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__ as transformers_version
    _verify(hasattr(transformers, "NanoChatForCausalLM"), f"transformers {transformers_version} has no NanoChat "
            "class, which this folder is for: pip install 'transformers>=5' (or --no-verify, and load it elsewhere)")
    from nanochat.gpt import GPT
    ours = GPT(model.config).eval()
    ours.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf_tok, bos = AutoTokenizer.from_pretrained(out_dir), tokenizer.get_bos_token_id()
    # the tokenizer: tokenizer.json as HF `tokenizers` reads it (what non-Python users load), then as
    # transformers serves it; then the chat template
    raw = hf_tok.backend_tokenizer
    for text in texts:
        mine, theirs = tokenizer.encode(text), raw.encode(text, add_special_tokens=False).ids
        _verify(theirs == mine, f"tokenizer.json encodes {text[:40]!r} differently: {theirs[:20]} vs ours {mine[:20]}")
        _verify(raw.encode(text).ids == [bos] + mine, "tokenizer.json does not prepend <|bos|>")
        _verify(raw.decode(theirs) == text, f"tokenizer.json does not decode {text[:40]!r} back")
        _verify(hf_tok(text)["input_ids"] == [bos] + mine, f"AutoTokenizer encodes {text[:40]!r} differently from ours")
    ids, _ = tokenizer.render_conversation(SAMPLE_CONVERSATION, max_tokens=10**9)
    hf_ids = list(hf_tok.apply_chat_template(SAMPLE_CONVERSATION["messages"], tokenize=True, return_dict=False))
    _verify(hf_ids == ids, f"chat template renders differently:\n  hf:   {hf_ids}\n  ours: {ids}")
    prompt_ids = tokenizer.render_for_completion(SAMPLE_CONVERSATION)
    hf_prompt = hf_tok.apply_chat_template(SAMPLE_CONVERSATION["messages"][:-1], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    _verify(list(hf_prompt) == prompt_ids, "chat template with add_generation_prompt differs from render_for_completion")

    # logits
    diffs, n_tokens, inputs = [], 0, [[bos] + tokenizer.encode(t) for t in texts] + [ids]
    with torch.no_grad():
        for seq in inputs:
            x = torch.tensor([seq[:model.config.sequence_len]])
            diffs.append((hf_model(x).logits.float() - ours(x)).abs().max().item())
            n_tokens += x.size(1)
        # a batch with left padding must give each row's own logits
        a, b = inputs[0][:12], inputs[1][:20]
        mask = torch.tensor([[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)])
        padded = hf_model(torch.tensor([[0] * (len(b) - len(a)) + a, b]), attention_mask=mask).logits
        diffs.append((padded[0, len(b) - len(a):] - ours(torch.tensor([a]))[0]).abs().max().item())
    max_diff = torch.tensor(diffs).max().item()  # a NaN propagates here (Python's max(0.0, nan) would drop it)
    _verify(max_diff <= tolerance, f"logits differ by up to {max_diff:.3g} (> {tolerance})")  # False for NaN too

    # greedy generation, token for token, with HF's KV cache against our reference sampler
    stops = {tokenizer.encode_special("<|assistant_end|>"), bos}
    for prompt in [inputs[0][:8], prompt_ids]:
        ref = list(ours.generate(list(prompt), max_tokens=new_tokens, temperature=0))
        # HF stops after an end token (generation_config.json), ours runs on: compare up to the first one
        ref = ref[:next((i + 1 for i, token in enumerate(ref) if token in stops), len(ref))]
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=new_tokens, do_sample=False)
        got = out[0, len(prompt):].tolist()
        _verify(got == ref, f"greedy generation differs:\n  hf:   {got}\n  ours: {ref}")
    return {"texts": len(texts), "tokenizer_json_texts": len(texts), "chat_template_tokens": len(ids),
            "tolerance": tolerance, "max_abs_logit_diff": max_diff, "tokens_compared": n_tokens,
            "generation_tokens_compared": new_tokens, "transformers_version": transformers_version}

# -----------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face transformers folder (verified).",
                                     formatter_class=HelpFormatter)
    add_checkpoint_args(parser, "sft")  # --device: where to load it (default cpu); the check runs on CPU anyway
    parser.add_argument("--lora-dir", default=None, help="export this LoRA adapter merged into its base (overrides --source)")
    parser.add_argument("--out", default=None, help="output folder (default: $NANOCHAT_BASE_DIR/export/<source>_<tag>_<step>)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the stored weights")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (CPU, fp32)")
    parser.add_argument("--verify-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    parser.add_argument("--no-verify", action="store_true", help="export without checking (when transformers is missing)")
    args = parser.parse_args(argv)

    device = args.device or "cpu"
    if args.lora_dir:  # an adapter folder is a checkpoint like any other; it loads merged into its base
        model, tokenizer, meta = build_model(args.lora_dir, args.step, device, "eval")
        name = f"lora_{os.path.basename(os.path.normpath(args.lora_dir))}_{meta['step']}"
    else:
        model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
        name = f"{args.source}_{args.model_tag or 'default'}_{meta['step']}"
    out_dir = os.path.abspath(args.out or os.path.join(get_base_dir(), "export", name))
    # transformers' NanoChat has none of the recipe's switches: it would load such weights into another model
    cfg, windowed = model.config, any(b.attn.window < model.config.sequence_len for b in model.transformer.h)
    if switches := [k for k, on in [("value_embeds", cfg.value_embeds), ("layer_lambdas", cfg.layer_lambdas),
                                    ("window_pattern", windowed)] if on]:
        raise SystemExit(f"cannot export: the model uses {', '.join(switches)}, which transformers' NanoChat lacks; "
                         "train with --value-embeds 0 --layer-lambdas 0 --window-pattern L to get an exportable model")

    dtype, staging = getattr(torch, args.dtype), out_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write_export(staging, model, tokenizer, meta, dtype)
    if dtype != torch.float32:  # the check compares against the weights as stored (write_export's cast)
        state = {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
    if not args.no_verify:
        if importlib.util.find_spec("transformers") is None:
            print(f"transformers is not installed, so the export in {staging} cannot be verified.\n"
                  "Install it (pip install 'transformers>=5') and run again, or pass --no-verify.", file=sys.stderr)
            return 2
        try:
            report = verify_with_transformers(staging, model, tokenizer, new_tokens=args.verify_tokens,
                                              tolerance=args.tolerance)
        except VerificationError as e:
            print(f"VERIFICATION FAILED: {e}\nThe unverified export is left in {staging}", file=sys.stderr)
            return 1
        write_json(os.path.join(staging, "verification.json"), report)
        print(f"verified: max |logit diff| {report['max_abs_logit_diff']:.2e} over {report['tokens_compared']} tokens "
              f"(<= {args.tolerance}), greedy generations and chat template identical")
    # put the folder in place: an existing export is replaced only by a complete new one
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"exported to {out_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
