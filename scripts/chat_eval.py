"""
Evaluate a chat model on tasks, and measure how well it fits your own conversations.

    python -m scripts.chat_eval -i sft                                  # every task, the SFT model
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" --max-problems 200
    python -m scripts.chat_eval -i sft --data-dir ../shared/data/eval   # offline, local task files
    python -m scripts.chat_eval -i mid --task-ppl my_val.jsonl          # perplexity on your data
    torchrun --nproc_per_node=8 -m scripts.chat_eval -i sft

Tasks (tasks/*.py) come in two kinds:
  categorical (ARC-Easy, ARC-Challenge, MMLU): the prompt is the rendered question up to
      <|assistant_start|>; the answer is the letter whose token has the highest logit at that
      last position, among the choices' letters only. Batched.
  generative (GSM8K, HumanEval, SpellingBee): the Engine samples a completion (greedy by
      default; with --num-samples N it is pass@N), graded by the task (HumanEval runs the code
      with its unit tests in the sandbox).
ChatCORE = the mean centered accuracy (acc - baseline) / (1 - baseline) over all six tasks,
with baseline 0.25 for the 4-choice tasks and 0 for the generative ones.

--task-ppl FILE (repeatable; jsonl conversations as in DESIGN.md, or Alpaca records) reports
the per-token perplexity of the assistant turns: exp(mean negative log-likelihood over the
tokens the model is trained to produce, i.e. render_conversation's mask). Run it on held-out
conversations before and after fine-tuning to see how much closer the model got to your domain.
Without -a, --task-ppl runs alone.

Every rank takes every world_size-th problem; the counts are summed over ranks.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import SOURCES, add_checkpoint_args, find_largest_model, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, get_base_dir, get_dist_info, print0
from nanochat.report import TASK_PPL_PREFIX, get_report

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
# files looked for in --data-dir (the names of shared/data/eval), first found wins
LOCAL_FILES = {
    "ARC-Easy": ["arc_easy.jsonl"],
    "ARC-Challenge": ["arc_challenge.jsonl"],
    "MMLU": ["mmlu_test.jsonl", "mmlu_test_26subjects.jsonl"],
    "GSM8K": ["gsm8k_test.jsonl"],
    "HumanEval": ["humaneval.jsonl"],
}


def build_eval_task(name, data_dir=None, spelling_size=256):
    """The Task behind a task name: local files from data_dir, else the default (downloaded) data."""
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.spelling import SpellingBee
    if name == "SpellingBee":
        return SpellingBee(size=spelling_size, split="test")
    path = None
    if data_dir is not None:
        candidates = [os.path.join(data_dir, f) for f in LOCAL_FILES[name]]
        path = next((p for p in candidates if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"--data-dir {data_dir}: no {' or '.join(LOCAL_FILES[name])} for {name}")
    if name == "ARC-Easy":
        return ARC("easy", "test", data_path=path)
    if name == "ARC-Challenge":
        return ARC("challenge", "test", data_path=path)
    if name == "MMLU":
        return MMLU("test", data_path=path)
    if name == "GSM8K":
        return GSM8K("test", data_path=path)
    return HumanEval(data_path=path)


def _all_reduce_sum(values, device):
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def my_indices(num_problems, max_problems=-1):
    """This rank's share of the first max_problems problems (all when -1)."""
    n = num_problems if max_problems is None or max_problems < 0 else min(num_problems, max_problems)
    _, rank, _, world_size = get_dist_info()
    return list(range(rank, n, world_size))


# -----------------------------------------------------------------------------
# Categorical: one forward, compare the answer letters' logits at the last position

