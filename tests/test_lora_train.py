"""--lora-rank in chat_sft, chat_dpo and mid_train, end to end: only the adapters train (a small
fraction of the parameters) and only they are saved, in <stage>_checkpoints/<tag>_lora/; the loss
falls; load_model / chat_cli / lora_merge give the base with the adapter merged, with the same
logits; DPO's reference is the same network with its adapters off (no second model in memory);
a LoRA run resumes exactly; mismatched resumes are refused."""
import gc
import json
import math
import random
import warnings
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint_manager import build_model, find_largest_model, load_checkpoint, load_model, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.lora import LoRALinear, has_lora, lora_parameters, lora_state_dict, merge_lora
from posttrain_helpers import offline_base_dir, reverse_conversation, reverse_words, run_main, run_script, write_jsonl

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

N_EMBD, N_LAYER, SEQ_LEN = 256, 4, 48  # big enough that rank-8 adapters are < 5% of the parameters
SFT = ["--source", "base", "--model-tag", "d4", "--device", "cpu", "--eval-tasks", "--log-every", "1",
       "--lora-rank", "8", "--lora-lr", "3e-3"]

def save_base_model(root, vocab_size):
    """A stand-in for a pretrained base: every projection and the lm_head non-zero (a freshly
    initialised GPT has zero output projections and a near-zero lm_head, which frozen would leave
    adapters with nothing to steer)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=vocab_size, n_layer=N_LAYER, n_head=N_EMBD // 64,
                       n_kv_head=N_EMBD // 64, n_embd=N_EMBD)
    model = GPT(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.05)
    save_checkpoint(str(root / "base_checkpoints" / "d4"), 0, model.state_dict(), None, {"model_config": asdict(config)})

def preference_pairs(n, seed):
    """Chosen answers end in 'good', rejected ones in 'bad'; otherwise the same words."""
    rng = random.Random(seed)
    words = ["the", "cat", "dog", "runs", "fast", "very", "nice", "hello"]
    pairs = []
    for _ in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(2, 4)))
        pairs.append({"prompt": "say something " + rng.choice(words), "chosen": body + " good", "rejected": body + " bad"})
    return pairs

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with offline_base_dir(tmp_path_factory, tags=()) as (root, tok):
        save_base_model(root, tok.get_vocab_size())
        write_jsonl(root / "reverse.jsonl", [reverse_conversation(w) for w in reverse_words(400, seed=5)])
        write_jsonl(root / "pairs.jsonl", preference_pairs(160, seed=0))
        write_jsonl(root / "val_pairs.jsonl", preference_pairs(32, seed=1))
        yield root, tok

def probe(vocab_size, seed=0):
    return torch.randint(0, vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(seed))

def test_sft_lora_trains_adapters_only_saves_them_small_and_loads_merged(base, capsys):
    root, tok = base
    trainer = run_main("chat_sft", SFT + ["--data", root / "reverse.jsonl", "--data-only", "--device-batch-size", "8",
                                          "--examples-per-step", "8", "--num-iterations", "25", "--eval-every", "-1",
                                          "--eval-examples", "16", "--warmdown-ratio", "0.2"])
    model = trainer.model
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(model))
    assert 0 < trainable / total < 0.05, f"{trainable} of {total} parameters trainable"
    losses = [loss for _, loss in trainer.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:3]) / 3, losses
    # the base weights did not move: the model minus its adapters is the checkpoint it started from
    base_state, _, _ = load_checkpoint(str(root / "base_checkpoints" / "d4"), 0, "cpu")
    tuned_state = model.state_dict()
    assert all(torch.equal(tuned_state[k], v) for k, v in base_state.items())

    # only the adapters were saved, in their own folder, with what the adapted model is rebuilt from
    lora_dir = root / "chatsft_checkpoints" / "d4_lora"
    assert sorted(p.name for p in lora_dir.iterdir()) == ["meta_000025.json", "model_000025.pt",
                                                          "optim_000025_rank0.pt"]
    assert all("lora_" in key for key in torch.load(lora_dir / "model_000025.pt", weights_only=True))
    assert not (root / "chatsft_checkpoints" / "d4").exists()
    adapter_bytes = (lora_dir / "model_000025.pt").stat().st_size
    full_bytes = (root / "base_checkpoints" / "d4" / "model_000000.pt").stat().st_size
    assert adapter_bytes < 0.06 * full_bytes, (adapter_bytes, full_bytes)
    meta = json.loads((lora_dir / "meta_000025.json").read_text())
    assert meta["base"] == {"source": "base", "model_tag": "d4", "step": 0} and meta["stage"] == "sft"
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["c_q", "c_k", "c_v", "c_proj", "c_fc"]}

    # load_model on the adapter folder: the base with the adapter merged in, the trained model's logits
    x = probe(tok.get_vocab_size())
    model.eval()
    with torch.no_grad():
        tuned = model(x)
        merged_model, _, loaded_meta = load_model("sft", "cpu", "eval", model_tag="d4_lora")
        merged = merged_model(x)
        base_model, _, _ = load_model("base", "cpu", "eval", model_tag="d4")
        assert (tuned - base_model(x)).abs().max() > 0.1, "the adapters should have changed the model"
    assert loaded_meta["step"] == 25 and not has_lora(merged_model)
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert (merged - tuned).abs().max().item() <= 1e-4  # fp32: W + BA rounds unlike W x + B A x
    # exactness of the merge itself, in fp64
    unmerged, _, _ = build_model(str(lora_dir), None, "cpu", "eval", merge=False)
    unmerged.double()
    with torch.no_grad():
        before = unmerged(x)
        after = merge_lora(unmerged)(x)
    assert (before - after).abs().max().item() <= 1e-5
    # with no full SFT checkpoint around, the adapter is what gets loaded by default
    assert find_largest_model(str(root / "chatsft_checkpoints")) == "d4_lora"

    # chat_cli loads it (merged) like any model
    from scripts.chat_cli import main as chat_cli
    capsys.readouterr()
    assert chat_cli(["--model-tag", "d4_lora", "--device", "cpu", "-p", "reverse: a b c", "--temperature", "0",
                     "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    # and chat_web serves it
    from scripts.chat_web import get_parser, load_engines
    (engine,), _, web_meta = load_engines(get_parser().parse_args(["--model-tag", "d4_lora", "--device", "cpu"]))
    assert web_meta["step"] == 25 and not has_lora(engine.model)
    # an adapter that does not name its base: a clear error, no traceback
    broken = root / "chatsft_checkpoints" / "nobase_lora"
    broken.mkdir()
    (broken / "model_000025.pt").write_bytes((lora_dir / "model_000025.pt").read_bytes())
    (broken / "meta_000025.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "base"}))
    with pytest.raises(SystemExit, match="which base model"):
        chat_cli(["--model-tag", "nobase_lora", "--device", "cpu", "-p", "hi"])

    # or merge explicitly into a normal checkpoint
    from scripts.lora_merge import main as lora_merge
    out_dir = lora_merge(["--lora-dir", str(lora_dir)])
    assert out_dir == str(root / "chatsft_checkpoints" / "d4_lora_merged")
    written, _, _ = load_model("sft", "cpu", "eval", model_tag="d4_lora_merged")
    with torch.no_grad():
        assert torch.equal(written(x), merged)

def live_tensors_shaped(shape):
    """Distinct storages of live tensors with this shape (a second model would double them)."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() pokes deprecated module attributes
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len({t.untyped_storage().data_ptr() for t in tensors if tuple(t.shape) == shape and t.device.type != "meta"})

