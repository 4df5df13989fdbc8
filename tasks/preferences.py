"""Preferences: pairs of replies to one prompt, one preferred, for DPO; by default UltraFeedback (MIT licence,
~61k train / 2k test prompts, the best of 4 GPT-4-rated replies chosen, a lower one rejected). Offline:
    Preferences(f"{DATA}/preference/hh_rlhf_harmless_base_test.jsonl", skip_bad=True)"""
from tasks.common import HubTask, RecordError, check_messages

HF_REPO = "HuggingFaceH4/ultrafeedback_binarized"
HF_FILES = {"train": ["data/train_prefs-00000-of-00001.parquet"], "test": ["data/test_prefs-00000-of-00001.parquet"]}

def _reply(record, key):
    """(reply text, earlier turns or None) of record[key], a string or a conversation."""
    if not isinstance(value := record.get(key), (str, list)):
        raise RecordError(key, "missing" if value is None else
                          f"expected a string or a list of messages, got {type(value).__name__}")
    if isinstance(value, list):
        messages = check_messages(value, field=key, final_role="assistant")
        if not isinstance(messages[-1]["content"], str):
            raise RecordError(f"{key}[{len(messages) - 1}].content", "the final reply must be a string")
        return messages[-1]["content"], messages[:-1]
    if not value.strip():
        raise RecordError(key, "empty")
    return value, None

# A record {"prompt": "..." | [messages], "chosen": "...", "rejected": "..."} becomes an item
# {"prompt_messages": [...], "chosen": str, "rejected": str}, what DPO compares (nanochat/dpo.py)
def preference_pair(record):
    (chosen, chosen_context), (rejected, rejected_context) = _reply(record, "chosen"), _reply(record, "rejected")
    # a message-list prompt ends with the user; "prompt_messages" is that of shared/data/preference/, whose
    # "prompt" is only the last user turn
    if "prompt_messages" in record or isinstance(record.get("prompt"), list):
        key = "prompt_messages" if "prompt_messages" in record else "prompt"
        prompt_messages = check_messages(record[key], field=key, final_role="user")
    # chosen/rejected as whole conversations ending with the reply (UltraFeedback's form): their earlier
    # turns are the prompt, the same for both (and already checked, ending with the user, as part of chosen)
    elif chosen_context:
        if chosen_context != rejected_context:
            raise RecordError("rejected", "its earlier turns differ from those of chosen (not the same prompt)")
        prompt_messages = chosen_context
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        prompt_messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise RecordError("prompt", "missing or empty (expected a string, a message list, or 'prompt_messages')")
    if chosen.strip() == rejected.strip():
        raise RecordError("rejected", "identical to chosen (a pair must differ to say anything)")
    return {"prompt_messages": prompt_messages, "chosen": chosen, "rejected": rejected}

class Preferences(HubTask):
    def __init__(self, path=None, split="train", skip_bad=None, **slice_kwargs):
        # UltraFeedback's other columns (scores, ids, the messages) are not needed: not read
        columns = ["prompt", "chosen", "rejected"] if path is None else None
        super().__init__(split, path, HF_REPO, HF_FILES, preference_pair, skip_bad, columns=columns, **slice_kwargs)
