"""CustomJSON: your own conversations, from .jsonl (one record per line), a .json array of records, or .parquet.
    CustomJSON("mine.jsonl"); in the training scripts: --data mine.jsonl, or --mixture custom:mine.jsonl"""
from tasks.common import RecordTask, chat_record_to_conversation

# A record is one of
#   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}: an optional first
#       system message, then user/assistant alternating, ending with the assistant; assistant content
#       may be a list of tool-use parts {"type": "text"|"python"|"python_output", "text": "..."}
#   {"instruction": "...", "input": "...", "output": "..."} (Alpaca style, input optional):
#       user = instruction + "\n\n" + input (when there is an input), assistant = output

class CustomJSON(RecordTask):
    # skip_bad=False: a bad record of your own file stops the run, naming file:line: field, for you to fix
    def __init__(self, path, skip_bad=False, **slice_kwargs):
        super().__init__(path, chat_record_to_conversation, skip_bad=skip_bad, **slice_kwargs)
        self.path = path
