"""
The report card of a run: every stage appends a markdown section (its config and metrics) as it
finishes, and `generate` stitches them into report.md with the environment, the time and cost,
and a summary table of the headline metrics per stage (BASE | MID | SFT | DPO).

    python -m nanochat.report reset       # a new run: drop old sections, write the header
    get_report().log(section="Base model training", data=[vars(args), {"val_bpb": 0.81}])  # a stage
    python -m nanochat.report generate    # -> $NANOCHAT_BASE_DIR/report/report.md + ./report.md
"""
import argparse
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys

from nanochat.common import atomic_write, get_base_dir, get_rank

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
DEFAULT_GPU_HOURLY_COST = 3.0  # USD per GPU-hour: about $24/h for an 8xH100 node

# The stages' section titles, in the order of the pipeline. Sections with other titles go after
# these, oldest first. The eval scripts add the checkpoint source in parentheses.
TRAINING_SECTIONS = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "dpo": "Chat DPO"}
STAGES = ("base", "mid", "sft", "dpo")
SECTION_ORDER = ["Tokenizer training", "Tokenizer evaluation"] + [
    title for stage in STAGES for title in (TRAINING_SECTIONS[stage], f"Loss evaluation ({stage})",
                                            f"CORE evaluation ({stage})", f"Chat evaluation ({stage})")]

# Summary table rows: (row name, section kind, keys to look for, first found wins)
SUMMARY_ROWS = [
    ("CORE", "CORE evaluation", ["CORE"]),
    ("ARC-Easy", "Chat evaluation", ["ARC-Easy"]),
    ("ARC-Challenge", "Chat evaluation", ["ARC-Challenge"]),
    ("MMLU", "Chat evaluation", ["MMLU"]),
    ("GSM8K", "Chat evaluation", ["GSM8K"]),
    ("HumanEval", "Chat evaluation", ["HumanEval"]),
    ("SpellingBee", "Chat evaluation", ["SpellingBee"]),
    ("ChatCORE", "Chat evaluation", ["ChatCORE"]),
    ("val bpb", "Loss evaluation", ["val_bpb"]),
]
TASK_PPL_PREFIX = "task_ppl:"  # chat_eval logs one "task_ppl:<file stem>" per --task-ppl file

def slugify(section):
    return "-".join(re.findall(r"[a-z0-9]+", section.lower())) or "section"

def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)

def _format_value(value):
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e7 else f"{value:.4e}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value).replace("\n", " ")

def _parse_number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None

def _run(cmd, cwd):
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

# -----------------------------------------------------------------------------
# The environment

