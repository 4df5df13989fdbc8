"""
torchrun worker for tests/test_optim.py (not a test module itself):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR

Trains a tiny GPT with the sharded optimizers (DistAdamW + DistMuon, picked by
setup_optimizers) on different data per rank, in several scenarios, and saves every rank's
final parameters to OUT_DIR/<scenario>_rank<r>.pt. The test replays the same steps in one
process with the averaged gradients and compares.
Shared helpers (config, data) live here so the test and the worker cannot drift apart.
"""
import os
import sys

import torch

from nanochat.gpt import GPT, GPTConfig

STEPS = 4
BATCH, SEQ = 2, 16
GRAD_CLIP = 0.05  # small enough that clipping is active at every step
# 3 layers: the (4C, C) and (C, 4C) shape groups hold 3 matrices, so DistMuon pads a chunk
CONFIG = GPTConfig(sequence_len=SEQ, vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
ODD_SHAPES = [(15,), (7, 3), (1,)]  # flat sizes that do not divide by world_size: DistAdamW pads


def make_model():
    torch.manual_seed(0)
    return GPT(CONFIG)


def batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def make_odd_params():
    torch.manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s)) for s in ODD_SHAPES]


def odd_grads(step, rank):
    g = torch.Generator().manual_seed(5000 + 1000 * step + rank)
    return [torch.randn(s, generator=g) for s in ODD_SHAPES]


ODD_ADAMW_KWARGS = dict(lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)


def main(out_dir):
    import torch.distributed as dist
    import nanochat.distributed as ndist
    from nanochat.adamw import DistAdamW
    from nanochat.muon import DistMuon

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert ndist.has_tensor_collectives(), "this PyTorch's Gloo should implement reduce_scatter_tensor"

    for portable in (False, True):
        ndist.FORCE_PORTABLE_COLLECTIVES = portable
        for clip in (False, True):
            name = f"{'portable' if portable else 'tensor'}_{'clip' if clip else 'noclip'}"
            model = make_model()
            optimizers = model.setup_optimizers(muon_dtype=torch.float32)  # see test_optim.replay_single_process
            assert isinstance(optimizers[0], DistAdamW) and isinstance(optimizers[1], DistMuon)
            for step in range(STEPS):
                x, y = batch(step, rank)
                model(x, y).backward()
                if clip:
                    assert ndist.all_reduce_gradients(model)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                for opt in optimizers:
                    opt.step(grads_already_averaged=clip)
                model.zero_grad(set_to_none=True)
            torch.save(model.state_dict(), os.path.join(out_dir, f"{name}_rank{rank}.pt"))

        # DistAdamW on parameters whose sizes do not divide by world_size
        params = make_odd_params()
        opt = DistAdamW(params, **ODD_ADAMW_KWARGS)
        for step in range(STEPS):
            for p, g in zip(params, odd_grads(step, rank)):
                p.grad = g
            opt.step()
        name = f"{'portable' if portable else 'tensor'}_odd"
        torch.save([p.detach() for p in params], os.path.join(out_dir, f"{name}_rank{rank}.pt"))

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
