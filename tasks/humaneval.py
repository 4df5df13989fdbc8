"""
HumanEval: 164 Python functions to complete from a signature and docstring, graded by running
unit tests (Chen et al., MIT licence). Evaluation only.
Hugging Face: openai/openai_humaneval, file openai_humaneval/test-00000-of-00001.parquet, rows
{"task_id", "prompt", "canonical_solution", "test", "entry_point"}. Offline: data_path= a jsonl
with the same fields (shared/data/eval/humaneval.jsonl).

The user turn is the prompt (signature + docstring); the reference assistant turn is the full
function. A completion may be the whole function or just its body, bare or in a ```python block;
evaluate() runs prompt + code + the tests + check(entry_point) in the sandbox of nanochat.execution.
"""
import re

from tasks.common import RecordTask, RecordError, data_paths_or_download

HF_REPO = "openai/openai_humaneval"
HF_FILE = "openai_humaneval/test-00000-of-00001.parquet"
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion):
    """The code in the first markdown code block of `completion` (an unclosed one runs to the end);
    the completion itself when it has no code block."""
    match = CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def humaneval_conversation(record):
    for key in FIELDS:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise RecordError(key, "missing or empty")
    return {"messages": [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["prompt"] + record["canonical_solution"]}],
            **{key: record[key] for key in ("task_id", "prompt", "test", "entry_point")}}


def humaneval_program(conversation, completion):
    """The program that passes iff the completion is right. Putting the prompt first keeps its
    imports and helper functions; a full def in the completion simply redefines the stub (whose
    body is just the docstring), and a bare body continues the stub."""
    return (conversation["prompt"] + "\n" + extract_code(completion) + "\n\n"
            + conversation["test"] + f"\n\ncheck({conversation['entry_point']})\n")


class HumanEval(RecordTask):
    def __init__(self, split="test", data_path=None, timeout=10.0, skip_bad=None, **slice_kwargs):
        if split != "test":
            raise ValueError(f"HumanEval has only a test split, got {split!r}")
        paths, skip_bad = data_paths_or_download(data_path, HF_REPO, [HF_FILE], skip_bad)
        super().__init__(paths, humaneval_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.timeout = timeout

    @property
    def eval_type(self):
        return "generative"

    def evaluate(self, conversation, completion):
        from nanochat.execution import execute_code  # imported here: only evaluation needs the sandbox
        result = execute_code(humaneval_program(conversation, completion), timeout=self.timeout)
        return float(result.success)
