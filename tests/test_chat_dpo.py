"""DPO: the loss against hand formulas (ln 2 when the policy is the reference, IPO), truncation never
empties an answer, dropped pairs are counted, the precomputed reference equals one-at-a-time
scoring, a tiny model learns a clear preference (held-out accuracy and margin rise), exact
resume, torchrun, and bad user files fail fast."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from nanochat.dpo import (collate_pairs, dpo_loss, pair_losses, reference_logps, tokenize_pairs, truncate_pair)
from nanochat.gpt import GPT, GPTConfig
from posttrain_helpers import offline_base_dir, run_main, run_script, tree_snapshot, write_jsonl

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = ["--source", "base", "--device", "cpu", "--log-every", "1", "--min-prompt-tokens", "4",
        "--min-response-tokens", "2"]
WORDS = ["the", "cat", "dog", "runs", "fast", "very", "nice", "hello"]

def preference_pairs(n, seed):
    """Chosen answers end in 'good', rejected ones in 'bad'; otherwise the same words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        pairs.append({"prompt": "say something " + rng.choice(WORDS), "chosen": body + " good",
                      "rejected": body + " bad"})
    return pairs

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with offline_base_dir(tmp_path_factory) as (root, tok):
        write_jsonl(root / "pairs.jsonl", preference_pairs(320, seed=0))
        write_jsonl(root / "val_pairs.jsonl", preference_pairs(48, seed=1))
        yield root, tok

def test_loss_formulas():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16) * 5 for _ in range(4))
    beta = 0.3
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, "sigmoid")
    h = (pc - rc) - (pr - rr)
    assert torch.allclose(losses, torch.log1p(torch.exp(-beta * h)), atol=1e-5)
    assert torch.allclose(chosen_rewards, beta * (pc - rc)) and torch.allclose(rejected_rewards, beta * (pr - rr))
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, "ipo")
    assert torch.allclose(ipo, (h - 1 / (2 * beta)) ** 2)
    # policy == reference: ln 2 (DPO) and 1 / (4 beta^2) (IPO), whatever the log-probs
    assert torch.allclose(dpo_loss(pc, pr, pc, pr, beta)[0], torch.full((16,), math.log(2)), atol=1e-7)
    assert torch.allclose(dpo_loss(pc, pr, pc, pr, beta, "ipo")[0], torch.full((16,), 1 / (4 * beta ** 2)))
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(pc, pr, rc, rr, beta, "hinge")

def test_truncation_never_empties_an_answer():
    rng = random.Random(0)
    bos, start = 1000, 1001
    for _ in range(2000):
        prompt = [bos] + [rng.randrange(100) for _ in range(rng.randint(0, 60))] + [start]
        chosen = [rng.randrange(100) for _ in range(rng.randint(1, 60))]
        rejected = [rng.randrange(100) for _ in range(rng.randint(1, 60))]
        T, min_prompt, min_response = rng.randint(8, 80), rng.randint(2, 10), rng.randint(1, 6)
        fitted = truncate_pair(prompt, chosen, rejected, T, min_prompt, min_response)
        if fitted is None:  # only when even the shortest prompt leaves too little room
            assert T - min(len(prompt), min_prompt) < min_response
            continue
        p, c, r, cut = fitted
        assert len(p) + len(c) <= T and len(p) + len(r) <= T
        assert p[0] == bos and p[-1] == start and p == prompt[:1] + prompt[len(prompt) - len(p) + 1:]
        assert c == chosen[:len(c)] and r == rejected[:len(r)]
        assert len(c) >= min(len(chosen), min_response) and len(r) >= min(len(rejected), min_response)
        if cut is None:
            assert (p, c, r) == (prompt, chosen, rejected)
        if cut == "response":  # the prompt was cut first, as far as allowed
            assert len(p) == min(len(prompt), min_prompt)

