"""
nanochat.loss_eval.evaluate_bpb against a hand computation: ignored targets (-1) and special
tokens (0 bytes) count in neither sum, an untrained GPT scores log2(vocab) bits per token, and
two ranks summing their halves get the single-process answer.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN_BYTES = torch.tensor([1, 2, 3, 1, 1, 4, 1, 2, 0, 0])  # ids 8 and 9 are special tokens
VOCAB = len(TOKEN_BYTES)

class BigramLM(nn.Module):
    """The smallest real language model: logits for the next token are a row of a table.
    Same forward contract as GPT (targets -1 ignored, loss_reduction="none" -> (B, T))."""

    def __init__(self, vocab_size, seed=0):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed)))

    def forward(self, idx, targets=None, loss_reduction="mean"):
        logits = self.logits[idx]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

def make_batches(n=3, B=2, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (B, T), generator=g)
        y = torch.randint(0, VOCAB, (B, T), generator=g)
        y[0, 0] = -1  # ignored (e.g. masked out)
        y[1, 2] = 8   # special tokens among the targets
        y[1, 3] = 9
        batches.append((x, y))
    return batches

def hand_bpb(model, batches):
    """Per token, in plain Python floats: -log softmax(logits)[target], summed where the target
    has bytes; bytes summed likewise; bits = nats / ln 2."""
    nats, num_bytes = 0.0, 0
    for x, y in batches:
        for b in range(x.size(0)):
            for t in range(x.size(1)):
                target = y[b, t].item()
                if target < 0 or TOKEN_BYTES[target].item() == 0:
                    continue
                row = model.logits[x[b, t].item()].tolist()
                log_z = math.log(sum(math.exp(v) for v in row))
                nats += log_z - row[target]
                num_bytes += TOKEN_BYTES[target].item()
    return nats / (math.log(2) * num_bytes)

def test_matches_hand_computation():
    model = BigramLM(VOCAB)
    batches = make_batches()
    bpb = evaluate_bpb(model, iter(batches), steps=3, token_bytes=TOKEN_BYTES)
    assert bpb == pytest.approx(hand_bpb(model, batches), rel=1e-6)
    # only `steps` batches are used; (inputs, targets, state) triples from the dataloader work too
    first_two = evaluate_bpb(model, ((x, y, {"state": i}) for i, (x, y) in enumerate(batches)), 2, TOKEN_BYTES)
    assert first_two == pytest.approx(hand_bpb(model, batches[:2]), rel=1e-6)

def test_special_tokens_count_like_ignored_targets():
    model = BigramLM(VOCAB, seed=1)
    batches = make_batches(seed=3)
    ignored = [(x, torch.where(TOKEN_BYTES[y.clamp(min=0)] == 0, -1, y)) for x, y in batches]
    with_specials = evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES)
    assert with_specials == pytest.approx(evaluate_bpb(model, iter(ignored), 3, TOKEN_BYTES), rel=1e-12)
    # and they do matter if they had bytes: the same batches score differently
    assert evaluate_bpb(model, iter(batches), 3, TOKEN_BYTES.clamp(min=1)) != pytest.approx(with_specials)

def test_no_bytes_is_an_error():
    x = torch.zeros((1, 4), dtype=torch.long)
    with pytest.raises(ValueError, match="no bytes"):
        evaluate_bpb(BigramLM(VOCAB), iter([(x, torch.full((1, 4), 8))]), 1, TOKEN_BYTES)

def test_untrained_gpt_scores_log2_vocab_bits_per_token(tiny_tokenizer):
    """A fresh GPT predicts ~uniformly (tiny lm_head), so every token costs log2(V) bits; the
    bytes are those of real text, counted from the tokenizer's raw token bytes."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    vocab_size = tiny_tokenizer.get_vocab_size()
    model = GPT(GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)).eval()
    token_bytes = torch.tensor(tiny_tokenizer.token_bytes())
    text = "Bits per byte does not care how the text was tokenized. " * 6
    ids = tiny_tokenizer.encode(text, prepend="<|bos|>")[:65]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    bpb = evaluate_bpb(model, iter([(x, y)]), 1, token_bytes)
    num_bytes = len(tiny_tokenizer.enc.decode_bytes(ids[1:]))  # raw bytes: no special token among targets
    assert bpb == pytest.approx(math.log2(vocab_size) * len(ids[1:]) / num_bytes, rel=1e-3)

DIST_WORKER = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, "tests")
from test_loss_eval import BigramLM, TOKEN_BYTES, make_batches
from nanochat.loss_eval import evaluate_bpb
rank, init_file = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
mine = make_batches(n=4)[rank::2]  # each rank evaluates its own half
print(json.dumps(evaluate_bpb(BigramLM(10), iter(mine), 2, TOKEN_BYTES)))
dist.destroy_process_group()
"""

@pytest.mark.slow
def test_two_ranks_sum_to_the_single_process_answer(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", DIST_WORKER, str(rank), str(tmp_path / "init")],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    single = evaluate_bpb(BigramLM(10), iter(make_batches(n=4)), 4, TOKEN_BYTES)
    assert results[0] == results[1] == pytest.approx(single, rel=1e-9)
    # the mean of per-rank bpb would differ: the sums are what must be reduced
    halves = [evaluate_bpb(BigramLM(10), iter(make_batches(n=4)[r::2]), 2, TOKEN_BYTES) for r in (0, 1)]
    assert single != pytest.approx(sum(halves) / 2, rel=1e-9)