def environment():
    """{name: value} describing the machine and code: git, hardware, software."""
    import torch
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _run(["git", "rev-parse", "--short", "HEAD"], repo)
    dirty = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"], repo)) if commit else False
    env = {
        "git_branch": _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo) or "-",
        "git_commit": (commit + (" (dirty)" if dirty else "")) if commit else "- (not a git checkout)",
        "git_message": _run(["git", "log", "-1", "--format=%s"], repo)[:80] or "-",
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpus": os.cpu_count(),
        "memory": _memory_gb(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        env["gpus"] = f"{count} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
        env["gpu_count"] = count
        env["cuda"] = torch.version.cuda
    else:
        env["gpus"] = "none (CPU" + (", MPS available)" if getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available() else ")")
        env["gpu_count"] = 0
    return env

def _memory_gb():
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return None

# -----------------------------------------------------------------------------
# Reading sections back

def parse_blocks(text):
    """[(section title, timestamp or None, {key: value str})] of a section file's blocks."""
    blocks = []
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        lines = chunk.splitlines()
        title, timestamp, values = lines[0].strip(), None, {}
        for line in lines[1:]:
            if line.startswith("timestamp: "):
                timestamp = line[len("timestamp: "):].strip()
            match = re.match(r"^- ([^:]+(?::[^:\s][^:]*)?): (.*)$", line)
            if match:
                values[match.group(1).strip()] = match.group(2).strip()
        blocks.append((title, timestamp, values))
    return blocks

def _parse_time(text):
    try:
        return datetime.datetime.strptime(text, TIME_FORMAT)
    except (TypeError, ValueError):
        return None

def _format_duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"

# -----------------------------------------------------------------------------
# The report

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir

    def _section_path(self, section):
        return os.path.join(self.report_dir, f"{slugify(section)}.md")

    def log(self, section, data):
        """
        Append a block to the section's file: '## section', a timestamp, then every item of
        `data` (a dict -> '- key: value' lines; a str -> written as is, e.g. a markdown table).
        Logging a section again (a re-run, or one eval task at a time) adds a block; the summary
        takes each metric from the latest block that has it. Returns the file's path.
        """
        if isinstance(data, (dict, str)):
            data = [data]
        lines = [f"## {section}", f"timestamp: {_now()}", ""]
        for item in data:
            if item is None:
                continue
            if isinstance(item, dict):
                lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
            else:
                lines.append(str(item).rstrip())
            lines.append("")
        path = self._section_path(section)
        previous = ""
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = f.read()
        atomic_write(path, previous + "\n".join(lines) + "\n")
        return path

    def reset(self):
        """Start a new run: remove every section and report, write the header (environment + start time)."""
        os.makedirs(self.report_dir, exist_ok=True)
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        env = environment()
        lines = ["# nanochat training report", "", "## Environment", ""]
        lines += [f"- {key}: {_format_value(value)}" for key, value in env.items()]
        lines += ["", f"Run started: {_now()}", ""]
        atomic_write(os.path.join(self.report_dir, "header.md"), "\n".join(lines))
        return os.path.join(self.report_dir, "header.md")

    def sections(self):
        """{title: [(timestamp, values, raw markdown)]} of every logged section, in pipeline order."""
        if not os.path.isdir(self.report_dir):
            return {}
        files = [os.path.join(self.report_dir, n) for n in os.listdir(self.report_dir)
                 if n.endswith(".md") and n not in ("header.md", "report.md")]
        known = {slugify(title): i for i, title in enumerate(SECTION_ORDER)}
        files.sort(key=lambda p: (known.get(os.path.basename(p)[:-3], len(known)), os.path.getmtime(p)))
        out = {}
        for path in files:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for chunk, (title, timestamp, values) in zip(re.split(r"^(?=## )", text, flags=re.MULTILINE)[1:],
                                                         parse_blocks(text)):
                out.setdefault(title, []).append((timestamp, values, chunk.strip()))
        return out

    def summary(self, sections=None):
        """{row: {stage: value str}}: the headline metrics of each stage (the latest value logged)."""
        sections = self.sections() if sections is None else sections

        def latest(title, keys):
            for _, values, _ in reversed(sections.get(title, [])):
                for key in keys:
                    if key in values:
                        return values[key]
            return None

        table = {}
        for row, kind, keys in SUMMARY_ROWS:
            for stage in STAGES:
                value = latest(f"{kind} ({stage})", keys)
                if value is None and row == "val bpb":  # fall back on the training run's own eval
                    value = latest(TRAINING_SECTIONS[stage], ["val_bpb", "min_val_bpb"])
                if value is not None:
                    table.setdefault(row, {})[stage] = value
        for stage in STAGES:
            for _, values, _ in sections.get(f"Chat evaluation ({stage})", []):
                for key, value in values.items():
                    if key.startswith(TASK_PPL_PREFIX):
                        table.setdefault(f"task ppl {key[len(TASK_PPL_PREFIX):]}", {})[stage] = value
        return table

    def generate(self, gpu_hourly_cost=DEFAULT_GPU_HOURLY_COST, out_dir=None):
        """Write report.md (header, tokenizer, every section, summary, timing and cost) into the
        report folder and copy it to out_dir (default: the current directory). Returns its path."""
        os.makedirs(self.report_dir, exist_ok=True)
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            header = ("# nanochat training report\n\n## Environment\n\n"
                      + "\n".join(f"- {k}: {_format_value(v)}" for k, v in environment().items())
                      + "\n\n(no `python -m nanochat.report reset` at the start of this run: start time unknown)\n")
        start = _parse_time(next(iter(re.findall(r"^Run started: (.*)$", header, flags=re.MULTILINE)), None))
        sections = self.sections()
        timestamps = [t for blocks in sections.values() for t in (_parse_time(b[0]) for b in blocks) if t]
        end = max(timestamps) if timestamps else None

        parts = [header.rstrip(), f"Generated: {_now()}", self._tokenizer_markdown()]
        for title, blocks in sections.items():
            parts.append("\n\n".join(raw for _, _, raw in blocks))
        parts.append(self._summary_markdown(self.summary(sections)))
        parts.append(self._timing_markdown(start, end, sections, gpu_hourly_cost))
        text = "\n\n".join(p for p in parts if p).rstrip() + "\n"

        path = os.path.join(self.report_dir, "report.md")
        atomic_write(path, text)
        out_dir = os.getcwd() if out_dir is None else out_dir
        if os.path.realpath(out_dir) != os.path.realpath(self.report_dir):
            atomic_write(os.path.join(out_dir, "report.md"), text)
        return path

    def _tokenizer_markdown(self):
        tokenizer_dir = os.path.join(os.path.dirname(self.report_dir), "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            return "## Tokenizer\n\n(no tokenizer in the base dir)"
        try:
            from nanochat.tokenizer import Tokenizer
            tokenizer = Tokenizer.from_directory(tokenizer_dir)
        except (OSError, ValueError) as e:
            return f"## Tokenizer\n\n(could not load {tokenizer_dir}: {e})"
        sizes = [n for n in tokenizer.token_bytes() if n > 0]
        lines = ["## Tokenizer", "",
                 f"- vocab_size: {tokenizer.get_vocab_size():,}",
                 f"- special_tokens: {len(tokenizer.get_special_tokens())}",
                 f"- token_bytes_mean: {sum(sizes) / len(sizes):.3f}",
                 f"- token_bytes_max: {max(sizes)}"]
        return "\n".join(lines)

    @staticmethod
    def _summary_markdown(table):
        lines = ["## Summary", "", "| Metric | BASE | MID | SFT | DPO |", "|---|---|---|---|---|"]
        for row, by_stage in table.items():
            lines.append(f"| {row} | " + " | ".join(by_stage.get(stage, "-") for stage in STAGES) + " |")
        if not table:
            lines.append("| (no metrics logged yet) | - | - | - | - |")
        return "\n".join(lines)

    @staticmethod
    def _timing_markdown(start, end, sections, gpu_hourly_cost):
        lines = ["## Time and cost", ""]
        train_minutes = 0.0
        for title in TRAINING_SECTIONS.values():
            for _, values, _ in sections.get(title, [])[-1:]:
                minutes = _parse_number(values.get("training_time_min", "")) or 0.0
                train_minutes += minutes
        if train_minutes:
            lines.append(f"- training time (sum over stages): {_format_duration(train_minutes * 60)}")
        if start and end and end >= start:
            wall = (end - start).total_seconds()
            lines.append(f"- total wall clock time: {_format_duration(wall)} (run start to the last section)")
            env = environment()
            if env["gpu_count"]:
                gpu_hours = wall / 3600 * env["gpu_count"]
                lines.append(f"- GPU hours: {gpu_hours:.2f} ({env['gpus']})")
                lines.append(f"- estimated cost: ${gpu_hours * gpu_hourly_cost:,.2f} at ${gpu_hourly_cost:.2f} per GPU-hour")
            else:
                lines.append("- estimated cost: n/a (no GPU in this run)")
        else:
            lines.append("- total wall clock time: unknown (run `python -m nanochat.report reset` before the first stage)")
        return "\n".join(lines)

class DummyReport:
    """What non-zero ranks get: the same methods, doing nothing (only rank 0 writes)."""

    def log(self, *args, **kwargs):
        pass

    reset = generate = log

def get_report():
    """The run's report on rank 0; a DummyReport on the other ranks, so only one process writes."""
    if get_rank() != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))

def main(argv=None):
    parser = argparse.ArgumentParser(description="The run's report card: reset at the start, generate at the end.")
    parser.add_argument("command", choices=["generate", "reset"],
                        help="reset: start a new report (header with environment + start time); "
                             "generate: write report.md")
    parser.add_argument("--gpu-hourly-cost", type=float, default=DEFAULT_GPU_HOURLY_COST,
                        help="USD per GPU-hour for the cost estimate (default: $3, ~$24/h for 8xH100)")
    parser.add_argument("--out-dir", default=None, help="where to copy report.md (default: the current directory)")
    args = parser.parse_args(argv)
    report = get_report()
    if args.command == "reset":
        print(f"new report started: {report.reset()}")
    else:
        path = report.generate(gpu_hourly_cost=args.gpu_hourly_cost, out_dir=args.out_dir)
        print(f"wrote {path}" + ("" if args.out_dir == os.path.dirname(path) else
                                 f" and {os.path.join(args.out_dir or os.getcwd(), 'report.md')}"))

if __name__ == "__main__":
    main()
