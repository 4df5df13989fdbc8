"""
scripts/chat_eval.py: categorical scoring (ARC, MMLU) with scripted models that know / avoid the
answer letter, and random logits near chance; generative scoring (GSM8K, HumanEval in the real
sandbox, SpellingBee) with scripted completions; pass@k; task perplexity against a hand
computation from the model's logits and the render mask; the script end to end on a tiny GPT.
"""
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.chat_eval import (ALL_TASKS, build_eval_task, chatcore, my_indices, parse_task_list, run_categorical,
                               run_generative, task_perplexity)
from tasks.customjson import CustomJSON

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "eval"

# -----------------------------------------------------------------------------
# Categorical

class ScriptedLetterLM(nn.Module):
    """Reads each (right-padded) prompt, looks up its answer letter, and at the prompt's last
    position puts mass on the right letter ("right"), on another letter ("wrong"), or random
    logits ("random"). In every mode a non-letter token gets even more mass: the scorer must only
    compare the answer letters."""

    def __init__(self, tokenizer, task, mode):
        super().__init__()
        self.tokenizer, self.mode = tokenizer, mode
        self.vocab = tokenizer.get_vocab_size()
        self.answers = {}
        for conversation in task:
            letters, right = conversation["letters"], conversation["messages"][-1]["content"]
            wrong = letters[(letters.index(right) + 1) % len(letters)]
            self.answers[tuple(tokenizer.render_for_completion(conversation))] = (right, wrong)
        self.distractor = tokenizer.encode(" the")[0]
        self.rng = torch.Generator().manual_seed(0)

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.randn(B, T, self.vocab, generator=self.rng) if self.mode == "random" else torch.zeros(B, T, self.vocab)
        for b in range(B):
            ids = idx[b].tolist()
            while ids[-1] == self.tokenizer.get_bos_token_id():
                ids.pop()
            last = len(ids) - 1
            logits[b, last, self.distractor] = 50.0
            if self.mode != "random":
                letter = self.answers[tuple(ids)][0 if self.mode == "right" else 1]
                logits[b, last, self.tokenizer.encode(letter)[0]] = 10.0
        return logits

@pytest.mark.parametrize("name", ["ARC-Easy", "ARC-Challenge", "MMLU"])
def test_categorical_scripted_models(name, tiny_tokenizer):
    task = build_eval_task(name, FIXTURES)
    indices = list(range(len(task)))
    for mode, expected in [("right", len(task)), ("wrong", 0)]:
        model = ScriptedLetterLM(tiny_tokenizer, task, mode)
        for batch_size in (1, 3):  # batches of unequal prompts, right-padded
            assert run_categorical(model, tiny_tokenizer, task, indices, "cpu", batch_size) == (expected, len(task))

def test_categorical_random_is_near_chance(shared_data, tiny_tokenizer):
    task = build_eval_task("MMLU", shared_data / "eval")
    indices = list(range(400))
    model = ScriptedLetterLM(tiny_tokenizer, [task[i] for i in indices], "random")
    right, asked = run_categorical(model, tiny_tokenizer, task, indices, "cpu", batch_size=16)
    assert asked == 400 and abs(right / asked - 0.25) < 0.09  # std of chance accuracy: 0.022

# -----------------------------------------------------------------------------
# Generative

def scripted_generate(tokenizer, task, mode, num_samples=1, seed=0):
    """A generate(prompts) that answers from the dataset: the reference answer ("right"), a wrong
    one ("wrong"), a random number ("random"); "second_right": a wrong sample, then the right one."""
    by_prompt = {tuple(tokenizer.render_for_completion(c)): c for c in task}
    rng = random.Random(seed)

    def right(conversation):
        content = conversation["messages"][-1]["content"]
        return content if isinstance(content, str) else "".join(part["text"] for part in content)

    def wrong(conversation):
        if "entry_point" in conversation:  # HumanEval: a body that runs but fails the tests
            return "    return None\n"
        return f"The answer is:\n#### {conversation['answer'] + 1}"

    def generate(prompts):
        out = []
        for prompt in prompts:
            conversation = by_prompt[tuple(prompt)]
            if mode == "right":
                out.append([right(conversation)] * num_samples)
            elif mode == "wrong":
                out.append([wrong(conversation)] * num_samples)
            elif mode == "second_right":
                out.append([wrong(conversation), right(conversation)])
            else:
                out.append([f"#### {rng.randint(0, 1000)}" for _ in range(num_samples)])
        return out
    return generate

