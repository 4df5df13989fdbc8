"""Batch generation with a trained model: many prompts in, completions out (jsonl), resumable.

    python -m scripts.generate --source sft --prompts prompts.txt --out completions.jsonl
    python -m scripts.generate --template "Write an FOI request to {authority} about {keyword}." --fill combos.csv \\
        --out foi.jsonl --num-samples 3 --temperature 0.8

--prompts: .txt (one prompt per line) or .jsonl (chat "messages", a DPO "prompt", or Alpaca "instruction"/"input").
--template: {field} slots (text, or a file holding it) filled from each row of --fill: .csv (its header names the
fields) or .jsonl (one object per line). Each line of --out is {"id", "prompt", "sample", "seed", "completion"};
a killed run is simply started again: the ids already in --out are skipped."""
import argparse
import csv
import json
import os

from tqdm import tqdm

from nanochat.checkpoint_manager import add_checkpoint_args, load_model
from nanochat.common import HelpFormatter, autodetect_device_type
from nanochat.engine import Engine, add_sampling_args, sampling_from_args
from scripts.gen_data import PLACEHOLDER, append, read_prompts, read_records, read_topics, render, stable_id

def read_fills(path):
    """[(where, values)] of the --fill rows: a .csv with a header, else JSON lines (gen_data's --topics format)."""
    if not path.endswith(".csv"):
        return [(f"{path}:{lineno}", values) for lineno, _, values in read_topics(path)]
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        # reader.line_num after a row: the line it ended on (a quoted field may span lines)
        rows = [(f"{path}:{reader.line_num}", row) for row in reader]
    for where, row in rows:
        if None in row or None in row.values():  # more or fewer cells than the header has names
            raise SystemExit(f"{where}: expected {len(reader.fieldnames)} cells ({', '.join(reader.fieldnames)})")
    return rows

def read_jobs(args):
    """[(where, prompt messages)] from --prompts, or from --template filled by each --fill row."""
    if args.prompts:
        return read_prompts(args.prompts)
    template = open(args.template, encoding="utf-8").read().strip() if os.path.isfile(args.template) else args.template
    jobs = []
    for where, values in read_fills(args.fill):
        # a slot without a value would send "{keyword}" to the model: refused before anything is generated
        if missing := set(PLACEHOLDER.findall(template)) - set(values):
            raise SystemExit(f"{where}: no value for {', '.join('{' + n + '}' for n in sorted(missing))}")
        jobs.append((where, [{"role": "user", "content": render(template, values)}]))
    return jobs

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_checkpoint_args(parser, "sft")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="the prompts: .txt (one per line) or .jsonl")
    source.add_argument("--template", help="a prompt with {field} slots (or a file holding it); needs --fill")
    parser.add_argument("--fill", help="with --template: the rows of field values (.csv with a header, or .jsonl)")
    parser.add_argument("--out", required=True, help="the .jsonl to append to (and to resume from)")
    parser.add_argument("--system", default=None, help="a system message before every prompt")
    parser.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    add_sampling_args(parser, temperature=0.0, max_tokens=256)  # chat_cli's --temperature, --top-k, --top-p, --max-tokens
    parser.add_argument("--seed", type=int, default=42, help="sample k of a prompt samples with seed + k")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    args = parser.parse_args(argv)
    if args.template and not args.fill:
        parser.error("--template needs --fill")
    jobs = read_jobs(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    # an id hashes what produced the completion (prompt, sample, seed, settings): a re-run with other
    # settings generates anew instead of counting the old lines as done
    sampling = vars(sampling_from_args(args, seed=args.seed))  # (checked: SystemExit when out of range)
    settings = json.dumps([args.source, args.model_tag, args.step, sampling])
    todo, done = [], {r.get("id") for r in read_records(args.out)}
    for where, messages in jobs:
        prompt = system + messages
        ids = [stable_id(json.dumps(prompt, sort_keys=True), str(k), str(args.seed + k), settings)
               for k in range(args.num_samples)]
        if not all(i in done for i in ids):
            todo.append((where, prompt, ids))
    print(f"{len(jobs)} prompt(s) x {args.num_samples} sample(s): {len(todo)} prompt(s) to do, the rest in {args.out}")
    if not todo:
        return 0
    model, tokenizer, meta = load_model(args.source, args.device or autodetect_device_type(), "eval",
                                        model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    for begin in tqdm(range(0, len(todo), args.batch_size), desc="generate", unit="batch"):
        batch = todo[begin:begin + args.batch_size]
        prompts = [tokenizer.render_for_completion({"messages": prompt}) for _, prompt, _ in batch]
        # the prompts of a batch decode together (continuous batching); each sample row has its own generator
        for (where, prompt, ids), tokens, (results, _) in zip(batch, prompts, engine.generate_multi(
                prompts, num_samples=args.num_samples, **sampling)):
            for k, (item_id, result) in enumerate(zip(ids, results)):
                if item_id not in done:  # a prompt cut short by a kill: only its missing samples are written
                    append(args.out, {"id": item_id, "prompt": prompt, "sample": k, "seed": args.seed + k,
                                      "completion": tokenizer.decode(result[len(tokens):]), "where": where,
                                      "model": f"{args.source} {meta['model_tag']} step {meta['step']}"})
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
