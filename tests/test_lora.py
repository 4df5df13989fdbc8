"""Tests for nanochat/lora.py and scripts/lora_merge.py: parameter budget, training only the
adapters, exact base logits with adapters disabled (and no second copy of the model), save ->
reload -> merge round trips (an adapter is an ordinary checkpoint of the trained tensors), the
merge CLI on real checkpoints, the adapter folders of before the redesign, and bad input."""
import gc
import json
import warnings

import pytest
import torch

from nanochat.checkpoint_manager import build_model, list_steps, load_checkpoint, save_checkpoint, trained_state
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora import (LoRALinear, apply_lora, disable_lora, has_lora, load_lora, lora_optimizer, lora_parameters,
                           lora_state_dict, merge_lora)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

CONFIG = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)

def make_model(seed=0, **overrides):
    """A small GPT with every projection non-zero (the zero-initialised output projections and
    tiny lm_head would otherwise make most adapters invisible in the logits)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CONFIG, **overrides}))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.03)
        model.lm_head.weight.normal_(0, 0.2)
    return model

def batch(seed=0, B=2, T=24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG["vocab_size"], (B, T), generator=g)
    y = torch.randint(0, CONFIG["vocab_size"], (B, T), generator=g)
    return x, y

def train_adapters(model, steps=15, lr=5e-3):
    x, y = batch()
    opt = lora_optimizer(model, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses

def live_tensor_bytes():
    """Bytes of every distinct tensor storage alive in the process (what a model copy would add)."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() pokes deprecated module attributes
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            with warnings.catch_warnings():  # fake tensors (left by torch.compile) only warn here
                warnings.simplefilter("error")
                pointer = storage.data_ptr()
        except Exception:  # no real storage: failed type checks, fake tensors
            continue
        if pointer not in seen:
            seen.add(pointer)
            total += storage.nbytes()
    return total

def test_parameter_budget_and_targets():
    model = make_model()
    total = model.num_params()
    adapted = apply_lora(model, rank=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(model))
    assert 0 < trainable / total < 0.05, f"{trainable} of {total} trainable"
    # default targets: the 4 attention + 2 MLP projections of every layer, not the embedding or lm_head
    assert len(adapted) == 6 * CONFIG["n_layer"]
    assert not any("lm_head" in name or "wte" in name for name in adapted)
    # only the adapters train; the base weight is the very same Parameter, now frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    model = make_model()
    adapted = apply_lora(model, rank=4, targets="attn.c_proj,lm_head")
    assert adapted == [f"transformer.h.{i}.attn.c_proj" for i in range(CONFIG["n_layer"])] + ["lm_head"]
    with pytest.raises(ValueError, match="unknown LoRA target"):
        apply_lora(make_model(), rank=4, targets="c_q,wte")
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=4)

def test_train_adapters_only_disable_is_exact_and_copy_free():
    model = make_model()
    x, _ = batch(seed=1)
    model.eval()
    with torch.no_grad():
        base_logits = model(x)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    apply_lora(model, rank=8, alpha=16)
    with torch.no_grad():
        assert torch.equal(model(x), base_logits), "B = 0: the adapted model must start unchanged"

    losses = train_adapters(model)
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall with adapters only: {losses[0]:.3f} -> {losses[-1]:.3f}"
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None and torch.equal(p, base_weights[name]), f"{name} changed"

    with torch.no_grad():
        tuned = model(x)
        assert (tuned - base_logits).abs().max() > 1e-2, "the adapters should have changed the model"
        # the reference pass: same module, adapters switched off -> the base model bit for bit,
        # computed without any new copy of the weights
        before = live_tensor_bytes()
        with disable_lora(model):
            during = live_tensor_bytes()
            ref = model(x)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert during - before < 0.01 * model_bytes, f"disable_lora allocated {during - before} bytes"
        assert torch.equal(ref, base_logits)
        assert torch.equal(model(x), tuned), "adapters must be back on after the block"

    # the DPO shape of it: reference log-probs without grad, policy with grad, one network
    model.train()
    with torch.no_grad(), disable_lora(model):
        ref_loss = model(x, x)
    policy_loss = model(x, x)
    policy_loss.backward()
    assert all(p.grad is not None for p in lora_parameters(model))
    assert ref_loss.item() != policy_loss.item()

