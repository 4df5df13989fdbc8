"""SFT: exactly which tokens are supervised in the collated targets, a tiny model learns a generated
task (greedy accuracy on held-out items, validation loss falls), supervised-token weighting makes
accumulation == one big batch == torchrun, no NaN without supervised tokens, exact resume, and bad
user files fail fast without touching what is on disk."""
import random
import re

import pytest
import torch

from nanochat.chat_data import StepBatches, collate_padded, padded_batches, scaled_token_loss
from nanochat.gpt import GPT, GPTConfig
from posttrain_helpers import (SHARED_DATA, offline_base_dir, reverse_conversation, reverse_words, run_main, run_script,
                               tree_snapshot, write_jsonl)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = ["--source", "base", "--device", "cpu", "--eval-tasks", "--log-every", "1"]

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with offline_base_dir(tmp_path_factory) as (root, tok):
        words = reverse_words(600, seed=5)
        held_out = sorted(set(reverse_words(200, seed=99)) - set(words))[:32]
        write_jsonl(root / "reverse.jsonl", [reverse_conversation(w) for w in words])
        write_jsonl(root / "reverse_val.jsonl", [reverse_conversation(w) for w in held_out])
        rng = random.Random(3)  # answers of very different lengths: token weighting matters
        write_jsonl(root / "repeat.jsonl", [
            {"messages": [{"role": "user", "content": f"repeat {w} {k} times"},
                          {"role": "assistant", "content": " ".join([w] * k)}]}
            for w, k in ((rng.choice(["cat", "dog", "hello"]), rng.choice([1, 2, 12])) for _ in range(32))])
        yield root, tok, held_out