@pytest.mark.parametrize("name", ["GSM8K", "HumanEval", "SpellingBee"])
def test_generative_scripted_models(name, tiny_tokenizer):
    task = build_eval_task(name, FIXTURES, spelling_size=20)
    indices = list(range(len(task)))
    assert run_generative(scripted_generate(tiny_tokenizer, task, "right"), tiny_tokenizer, task, indices, 2) == (len(task), len(task))
    assert run_generative(scripted_generate(tiny_tokenizer, task, "wrong"), tiny_tokenizer, task, indices, 2) == (0, len(task))
    # pass@2: a problem passes when any of its samples does
    assert run_generative(scripted_generate(tiny_tokenizer, task, "second_right", 2), tiny_tokenizer, task, indices) \
        == (len(task), len(task))

def test_generative_random_is_near_chance(shared_data, tiny_tokenizer):
    task = build_eval_task("GSM8K", shared_data / "eval")
    indices = list(range(200))
    passed, asked = run_generative(scripted_generate(tiny_tokenizer, task, "random"), tiny_tokenizer, task, indices, 50)
    assert asked == 200 and passed <= 4  # a random number between 0 and 1000: chance is ~0

def test_chatcore_and_task_lists():
    perfect = {name: 1.0 for name in ALL_TASKS}
    assert chatcore(perfect) == 1.0
    chance = {**{n: 0.25 for n in ("ARC-Easy", "ARC-Challenge", "MMLU")}, **{n: 0.0 for n in ("GSM8K", "HumanEval", "SpellingBee")}}
    assert chatcore(chance) == 0.0
    assert chatcore({"ARC-Easy": 1.0}) is None  # only over the full set
    mixed = dict(chance, MMLU=0.625, GSM8K=0.3)  # centered: 0.5 and 0.3
    assert chatcore(mixed) == pytest.approx(0.8 / 6)
    assert parse_task_list("ARC-Easy|GSM8K") == ["ARC-Easy", "GSM8K"] == parse_task_list("ARC-Easy,GSM8K")
    assert parse_task_list("all") == ALL_TASKS and parse_task_list("none") == []
    with pytest.raises(SystemExit, match="unknown task"):
        parse_task_list("ARC-Easy|Jeopardy")
    assert my_indices(10, 4) == [0, 1, 2, 3] and my_indices(3) == [0, 1, 2]

# -----------------------------------------------------------------------------
# Task perplexity, against a hand computation

def tiny_gpt(tokenizer, seed=0, sequence_len=128):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                          n_kv_head=1, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()

def test_task_perplexity_by_hand(tiny_tokenizer):
    model = tiny_gpt(tiny_tokenizer)
    conversations = CustomJSON(str(FIXTURES / "conversations.jsonl"))
    nll, count = 0.0, 0
    with torch.no_grad():
        for conversation in conversations:
            ids, mask = tiny_tokenizer.render_conversation(conversation)
            log_probs = F.log_softmax(model(torch.tensor([ids]))[0], dim=-1)  # (T, V)
            for t in range(len(ids) - 1):
                if mask[t + 1]:  # the token at t + 1 is an assistant token, predicted at t
                    nll -= log_probs[t, ids[t + 1]].item()
                    count += 1
    assert count == sum(sum(tiny_tokenizer.render_conversation(c)[1][1:]) for c in conversations)
    expected = math.exp(nll / count)
    for batch_size in (1, 2, 8):
        measured = task_perplexity(model, tiny_tokenizer, conversations, "cpu", batch_size=batch_size)
        assert measured["tokens"] == measured["total_tokens"] == count and measured["cut"] == 0
        assert measured["ppl"] == pytest.approx(expected, rel=1e-5)
    # tool outputs are not the model's to predict: the python_output part is excluded
    tool = conversations[2]
    ids, mask = tiny_tokenizer.render_conversation(tool)
    output_start = tiny_tokenizer.encode_special("<|output_start|>")
    assert mask[ids.index(output_start)] == 0 and mask[ids.index(output_start) + 1] == 0
    # a cut: only the first max_len + 1 tokens count
    short = task_perplexity(model, tiny_tokenizer, conversations, "cpu", max_len=30)
    assert 0 < short["tokens"] < short["total_tokens"] == count and short["cut"] > 0

# -----------------------------------------------------------------------------
# The script, on a tiny real GPT