def test_dropped_pairs_are_counted(base):
    _, tok = base
    prompt = [{"role": "user", "content": "say something"}]
    items = [
        {"prompt_messages": prompt, "chosen": "the cat good", "rejected": "the cat bad"},  # kept
        {"prompt_messages": prompt, "chosen": "", "rejected": "the cat bad"},  # empty
        {"prompt_messages": prompt, "chosen": "the dog", "rejected": "the dog"},  # identical
        {"prompt_messages": prompt, "chosen": "the cat runs " * 20 + "good", "rejected": "the cat runs " * 20 + "bad"},
        {"prompt_messages": [{"role": "user", "content": "hello " * 40}], "chosen": "yes", "rejected": "no"},  # prompt cut
    ]
    pairs, counts = tokenize_pairs(items, tok, max_seq_len=24, min_prompt_tokens=8, min_response_tokens=4)
    # the long pair differs only past the cut: dropped after truncation
    assert counts == {"kept": 2, "dropped_empty": 1, "dropped_identical": 1, "dropped_identical_after_truncation": 1,
                      "truncated_prompt": 1}
    _, counts = tokenize_pairs(items, tok, max_seq_len=24, min_prompt_tokens=8, min_response_tokens=20)
    assert counts["dropped_too_long"] == 1 and counts["kept"] == 2
    end = tok.encode_special("<|assistant_end|>")
    prompt_ids, chosen, rejected = pairs[0]
    assert prompt_ids == tok.render_for_completion({"messages": prompt})
    assert chosen == tok.encode("the cat good") + [end] and rejected == tok.encode("the cat bad") + [end]

def test_precomputed_reference_matches_one_pair_at_a_time(base):
    _, tok = base
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    items = [{"prompt_messages": [{"role": "user", "content": p["prompt"]}], "chosen": p["chosen"],
              "rejected": p["rejected"]} for p in preference_pairs(10, seed=3)]
    pairs, _ = tokenize_pairs(items, tok, max_seq_len=64)
    ref = reference_logps(model, pairs, batch_size=4, pad_id=0, device="cpu")
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        for j, answer in enumerate((chosen, rejected)):
            ids = torch.tensor([prompt + answer])
            logits = model(ids[:, :-1])[0, len(prompt) - 1:]
            expected = F.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer)[:, None]).sum()
            assert ref[i, j].item() == pytest.approx(expected.item(), abs=1e-4)
    # with the policy equal to the reference: ln 2, zero rewards; the SFT term adds the chosen NLL
    inputs, targets = collate_pairs(pairs, pad_id=0)
    batch = {"inputs": inputs, "targets": targets, "ref": ref}
    losses, stats = pair_losses(model, batch, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-6)
    assert stats["rewards/margins"].abs().max() < 1e-5 and stats["rewards/accuracies"].sum() == 0
    with_sft, _ = pair_losses(model, batch, beta=0.1, sft_weight=0.5)
    chosen_nll = torch.tensor([-ref[i, 0].item() / len(pairs[i][1]) for i in range(len(pairs))])
    assert torch.allclose(with_sft - losses, 0.5 * chosen_nll, atol=1e-4)
    normed, normed_stats = pair_losses(model, batch, beta=0.1, length_norm=True)
    assert torch.allclose(normed_stats["logps/chosen"], ref[:, 0] / torch.tensor([len(p[1]) for p in pairs]), atol=1e-4)

def held_out_curve(trainer, name):
    return [metrics[f"val/{name}"] for _, metrics in trainer.eval_history]

def test_dpo_learns_a_clear_preference(base):
    """From an untrained model: the first step's loss is ln 2 (policy == the precomputed reference);
    on held-out pairs the reward accuracy goes from 0 to ~1 and the margin grows."""
    root, _ = base
    trainer = run_main("chat_dpo", TINY + ["--data", root / "pairs.jsonl", "--data-only",
                                           "--val-mixture", f"preferences:{root / 'val_pairs.jsonl'}",
                                           "--device-batch-size", "8", "--examples-per-step", "16",
                                           "--num-iterations", "20", "--init-lr-frac", "0.2", "--eval-every", "10",
                                           "--output-tag", "dpo"])
    assert trainer.history[0][1] == pytest.approx(math.log(2), abs=1e-6)
    accuracy, margins = held_out_curve(trainer, "rewards/accuracies"), held_out_curve(trainer, "rewards/margins")
    assert [s for s, _ in trainer.eval_history] == [0, 10, 20]
    assert accuracy[0] == 0.0 and accuracy[-1] >= 0.9, accuracy
    assert margins[0] == pytest.approx(0.0, abs=1e-5) and margins[-1] > 0.5, margins
    assert held_out_curve(trainer, "loss")[-1] < 0.6 * math.log(2)
    step, train_metrics = trainer.metrics_history[-1]
    assert step == 20 and set(train_metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                                 "rewards/accuracies", "logps/chosen", "logps/rejected"}
    assert train_metrics["rewards/margins"] == pytest.approx(
        train_metrics["rewards/chosen"] - train_metrics["rewards/rejected"], abs=1e-5)
    from nanochat.checkpoint_manager import load_model
    _, _, meta = load_model("dpo", "cpu", "eval", model_tag="dpo")
    assert meta["step"] == 20 and meta["pairs"]["kept"] == 320 and meta["val/rewards/accuracies"] == accuracy[-1]
    assert "val/rewards/margins" in (root / "report" / "chat-dpo.md").read_text()  # the report card's section