def test_save_reload_merge_roundtrip(tmp_path):
    model = make_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=8, alpha=16, targets="c_q,c_v,c_fc,mlp.c_proj,lm_head")
    train_adapters(model, steps=10)
    x, _ = batch(seed=2)
    with torch.no_grad():
        tuned = model(x)

    lora_dir = tmp_path / "adapter"
    assert set(trained_state(model)) == set(lora_state_dict(model))  # what a training stage saves: the adapters
    save_checkpoint(str(lora_dir), 10, trained_state(model), None, {"model_config": CONFIG, "lora": model.lora_config,
                                                                      "base": {"source": "sft", "model_tag": "d4", "step": 3}})
    assert list_steps(str(lora_dir)) == [10]
    full_path = tmp_path / "full.pt"
    torch.save(model.state_dict(), full_path)
    adapter_bytes = (lora_dir / "model_000010.pt").stat().st_size
    assert adapter_bytes < 0.1 * full_path.stat().st_size
    assert not list(lora_dir.glob("*.tmp")) and not list(lora_dir.glob(".*.tmp")), "atomic writes leave no temp files"

    state, _, meta = load_checkpoint(str(lora_dir), 10, "cpu")
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0,
                            "targets": ["c_q", "c_v", "c_fc", "mlp.c_proj", "lm_head"]}
    assert meta["model_config"] == CONFIG and meta["step"] == 10
    assert set(state) == set(lora_state_dict(model))

    # a fresh base model + the adapter file = the trained model
    fresh = make_model(seed=123)
    fresh.load_state_dict(base_state)
    fresh.eval()
    load_lora(fresh, state, meta["lora"])
    with torch.no_grad():
        assert torch.equal(fresh(x), tuned)
        merge_lora(fresh)
        merged = fresh(x)
    assert not has_lora(fresh) and not any(isinstance(m, LoRALinear) for m in fresh.modules())
    # fp32: W + BA rounds differently from W x + B(A x), by ~1e-6 relative, through 4 layers
    assert (merged - tuned).abs().max().item() <= 1e-4
    # in fp64 the merge is exact to well below 1e-5 (the logits are still returned in fp32)
    exact = make_model(seed=5).double()
    exact.load_state_dict(base_state)
    load_lora(exact, state, meta["lora"])
    exact.eval()
    with torch.no_grad():
        unmerged64 = exact(x)
        merged64 = merge_lora(exact)(x)
    assert (merged64 - unmerged64).abs().max().item() <= 1e-5
    assert (unmerged64 - tuned).abs().max().item() <= 1e-4
    # the merged model is an ordinary GPT: same keys, loads strictly into a fresh one, trainable again
    assert set(fresh.state_dict()) == set(base_state)
    plain = make_model(seed=7)
    plain.load_state_dict(fresh.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), merged)
    assert all(p.requires_grad for p in fresh.parameters())

def test_resume_with_optimizer_state_continues_identically(tmp_path):
    x, y = batch(seed=4)

    def step(model, opt):
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    model = make_model()
    apply_lora(model, rank=4)
    opt = lora_optimizer(model, lr=1e-2)
    for _ in range(3):
        step(model, opt)
    save_checkpoint(str(tmp_path), 3, trained_state(model), opt.state_dict(), {"lora": model.lora_config})
    step(model, opt)  # the uninterrupted run's 4th step

    resumed = make_model()  # same base weights (same seed), adapters and Adam moments from disk
    state, optimizer_state, meta = load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True)
    load_lora(resumed, state, meta["lora"])
    opt2 = lora_optimizer(resumed, lr=1e-2)
    opt2.load_state_dict(optimizer_state)
    step(resumed, opt2)
    for a, b in zip(lora_parameters(model), lora_parameters(resumed)):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="without optimizer state"):
        load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=1)

