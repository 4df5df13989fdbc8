"""
Preferences: pairs of replies to the same prompt, one preferred, for DPO.

Local files (.jsonl, one record per line, or .parquet):
  {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."}
  - the prompt may also come as "prompt_messages" (as in shared/data/preference/, where "prompt"
    is only the last user turn); a message-list prompt has an optional system message, then
    user/assistant alternating, and ends with the user turn
  - "chosen"/"rejected" may also be whole conversations (message lists ending with the assistant
    reply); their earlier turns then are the prompt and must be the same for both
Items are {"prompt_messages": [...], "chosen": str, "rejected": str}; pair_conversations() turns
one into the two full conversations the DPO loss compares.

Default download: HuggingFaceH4/ultrafeedback_binarized (MIT licence): ~61k train / 2k test
prompts, each with the highest-rated of four model replies as chosen and a lower-rated one as
rejected (rated by GPT-4 in UltraFeedback). Files data/train_prefs-00000-of-00001.parquet and
data/test_prefs-00000-of-00001.parquet; chosen/rejected there are message lists.
"""
from tasks.common import Task, RecordTask, RecordError, data_paths_or_download, check_messages

HF_REPO = "HuggingFaceH4/ultrafeedback_binarized"
HF_FILES = {"train": "data/train_prefs-00000-of-00001.parquet", "test": "data/test_prefs-00000-of-00001.parquet"}


def _reply(record, key):
    """(reply text, earlier turns or None) of record[key], a string or a conversation."""
    value = record.get(key)
    if value is None:
        raise RecordError(key, "missing")
    if isinstance(value, list):
        messages = check_messages(value, field=key, final_role="assistant")
        if not isinstance(messages[-1]["content"], str):
            raise RecordError(f"{key}[{len(messages) - 1}].content", "the final reply must be a string")
        return messages[-1]["content"], messages[:-1]
    if not isinstance(value, str):
        raise RecordError(key, f"expected a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(key, "empty")
    return value, None


def preference_pair(record):
    chosen, chosen_context = _reply(record, "chosen")
    rejected, rejected_context = _reply(record, "rejected")
    if "prompt_messages" in record:
        prompt_messages = check_messages(record["prompt_messages"], field="prompt_messages", final_role="user")
    elif isinstance(record.get("prompt"), list):
        prompt_messages = check_messages(record["prompt"], field="prompt", final_role="user")
    elif chosen_context:  # a conversation-style pair carries its own prompt
        if chosen_context != rejected_context:
            raise RecordError("rejected", "its earlier turns differ from those of chosen (not the same prompt)")
        prompt_messages = check_messages(chosen_context, field="chosen", final_role="user")
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        prompt_messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise RecordError("prompt", "missing or empty (expected a string, a message list, or 'prompt_messages')")
    if chosen.strip() == rejected.strip():
        raise RecordError("rejected", "identical to chosen (a pair must differ to say anything)")
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}


def pair_conversations(item):
    """(chosen conversation, rejected conversation) for one preference item."""
    return tuple({"messages": item["prompt_messages"] + [{"role": "assistant", "content": item[key]}]}
                 for key in ("chosen", "rejected"))


class Preferences(RecordTask):
    def __init__(self, path=None, split="train", hf_repo=HF_REPO, hf_filename=None, skip_bad=None,
                 **slice_kwargs):
        if path is None:
            if hf_filename is None:
                if hf_repo != HF_REPO or split not in HF_FILES:
                    raise ValueError(f"Preferences: give path= a local file, or hf_filename= for {hf_repo!r} "
                                     f"(the default {HF_REPO} knows splits {tuple(HF_FILES)})")
                hf_filename = HF_FILES[split]
        paths, skip_bad = data_paths_or_download(path, hf_repo, [hf_filename], skip_bad)
        columns = ["prompt", "chosen", "rejected"] if path is None and hf_repo == HF_REPO else None
        super().__init__(paths, preference_pair, skip_bad=skip_bad, columns=columns, **slice_kwargs)
        self.split = split


class PreferenceList(Task):
    """Preference items made in code (e.g. identity_preference_pairs) as a Task."""

    def __init__(self, items, **slice_kwargs):
        super().__init__(**slice_kwargs)
        self.items = [preference_pair(item) for item in items]  # same checks as loaded data

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        item = self.items[index]
        return {"prompt_messages": [dict(m) for m in item["prompt_messages"]],
                "chosen": item["chosen"], "rejected": item["rejected"]}