def test_ipo_with_length_norm(base):
    root, _ = base
    beta = 0.5
    trainer = run_main("chat_dpo", TINY + ["--data", root / "pairs.jsonl", "--data-only", "--loss", "ipo",
                                           "--length-norm", "--beta", str(beta), "--device-batch-size", "8",
                                           "--examples-per-step", "16", "--num-iterations", "12", "--init-lr-frac",
                                           "0.2", "--eval-every", "-1", "--output-tag", "ipo"])
    assert trainer.history[0][1] == pytest.approx(1 / (4 * beta ** 2), rel=1e-5)
    assert trainer.history[-1][1] < 0.5 * trainer.history[0][1]
    assert trainer.eval_history[-1][1]["val/rewards/margins"] > 0

def test_resume_continues_exactly(base):
    root, _ = base
    args = TINY + ["--data", root / "pairs.jsonl", "--data-only", "--device-batch-size", "4", "--examples-per-step", "8",
                   "--num-iterations", "6", "--save-every", "3", "--eval-every", "-1", "--eval-pairs", "8",
                   "--init-lr-frac", "0.2", "--output-tag", "dpo_resume"]
    full = [loss for _, loss in run_main("chat_dpo", args).history]
    for path in (root / "chatdpo_checkpoints" / "dpo_resume").glob("*_000006*"):  # as if killed after step 3
        path.unlink()
    resumed = run_main("chat_dpo", args + ["--resume"])  # the reference is still the starting model
    assert [s for s, _ in resumed.history] == [4, 5, 6]
    assert [loss for _, loss in resumed.history] == pytest.approx(full[3:], abs=1e-6)

@pytest.mark.slow
def test_torchrun_two_ranks(base):
    root, _ = base
    proc = run_script("chat_dpo", root, TINY + ["--data", root / "pairs.jsonl", "--data-only", "--device-batch-size", "4",
                                                "--examples-per-step", "8", "--num-iterations", "3", "--eval-every", "-1",
                                                "--eval-pairs", "16", "--output-tag", "dpo_ddp"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "grad accumulation: 1" in proc.stdout and "dpo step 00003/00003" in proc.stdout
    assert "loss 0.6931" in proc.stdout  # step 1: policy == reference on both ranks
    assert (root / "chatdpo_checkpoints" / "dpo_ddp" / "meta_000003.json").exists()

@pytest.mark.parametrize("record, where", [
    ('{"prompt": "hi", "chosen": "the cat", "rejected": "the cat"}', ":2: rejected"),
    ('{"prompt": "hi", "chosen": "", "rejected": "the cat"}', ":2: chosen"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}', ":2: prompt[0].role"),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b"', ":2: json"),

])
def test_bad_user_file_fails_fast_and_harms_nothing(base, tmp_path, record, where):
    root, _ = base
    existing = root / "chatdpo_checkpoints" / "keep"
    existing.mkdir(parents=True, exist_ok=True)
    (existing / "meta_000001.json").write_text('{"step": 1}')
    before = tree_snapshot(root / "chatdpo_checkpoints")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "good", "rejected": "bad"}\n' + record + "\n")
    with pytest.raises(SystemExit) as error:  # no --data-only: checked before the defaults are fetched
        run_main("chat_dpo", TINY + ["--data", bad, "--output-tag", "keep", "--num-iterations", "1"])
    assert f"{bad}{where}" in str(error.value)
    assert tree_snapshot(root / "chatdpo_checkpoints") == before
