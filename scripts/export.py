"""
Export a checkpoint as a Hugging Face `transformers` model folder, and prove it is the same model.

    python -m scripts.export --source sft --out ./nanochat-d20-hf
    # then, anywhere with transformers installed:
    #   model = AutoModelForCausalLM.from_pretrained("./nanochat-d20-hf", trust_remote_code=True)
    #   tok = AutoTokenizer.from_pretrained("./nanochat-d20-hf")
    #   ids = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True, return_tensors="pt")

The folder:
    model.safetensors        the weights, under nanochat's own parameter names (written by hand:
                             an 8-byte header length, a JSON header, then the raw tensors)
    config.json              NanoChatConfig + auto_map -> the two code files below
    configuration_nanochat.py, modeling_nanochat.py   (from nanochat/hf/; loaded with trust_remote_code)
    generation_config.json   stops at <|assistant_end|> (and <|bos|>)
    tokenizer.json           byte-level BPE for HF `tokenizers`: our split pattern, our vocabulary,
                             merges derived from our ranks; <|bos|> prepended like our documents
    tokenizer_config.json, special_tokens_map.json, chat_template.jinja   the chat format as Jinja
    nanochat_meta.json, verification.json                                  provenance and the check

Our architecture (QK-norm with parameter-free RMSNorm, ReLU^2 MLP, rotary, soft-capped logits,
untied head, GQA, norm after the embedding) is no stock HF architecture, hence the code files.

Before the folder is put in place, the export is VERIFIED on CPU in fp32: transformers loads
it offline, its logits must match ours to --tolerance (1e-4) on sample texts, its greedy
generations must equal ours token for token, and its tokenizer and chat template must give our
ids. Any mismatch: the command fails (exit 1) and leaves the unverified folder at <out>.tmp.
Without transformers installed it stops with exit 2 (or exports unchecked with --no-verify).
"""
import argparse
import json
import os
import shutil
import struct
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_CODE_DIR = os.path.join(ROOT, "nanochat", "hf")
HF_CODE_FILES = ("configuration_nanochat.py", "modeling_nanochat.py")

# -----------------------------------------------------------------------------
# safetensors: [u64 little-endian header size][JSON header][tensor bytes], tensors contiguous,
# row-major, little-endian; header {name: {dtype, shape, data_offsets: [begin, end]}} with
# offsets relative to the end of the header; the header is space-padded to a multiple of 8.

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def tensor_bytes(t):
    t = t.detach().cpu().contiguous()
    # reinterpret as bytes through a same-width integer type numpy knows (bf16 has no numpy dtype)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} to `path` atomically (.tmp then rename)."""
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in names:
            f.write(tensor_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors(path):
    """({name: tensor}, metadata) from a safetensors file, checking its offsets add up."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    body = memoryview(data)[8 + n:]
    tensors, expected = {}, 0
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        dtype = DTYPES_BY_NAME[info["dtype"]]
        if begin != expected or end > len(body):
            raise ValueError(f"{path}: tensor {name} has bad offsets {begin}..{end}")
        raw = torch.frombuffer(bytearray(body[begin:end]), dtype=torch.uint8) if end > begin else torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(info["shape"])
        expected = end
    if expected != len(body):
        raise ValueError(f"{path}: {len(body) - expected} trailing bytes after the last tensor")
    return tensors, metadata


# -----------------------------------------------------------------------------
# The tokenizer for HF `tokenizers`


def bytes_to_unicode():
    """The byte-level BPE alphabet (as in GPT-2): every byte gets a printable character, so token
    bytes can be JSON strings. Printable Latin-1 bytes map to themselves, the rest to 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bpe_merges(ranks):
    """The merge that makes each multi-byte token, in rank order: replay BPE on the token's own
    bytes using only lower-ranked tokens (what tiktoken does) until two parts are left."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) cannot be built by merging lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer_json(tokenizer):
    """tokenizer.json contents equivalent to our tiktoken encoding (checked by verify_tokenizer)."""
    enc = tokenizer.enc
    ranks = enc._mergeable_ranks
    if sorted(len(t) for t, r in ranks.items() if r < 256) != [1] * 256:
        raise ValueError("the tokenizer's ranks 0..255 must be the 256 single bytes (byte-level BPE)")
    byte_char = bytes_to_unicode()

    def as_str(token_bytes):
        return "".join(byte_char[b] for b in token_bytes)

    vocab = {as_str(token): rank for token, rank in ranks.items()}
    merges = [f"{as_str(a)} {as_str(b)}" for a, b in bpe_merges(ranks)]
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    bos = "<|bos|>"
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, i in specials],
        "normalizer": None,
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
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + message['content'] + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}"
    "{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- endif -%}"
)


# -----------------------------------------------------------------------------
# Writing the folder


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_export(out_dir, model, tokenizer, meta=None, dtype=torch.float32):
    """Write every file of the HF folder into out_dir (created)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.config
    special = tokenizer.encode_special
    bos, assistant_end = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    write_safetensors(os.path.join(out_dir, "model.safetensors"), state, metadata={"format": "pt"})
    for name in HF_CODE_FILES:
        shutil.copyfile(os.path.join(HF_CODE_DIR, name), os.path.join(out_dir, name))
    write_json(os.path.join(out_dir, "config.json"), {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "auto_map": {"AutoConfig": "configuration_nanochat.NanoChatConfig",
                     "AutoModel": "modeling_nanochat.NanoChatModel",
                     "AutoModelForCausalLM": "modeling_nanochat.NanoChatForCausalLM"},
        "vocab_size": cfg.vocab_size, "sequence_len": cfg.sequence_len, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head, "n_embd": cfg.n_embd,
        "logit_softcap": 15.0, "rotary_base": 10000.0,
        "bos_token_id": bos, "eos_token_id": assistant_end, "pad_token_id": bos,
        "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    })
    write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": bos, "eos_token_id": [assistant_end, bos], "pad_token_id": bos,
    })
    write_json(os.path.join(out_dir, "tokenizer.json"), hf_tokenizer_json(tokenizer))
    specials = sorted(tokenizer.enc._special_tokens.items(), key=lambda kv: kv[1])
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>",
        "additional_special_tokens": [name for name, _ in specials if name not in ("<|bos|>", "<|assistant_end|>")],
        "added_tokens_decoder": {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for name, i in specials},
        "model_max_length": cfg.sequence_len,
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>"})
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    write_json(os.path.join(out_dir, "nanochat_meta.json"), meta or {})


# -----------------------------------------------------------------------------
# Verification

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "In 1905, Einstein published 4 papers; the third (on special relativity) ran to 31 pages!",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))  # 42\n",
    "Ünïcödé wörks too: naïve café, 東京, Москва, emoji 🙂 and tabs\tand   spaces.\n\n\nEnd.",
]
SAMPLE_CONVERSATION = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 times 7?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                      {"type": "python", "text": "12*7"},
                                      {"type": "python_output", "text": "84"},
                                      {"type": "text", "text": " It is 84."}]},
    {"role": "user", "content": "Thanks! And 84 minus 2?"},
    {"role": "assistant", "content": "82."},
]}


