"""
Shared pieces of the post-training tests (mid_train, chat_sft, chat_dpo): a $NANOCHAT_BASE_DIR
with a tiny trained tokenizer and a tiny GPT saved as a checkpoint, small generated tasks with
a clear signal, and launching the scripts in a subprocess (one process or torchrun on gloo).
"""
import contextlib
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LETTERS = "abcdefgh"

def reverse_conversation(word):
    """'reverse: c a f' -> 'f a c' (letters separated by spaces, so each is its own token)."""
    return {"messages": [{"role": "user", "content": "reverse: " + " ".join(word)},
                         {"role": "assistant", "content": " ".join(reversed(word))}]}

def reverse_words(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(n)]

def tokenizer_texts():
    """Text for the tiny tokenizer: the words the tasks use, so they get tokens of their own."""
    words = ["reverse", "say", "something", "good", "bad", "hello", "the", "cat", "dog", "runs", "fast",
             "answer", "question", "python", "yes", "no", "very", "nice", "ugly", "thanks"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    lines += ["reverse: " + " ".join(w) + " -> " + " ".join(reversed(w)) for w in reverse_words(200, 1)]
    return lines

def make_base_dir(root, tags=("d2",), seq_len=48, n_embd=64, n_layer=2):
    """root as $NANOCHAT_BASE_DIR: a trained tokenizer and untrained tiny GPT base checkpoints."""
    root = Path(root)
    tok = Tokenizer.train_from_iterator(iter(tokenizer_texts()), vocab_size=256 + len(SPECIAL_TOKENS) + 64)
    tok.save(root / "tokenizer")
    torch.save(torch.tensor(tok.token_bytes()), root / "tokenizer" / "token_bytes.pt")
    for i, tag in enumerate(tags):
        save_tiny_model(root / "base_checkpoints" / tag, tok.get_vocab_size(), seed=i, seq_len=seq_len,
                        n_embd=n_embd, n_layer=n_layer)
    return tok

@contextlib.contextmanager
def offline_base_dir(tmp_path_factory, **make_kwargs):
    """A fresh $NANOCHAT_BASE_DIR (make_base_dir) set for the duration, with Hugging Face unreachable: yields (root, tok)."""
    root = tmp_path_factory.mktemp("nanochat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root))
        mp.setenv("NANOCHAT_HF_URL", "http://127.0.0.1:9")  # never the internet, even by mistake
        yield root, make_base_dir(root, **make_kwargs)

def save_tiny_model(checkpoint_dir, vocab_size, seed=0, seq_len=48, n_embd=64, n_layer=2, step=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_embd // 32,
                       n_kv_head=n_embd // 32, n_embd=n_embd)
    model = GPT(config)
    save_checkpoint(str(checkpoint_dir), step, model.state_dict(), None, {"model_config": asdict(config)})
    return model

def write_jsonl(path, rows):
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

def env_for(base_dir):
    return {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

def run_script(module, base_dir, args, nproc=1, timeout=300):
    """Run `python -m scripts.<module>` (nproc=1) or under torchrun with nproc gloo ranks."""
    if nproc == 1:
        launcher = [sys.executable, "-m"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--standalone", "-m"]  # standalone: torchrun picks a free port
    return subprocess.run([*launcher, f"scripts.{module}", *map(str, args)], cwd=REPO, env=env_for(base_dir),
                          capture_output=True, text=True, timeout=timeout)

def tree_snapshot(folder):
    """{relative path: (size, mtime_ns, bytes)} of every file under folder, to show it was not touched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}

def run_main(module, args):
    """scripts.<module>.main(args) in this process (args may hold Paths); returns its TrainLog."""
    import importlib
    return importlib.import_module(f"scripts.{module}").main([str(a) for a in args])