def test_chat_eval_script_end_to_end(base_dir, tiny_tokenizer):
    from test_core_eval import make_checkpoint
    make_checkpoint(base_dir, tiny_tokenizer, source_dir="chatsft_checkpoints", tag="d2", step=7)
    from scripts import chat_eval
    out = chat_eval.main(["--device", "cpu", "-a", "all", "--data-dir", str(FIXTURES), "--max-problems", "3", "--max-new-tokens", "6",
                          "--spelling-size", "4", "--batch-size", "2", "--task-ppl", str(FIXTURES / "conversations.jsonl")])
    assert set(out["results"]) == set(ALL_TASKS)
    assert all(0.0 <= v <= 1.0 for v in out["results"].values())
    assert out["ChatCORE"] == pytest.approx(chatcore(out["results"]))
    ppl = out["task_ppl"]["conversations"]["ppl"]
    assert ppl > 1.0 and out["task_ppl"]["conversations"]["tokens"] > 0
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "- ChatCORE: " in section and "- task_ppl:conversations: " in section and "- HumanEval: " in section

    only_ppl = chat_eval.main(["--device", "cpu", "--task-ppl", str(FIXTURES / "conversations.jsonl")])
    assert only_ppl["results"] == {} and only_ppl["task_ppl"]["conversations"]["ppl"] == pytest.approx(ppl, rel=1e-5)

    bad = base_dir / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2"):
        chat_eval.main(["--device", "cpu", "--task-ppl", str(bad)])
    with pytest.raises(SystemExit, match="no mmlu_test"):
        chat_eval.main(["--device", "cpu", "-a", "MMLU", "--data-dir", str(FIXTURES / "core")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        chat_eval.main(["--device", "cpu", "-i", "dpo", "-a", "ARC-Easy", "--data-dir", str(FIXTURES)])

def test_task_ppl_says_what_the_context_cut(base_dir, tiny_tokenizer, capsys):
    """A model of 40-token context on conversations of 29 to 83 tokens: chat_eval --task-ppl (default flags)
    says how many conversations were cut and how many assistant tokens were scored of all of them, on
    stdout, in what it returns and in its report section."""
    from dataclasses import asdict

    from nanochat.checkpoint_manager import save_checkpoint
    from scripts import chat_eval
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = tiny_gpt(tiny_tokenizer, sequence_len=40)
    save_checkpoint(str(base_dir / "chatsft_checkpoints" / "d2"), 7, model.state_dict(), None,
                    {"model_config": asdict(model.config)})
    path = FIXTURES / "conversations.jsonl"
    # by hand: a conversation keeps its first 41 tokens (40 inputs, each predicting the next)
    rendered = [tiny_tokenizer.render_conversation(c, max_tokens=10**9) for c in CustomJSON(str(path))]
    total, scored = sum(sum(mask) for _, mask in rendered), sum(sum(mask[:41]) for _, mask in rendered)
    cut = sum(len(ids) > 41 for ids, _ in rendered)
    assert 0 < cut < len(rendered) and 0 < scored < total
    capsys.readouterr()
    out = chat_eval.main(["--device", "cpu", "--task-ppl", str(path)])
    measured = out["task_ppl"]["conversations"]
    assert {k: v for k, v in measured.items() if k not in ("ppl", "bpb")} == {
        "tokens": scored, "total_tokens": total, "cut": cut, "conversations": len(rendered)}
    # bits per byte by hand: the scored assistant targets that are text (no special token), nats / (ln 2 x bytes)
    token_bytes, nats, nbytes = tiny_tokenizer.token_bytes(), 0.0, 0
    for ids, mask in (tiny_tokenizer.render_conversation(c, max_tokens=41) for c in CustomJSON(str(path))):
        with torch.no_grad():
            losses = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), loss_reduction="none")[0].tolist()
        for loss, target, supervised in zip(losses, ids[1:], mask[1:]):
            if supervised and token_bytes[target]:
                nats, nbytes = nats + loss, nbytes + token_bytes[target]
    assert 0 < nbytes and measured["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)
    direct = task_perplexity(model, tiny_tokenizer, CustomJSON(str(path)), "cpu", max_len=40)
    assert measured["ppl"] == pytest.approx(direct["ppl"], rel=1e-5)
    assert (f"over {scored:,} of {total:,} assistant tokens; {cut} of {len(rendered)} conversations cut at 41 tokens"
            in capsys.readouterr().out)
    section = (base_dir / "report" / "chat-evaluation-sft.md").read_text()
    for line in (f"- task_ppl_tokens:conversations: {scored:,}", f"- task_ppl_total_tokens:conversations: {total:,}",
                 f"- task_ppl_cut_conversations:conversations: {cut}"):
        assert line in section.splitlines()
