"""HumanEval: 164 Python functions to complete from a signature and docstring, graded by running unit
tests (Chen et al., MIT licence), openai/openai_humaneval; evaluation only. Offline, the same fields:
    HumanEval(data_path=f"{DATA}/eval/humaneval.jsonl")"""
import re

from nanochat.execution import execute_code
from tasks.common import HubTask, nonempty_str

HF_REPO, HF_FILES = "openai/openai_humaneval", {"test": ["openai_humaneval/test-00000-of-00001.parquet"]}
# a markdown code block, ```python or bare; an unclosed one runs to the end of the completion
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)

def extract_code(completion):
    """The code in the first code block of `completion`; the completion itself when it has none."""
    return match.group(1) if (match := CODE_BLOCK.search(completion)) else completion

def humaneval_conversation(record):
    for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point"):
        nonempty_str(record, key)
    # the user turn is the prompt (signature + docstring); the reference reply is the whole function
    return {"messages": [{"role": "user", "content": record["prompt"]},
                         {"role": "assistant", "content": record["prompt"] + record["canonical_solution"]}],
            **{key: record[key] for key in ("task_id", "prompt", "test", "entry_point")}}

def humaneval_program(conversation, completion):
    """The program that passes iff the completion is right: prompt + code + tests + check(entry_point)."""
    # the prompt first keeps its imports and helpers; a full def in the completion simply redefines
    # the stub (whose body is just the docstring), and a bare body continues the stub
    return (conversation["prompt"] + "\n" + extract_code(completion) + "\n\n"
            + conversation["test"] + f"\n\ncheck({conversation['entry_point']})\n")

class HumanEval(HubTask):
    eval_type = "generative"
    def __init__(self, split="test", data_path=None, timeout=10.0, skip_bad=None, **slice_kwargs):
        super().__init__(split, data_path, HF_REPO, HF_FILES, humaneval_conversation, skip_bad, **slice_kwargs)
        self.timeout = timeout
    def evaluate(self, conversation, completion):
        # model-written code runs in nanochat.execution's sandbox (a separate process, with limits)
        return float(execute_code(humaneval_program(conversation, completion), timeout=self.timeout).success)
