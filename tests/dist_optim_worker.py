"""
torchrun worker for tests/test_optim.py (not a test module itself):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_optim_worker.py OUT_DIR

Trains a tiny GPT with the sharded optimizer (DistMuonAdamW, picked by setup_optimizer) on
different data per rank, in several scenarios, and saves every rank's final parameters to
OUT_DIR/<scenario>_rank<r>.pt. The test replays the same steps in one process with the averaged
gradients and compares. It also records the order in which one step launches and waits on its
collectives. Shared helpers (config, data) live here so the test and the worker cannot drift apart.
"""
import os
import sys

import torch

from nanochat.gpt import GPT, GPTConfig

STEPS = 4
BATCH, SEQ = 2, 16
GRAD_CLIP = 0.05  # small enough that clipping is active at every step
# 3 layers: the (4C, C) and (C, 4C) shape groups hold 3 matrices, so DistMuonAdamW pads a chunk
CONFIG = GPTConfig(sequence_len=SEQ, vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
ODD_SHAPES = [(15,), (7, 3), (1,)]  # flat sizes that do not divide by world_size: the AdamW slices pad
COLLECTIVES = ("reduce_scatter_tensor", "all_reduce", "all_gather_into_tensor", "all_gather")

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

# the LoRA optimizer's form: AdamW groups only, no Muon
ODD_ADAMW_KWARGS = dict(lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)

class RecordedWork:
    """An async collective's work whose wait() is logged."""

    def __init__(self, work, name, events):
        self.work, self.name, self.events = work, name, events

    def wait(self):
        self.events.append(("wait", self.name))
        return self.work.wait()

def record_collectives(dist, events):
    """Make every collective launch and wait append to events; returns the originals to restore."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def recorded(name):
        def launch(*args, **kwargs):
            events.append(("launch", name))
            return RecordedWork(originals[name](*args, **kwargs), name, events)
        return launch

    for name in COLLECTIVES:
        setattr(dist, name, recorded(name))
    return originals

def main(out_dir):
    import torch.distributed as dist
    import nanochat.optim as optim

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert optim.has_tensor_collectives(), "this PyTorch's Gloo should implement reduce_scatter_tensor"

    for portable in (False, True):
        optim.FORCE_PORTABLE_COLLECTIVES = portable
        mode = "portable" if portable else "tensor"
        for clip in (False, True):
            model = make_model()
            opt = model.setup_optimizer(muon_dtype=torch.float32)  # see test_optim.replay_single_process
            assert type(opt) is optim.DistMuonAdamW
            for step in range(STEPS):
                x, y = batch(step, rank)
                model(x, y).backward()
                if clip:
                    assert optim.all_reduce_gradients(model)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
                opt.step(grads_averaged=clip)
                model.zero_grad(set_to_none=True)
            torch.save(model.state_dict(), os.path.join(out_dir, f"{mode}_{'clip' if clip else 'noclip'}_rank{rank}.pt"))

        # one more step, its collectives recorded in the order they are launched and waited on
        x, y = batch(STEPS, rank)
        model(x, y).backward()
        events = []
        originals = record_collectives(dist, events)
        opt.step()
        for name, fn in originals.items():
            setattr(dist, name, fn)
        torch.save(events, os.path.join(out_dir, f"{mode}_events_rank{rank}.pt"))

        # AdamW alone (as for LoRA adapters) on parameters whose sizes do not divide by world_size
        params = make_odd_params()
        opt = optim.build_optimizer([dict(kind="adamw", params=params, **ODD_ADAMW_KWARGS)])
        assert type(opt) is optim.DistMuonAdamW
        for step in range(STEPS):
            for p, g in zip(params, odd_grads(step, rank)):
                p.grad = g
            opt.step()
        torch.save([p.detach() for p in params], os.path.join(out_dir, f"{mode}_odd_rank{rank}.pt"))

    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1])
