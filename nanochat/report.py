"""The report card of a run: each stage appends a markdown section as it finishes; `generate` joins them into report.md.
    python -m nanochat.report reset       # a new run: drop old sections, write the header
    python -m nanochat.report generate    # -> $NANOCHAT_BASE_DIR/report/report.md (--out PATH: a copy there too)"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

from nanochat.common import HelpFormatter, atomic_write, get_base_dir, get_rank

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # of the sections' timestamps, parsed back to time the whole run
DEFAULT_GPU_HOURLY_COST = 3.0  # USD per GPU-hour: about $24/h for an 8xH100 node
# The stages' section titles, in pipeline order (sections with other titles go after these,
# oldest first); the eval scripts add the checkpoint source in parentheses: "CORE evaluation (base)"
TRAINING_SECTIONS = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "dpo": "Chat DPO"}
STAGES = ("base", "mid", "sft", "dpo")
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation"] + [
    title for stage in STAGES for title in (TRAINING_SECTIONS[stage], f"Loss evaluation ({stage})",
                                            f"CORE evaluation ({stage})", f"Chat evaluation ({stage})")]
# Summary table rows: (row name, the kind of section it comes from, the key logged there)
SUMMARY_ROWS = ([("CORE", "CORE evaluation", "CORE")] + [(name, "Chat evaluation", name) for name in
                 ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")]
                + [("val bpb", "Loss evaluation", "val_bpb")])
TASK_PPL_PREFIX = "task_ppl:"  # chat_eval logs one "task_ppl:<file stem>" per --task-ppl file
TASK_BPB_PREFIX = "task_bpb:"  # and one "task_bpb:<file stem>"
CUSTOM_PREFIX = "custom:"  # and the accuracy on each -a custom:FILE, "custom:<file stem>"

# a section's file name: "Chat evaluation (sft)" -> chat-evaluation-sft.md
def slugify(section):
    return "-".join(re.findall(r"[a-z0-9]+", section.lower())) or "section"

def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)

def _format_value(value):
    # every value stays one "- key: value" line: ints with thousands separators, floats with 4
    # decimals (e-notation when tiny or huge), containers as JSON
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e7 else f"{value:.4e}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value).replace("\n", " ")  # text, bools, None, nan and inf

def _parse_number(text):  # None when it is no number
    with contextlib.suppress(ValueError):
        return float(text.replace(",", ""))

def _run(cmd, cwd):
    # git may be missing, or this may not be a checkout: the report then just says "-"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    return ""

# -----------------------------------------------------------------------------
# The environment
def environment():
    """{name: value} describing the machine and code: git, hardware, software."""
    import torch  # here, not at the top: `report reset/generate` should not wait for torch otherwise
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _run(["git", "rev-parse", "--short", "HEAD"], repo)
    # tracked files only: a run's own outputs in the checkout should not mark it dirty
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], repo)) if commit else False
    env = {"git_branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo) or "-",
           "git_commit": (commit + (" (dirty)" if dirty else "")) if commit else "- (not a git checkout)",
           "git_message": _run(["git", "log", "-1", "--format=%s"], repo)[:80] or "-",  # its subject, cut short
           "hostname": platform.node(),
           "platform": f"{platform.system()} {platform.release()} ({platform.machine()})", "cpus": os.cpu_count(),
           "memory": _memory_gb(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        count, props = torch.cuda.device_count(), torch.cuda.get_device_properties(0)
        # gpu_count is what the cost estimate multiplies the wall clock time by
        env.update(gpus=f"{count} x {props.name} ({props.total_memory / 2**30:.0f} GiB)", gpu_count=count,
                   cuda=torch.version.cuda)
    else:
        env.update(gpus="none (CPU" + (", MPS available)" if torch.backends.mps.is_available() else ")"), gpu_count=0)
    return env

def _memory_gb():  # None where sysconf has no such names (off Linux/macOS)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"

# header.md: the title, the environment, and last_line (the start time, when known)
def _header(last_line):
    env = "\n".join(f"- {key}: {_format_value(value)}" for key, value in environment().items())
    return f"# nanochat training report\n\n## Environment\n\n{env}\n\n{last_line}\n"

# -----------------------------------------------------------------------------
# Reading sections back
def parse_blocks(text):
    """[(section title, timestamp or None, {key: value str})] of a section file's blocks."""
    # a key may hold one colon not followed by a space ("task_ppl:mine"), so values may hold colons
    blocks = []
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        (title, *lines), timestamp, values = chunk.splitlines(), None, {}
        for line in lines:
            if line.startswith("timestamp: "):
                timestamp = line[len("timestamp: "):].strip()
            if match := re.match(r"^- ([^:]+(?::[^:\s][^:]*)?): (.*)$", line):
                values[match.group(1).strip()] = match.group(2).strip()
        blocks.append((title.strip(), timestamp, values))
    return blocks

