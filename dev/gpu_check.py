"""The GPU proof in one table, within 8 minutes on one H100-class GPU. 1-2: torch.compile(fullgraph=True) of training's
forward, loss and backward: no graph break, eager's loss and gradients. 3: training-step tok/s, MFU, peak memory at the
speedrun's d12 and d20 (compiled plain path, real optimizer, device batch 32; eager fused path at d12). 4: the largest
device batch at d20. 5: SFT and DPO under torch.compile(dynamic=True) over 4 padded lengths compile at most twice.
6: KV-cache decoding at batch 1 and 8. 7: training's attention kernel (FA3 where present, else SDPA's) vs masked
math; the fp8 matmul vs fp32, and its speed against bf16's.
    python -m dev.gpu_check             # CUDA; a python3 with torch, numpy, pyarrow, tiktoken, requests, tqdm will do
    python -m dev.gpu_check --dry-run   # CPU, tiny shapes, the same code: CI runs it so that it cannot rot
Exit status 1 when a check FAILs ("n/a" is none). Lines start with the seconds so far: 7 inductor compiles take most."""
import argparse
import gc
import threading
import time
import traceback

import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.benchmark import Timer

from nanochat.chat_data import StepBatches, collate_padded, scaled_token_loss
from nanochat.common import HelpFormatter, compute_init, get_peak_flops, synchronize
from nanochat.dpo import collate_pairs, pair_losses, reference_logps
from nanochat.engine import Engine, SamplingParams
from nanochat.gpt import GPT, GPTConfig, attention
from nanochat.hopper import FA3, Fp8Matmul, fa3_attention, flash_attn3, use_fp8
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

# The speedrun's shapes (width 64 x depth, heads of 128) and the dry run's: only sizes differ; "small" (depth, width,
# seq) serves rows 1-2 and 5. The dry run compiles with aot_eager (dynamo and AOT autograd, then eager kernels):
# inductor's C++ builds take ~30 s a graph on 2 cores
SHAPES = {"cuda": dict(depths=(12, 20), head_dim=128, seq=2048, vocab=32768, batch=32, small=(2, 512, 512),
                       backend="inductor", warmup=2, steps=5, new_tokens=128),
          "cpu": dict(depths=(1, 2), head_dim=32, seq=64, vocab=512, batch=2, small=(1, 128, 64),
                      backend="aot_eager", warmup=1, steps=2, new_tokens=16)}
# bf16 keeps 8 significant bits (0.4 % a rounding), and compiled and eager code round in different places, layer after
# layer: 1.6e-2 is torch.testing's bf16 rtol (SDPA's too, plus 1e-2 absolute for outputs near 0)
LOSS_TOL, GRAD_TOL, SDPA_ATOL = 1.6e-2, 5e-2, 1e-2
ROWS, START, SAID = [], time.time(), [time.time()]  # the table (check, result, detail); when we last said a word

def build(s, device, depth, width=None, seq=None, fused=False):
    """A GPT of the speedrun's proportions and its GPU preset's switches on the plain path (compiled on CUDA)."""
    torch._dynamo.reset()  # a fresh dynamo for each model: no graphs of the last one, no recompile limit reached
    gc.collect()  # and the memory of the last model back
    heads = (width := width or 64 * depth) // s["head_dim"]
    with torch.device("meta"):  # as base_train: allocated once, on the device
        model = GPT(GPTConfig(sequence_len=seq or s["seq"], vocab_size=s["vocab"], n_layer=depth, n_head=heads,
                              n_kv_head=heads, n_embd=width, value_embeds=True, layer_lambdas=True,
                              window_pattern="SSSL" if FA3 else "L"))  # as speedrun's GPU preset picks them
    model.to_empty(device=device).init_weights()
    model.fused = fused
    return model

def loss_of(forward, inputs, targets, device, reduction="mean"):
    # bf16 autocast, CUDA's policy (common.autocast_ctx), on CPU too: the dry run compiles the same graphs
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return forward(inputs, targets, loss_reduction=reduction).sum()

def random_batch(model, rows, device):
    x = torch.randint(model.config.vocab_size, (rows, model.config.sequence_len + 1), generator=torch.Generator().manual_seed(0))
    return x[:, :-1].to(device), x[:, 1:].to(device)