def test_bad_adapters_are_refused(tmp_path):
    model = make_model()
    apply_lora(model, rank=4)
    state = lora_state_dict(model)
    other = make_model()
    with pytest.raises(ValueError, match="shape"):
        load_lora(other, state, {"rank": 8, "alpha": 16, "targets": ["c_q", "c_k", "c_v", "c_proj", "c_fc"]})
    with pytest.raises(ValueError, match="missing"):
        load_lora(make_model(), state, {"rank": 4, "alpha": 8, "targets": ["c_q", "c_k", "c_v", "c_proj", "c_fc", "lm_head"]})
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora(make_model(), state)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(str(tmp_path), 3, "cpu")

def test_merge_cli_writes_a_normal_checkpoint(base_dir, tiny_tokenizer):
    from scripts.lora_merge import main as lora_merge
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = make_model()
    sft_dir = base_dir / "chatsft_checkpoints" / "d4"
    save_checkpoint(str(sft_dir), 3, model.state_dict(), None, {"model_config": CONFIG})

    apply_lora(model, rank=8)
    train_adapters(model, steps=10)
    lora_dir = base_dir / "chatdpo_checkpoints" / "d4_lora"
    save_checkpoint(str(lora_dir), 10, trained_state(model), None, {"model_config": CONFIG, "lora": model.lora_config,
                    "stage": "dpo", "base": {"source": "sft", "model_tag": "d4", "step": 3}})

    out_dir = lora_merge(["--lora-dir", str(lora_dir)])
    assert out_dir == str(base_dir / "chatdpo_checkpoints" / "d4_lora_merged")
    merged, _, meta = build_model(out_dir, 10, "cpu", "eval")
    assert meta["merged_lora"]["rank"] == 8 and meta["base"]["model_tag"] == "d4"
    x, _ = batch(seed=3)
    model.eval()
    with torch.no_grad():
        assert (merged(x) - model(x)).abs().max().item() <= 1e-4  # fp32 rounding of W + BA; exactness is shown in fp64 above

    # an adapter that does not say what it adapts is refused with a clear message
    json_path = lora_dir / "meta_000010.json"
    record = json.loads(json_path.read_text())
    del record["base"]
    json_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="which base model"):
        lora_merge(["--lora-dir", str(lora_dir)])

def test_merging_two_adapters_of_one_base_gives_two_models(base_dir, tiny_tokenizer, capsys):
    """Each merge is named after its adapter (not the base they share), prints the flags that load it, and
    an existing output is replaced only with --force (which leaves no step of the old merge behind)."""
    from nanochat.checkpoint_manager import load_model
    from scripts.lora_merge import main as lora_merge
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d4"), 3, make_model().state_dict(), None,
                    {"model_config": CONFIG})
    x, _ = batch(seed=5)
    tuned = {}
    for seed, (name, steps) in enumerate([("d4_lora", 10), ("d4_lora_persona", 20)]):
        model = make_model()
        apply_lora(model, rank=4)
        torch.manual_seed(seed)
        train_adapters(model, steps=steps, lr=1e-2 * (seed + 1))
        save_checkpoint(str(base_dir / "chatsft_checkpoints" / name), steps, trained_state(model), None,
                        {"model_config": CONFIG, "lora": model.lora_config, "stage": "sft",
                         "base": {"source": "sft", "model_tag": "d4", "step": 3}})
        with torch.no_grad():
            tuned[name] = model(x)
    printed = {}
    for name in tuned:
        capsys.readouterr()
        out_dir = lora_merge(["--lora-dir", str(base_dir / "chatsft_checkpoints" / name)])
        assert out_dir == str(base_dir / "chatsft_checkpoints" / f"{name}_merged")
        printed[name] = capsys.readouterr().out
        assert f"load it with `-i sft --model-tag {name}_merged`" in printed[name]
    assert (tuned["d4_lora"] - tuned["d4_lora_persona"]).abs().max() > 0.1, "two different adapters"
    for name in tuned:  # the printed flags load each merge, and it is that adapter's model
        merged, _, meta = load_model("sft", "cpu", "eval", model_tag=f"{name}_merged")
        with torch.no_grad():
            assert (merged(x) - tuned[name]).abs().max().item() <= 1e-4
        assert meta["merged_lora"]["lora_dir"].endswith(name)

    # merging again into an existing folder: refused, one line naming the folder and the flag
    target = base_dir / "chatsft_checkpoints" / "d4_lora_merged"
    with pytest.raises(SystemExit) as refused:
        lora_merge(["--lora-dir", str(base_dir / "chatsft_checkpoints" / "d4_lora_persona"), "--model-tag", "d4_lora_merged"])
    assert str(refused.value) == f"error: {target} already holds a checkpoint; pass --force to replace it"
    assert list_steps(str(target)) == [10]
    # --force replaces it: only the new merge's step is left, so loading cannot pick the old one
    lora_merge(["--lora-dir", str(base_dir / "chatsft_checkpoints" / "d4_lora_persona"), "--model-tag", "d4_lora_merged",
                "--force"])
    assert list_steps(str(target)) == [20]
    merged, _, _ = load_model("sft", "cpu", "eval", model_tag="d4_lora_merged")
    with torch.no_grad():
        assert (merged(x) - tuned["d4_lora_persona"]).abs().max().item() <= 1e-4