def live_models(vocab_size):
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, GPT) and o.config.vocab_size == vocab_size)

def test_dpo_lora_reference_is_the_same_network_with_adapters_off(base, monkeypatch):
    """DPO from a LoRA SFT model (chained: its base is chatsft_checkpoints/<tag>_lora): the reference
    log-probs are computed with every adapter switched off and equal those of the starting model;
    while training there is one GPT in memory and one copy of each weight (no second model, no
    optimizer state for the frozen weights); held-out preference accuracy rises."""
    root, tok = base
    V = tok.get_vocab_size()
    run_main("chat_sft", SFT + ["--data", root / "reverse.jsonl", "--data-only", "--device-batch-size", "4",
                                "--examples-per-step", "4", "--num-iterations", "3", "--eval-every", "-1",
                                "--output-tag", "chain"])
    import scripts.chat_dpo as chat_dpo
    seen = {}
    real_reference, real_pair_losses = chat_dpo.reference_logps, chat_dpo.pair_losses

    def reference_logps(model, pairs, *args, **kwargs):
        seen["adapters_on_in_reference"] = [m.lora_enabled for m in model.modules() if isinstance(m, LoRALinear)]
        seen["models_in_reference"] = live_models(V)
        seen["pairs"], seen["ref"] = pairs, real_reference(model, pairs, *args, **kwargs)
        return seen["ref"]

    def pair_losses(model, batch, **kwargs):
        if torch.is_grad_enabled() and "models_in_training" not in seen:  # the first training micro-batch
            seen["models_in_training"] = live_models(V)
            seen["embedding_shaped_tensors"] = live_tensors_shaped((V, N_EMBD))
        return real_pair_losses(model, batch, **kwargs)

    monkeypatch.setattr(chat_dpo, "reference_logps", reference_logps)
    monkeypatch.setattr(chat_dpo, "pair_losses", pair_losses)
    trainer = run_main("chat_dpo", ["--source", "sft", "--model-tag", "chain_lora", "--device", "cpu", "--log-every", "1",
                                    "--min-prompt-tokens", "4", "--min-response-tokens", "2", "--lora-rank", "8",
                                    "--lora-lr", "1e-2", "--data", root / "pairs.jsonl", "--data-only",
                                    "--val-mixture", f"preferences:{root / 'val_pairs.jsonl'}", "--device-batch-size", "8",
                                    "--examples-per-step", "16", "--num-iterations", "10", "--eval-every", "10"])
    assert seen["adapters_on_in_reference"] and not any(seen["adapters_on_in_reference"])
    assert seen["models_in_reference"] == 1 and seen["models_in_training"] == 1
    # wte and lm_head, once each: no reference copy, and AdamW moments only for the adapters
    assert seen["embedding_shaped_tensors"] == 2
    with torch.no_grad():  # the counter does see a second model
        extra = GPT(trainer.model.config)
        assert live_tensors_shaped((V, N_EMBD)) == 2 + 2 and live_models(V) == 2
        del extra

    # the reference is the starting model (the SFT adapter merged into the base), pair for pair
    starting, _, _ = load_model("sft", "cpu", "eval", model_tag="chain_lora")
    assert len(seen["pairs"]) == 160 + 32  # training + held-out pairs, in one pass
    expected = real_reference(starting, seen["pairs"], 8, tok.get_bos_token_id(), "cpu")
    assert torch.allclose(seen["ref"], expected, atol=1e-4)

    assert trainer.history[0][1] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is the reference
    (_, start), (_, end) = trainer.eval_history
    assert start["val/rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # held out: policy == reference too
    assert end["val/rewards/accuracies"] >= 0.9 and end["val/rewards/margins"] > 1.0, end
    lora_dir = root / "chatdpo_checkpoints" / "chain_lora"
    meta = json.loads((lora_dir / "meta_000010.json").read_text())
    assert meta["base"] == {"source": "sft", "model_tag": "chain_lora", "step": 3} and meta["stage"] == "dpo"
    assert all("lora_" in key for key in torch.load(lora_dir / "model_000010.pt", weights_only=True))  # adapters only
    # rebuilt through both adapters (base -> SFT adapter merged -> DPO adapter merged)
    final, _, _ = load_model("dpo", "cpu", "eval", model_tag="chain_lora")
    x = probe(V, seed=1)
    trainer.model.eval()
    with torch.no_grad():
        assert (final(x) - trainer.model(x)).abs().max().item() <= 1e-4

MID = ["--model-tag", "d4", "--device", "cpu", "--device-batch-size", "4", "--max-seq-len", "48",
       "--total-batch-size", "384", "--log-every", "1", "--eval-tokens", "400", "--lora-rank", "4",
       "--lora-lr", "3e-3"]

def test_mid_lora_resumes_exactly(base):
    root, _ = base
    args = MID + ["--data", root / "reverse.jsonl", "--data-only", "--num-iterations", "6", "--save-every", "3",
                  "--eval-every", "-1", "--warmup-ratio", "0.3", "--output-tag", "mid"]
    first = run_main("mid_train", args)
    full = [loss for _, loss in first.history]
    full_adapters = {k: v.clone() for k, v in lora_state_dict(first.model).items()}
    lora_dir = root / "mid_checkpoints" / "mid_lora"
    assert not (root / "mid_checkpoints" / "mid").exists()
    assert {p.name for p in lora_dir.glob("*_000003*")} == {"model_000003.pt", "meta_000003.json",
                                                           "optim_000003_rank0.pt"}
    for path in lora_dir.glob("*_000006*"):  # as if killed after step 3
        path.unlink()
    resumed = run_main("mid_train", args + ["--resume"])
    assert [s for s, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == pytest.approx(full[3:], abs=1e-6)
    for key, value in lora_state_dict(resumed.model).items():
        assert torch.allclose(value, full_adapters[key], atol=1e-7), key
    assert json.loads((lora_dir / "meta_000006.json").read_text())["loader_state"]["kind"] == "mid conversations"

    # resuming with other LoRA settings, or without LoRA, is refused before any step
    rank = args.index("--lora-rank")
    with pytest.raises(SystemExit, match="trained with lora"):
        run_main("mid_train", args[:rank + 1] + ["8"] + args[rank + 2:] + ["--resume"])
    with pytest.raises(SystemExit, match="LoRA adapters"):
        run_main("mid_train", args[:rank] + args[rank + 2:] + ["--output-tag", "mid_lora", "--resume"])

@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(base):
    """LoRA under torchrun (sharded DistAdamW over the adapters, per-rank optimizer files) gives the
    losses and adapters of one process with gradient accumulation."""
    root, _ = base
    common = SFT + ["--data", root / "reverse.jsonl", "--data-only", "--examples-per-step", "4",
                    "--num-iterations", "3", "--eval-every", "-1", "--device-batch-size", "2"]
    one = run_main("chat_sft", common + ["--output-tag", "one"])
    proc = run_script("chat_sft", root, common + ["--output-tag", "ddp"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re
    ddp_losses = [float(x) for x in re.findall(r"sft step \d+/\d+ .*?\| loss ([\d.]+)", proc.stdout)]
    assert max(abs(a - b) for (_, a), b in zip(one.history, ddp_losses)) < 2e-4
    ddp_dir = root / "chatsft_checkpoints" / "ddp_lora"
    assert {p.name for p in ddp_dir.glob("optim_*")} == {"optim_000003_rank0.pt", "optim_000003_rank1.pt"}
    ddp_state = torch.load(ddp_dir / "model_000003.pt", weights_only=True)
    for key, value in lora_state_dict(one.model).items():
        assert torch.allclose(value, ddp_state[key], atol=1e-4), key