def check_compile(s, device, fused, backend):
    model = build(s, device, *s["small"], fused=fused)
    for lin in [model.lm_head] + [m for b in model.transformer.h for m in (b.attn.c_proj, b.mlp.c_proj)]:
        # the zero-initialised output projections make every block the identity: comparisons would not see in
        torch.nn.init.normal_(lin.weight, 0, lin.in_features ** -0.5)
    # fullgraph=True raises at the first graph break, with its reason: breaks are dynamo's, whatever the backend
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    inputs, targets = random_batch(model, 4, device)
    loss_err = grad_err = 0.0
    for reduction in ("mean", "none"):  # training's loss, and DPO's per-token one
        loss, c_loss = (loss_of(forward, inputs, targets, device, reduction) for forward in (model, compiled))
        grads, c_grads = (torch.autograd.grad(x, list(model.parameters())) for x in (loss, c_loss))
        loss_err = max(loss_err, abs(c_loss.item() - loss.item()) / loss.item())
        grad_err = max([grad_err] + [((a - b).norm() / b.norm()).item() for a, b in zip(c_grads, grads)])
    return loss_err < LOSS_TOL and grad_err < GRAD_TOL, (f"0 graph breaks (forward, 2 losses, backward); vs eager, "
           f"relative error: loss {loss_err:.1e} (< {LOSS_TOL:g}), worst gradient {grad_err:.1e} (< {GRAD_TOL:g}); {backend}")

def check_training(s, model, forward, optimizer, device, path, rows=None, warmup=None, steps=None):
    # whole optimizer steps on one fixed random batch; returns (finite loss?, detail, peak GiB or None)
    rows, warmup, steps = rows or s["batch"], warmup or s["warmup"], steps or s["steps"]
    inputs, targets = random_batch(model, rows, device)
    if cuda := device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:  # the first steps pay for compilation and lazy allocations; GPU work is asynchronous
            synchronize(device.type)
            t0 = time.perf_counter()
        (loss := loss_of(forward, inputs, targets, device)).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    finite = bool(loss.isfinite())  # (a host sync: the clock stops once the GPU is done)
    tok_s = rows * model.config.sequence_len * steps / (time.perf_counter() - t0)
    peak, peak_flops = torch.cuda.max_memory_allocated() / 2**30 if cuda else None, get_peak_flops(device.type)
    mfu = f"MFU {100 * model.estimate_flops() * tok_s / peak_flops:.1f}%" if peak_flops else "MFU -"  # known GPUs
    return finite, (f"{tok_s:,.0f} tok/s, {mfu}, peak {f'{peak:.1f} GiB' if peak else '-'} ({path}, "
                    f"batch {rows} x {model.config.sequence_len}, {steps} timed steps)"), peak

def check_largest_batch(s, model, forward, optimizer, device):
    # Doubling from the speedrun's batch up to 4x, one step each, through row 3's compiled forward: the first new size
    # compiles once more with a dynamic batch (automatic dynamic shapes), the next ones reuse that graph
    fits, peak = 0, None
    for rows in (s["batch"], 2 * s["batch"], 4 * s["batch"]):
        try:
            peak, fits = check_training(s, model, forward, optimizer, device, "", rows, 1, 1)[2], rows
        except torch.OutOfMemoryError:
            break
    model.zero_grad(set_to_none=True)  # a step cut short leaves partial gradients
    return fits > 0, (f"{fits} rows fit, peak {f'{peak:.1f} GiB' if peak else '-'}; "
                      + (f"{rows}: out of memory" if fits < rows else "not tried past 4x"))