class VerificationError(RuntimeError):
    pass


def verify_tokenizer_json(out_dir, tokenizer, texts=SAMPLE_TEXTS):
    """HF `tokenizers` with our tokenizer.json encodes like our tokenizer (no transformers needed)."""
    from tokenizers import Tokenizer as HFTokenizer
    hf = HFTokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    for text in texts:
        ours = tokenizer.encode(text)
        theirs = hf.encode(text, add_special_tokens=False).ids
        if theirs != ours:
            raise VerificationError(f"tokenizer.json encodes {text[:40]!r} differently: {theirs[:20]} vs ours {ours[:20]}")
        if hf.encode(text).ids != [tokenizer.get_bos_token_id()] + ours:
            raise VerificationError("tokenizer.json does not prepend <|bos|>")
        if hf.decode(theirs) != text:
            raise VerificationError(f"tokenizer.json does not decode {text[:40]!r} back")
    return len(texts)


def verify_with_transformers(out_dir, model, tokenizer, texts=SAMPLE_TEXTS, new_tokens=16, tolerance=1e-4):
    """Load the folder with transformers (offline, CPU, fp32) and compare with our model (moved
    to a CPU fp32 copy). Returns a report dict; raises VerificationError on any mismatch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never touch the network
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from nanochat.gpt import GPT

    ours = GPT(model.config)
    ours.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()})
    ours.eval()
    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True, dtype=torch.float32)
    hf_model.eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir)

    report = {"texts": len(texts), "tolerance": tolerance}
    # the tokenizer, as transformers serves it, and the chat template
    for text in texts:
        if hf_tok(text)["input_ids"] != [tokenizer.get_bos_token_id()] + tokenizer.encode(text):
            raise VerificationError(f"AutoTokenizer encodes {text[:40]!r} differently from ours")
    ids, _ = tokenizer.render_conversation(SAMPLE_CONVERSATION, max_tokens=10**9)
    hf_ids = hf_tok.apply_chat_template(SAMPLE_CONVERSATION["messages"], tokenize=True, return_dict=False)
    if list(hf_ids) != ids:
        raise VerificationError(f"chat template renders differently:\n  hf:   {list(hf_ids)}\n  ours: {ids}")
    prompt_ids = tokenizer.render_for_completion(SAMPLE_CONVERSATION)
    hf_prompt = hf_tok.apply_chat_template(SAMPLE_CONVERSATION["messages"][:-1], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    if list(hf_prompt) != prompt_ids:
        raise VerificationError("chat template with add_generation_prompt differs from render_for_completion")
    report["chat_template_tokens"] = len(ids)

    # logits
    max_diff, n_tokens = 0.0, 0
    inputs = [[tokenizer.get_bos_token_id()] + tokenizer.encode(t) for t in texts] + [ids]
    with torch.no_grad():
        for seq in inputs:
            x = torch.tensor([seq[:model.config.sequence_len]])
            diff = (hf_model(x).logits.float() - ours(x)).abs().max().item()
            max_diff, n_tokens = max(max_diff, diff), n_tokens + x.size(1)
        # a batch with left padding must give each row's own logits
        a, b = inputs[0][:12], inputs[1][:20]
        batch = torch.tensor([[0] * (len(b) - len(a)) + a, b])
        mask = torch.tensor([[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)])
        padded = hf_model(batch, attention_mask=mask).logits
        diff = (padded[0, len(b) - len(a):] - ours(torch.tensor([a]))[0]).abs().max().item()
        max_diff = max(max_diff, diff)
    report["max_abs_logit_diff"], report["tokens_compared"] = max_diff, n_tokens
    if not max_diff <= tolerance:
        raise VerificationError(f"logits differ by up to {max_diff:.3g} (> {tolerance})")

    # greedy generation, token for token, with HF's KV cache against our reference sampler
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    for prompt in [inputs[0][:8], prompt_ids]:
        ref = []
        for token in ours.generate(list(prompt), max_tokens=new_tokens, temperature=0):
            ref.append(token)
            if token in stops:
                break
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=new_tokens, do_sample=False)
        got = out[0, len(prompt):].tolist()
        if got != ref:
            raise VerificationError(f"greedy generation differs:\n  hf:   {got}\n  ours: {ref}")
    report["generation_tokens_compared"] = new_tokens
    return report


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="Export a checkpoint as a Hugging Face transformers folder (verified).")
    parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "dpo"], help="which checkpoint family")
    parser.add_argument("--model-tag", default=None, help="model tag (default: the largest)")
    parser.add_argument("--step", type=int, default=None, help="step (default: the latest)")
    parser.add_argument("--lora-dir", default=None, help="export this LoRA adapter merged into its base (overrides --source)")
    parser.add_argument("--out", default=None, help="output folder (default: $NANOCHAT_BASE_DIR/export/<source>_<tag>_<step>)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the stored weights")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference allowed (CPU, fp32)")
    parser.add_argument("--verify-tokens", type=int, default=16, help="greedy tokens compared per prompt")
    parser.add_argument("--no-verify", action="store_true", help="export without checking (when transformers is missing)")
    args = parser.parse_args(argv)

    from nanochat.checkpoint_manager import load_model
    from nanochat.common import get_base_dir
    if args.lora_dir:
        from nanochat.lora import load_model_with_lora
        model, tokenizer, meta = load_model_with_lora(args.lora_dir, "cpu", phase="eval")
        name = f"lora_{os.path.basename(os.path.normpath(args.lora_dir))}_{meta['step']}"
    else:
        model, tokenizer, meta = load_model(args.source, "cpu", "eval", model_tag=args.model_tag, step=args.step)
        name = f"{args.source}_{args.model_tag or 'default'}_{meta['step']}"
    out_dir = os.path.abspath(args.out or os.path.join(get_base_dir(), "export", name))
    dtype = getattr(torch, args.dtype)

    staging = out_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write_export(staging, model, tokenizer, meta, dtype)
    if dtype != torch.float32:  # the check compares against the weights as stored
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())

    if not args.no_verify:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print(f"transformers is not installed, so the export in {staging} cannot be verified.\n"
                  "Install it (pip install transformers) and run again, or pass --no-verify.", file=sys.stderr)
            return 2
        try:
            n = verify_tokenizer_json(staging, tokenizer)
            report = verify_with_transformers(staging, model, tokenizer, new_tokens=args.verify_tokens,
                                              tolerance=args.tolerance)
            report["tokenizer_json_texts"] = n
        except VerificationError as e:
            print(f"VERIFICATION FAILED: {e}\nThe unverified export is left in {staging}", file=sys.stderr)
            return 1
        report["transformers_version"] = transformers.__version__
        write_json(os.path.join(staging, "verification.json"), report)
        print(f"verified: max |logit diff| {report['max_abs_logit_diff']:.2e} over {report['tokens_compared']} tokens "
              f"(<= {args.tolerance}), greedy generations and chat template identical")

    # put the folder in place; an existing export is replaced only by a complete new one
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(staging, out_dir)
    print(f"exported to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