def _parse_time(text):  # None for None (no start time) or a hand-edited timestamp
    with contextlib.suppress(TypeError, ValueError):
        return datetime.datetime.strptime(text, TIME_FORMAT)

# hours only once past an hour: a short stage reads 3m05s
def _format_duration(seconds):
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"

# -----------------------------------------------------------------------------
# The report: the folder holds header.md (from reset), one <slug>.md per section and report.md
class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
    def log(self, section, data):
        """Append a block to the section's file: a dict item -> '- key: value' lines, a str as is."""
        # a section logged again (a re-run, one eval task at a time) adds a block: the summary takes the latest
        lines = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in [data] if isinstance(data, (dict, str)) else data:
            if isinstance(item, dict):
                lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()] + [""]
            elif item is not None:
                lines += [str(item).rstrip(), ""]
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        previous = Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""
        atomic_write(path, previous + "\n".join(lines) + "\n")  # atomic: a crash never tears a section
        return path
    def reset(self):
        """Start a new run: remove every section and report, write the header (environment + start time)."""
        for path in Path(self.report_dir).glob("*.md"):  # no folder yet: nothing to remove (atomic_write makes it)
            path.unlink()
        atomic_write(path := os.path.join(self.report_dir, "header.md"), _header(f"Run started: {_now()}"))
        return path
    def sections(self):
        """{title: [(timestamp, values, raw markdown)]} of every logged section, in pipeline order."""
        known = {slugify(title): i for i, title in enumerate(SECTION_ORDER)}
        # pipeline order first; unknown sections after, oldest first (no folder yet: no sections)
        files = sorted((p for p in Path(self.report_dir).glob("*.md") if p.name not in ("header.md", "report.md")),
                       key=lambda p: (known.get(p.stem, len(known)), p.stat().st_mtime))
        out = {}
        for path in files:
            text = path.read_text(encoding="utf-8")
            # the raw chunks (kept verbatim in report.md) side by side with their parsed values
            for chunk, (title, timestamp, values) in zip(re.split(r"^(?=## )", text, flags=re.MULTILINE)[1:],
                                                         parse_blocks(text)):
                out.setdefault(title, []).append((timestamp, values, chunk.strip()))
        return out
    def summary(self, sections=None):
        """{row: {stage: value str}}: the headline metrics of each stage (the latest value logged)."""
        sections = self.sections() if sections is None else sections
        def latest(title, *keys):  # from the newest block that has one of the keys, the first it has
            return next((v[k] for _, v, _ in reversed(sections.get(title, [])) for k in keys if k in v), None)
        table = {}
        # each row takes from every stage's section of its kind, e.g. "Chat evaluation (sft)" for ARC-Easy
        for row, kind, key in SUMMARY_ROWS:
            for stage in STAGES:
                value = latest(f"{kind} ({stage})", key)
                if value is None and row == "val bpb":  # fall back on the training run's own eval
                    value = latest(TRAINING_SECTIONS[stage], "val_bpb", "min_val_bpb")
                if value is not None:
                    table.setdefault(row, {})[stage] = value
        # and rows per --task-ppl file any chat evaluation measured (perplexity, bpb), per custom:FILE (accuracy)
        for stage in STAGES:
            for _, values, _ in sections.get(f"Chat evaluation ({stage})", []):
                for key, value in values.items():
                    for prefix, row in ((TASK_PPL_PREFIX, "task ppl "), (TASK_BPB_PREFIX, "task bpb "),
                                        (CUSTOM_PREFIX, CUSTOM_PREFIX)):
                        if key.startswith(prefix):
                            table.setdefault(row + key[len(prefix):], {})[stage] = value
        return table
    def generate(self, gpu_hourly_cost=DEFAULT_GPU_HOURLY_COST, out=None):
        """Write report.md (header, tokenizer, sections, summary, time, cost), and a copy to `out`; returns its path."""
        header_path = os.path.join(self.report_dir, "header.md")
        header = (Path(header_path).read_text(encoding="utf-8") if os.path.exists(header_path) else
                  _header("(no `python -m nanochat.report reset` at the start of this run: start time unknown)"))
        start = _parse_time(next(iter(re.findall(r"^Run started: (.*)$", header, flags=re.MULTILINE)), None))
        sections = self.sections()
        # the run ends with its last logged section, not when the report is generated
        end = max((t for blocks in sections.values() for t in (_parse_time(b[0]) for b in blocks) if t), default=None)
        parts = [header.rstrip(), f"Generated: {_now()}", self._tokenizer_markdown(),
                 *("\n\n".join(raw for _, _, raw in blocks) for blocks in sections.values()),
                 _summary_markdown(self.summary(sections)), _timing_markdown(start, end, sections, gpu_hourly_cost)]
        text = "\n\n".join(p for p in parts if p).rstrip() + "\n"
        atomic_write(path := os.path.join(self.report_dir, "report.md"), text)
        # a copy only where asked: never a stray report.md in whatever folder the command ran from
        if out is not None:
            atomic_write(os.path.join(out, "report.md") if os.path.isdir(out) else out, text)
        return path
    def _tokenizer_markdown(self):
        tokenizer_dir = os.path.join(os.path.dirname(self.report_dir), "tokenizer")
        # optional: a report may be generated before (or without) scripts/tok_train.py
        if not os.path.isdir(tokenizer_dir):
            return "## Tokenizer\n\n(no tokenizer in the base dir)"
        try:
            from nanochat.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_directory(tokenizer_dir)
        except (OSError, ValueError) as e:
            return f"## Tokenizer\n\n(could not load {tokenizer_dir}: {e})"
        sizes = [n for n in tokenizer.token_bytes() if n > 0]  # special tokens have no bytes
        return (f"## Tokenizer\n\n- vocab_size: {tokenizer.get_vocab_size():,}\n"
                f"- special_tokens: {len(tokenizer.get_special_tokens())}\n"
                f"- token_bytes_mean: {sum(sizes) / len(sizes):.3f}\n- token_bytes_max: {max(sizes)}")