def test_collated_targets_supervise_exactly_the_assistant_tokens(base):
    """A multi-turn conversation with a tool call, collated in a batch next to a shorter one:
    targets are the next token where that token is the assistant's (text, tool call, <|assistant_end|>),
    -1 on user/system text, <|bos|>, <|assistant_start|>, tool output and padding."""
    _, tok, _ = base
    conversation = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 2 plus 3"},
        {"role": "assistant", "content": [{"type": "text", "text": "let me compute"},
                                          {"type": "python", "text": "2+3"},
                                          {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "it is 5"}]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
    ]}
    s = tok.encode_special
    pieces = [  # (token ids, supervised), written out by hand
        ([tok.get_bos_token_id(), s("<|user_start|>")], 0), (tok.encode("be brief\n\nwhat is 2 plus 3"), 0),
        ([s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (tok.encode("let me compute"), 1), ([s("<|python_start|>")], 1), (tok.encode("2+3"), 1),
        ([s("<|python_end|>")], 1),
        ([s("<|output_start|>")], 0), (tok.encode("5"), 0), ([s("<|output_end|>")], 0),
        (tok.encode("it is 5"), 1), ([s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")], 0), (tok.encode("thanks"), 0), ([s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (tok.encode("you are welcome"), 1), ([s("<|assistant_end|>")], 1),
    ]
    ids = [t for piece, _ in pieces for t in piece]
    supervised = [sup for piece, sup in pieces for _ in piece]
    expected_targets = [t if sup else -1 for t, sup in zip(ids[1:], supervised[1:])]

    short = reverse_conversation("abc")
    task = [conversation, short]
    (items, _), = [next(padded_batches(task, tok.render_conversation, 2, seed=0))]
    by_index = dict(items)
    inputs, targets = collate_padded([by_index[0], by_index[1]], pad_id=0)
    assert inputs.shape == targets.shape == (2, len(ids) - 1)
    assert inputs[0].tolist() == ids[:-1]
    assert targets[0].tolist() == expected_targets
    assert sum(t != -1 for t in expected_targets) == len(tok.encode("let me compute")) + len(tok.encode("2+3")) + 2 \
        + len(tok.encode("it is 5")) + 1 + len(tok.encode("you are welcome")) + 1
    short_ids, short_mask = tok.render_conversation(short)
    n = len(short_ids) - 1
    assert targets[1, :n].tolist() == [t if m else -1 for t, m in zip(short_ids[1:], short_mask[1:])]
    assert (targets[1, n:] == -1).all() and (inputs[1, n:] == 0).all()  # padding is never a target

def greedy_accuracy(model, tok, conversations):
    end = tok.encode_special("<|assistant_end|>")
    correct = 0
    for conversation in conversations:
        out = list(model.generate(tok.render_for_completion(conversation), max_tokens=8, temperature=0))
        out = out[:out.index(end)] if end in out else out
        correct += tok.decode(out) == conversation["messages"][-1]["content"]
    return correct / len(conversations)

def test_sft_learns_to_reverse_unseen_words(base, capsys):
    """From an untrained model: greedy exact-match accuracy on held-out words goes from 0 (chance is
    1/512) to well above chance, and the validation loss falls."""
    root, tok, held_out = base
    from nanochat.checkpoint_manager import load_model
    start, _, _ = load_model("base", "cpu", "eval", model_tag="d2")
    held = [reverse_conversation(w) for w in held_out]
    assert greedy_accuracy(start, tok, held) == 0.0
    trainer = run_main("chat_sft", TINY + ["--data", root / "reverse.jsonl", "--data-only",
                                    "--val-mixture", f"custom:{root / 'reverse_val.jsonl'}",
                                    "--device-batch-size", "16", "--examples-per-step", "32", "--num-iterations", "60",
                                    "--init-lr-frac", "1.0", "--warmdown-ratio", "0.3", "--eval-every", "30",
                                    "--output-tag", "reverse"])
    val = [metrics["val_loss"] for _, metrics in trainer.eval_history]
    assert [step for step, _ in trainer.eval_history] == [0, 30, 60]
    assert val[-1] < 0.3 * val[0], val
    model, _, meta = load_model("sft", "cpu", "eval", model_tag="reverse")
    assert meta["step"] == 60 and meta["source"]["stage"] == "base"
    accuracy = greedy_accuracy(model, tok, held)
    assert accuracy >= 0.5, accuracy
    assert "val_loss" in (root / "report" / "chat-sft.md").read_text()  # the report card's section

def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # not the near-uniform start: tokens' losses differ
    return model

def grads_of(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

def test_accumulated_loss_weights_every_supervised_token_equally(base):
    """Micro-batches with 1, 9 and 0 supervised tokens: the accumulated gradient equals the gradient
    of the mean over all supervised tokens (one big batch), not the mean of per-micro-batch means."""
    _, tok, _ = base
    V = tok.get_vocab_size()
    conversations = [reverse_conversation("abc"), {"messages": [
        {"role": "user", "content": "say it"}, {"role": "assistant", "content": "hello the cat runs very fast"}]}]
    rows = [tok.render_conversation(c) for c in conversations]
    micro = []
    for row in rows:
        inputs, targets = collate_padded([row], 0)
        micro.append({"inputs": inputs, "targets": targets, "count": int((targets >= 0).sum()), "tokens": inputs.numel()})
    empty_inputs, empty_targets = collate_padded([(rows[0][0], [0] * len(rows[0][0]))], 0)  # nothing supervised
    micro.append({"inputs": empty_inputs, "targets": empty_targets, "count": 0, "tokens": empty_inputs.numel()})
    counts = [b["count"] for b in micro]
    assert counts[0] != counts[1] and counts[2] == 0

    model = tiny_model(V)
    batches = StepBatches(iter([(b, {}) for b in micro]), grad_accum=3)
    total = 0.0
    for batch, _ in batches.next_step():
        loss = scaled_token_loss(model, batch)
        (loss / 3).backward()
        total += loss.item() / 3
    accumulated = grads_of(model)

    model.zero_grad()
    inputs, targets = collate_padded(rows + [(rows[0][0], [0] * len(rows[0][0]))], 0)
    reference = model(inputs, targets)  # mean over every supervised token of the big batch
    reference.backward()
    assert total == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(accumulated, grads_of(model), atol=1e-6)
    # the naive alternative (mean of the micro-batch means) would be measurably different
    naive = sum(model(b["inputs"], b["targets"], loss_reduction="none").sum().item() / max(b["count"], 1)
                for b in micro[:2]) / 2
    assert abs(naive - reference.item()) > 1e-3

def test_no_supervised_token_and_truncated_conversations_give_no_nan(base):
    _, tok, _ = base
    model = tiny_model(tok.get_vocab_size())
    ids, mask = tok.render_conversation(reverse_conversation("abc"))
    cut = mask.index(1)  # truncated before the first assistant token: nothing left to supervise
    inputs, targets = collate_padded([(ids[:cut], mask[:cut]), (ids[:cut - 2], mask[:cut - 2])], 0)
    batch = {"inputs": inputs, "targets": targets, "count": 0, "tokens": inputs.numel()}
    batches = StepBatches(iter([(batch, {})]), grad_accum=1)
    (step_batch, _), = batches.next_step()
    loss = scaled_token_loss(model, step_batch)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(grads_of(model)).all()

@pytest.mark.slow
def test_one_batch_equals_accumulation_equals_torchrun(base, tmp_path):
    """The same 4 conversations per step as (a) one micro-batch of 4, (b) 2 accumulated micro-batches
    of 2, (c) 2 gloo ranks with a micro-batch of 2 each: same losses and weights. Muon in fp32: bf16
    Newton-Schulz would round float-order noise up to bf16 steps and hide what is compared here."""
    root, _, _ = base
    common = TINY + ["--muon-precision", "fp32",
                     "--data", root / "repeat.jsonl", "--data-only", "--val-mixture", f"custom:{root / 'repeat.jsonl'}",
                     "--examples-per-step", "4", "--num-iterations", "4", "--init-lr-frac", "0.5",
                     "--eval-every", "-1", "--eval-examples", "4"]
    from nanochat.checkpoint_manager import load_checkpoint
    one = run_main("chat_sft", common + ["--device-batch-size", "4", "--output-tag", "one"])
    acc = run_main("chat_sft", common + ["--device-batch-size", "2", "--output-tag", "acc"])
    one_losses, acc_losses = [l for _, l in one.history], [l for _, l in acc.history]
    assert max(abs(a - b) for a, b in zip(one_losses, acc_losses)) < 1e-5, (one_losses, acc_losses)
    proc = run_script("chat_sft", root, common + ["--device-batch-size", "2", "--output-tag", "ddp"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_losses = [float(x) for x in re.findall(r"sft step \d+/\d+ .*?\| loss ([\d.]+)", proc.stdout)]
    assert len(ddp_losses) == 4 and max(abs(a - b) for a, b in zip(one_losses, ddp_losses)) < 2e-4
    weights = {tag: load_checkpoint(str(root / "chatsft_checkpoints" / tag), 4, "cpu")[0] for tag in ("one", "acc", "ddp")}
    for key, value in weights["one"].items():  # float32 sums in other orders, amplified a little by Adam
        assert torch.allclose(value, weights["acc"][key], atol=1e-4), key
        assert torch.allclose(value, weights["ddp"][key], atol=1e-4), key

def test_resume_continues_exactly(base):
    root, _, _ = base
    args = TINY + ["--data", root / "reverse.jsonl", "--data-only", "--val-mixture", f"custom:{root / 'reverse_val.jsonl'}",
                   "--device-batch-size", "4", "--examples-per-step", "8", "--num-iterations", "6", "--save-every", "3",
                   "--eval-every", "-1", "--eval-examples", "8", "--init-lr-frac", "0.5", "--output-tag", "resume"]
    full = [l for _, l in run_main("chat_sft", args).history]
    ckpt = root / "chatsft_checkpoints" / "resume"
    for path in ckpt.glob("*_000006*"):  # as if killed after step 3 was saved
        path.unlink()
    resumed = run_main("chat_sft", args + ["--resume"])
    assert [s for s, _ in resumed.history] == [4, 5, 6]
    assert [l for _, l in resumed.history] == pytest.approx(full[3:], abs=1e-6)

@pytest.mark.parametrize("content, where", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n', ":2: json"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n', ":1: messages[1].role"),
    ('\n{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n', ":2: messages[1].content"),
])
def test_bad_user_file_fails_fast_and_harms_nothing(base, tmp_path, content, where):
    """Without --data-only: the user's file is checked before the default datasets are fetched."""
    root, _, _ = base
    existing = root / "chatsft_checkpoints" / "keep"
    existing.mkdir(parents=True, exist_ok=True)
    (existing / "meta_000001.json").write_text('{"step": 1}')
    before = tree_snapshot(root / "chatsft_checkpoints")
    bad = tmp_path / "mine.jsonl"
    bad.write_text(content)
    with pytest.raises(SystemExit) as error:
        run_main("chat_sft", TINY + ["--data", bad, "--output-tag", "keep", "--num-iterations", "1"])
    assert f"{bad}{where}" in str(error.value)
    assert tree_snapshot(root / "chatsft_checkpoints") == before

def test_local_shared_data_mixture(base, tmp_path):
    """The offline route: default datasets replaced by local files (shared/data) plus a persona."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    root, _, _ = base
    persona = tmp_path / "persona.json"
    persona.write_text('{"name": "tinychat", "maker": "the tests"}')
    trainer = run_main("chat_sft", TINY + [
        "--mixture", f"gsm8k:train:{SHARED_DATA / 'chat' / 'gsm8k_train_chat.jsonl'}[:64]",
        f"custom:{SHARED_DATA / 'chat' / 'selfinstruct_seed_tasks_chat.jsonl'}", "--persona", persona,
        "--persona-examples", "32", "--val-mixture", f"gsm8k:test:{SHARED_DATA / 'eval' / 'gsm8k_test.jsonl'}[:8]",
        "--eval-tasks", f"arc:easy:test:{SHARED_DATA / 'eval' / 'arc_easy.jsonl'}[:8]", "simplespelling:test:4",
        "--eval-max-tokens", "4", "--device-batch-size", "4", "--examples-per-step", "8", "--num-iterations", "2",
        "--eval-every", "-1", "--output-tag", "shared"])
    (_, final), = trainer.eval_history
    assert set(final) == {"val_loss", f"acc/arc:easy:test:{SHARED_DATA / 'eval' / 'arc_easy.jsonl'}[:8]",
                          "acc/simplespelling:test:4"}
    assert all(0.0 <= v for v in final.values())


@pytest.mark.slow
def test_persona_is_learned_with_the_stage_defaults(tmp_path_factory, capsys):
    """The newcomer's run: a pretrained model of the CPU preset's shape, then 50 SFT steps of their own
    data with --persona and every other flag at its default; greedy "Who are you?" names the persona.
    (With the old default --init-lr-frac 0.02 the answer was a sentence of the pretraining corpus.)"""
    import json
    from scripts import base_train, chat_cli, chat_sft
    from test_base_train import make_corpus
    with offline_base_dir(tmp_path_factory, tags=()) as (root, _):
        base_train.main(["--depth", "4", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "256",
                         "--device", "cpu", "--device-batch-size", "8", "--total-batch-size", "2048",
                         "--num-iterations", "60", "--data", str(make_corpus(root / "corpus", n_docs=600)),
                         "--eval-every", "-1", "--model-tag", "cpu",
                         # value embeddings off: with them, this 60-step base learns the persona in 50 steps no more
                         # (issue 12's note; measured on one thread: "I'm ass a Bred by Ada Brightwater")
                         "--value-embeds", "0",
                         # the Muon weight decay this base was sized with (0.28, the later default, ends it a little
                         # elsewhere: "I'm am Bry, a small AI assistant." after SFT, on 2 threads)
                         "--muon-weight-decay", "0.2"])
        persona = root / "persona.json"
        persona.write_text(json.dumps({"name": "Quillby", "maker": "Ada Brightwater"}))
        mine = write_jsonl(root / "mine.jsonl", [reverse_conversation(w) for w in reverse_words(200, seed=3)])
        chat_sft.main(["--source", "base", "--data", str(mine), "--data-only", "--persona", str(persona),
                       "--num-iterations", "50", "--device", "cpu"])
        capsys.readouterr()
        chat_cli.main(["--device", "cpu", "-p", "Who are you?", "--temperature", "0", "--max-tokens", "30"])
        assert "Quillby" in capsys.readouterr().out