@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, device, batch_size=8, max_len=None):
    """(number right, number asked) over task[indices] on this rank."""
    pad_id = tokenizer.get_bos_token_id()
    letter_ids = {}
    right = 0
    for begin in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[begin:begin + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        if max_len is not None:  # keep the end (the question's end and <|assistant_start|>)
            prompts = [p[-max_len:] for p in prompts]
        width = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            batch[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        logits = model(batch.to(device))  # (B, width, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer, not one")
                    letter_ids[letter] = ids[0]
            candidates = logits[row, len(prompt) - 1, [letter_ids[l] for l in letters]]
            predicted = letters[int(candidates.argmax())]
            right += int(task.evaluate(conversation, predicted))
    return right, len(indices)


# -----------------------------------------------------------------------------
# Generative: sample with the Engine, grade with the task

def engine_generate_fn(model, tokenizer, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50, seed=42,
                       batch_size=8):
    """generate(prompts: list of token lists) -> per prompt, num_samples completions (str). The
    Engine seeds every row on its own, so a completion does not depend on its batch neighbours."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)

    def generate(prompts):
        outputs = engine.generate_multi(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed,
                                        max_batch_size=max(batch_size, num_samples))
        return [[tokenizer.decode(ids[len(prompt):]) for ids in results] for prompt, (results, _) in zip(prompts, outputs)]
    return generate


def run_generative(generate, tokenizer, task, indices, batch_size=8):
    """(number passed, number asked) over task[indices]: a problem passes when any of its samples does."""
    passed = 0
    for begin in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[begin:begin + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        for conversation, completions in zip(conversations, generate(prompts)):
            passed += int(any(task.evaluate(conversation, completion) for completion in completions))
    return passed, len(indices)


# -----------------------------------------------------------------------------
# Task perplexity on your own conversations

@torch.no_grad()
def task_perplexity(model, tokenizer, conversations, device, batch_size=8, max_len=None):
    """(perplexity, number of tokens): exp of the mean NLL of the supervised (assistant) tokens
    of the conversations, summed over ranks (each takes every world_size-th conversation).
    A conversation longer than max_len + 1 tokens is cut at the end."""
    _, rank, _, world_size = get_dist_info()
    pad_id = tokenizer.get_bos_token_id()
    total_nll, total_tokens = 0.0, 0
    mine = list(range(rank, len(conversations), world_size))
    for begin in range(0, len(mine), batch_size):
        rows = []
        for i in mine[begin:begin + batch_size]:
            ids, mask = tokenizer.render_conversation(conversations[i], max_tokens=(max_len + 1) if max_len else 10**9)
            targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]  # input t predicts token t + 1
            rows.append((ids[:-1], targets))
        width = max(len(inputs) for inputs, _ in rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (inputs, targets) in enumerate(rows):
            x[r, :len(inputs)] = torch.tensor(inputs)
            y[r, :len(targets)] = torch.tensor(targets)
        x, y = x.to(device), y.to(device)
        losses = model(x, y, loss_reduction="none")  # (B, T) nats, 0 where ignored
        counted = y >= 0
        total_nll += losses[counted].double().sum().item()
        total_tokens += int(counted.sum().item())
    total_nll, total_tokens = _all_reduce_sum([total_nll, total_tokens], device)
    if total_tokens == 0:
        raise ValueError("no assistant tokens to score (empty file, or every conversation cut before its answer)")
    return math.exp(total_nll / total_tokens), int(total_tokens)


def chatcore(accuracies):
    """Mean centered accuracy over ALL_TASKS; None unless every one of them was evaluated."""
    if not all(name in accuracies for name in ALL_TASKS):
        return None
    return sum((accuracies[n] - BASELINES[n]) / (1 - BASELINES[n]) for n in ALL_TASKS) / len(ALL_TASKS)


def parse_task_list(text):
    names = [n.strip() for n in text.replace(",", "|").split("|") if n.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown:
        raise SystemExit(f"error: -a: unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)} (or all, none)")
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser, default_source="sft")
    parser.add_argument("-a", "--tasks", default=None,
                        help=f"tasks separated by | or , from {'|'.join(ALL_TASKS)}; 'all' or 'none' "
                             "(default: all, or none when --task-ppl is given)")
    parser.add_argument("--max-problems", type=int, default=-1, help="evaluate the first N problems of each task (-1 = all)")
    parser.add_argument("--data-dir", default=None,
                        help="offline: read the tasks from this folder (arc_easy.jsonl, arc_challenge.jsonl, "
                             "mmlu_test*.jsonl, gsm8k_test.jsonl, humaneval.jsonl), e.g. ../shared/data/eval")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per forward pass / generation batch")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@N)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="token budget of a generated answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--spelling-size", type=int, default=256, help="how many SpellingBee problems to generate")
    parser.add_argument("--task-ppl", action="append", default=[], metavar="FILE",
                        help="report the assistant-token perplexity of these conversations (repeatable)")
    args = parser.parse_args(argv)
    names = parse_task_list(args.tasks) if args.tasks is not None else ([] if args.task_ppl else list(ALL_TASKS))
    if args.temperature == 0.0 and args.num_samples > 1:
        parser.error("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")

    ddp, rank, _, world_size, device = compute_init(args.device)
    try:  # load (and check) all the data before the model
        from tasks.customjson import CustomJSON
        tasks = {name: build_eval_task(name, args.data_dir, args.spelling_size) for name in names}
        ppl_sets = {os.path.splitext(os.path.basename(p))[0]: CustomJSON(p) for p in args.task_ppl}
        model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    max_len = model.config.sequence_len
    print0(f"{args.source} model {model_tag} step {meta['step']}, {world_size} rank(s)")

    results, timings = {}, {}
    generate = engine_generate_fn(model, tokenizer, args.num_samples, args.max_new_tokens, args.temperature,
                                  args.top_k, args.seed, args.batch_size)
    for name, task in tasks.items():
        t0 = time.time()
        indices = my_indices(len(task), args.max_problems)
        with autocast_ctx(device.type):
            if task.eval_type == "categorical":
                right, asked = run_categorical(model, tokenizer, task, indices, device, args.batch_size, max_len)
            else:
                right, asked = run_generative(generate, tokenizer, task, indices, args.batch_size)
        right, asked = _all_reduce_sum([right, asked], device)
        results[name] = right / asked if asked else float("nan")
        timings[name] = time.time() - t0
        print0(f"{name:<14} {int(right)}/{int(asked)} = {results[name]:.4f}  ({timings[name]:.1f}s)")
    score = chatcore(results)
    if score is not None:
        print0(f"ChatCORE: {score:.4f}")

    ppl = {}
    for stem, conversations in ppl_sets.items():
        with autocast_ctx(device.type):
            value, num_tokens = task_perplexity(model, tokenizer, conversations, device, args.batch_size, max_len)
        ppl[stem] = (value, num_tokens)
        print0(f"task ppl {stem}: {value:.4f} over {num_tokens:,} assistant tokens ({len(conversations)} conversations)")

    if rank == 0:
        metrics = dict(results)
        if score is not None:
            metrics["ChatCORE"] = score
        for stem, (value, num_tokens) in ppl.items():
            metrics[TASK_PPL_PREFIX + stem] = value
            metrics[f"task_ppl_tokens:{stem}"] = num_tokens
        get_report().log(section=f"Chat evaluation ({args.source})", data=[
            {"source": args.source, "model_tag": model_tag, "step": meta["step"], "tasks": "|".join(names) or "none",
             "max_problems": args.max_problems, "data_dir": args.data_dir, "num_samples": args.num_samples,
             "temperature": args.temperature, "task_ppl_files": args.task_ppl},
            metrics,
            {f"time_s:{name}": round(seconds, 1) for name, seconds in timings.items()},
        ])
    compute_cleanup()
    return {"results": results, "ChatCORE": score, "task_ppl": ppl}


if __name__ == "__main__":
    main()
