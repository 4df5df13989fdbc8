"""torch.compile of the model as the stages run it (issue 13): the training forward + loss traces as one graph
(no graph break) under bf16 autocast on both paths, backward included; SFT and DPO losses over padded batches of
changing length compile once under dynamic=True. The numbers (compiled == eager) are test_gpt's
test_torch_compile_matches_eager; the fused backwards under autocast are test_gpt's test_bf16_autocast_close_to_fp32."""
import pytest
import torch

from nanochat.chat_data import StepBatches, collate_padded, scaled_token_loss
from nanochat.dpo import collate_pairs, pair_losses
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

def tiny_model(fused):
    torch.manual_seed(0)
    # GQA (2 kv heads for 4 query heads) so that the kv-head expansion is traced too
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.fused = fused
    return model

def counting_backend(graphs):
    """aot_eager (dynamo, then AOT autograd traces forward and backward; eager kernels: fast), counting the graphs
    it compiled: every graph break and every recompilation adds one."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        compiled = aot_eager(gm, example_inputs)
        # counted once it succeeded: with dynamic shapes dynamo may throw a first attempt away and trace again
        graphs.append(gm)
        return compiled
    return backend

@pytest.mark.parametrize("fused", [False, True])
def test_training_forward_and_loss_trace_as_one_graph(fused):
    """fullgraph=True raises at a graph break, with its reason; the backward runs through the traced graph."""
    torch._dynamo.reset()
    model = tiny_model(fused)
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    idx, targets = torch.randint(0, 64, (2, 32)), torch.randint(0, 64, (2, 32))
    targets[0, :5] = -1
    # the mean loss (pretraining, midtraining) and the per-token one (DPO); SFT's sum is in the test below
    for reduction in ("mean", "none"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(idx, targets, loss_reduction=reduction)
            eager = model(idx, targets, loss_reduction=reduction)
        assert loss.dtype == torch.float32 and loss.shape == eager.shape
        torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
        grads = torch.autograd.grad(loss.sum(), list(model.parameters()))
        assert all(torch.isfinite(g).all() for g in grads) and grads[-1].abs().sum() > 0  # lm_head's
    # one graph per reduction (each is a constant the trace specialises on), and nothing more
    assert len(graphs) == 2
    torch._dynamo.reset()

def sft_loss(model, lengths):
    """scaled_token_loss of a padded micro-batch whose longest row has `lengths[0]` + 1 tokens."""
    rows = [(list(range(1, n + 2)), [0] * 3 + [1] * (n - 2)) for n in lengths]
    inputs, targets = collate_padded(rows, 0)
    micro = {"inputs": inputs, "targets": targets, "count": sum(sum(m[1:]) for _, m in rows), "tokens": inputs.numel()}
    (batch, _), = StepBatches(iter([(micro, None)]), 1).next_step()
    return scaled_token_loss(model, batch)

def dpo_loss(model, lengths):
    """pair_losses of 2 pairs (a 4-token prompt, answers of the given lengths), the reference at 0."""
    pairs = [([1, 2, 3, 4], list(range(5, 5 + a)), list(range(9, 9 + b))) for a, b in zip(lengths[::2], lengths[1::2])]
    inputs, targets = collate_pairs(pairs, 0)
    losses, _ = pair_losses(model, {"inputs": inputs, "targets": targets, "ref": torch.zeros(2, 2)}, beta=0.1)
    return losses.mean()

@pytest.mark.slow
@pytest.mark.parametrize("loss_fn", [sft_loss, dpo_loss], ids=["sft", "dpo"])
def test_padded_lengths_compile_once_with_dynamic_shapes(loss_fn):
    """As chat_sft/chat_dpo run it (torch.compile(dynamic=True), plain path, bf16 autocast), a loss over 4 different
    padded lengths compiles ONE graph: no graph break (fullgraph=True would raise), no recompilation per length."""
    torch._dynamo.reset()
    model = tiny_model(fused=False)
    graphs = []
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=counting_backend(graphs))
    for lengths in ([9, 5, 7, 6], [20, 12, 15, 3], [14, 14, 9, 10], [27, 4, 8, 25]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(compiled, lengths)
            eager = loss_fn(model, lengths)
        torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
        loss.backward()
        assert model.lm_head.weight.grad is not None
        model.zero_grad(set_to_none=True)
    assert len(graphs) == 1, f"{len(graphs)} graphs for 4 padded lengths"
    torch._dynamo.reset()