def check_dynamic_compiles(s, device, stage):
    """Steps of SFT or DPO as the stages run them (torch.compile(dynamic=True)), a new padded length each."""
    model = build(s, device, *s["small"])
    optimizer, compiled = model.setup_optimizer(), torch.compile(model, dynamic=True, backend=s["backend"])
    # dynamo's count of compiled graphs (one per break and recompile); a counting backend also counts discarded tries
    lengths, before = [n * model.config.sequence_len // 8 - 1 for n in (2, 4, 8, 3)], counters["stats"]["unique_graphs"]
    for length in lengths:
        # 4 random sequences, the first length + 1 tokens (the batch pads to it); each a prompt third and an answer
        ids = [torch.randint(s["vocab"], (n,)).tolist() for n in (length + 1, length // 2, 2 * length // 3, length)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if stage == "SFT":
                rows = [(x, [0] * (len(x) // 3) + [1] * (len(x) - len(x) // 3)) for x in ids]
                inputs, targets = collate_padded(rows, 0, device)  # pad id 0: padded targets are -1 anyway
                micro = dict(inputs=inputs, targets=targets, count=sum(sum(m[1:]) for _, m in rows), tokens=inputs.numel())
                (batch, _), = StepBatches(iter([(micro, None)]), 1, device=device).next_step()
                loss = scaled_token_loss(compiled, batch)
            else:  # 2 pairs of answers to a prompt; their reference log-probs from the eager model, as chat_dpo's
                pairs = [(a[:len(a) // 3], a[len(a) // 3:], b[len(a) // 3:]) for a, b in zip(ids[::2], ids[1::2])]
                inputs, targets = collate_pairs(pairs, 0, device)
                batch = dict(inputs=inputs, targets=targets, ref=reference_logps(model, pairs, 2, 0, device))
                loss = pair_losses(compiled, batch, beta=0.1)[0].mean()
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
    graphs = counters["stats"]["unique_graphs"] - before
    return graphs <= 2, f"{graphs} compilation(s) over padded lengths {lengths} (more than 2 fails); {s['backend']}"

def check_decode(s, model, tokenizer, rows):
    decoder = Engine(model, tokenizer).decoder()
    decoder.add(list(range(32, 48)), SamplingParams(temperature=0, max_tokens=s["new_tokens"]), num_samples=rows)
    decoder.step()  # the prefill's token: the rows join the batch; from here on each step is one decode forward
    t0, generated = time.perf_counter(), 0
    while decoder.num_rows:  # every step ends in a host sync (its tokens to the CPU): the clock needs no other
        generated += len(decoder.step())
    tok_s = generated / (time.perf_counter() - t0)
    return generated > 0, f"{tok_s:,.0f} tok/s ({generated} tokens, greedy, eager, d{model.config.n_layer})"

def timed_ms(fn):  # torch's Timer warms up and synchronises CUDA around its runs
    return 1000 * Timer("fn()", globals={"fn": fn}).timeit(10).mean

def check_attention(s, device):
    """Training's attention kernel, FA3 where present, else SDPA's (flash for L, efficient for S), vs fp32 masked math."""
    if (fa3 := flash_attn3()) is None and device.type != "cuda":
        return "n/a", "CUDA only"
    T, errors = s["seq"], {}
    q, k, v = (torch.randn(2, T, h, 128, device=device).bfloat16().requires_grad_() for h in (16, 8, 8))  # GQA
    g, pos = torch.randn_like(q), torch.arange(T, device=device)
    masked = lambda q, k, v, mask: attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask).transpose(1, 2)  # noqa: E731
    for window in (T // 4, T):  # an S layer's and an L layer's, against our mask in fp32 math (B, H, T, D)
        mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        with sdpa_kernel(SDPBackend.MATH):
            ref = masked(q.float(), k.float(), v.float(), mask)
        got = fa3_attention(fa3, q, k, v, window) if fa3 else masked(q, k, v, None if window == T else mask)
        grads, ref_grads = (torch.autograd.grad(y, (q, k, v), g.to(y.dtype)) for y in (got, ref))
        errors[f"out w{window}"] = ((got - ref).abs() / (SDPA_ATOL + LOSS_TOL * ref.abs())).max().item()
        errors[f"grads w{window}"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)) / GRAD_TOL
    ms = [timed_ms(lambda: f().sum().backward()) for f in (lambda: fa3_attention(fa3, q, k, v, T // 4),
                                                           lambda: masked(q, k, v, mask))] if fa3 else [0, 0]
    return all(e <= 1 for e in errors.values()), ", ".join(f"{n} {e:.2f}" for n, e in errors.items()) + \
        f" of tolerance ({'FA3' if fa3 else 'SDPA, no FA3 here: it needs Hopper and the gpu extra'}; B 2, T {T}, " \
        f"GQA 16/8)" + (f"; fwd+bwd at window {T // 4}: FA3 {ms[0]:.2f} ms, masked SDPA {ms[1]:.2f} ms" if fa3 else "")

def check_fp8(s, device):
    M, K, N = (16384, 1536, 6144) if device.type == "cuda" else (256, 128, 512)  # d24's MLP up-projection
    x, w = torch.randn(M, K, device=device).bfloat16().requires_grad_(), torch.randn(N, K, device=device).requires_grad_()
    grads = torch.autograd.grad(y := Fp8Matmul.apply(x, w), (x, w), g := torch.randn(M, N, device=device).bfloat16())
    exact = [x.float() @ w.T, g.float() @ w, g.float().T @ x.float()]
    errors = [((a.float() - b).norm() / b.norm()).item() for a, b in zip([y, *grads], exact)]
    run = lambda f: lambda: torch.autograd.grad(f(x, w), (x, w), g)  # noqa: E731
    ms = [timed_ms(run(f)) for f in (Fp8Matmul.apply, lambda x, w: x @ w.bfloat16().T)]
    return max(errors) < 0.08, (f"relative error vs fp32: out {errors[0]:.3f}, grad x {errors[1]:.3f}, grad w "
                                f"{errors[2]:.3f} (< 0.08); fwd+bwd {M}x{K}x{N}: fp8 {ms[0]:.2f} ms, bf16 {ms[1]:.2f} ms")

def say(text):
    SAID[0] = time.time()
    print(f"[{SAID[0] - START:4.0f}s] {text}", flush=True)

def heartbeat():  # a big shape's compilation takes a minute or more without a word
    while True:
        time.sleep(5)
        if time.time() - SAID[0] > 20:
            say("... still at it")

def check(name, fn, *args):
    say(f"{name} ...")
    try:
        ok, detail, *_ = fn(*args)
        ROWS.append((name, ok if isinstance(ok, str) else "PASS" if ok else "FAIL", detail))  # or "n/a"
    except Exception as e:  # one broken check must not hide the others
        print(traceback.format_exc(), flush=True)
        ROWS.append((name, "FAIL", " ".join(f"{type(e).__name__}: {e}".split())[:500]))
    say(" | ".join(ROWS[-1]))

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU and tiny shapes: the same checks without a GPU")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; `python -m dev.gpu_check --dry-run` runs the checks on CPU, tiny")
    s = SHAPES["cpu" if args.dry_run else "cuda"]
    device = compute_init("cpu" if args.dry_run else "cuda", seed=0)[-1]
    if args.dry_run:  # tiny shapes gain nothing from threads; on a shared 2-core box spinning workers slow them
        torch.set_num_threads(1)
    threading.Thread(target=heartbeat, daemon=True).start()
    check("1-2 compile, plain path", check_compile, s, device, False, s["backend"])
    check("1-2 compile, fused path", check_compile, s, device, True, "aot_eager")  # compiled by default nowhere
    for depth in s["depths"]:
        model = optimizer = forward = None  # the last model goes first: each peak memory is then one model's
        model = build(s, device, depth)
        # dynamic=None: static for the first shape, as base_train's dynamic=False; row 4 needs it for the next ones
        optimizer, forward = model.setup_optimizer(), torch.compile(model, backend=s["backend"])
        check(f"3 train d{depth}, compiled plain", check_training, s, model, forward, optimizer, device, "compiled plain")
        if depth == s["depths"][-1]:  # the same step with the blocks' matmuls in fp8 (base_train --fp8 1)
            use_fp8(model)
            check(f"3 train d{depth}, compiled fp8", check_training, s, model, forward, optimizer, device, "compiled fp8")
            use_fp8(model, False)
        if depth == s["depths"][0]:
            model.fused = True
            check(f"3 train d{depth}, eager fused", check_training, s, model, model, optimizer, device, "eager fused")
    check(f"4 largest batch d{depth}", check_largest_batch, s, model, forward, optimizer, device)
    check("5 SFT, dynamic shapes", check_dynamic_compiles, s, device, "SFT")
    check("5 DPO, dynamic shapes", check_dynamic_compiles, s, device, "DPO")
    # the Engine's tokenizer: a real one, of the model's ids, with no file, no rustbpe (bytes, byte pairs, specials)
    ranks = {bytes([i] if i < 256 else [i // 256 - 1, i % 256]): i for i in range(s["vocab"] - len(SPECIAL_TOKENS))}
    for rows in (1, 8):  # on row 3's last model
        check(f"6 decode, batch {rows}", check_decode, s, model, Tokenizer.from_ranks(ranks), rows)
    check("7 attention kernel vs masked math", check_attention, s, device)
    check("7 fp8 matmul vs fp32", check_fp8, s, device)
    width = max(len(name) for name, *_ in ROWS)
    print("\n" + "\n".join(f"{a:<{width}} | {b:<6} | {c}" for a, b, c in [("check", "result", "detail")] + ROWS))
    failed = [name for name, result, _ in ROWS if result == "FAIL"]
    print(f"verdict: {'FAIL: ' + '; '.join(failed) if failed else 'PASS'} ({time.time() - START:.0f}s)")
    raise SystemExit(1 if failed else 0)

if __name__ == "__main__":
    main()