def test_adapter_folders_from_before_the_redesign_still_load(base_dir, tiny_tokenizer):
    """LoRA runs used to write lora_<step>.pt / lora_<step>.json / lora_optim_<step>_rank<r>.pt (a
    list holding one torch AdamW state): such a folder still loads, merged into its base; its optimizer state, of
    the two-optimizer days, cannot be resumed, and --resume says so."""
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = make_model()
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d4"), 3, model.state_dict(), None, {"model_config": CONFIG})
    apply_lora(model, rank=4)
    old_optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)  # what the old lora_optimizer was
    x, y = batch(seed=6)

    def step(opt):
        model(x, y).backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step(old_optimizer)
    old_dir = base_dir / "chatsft_checkpoints" / "d4_lora"
    old_dir.mkdir()
    # exactly the files the old nanochat.lora.save_lora wrote
    torch.save({k: v.clone() for k, v in lora_state_dict(model).items()}, old_dir / "lora_000005.pt")
    torch.save([old_optimizer.state_dict()], old_dir / "lora_optim_000005_rank0.pt")
    (old_dir / "lora_000005.json").write_text(json.dumps({
        "model_config": CONFIG, "stage": "sft", "base": {"source": "sft", "model_tag": "d4", "step": 3},
        "step": 5, "lora": model.lora_config}))
    assert list_steps(str(old_dir)) == [5]
    loaded, _, meta = build_model(str(old_dir), None, "cpu", "eval")
    assert meta["step"] == 5 and not has_lora(loaded)
    model.eval()
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max().item() <= 1e-4
    # resume: the old list form of the optimizer state is refused, naming the step (the weights above load)
    from nanochat import training
    state, optimizer_state, meta = load_checkpoint(str(old_dir), 5, "cpu", load_optimizer=True)
    assert isinstance(optimizer_state, list)
    resumed = make_model()
    load_lora(resumed, state, meta["lora"])
    with pytest.raises(SystemExit, match=r"d4_lora step 5 holds the optimizer state of an older nanochat"):
        training.resume(True, str(old_dir), resumed, lora_optimizer(resumed, lr=1e-2), meta, "cpu")

def test_lm_head_adapter_trains_on_the_fused_path():
    """The fused loss reads lm_head.weight directly: with an adapter on lm_head the model must take
    the path that calls the module, or the adapter would never get a gradient."""
    for fused in (True, False):
        model = make_model()
        model.fused = fused
        apply_lora(model, rank=4, targets="lm_head")
        x, y = batch(seed=7)
        model(x, y).backward()
        assert model.lm_head.lora_B.grad.abs().sum() > 0, fused
