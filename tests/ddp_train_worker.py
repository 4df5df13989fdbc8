"""
Trains a tiny GPT with the training stages' shared pieces (schedule, optimizer step with clipping,
the sharded optimizer, checkpoints, the step log) on deterministic synthetic batches and prints
the loss of every step as JSON. Launched by tests/test_base_train.py either as one process with
gradient accumulation, or under `torchrun --nproc_per_node=2` (gloo) without it. Micro-batch m of a
step on one process is the same data as rank m's batch under torchrun, so the two runs must
produce the same losses and the same weights.
"""
import argparse
import json
import sys
import time

import torch

from nanochat import training
from nanochat.common import compute_cleanup, compute_init
from nanochat.gpt import GPT, GPTConfig

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
    training.add_training_flags(parser)
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
    # every recipe switch on: value embeddings, lambdas, a windowed first layer (window T // 4)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=V, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                          value_embeds=True, layer_lambdas=True, window_pattern="SL"))
    # fp32 Newton-Schulz: bf16 would round float-order noise up to bf16-sized steps (see test_optim);
    # the Muon upgrades (Polar Express, NorMuon, cautious weight decay) as the flags say
    muon = dict(ns=args.muon_ns, normuon_beta2=args.normuon_beta2, weight_decay=args.muon_weight_decay)
    optimizer = model.setup_optimizer(unembedding_lr=0.01, embedding_lr=0.1, matrix_lr=0.02, muon_dtype=torch.float32,
                                      muon=muon)
    grad_accum, num_steps = 2 // world_size, args.num_iterations
    log = training.TrainLog("test", args, num_steps, world_size=world_size)
    step = 0
    while step < num_steps:
        lrm = training.set_schedule(optimizer, step, num_steps, args)
        t0 = time.time()
        loss_sum = torch.zeros(())
        for micro in range(grad_accum):
            # the m-th micro-batch of a step: on one process m = 0, 1; under torchrun m = rank
            loss = model(*batch_for(step, rank if ddp else micro))
            (loss / grad_accum).backward()
            loss_sum += loss.detach()
        training.optimizer_step(model, optimizer, args.grad_clip)
        step += 1
        log.step(step, t0, lrm, loss_sum / grad_accum, tokens=grad_accum * B * T)
        if training.is_due(step, args.save_every, num_steps):
            training.save(args.checkpoint_dir, step, model, optimizer, {}, {"step": step}, log)
    if rank == 0:
        torch.save(model.state_dict(), f"{args.checkpoint_dir}/final_weights_clip{args.grad_clip}.pt")
    return [loss for _, loss in log.history]

if __name__ == "__main__":
    main()
