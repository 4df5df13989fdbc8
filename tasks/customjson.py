"""
CustomJSON: your own conversations, from .jsonl (one record per line) or .parquet, in either form
  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
      optional first system message, then user/assistant alternating, ending with the assistant;
      assistant content may be a list of tool-use parts {"type": "text"|"python"|"python_output", "text"}
  {"instruction": "...", "input": "...", "output": "..."}       (Alpaca style; input optional)
      -> user = instruction + "\n\n" + input (when there is an input), assistant = output.
Every record is checked when loading; the first bad one is reported as file:line: field: problem,
with the number of bad records (skip_bad=True leaves them out instead, printing the same report).
"""
from tasks.common import RecordTask, chat_record_to_conversation


class CustomJSON(RecordTask):
    def __init__(self, path, skip_bad=False, **slice_kwargs):
        super().__init__(path, chat_record_to_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.path = path
