"""Evaluate a chat model on tasks (ChatCORE), and measure how well it fits your own conversations.
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" --data-dir ../shared/data/eval   # or torchrun
    python -m scripts.chat_eval -i mid --task-ppl my_val.jsonl          # perplexity on your data
    python -m scripts.chat_eval -a "ARC-Easy|custom:my_quiz.jsonl" --fewshot 3   # your own questions too"""
import argparse
import math
import os
import time
from functools import partial

import torch

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import HelpFormatter, autocast_ctx, compute_cleanup, compute_init, exit_on, print0
from nanochat.report import CUSTOM_PREFIX, TASK_BPB_PREFIX, TASK_PPL_PREFIX, get_report
from nanochat.task_eval import (all_reduce_sum, assistant_nll, engine_generate_fn, my_indices, run_categorical,
                                run_generative)
from tasks.arc import ARC
from tasks.customjson import EVAL_FORMATS, CustomEval, CustomJSON
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spelling import SpellingBee

ALL_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
# chance: 1 in 4 for the 4-choice tasks, 0 for the generative ones
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}
# files looked for in --data-dir (the names of shared/data/eval), first found wins
LOCAL_FILES = {"ARC-Easy": ["arc_easy.jsonl"], "ARC-Challenge": ["arc_challenge.jsonl"], "GSM8K": ["gsm8k_test.jsonl"],
               "MMLU": ["mmlu_test.jsonl", "mmlu_test_26subjects.jsonl"], "HumanEval": ["humaneval.jsonl"]}
MAX_CONFUSION_LABELS = 20  # a custom file with more answers than this gets no confusion table: too wide to read

def build_eval_task(name, data_dir=None, spelling_size=256, fewshot=0, fewshot_file=None, seed=42):
    """The Task behind a task name: local files from data_dir, else the default (downloaded) data."""
    if name.startswith(CUSTOM_PREFIX):  # your own questions, from the file named after the prefix
        return CustomEval(name[len(CUSTOM_PREFIX):], fewshot, fewshot_file, seed)
    if name == "SpellingBee":  # generated from a word list: nothing to download or find
        return SpellingBee(size=spelling_size, split="test")
    path = None
    if data_dir is not None:
        path = next((p for p in (os.path.join(data_dir, f) for f in LOCAL_FILES[name]) if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"--data-dir {data_dir}: no {' or '.join(LOCAL_FILES[name])} for {name}")
    tasks = {"ARC-Easy": partial(ARC, "easy", "test"), "ARC-Challenge": partial(ARC, "challenge", "test"),
             "MMLU": partial(MMLU, "test"), "GSM8K": partial(GSM8K, "test"), "HumanEval": HumanEval}
    return tasks[name](data_path=path)

def task_perplexity(model, tokenizer, conversations, device, batch_size=8, max_len=None):
    """{ppl, tokens (scored), total_tokens, cut, conversations}: assistant-token perplexity (all ranks)."""
    # exp(mean NLL) of what the assistant says in held-out conversations (jsonl messages or Alpaca):
    # measured before and after fine-tuning, it says how much closer the model got to your data
    nll, tokens, text_nll, text_bytes = assistant_nll(model, tokenizer, conversations, device, batch_size, max_len)
    if tokens == 0:
        raise ValueError("no assistant tokens to score (empty file, or every conversation cut before its answer)")
    # the end of a conversation longer than max_len + 1 tokens goes unscored: say how much was cut
    full = [tokenizer.render_conversation(c, max_tokens=10**9) for c in conversations]
    # bits per byte of the assistant's text: independent of the tokenizer, so any two models compare
    return {"ppl": math.exp(nll / tokens), "bpb": text_nll / (math.log(2) * max(1, text_bytes)), "tokens": tokens,
            "total_tokens": sum(sum(mask) for _, mask in full),
            "cut": sum(len(ids) > max_len + 1 for ids, _ in full) if max_len else 0, "conversations": len(full)}

@torch.no_grad()
def hf_task_perplexity(path, conversations, max_len=None):
    """task_perplexity's ppl and bpb for a local Hugging Face causal LM, with its own tokenizer and chat template."""
    # bpb does not depend on the tokenizer: the side-by-side number against any reference model
    from transformers import AutoModelForCausalLM, AutoTokenizer  # optional (the hf extra): imported only here
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    render = lambda messages, **kw: list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))
    max_len, specials = max_len or model.config.max_position_embeddings, set(tok.all_special_ids)
    nll = text_nll = tokens = text_bytes = 0
    for n, conversation in enumerate(conversations):
        messages, spans = conversation["messages"], []
        ids = render(messages)[:max_len + 1]  # as ours: max_len inputs, each predicting the next token
        for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            # an answer's tokens: its whole conversation so far, less the prompt for it (a template must be a prefix)
            prompt, turn = render(messages[:i], add_generation_prompt=True), render(messages[:i + 1])
            if turn[:len(prompt)] != prompt or ids[:len(turn)] != turn[:len(ids)]:
                raise ValueError(f"{path}: its chat template does not render conversation {n} turn by turn")
            spans.append(range(len(prompt), min(len(turn), len(ids))))
        logprobs = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
        for span in spans:  # position t is predicted at t - 1; special tokens are no text (as in our bpb)
            losses = [-logprobs[t - 1, ids[t]].item() for t in span]
            nll, tokens = nll + sum(losses), tokens + len(losses)
            text_nll += sum(loss for t, loss in zip(span, losses) if ids[t] not in specials)
            text_bytes += len(tok.decode([ids[t] for t in span], skip_special_tokens=True).encode("utf-8"))
    return {"ppl": math.exp(nll / max(1, tokens)), "bpb": text_nll / (math.log(2) * max(1, text_bytes)), "tokens": tokens}