def _summary_markdown(table):
    rows = [f"| {row} | " + " | ".join(by_stage.get(stage, "-") for stage in STAGES) + " |"
            for row, by_stage in table.items()]
    return "\n".join(["## Summary", "", "| Metric | BASE | MID | SFT | DPO |", "|---|---|---|---|---|"]
                     + (rows or ["| (no metrics logged yet) | - | - | - | - |"]))

def _timing_markdown(start, end, sections, gpu_hourly_cost):
    lines = ["## Time and cost", ""]
    # the latest run of each training stage (a re-run replaces, not adds)
    if train_minutes := sum(_parse_number(values.get("training_time_min", "")) or 0.0
                            for title in TRAINING_SECTIONS.values() for _, values, _ in sections.get(title, [])[-1:]):
        lines.append(f"- training time (sum over stages): {_format_duration(train_minutes * 60)}")
    if start and end and end >= start:
        # wall clock, not the sum of stages: evals, downloads and idle time are paid for too
        wall = (end - start).total_seconds()
        lines.append(f"- total wall clock time: {_format_duration(wall)} (run start to the last section)")
        if (env := environment())["gpu_count"]:
            gpu_hours = wall / 3600 * env["gpu_count"]
            lines += [f"- GPU hours: {gpu_hours:.2f} ({env['gpus']})",
                      f"- estimated cost: ${gpu_hours * gpu_hourly_cost:,.2f} at ${gpu_hourly_cost:.2f} per GPU-hour"]
        else:
            lines.append("- estimated cost: n/a (no GPU in this run)")
    else:
        lines.append("- total wall clock time: unknown (run `python -m nanochat.report reset` before the first stage)")
    return "\n".join(lines)

# What non-zero ranks get: the same methods, doing nothing (only rank 0 writes)
class DummyReport:
    def log(self, *args, **kwargs):
        pass
    reset = generate = log

def get_report():
    """The run's report: a stage logs get_report().log(section="Base model training", data=[vars(args), metrics])."""
    return Report(os.path.join(get_base_dir(), "report")) if get_rank() == 0 else DummyReport()

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("command", choices=["generate", "reset"], help="reset: start a new report (header with "
                        "environment + start time); generate: write report.md")
    parser.add_argument("--gpu-hourly-cost", type=float, default=DEFAULT_GPU_HOURLY_COST,
                        help="USD per GPU-hour for the cost estimate ($3: ~$24/h for 8xH100)")
    parser.add_argument("--out", default=None, metavar="PATH", help="generate: copy report.md to PATH (file or folder)")
    args, report = parser.parse_args(argv), get_report()
    if args.command == "reset":
        print(f"new report started: {report.reset()}")
    else:
        path = report.generate(gpu_hourly_cost=args.gpu_hourly_cost, out=args.out)
        print(f"wrote {path}" + (f" and a copy at {args.out}" if args.out else ""))

if __name__ == "__main__":
    main()
