"""
Runs the shared Trainer on a tiny GPT with deterministic synthetic batches and prints the loss
of every step as JSON. Launched by tests/test_base_train.py either as one process with
gradient accumulation, or under `torchrun --nproc_per_node=2` (gloo) without it. Micro-batch
m of a step on one process is the same data as rank m's batch under torchrun, so the two runs
must produce the same losses and the same weights.
"""
import argparse
import json
import sys

import torch

from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import Trainer, add_training_args

V, T, B = 64, 16, 4


def batch_for(step, micro):
    g = torch.Generator().manual_seed(1000 * step + micro)
    # a learnable pattern: each row counts up from a random start, mod V
    start = torch.randint(0, V, (B, 1), generator=g)
    rows = (start + torch.arange(T + 1)) % V
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", required=True)
    add_training_args(parser)
    args = parser.parse_args()
    ddp, rank, _, world_size, device = compute_init("cpu", seed=0)
    results = {}
    for clip in (0.0, 0.05):  # without and with gradient clipping (which must clip *after* the sync)
        args.grad_clip = clip
        results[clip] = train(args, ddp, rank, world_size, device)
    if rank == 0:
        print("RESULT " + json.dumps({str(clip): losses for clip, losses in results.items()}))
        sys.stdout.flush()
    compute_cleanup()


def train(args, ddp, rank, world_size, device):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    # fp32 Newton-Schulz: bf16 would round float-order noise up to bf16-sized steps (see test_optim)
    optimizers = model.setup_optimizers(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.02,
                                        muon_dtype=torch.float32)
    grad_accum = 2 // world_size
    trainer = Trainer(args, model, optimizers, device=device, ddp=ddp, world_size=world_size, rank=rank,
                      checkpoint_dir=args.checkpoint_dir, num_steps=args.num_iterations, grad_accum=grad_accum,
                      tokens_per_step=2 * B * T, meta={}, stage="test")
    micro = {"i": 0}

    def next_batch():
        # the m-th micro-batch of a step: on one process m = 0, 1; under torchrun m = rank
        m = rank if ddp else micro["i"] % 2
        step = trainer.step
        micro["i"] += 1
        return batch_for(step, m), {"step": step}

    def compute_loss(model, batch):
        return model(*batch)

    trainer.run(next_batch, compute_loss)
    if rank == 0:
        torch.save(model.state_dict(), f"{args.checkpoint_dir}/final_weights_clip{args.grad_clip}.pt")
    return [loss for _, loss in trainer.history]


if __name__ == "__main__":
    main()