def chatcore(accuracies):
    """Mean centered accuracy over ALL_TASKS; None unless every one of them was evaluated."""
    # centered, (acc - chance) / (1 - chance): 0 is guessing and 1 perfect on every task, so a
    # 4-choice task at chance does not count as 25% progress
    if not all(name in accuracies for name in ALL_TASKS):
        return None
    return sum((accuracies[n] - BASELINES[n]) / (1 - BASELINES[n]) for n in ALL_TASKS) / len(ALL_TASKS)

# 'custom:/data/quiz.jsonl' -> 'custom:quiz': a file's stem names its results (as --task-ppl's); a built-in task as is
def task_label(name):
    path = name.removeprefix(CUSTOM_PREFIX)
    return CUSTOM_PREFIX + os.path.splitext(os.path.basename(path))[0] if path != name else name

# markdown: how often each right answer (row) got each reply (column; "(other)": a reply that is no answer of the file)
def confusion_table(name, task, indices, replies, device):
    # every rank knows the labels from the file: the same fixed-size matrix everywhere, summed in one all-reduce
    labels, width = task.labels, len(task.labels) + 1
    counts = [0] * (len(labels) * width)
    for index, completion in zip(indices, replies):
        answer, reply = task.graded(task[index], completion)
        counts[labels.index(answer) * width + (labels.index(reply) if reply in labels else width - 1)] += 1
    counts = all_reduce_sum(counts, device)
    rows = [f"| {label} | " + " | ".join(f"{n:.0f}" for n in counts[row * width:(row + 1) * width]) + " |"
            for row, label in enumerate(labels)]
    return "\n".join([f"{name}: right answer (rows) x reply (columns)", "", f"| | {' | '.join(labels)} | (other) |",
                      "|---" * (width + 1) + "|", *rows])

def parse_task_list(text):
    # "ARC-Easy|GSM8K" or "ARC-Easy,GSM8K" (a comma is friendlier in a shell), "all", "none"
    names = [n.strip() for n in text.replace(",", "|").split("|") if n.strip()]
    if names in (["all"], ["none"]):
        return list(ALL_TASKS) if names == ["all"] else []
    if unknown := [n for n in names if n not in ALL_TASKS and not n.startswith(CUSTOM_PREFIX)]:
        raise SystemExit(f"error: -a: unknown task(s) {unknown}; choose from {'|'.join(ALL_TASKS)} "
                         f"(or all, none, {CUSTOM_PREFIX}FILE)")
    if len(set(map(task_label, names))) < len(names):  # two results of one name: one would hide the other
        raise SystemExit(f"error: -a: a task (or a custom file's stem) is listed twice: {names}")
    return names

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     epilog=f"{CUSTOM_PREFIX}FILE tasks, one kind of question per file:\n{EVAL_FORMATS}")
    add_checkpoint_args(parser, default_source="sft")
    parser.add_argument("-a", "--tasks", default=None, help=f"tasks separated by | or , from {'|'.join(ALL_TASKS)} "
                        f"and {CUSTOM_PREFIX}FILE (see below); 'all' or 'none' (None: all, or none with --task-ppl)")
    parser.add_argument("--max-problems", type=int, default=-1, help="evaluate the first N problems of each task (-1 = all)")
    parser.add_argument("--data-dir", default=None, help="offline: the tasks from this folder (../shared/data/eval): "
                        "arc_easy.jsonl, arc_challenge.jsonl, mmlu_test*.jsonl, gsm8k_test.jsonl, humaneval.jsonl")
    parser.add_argument("--batch-size", type=int, default=8, help="problems per forward pass / generation batch")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@N)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="token budget of a generated answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed")
    parser.add_argument("--fewshot", type=int, default=0, metavar="K", help="custom tasks: each question after the "
                        "same K solved examples (drawn by --seed) as earlier turns: [its system message], user (example"
                        " 1's question), assistant (its answer; a letter for multiple choice), ..., then its own turns")
    parser.add_argument("--fewshot-file", default=None, metavar="FILE",
                        help="draw the --fewshot examples from FILE (default: from each custom file, then not scored)")
    parser.add_argument("--spelling-size", type=int, default=256, help="how many SpellingBee problems to generate")
    parser.add_argument("--task-ppl", action="append", default=[], metavar="FILE",
                        help="report the assistant-token perplexity of these conversations (repeatable)")
    parser.add_argument("--hf-model", default=None, metavar="PATH",
                        help="with --task-ppl: the same numbers for this local Hugging Face causal LM (folder), with "
                             "its own tokenizer and chat template, to compare by bpb (needs transformers)")
    args = parser.parse_args(argv)
    # --task-ppl alone measures just your files (the task suite takes minutes and may need downloads)
    names = parse_task_list(args.tasks) if args.tasks is not None else ([] if args.task_ppl else list(ALL_TASKS))
    if args.temperature == 0.0 and args.num_samples > 1:
        parser.error("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    if args.fewshot < 0:
        parser.error(f"--fewshot must be >= 0, got {args.fewshot}")
    ddp, rank, _, world_size, device = compute_init(args.device)
    with exit_on(FileNotFoundError, ValueError):  # load (and check) all the data first: a bad file fails in seconds
        # your own files first, so that a mistake there stops the run before anything is downloaded
        tasks = {task_label(name): build_eval_task(name, args.data_dir, args.spelling_size, args.fewshot,
                                                   args.fewshot_file, args.seed)
                 for name in sorted(names, key=lambda name: not name.startswith(CUSTOM_PREFIX))}
        # each file is read and checked now too; its stem names its report row, "task ppl <stem>"
        ppl_sets = {os.path.splitext(os.path.basename(p))[0]: CustomJSON(p) for p in args.task_ppl}
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    # a longer prompt keeps its end, the question and <|assistant_start|>: no more than the model was trained on
    max_len = model.config.sequence_len
    print0(f"{args.source} model {meta['model_tag']} step {meta['step']}, {world_size} rank(s)")
    results, timings, custom, ppl = {}, {}, {}, {}
    # pass@N: a generative problem passes when any of its --num-samples samples does
    generate = engine_generate_fn(model, tokenizer, args.num_samples, args.max_new_tokens, args.temperature,
                                  args.top_k, args.seed, args.batch_size)
    for name, task in tasks.items():
        t0, replies = time.time(), []  # replies: each generated answer's first sample, for a confusion table
        # every rank takes every world_size-th problem; the counts are summed over the ranks below
        indices = my_indices(len(task), args.max_problems)
        with autocast_ctx(device.type):
            # multiple choice (ARC, MMLU) by the answer letters' logits; GSM8K, HumanEval and
            # SpellingBee by a generated answer that the task grades
            right, asked = (run_categorical(model, tokenizer, task, indices, device, args.batch_size, max_len)
                            if task.eval_type == "categorical" else
                            run_generative(generate, tokenizer, task, indices, args.batch_size, max_len, replies))
        # a custom file's chance: 1 / the number of choices (multiple choice) or of the file's answers (exact match);
        # and its prompts longer than the context, which lost their start (the few-shot examples first)
        mine = [task[i] for i in indices] if isinstance(task, CustomEval) else []
        chance = sum(1 / len(conversation.get("letters", task.labels)) for conversation in mine)
        cut = sum(len(tokenizer.render_for_completion(conversation)) > max_len for conversation in mine)
        right, asked, chance, cut = all_reduce_sum([right, asked, chance, cut], device)
        results[name] = right / asked if asked else float("nan")  # --max-problems 0: nothing asked
        timings[name] = time.time() - t0
        print0(f"{name:<14} {int(right)}/{int(asked)} = {results[name]:.4f}  ({timings[name]:.1f}s)")
        if isinstance(task, CustomEval):
            # exact match only (multiple choice has no labels), on every rank: the table is summed over them
            table = (confusion_table(name, task, indices, replies, device)
                     if 0 < len(task.labels) <= MAX_CONFUSION_LABELS else None)
            custom[name] = {"chance": chance / max(1, asked), "scored": int(asked), "cut": int(cut), "table": table}
            shots = f" (examples from {args.fewshot_file or 'the file, not scored'})" if args.fewshot else ""
            print0(f"{'':<14} chance {custom[name]['chance']:.4f}, {int(asked)} scored, {int(cut)} cut to the "
                   f"{max_len}-token context, {args.fewshot}-shot{shots}" + (f"\n{table}" if table else ""))
    if (score := chatcore(results)) is not None:
        print0(f"ChatCORE: {score:.4f}")
    # the assistant-token perplexity of each --task-ppl file, with the number of tokens it rests on
    for stem, conversations in ppl_sets.items():
        with autocast_ctx(device.type):
            stats = ppl[stem] = task_perplexity(model, tokenizer, conversations, device, args.batch_size, max_len)
        print0(f"task ppl {stem}: {stats['ppl']:.4f} (bpb {stats['bpb']:.4f}) over {stats['tokens']:,} of {stats['total_tokens']:,} "
               f"assistant tokens; {stats['cut']} of {stats['conversations']} conversations cut at {max_len + 1} tokens")
        if args.hf_model and rank == 0:  # the reference model beside ours, on the same conversations
            with exit_on(ValueError):
                stats["hf"] = hf = hf_task_perplexity(args.hf_model, conversations)
            print0(f"task ppl {stem}: {hf['ppl']:.4f} (bpb {hf['bpb']:.4f}) over {hf['tokens']:,} assistant tokens of "
                   f"{args.hf_model}, its own tokenizer")
    # the report card: its summary table reads these keys (report.SUMMARY_ROWS)
    if rank == 0:
        metrics = dict(results, **({"ChatCORE": score} if score is not None else {}))
        for stem, stats in ppl.items():
            metrics.update({TASK_PPL_PREFIX + stem: stats["ppl"], TASK_BPB_PREFIX + stem: stats["bpb"],
                            **{f"hf_task_{key}:{stem}": stats["hf"][key] for key in ("ppl", "bpb") if "hf" in stats},
                            f"task_ppl_tokens:{stem}": stats["tokens"],
                            f"task_ppl_total_tokens:{stem}": stats["total_tokens"],
                            f"task_ppl_cut_conversations:{stem}": stats["cut"]})
        get_report().log(section=f"Chat evaluation ({args.source})", data=[
            {"source": args.source, "model_tag": meta["model_tag"], "step": meta["step"],
             "tasks": "|".join(names) or "none", "max_problems": args.max_problems, "data_dir": args.data_dir,
             "num_samples": args.num_samples, "temperature": args.temperature, "task_ppl_files": args.task_ppl,
             "hf_model": args.hf_model, "fewshot": args.fewshot, "fewshot_file": args.fewshot_file},
            metrics, {f"time_s:{name}": round(seconds, 1) for name, seconds in timings.items()},
            # a custom file's chance and number scored beside its accuracy, then its confusion table (markdown)
            {f"custom_{key}:{name.removeprefix(CUSTOM_PREFIX)}": stats[key]
             for name, stats in custom.items() for key in ("chance", "scored", "cut")},
            *(stats["table"] for stats in custom.values())])
    compute_cleanup()
    return {"results": results, "ChatCORE": score, "task_ppl": ppl, "custom": custom}

if __name__ == "__main__":
    main()
