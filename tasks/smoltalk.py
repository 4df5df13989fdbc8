"""SmolTalk: general chat conversations for SFT/midtraining (Apache-2.0). Offline, any conversation file:
    SmolTalk("train", data_path=f"{DATA}/chat/selfinstruct_seed_tasks_chat.jsonl")"""
from tasks.common import HubTask, chat_record_to_conversation

# the mix of chat data that Hugging Face made for small models: ~460k train / ~24k test conversations
HF_REPO = "HuggingFaceTB/smol-smoltalk"
# the train split comes in four parquet shards
HF_FILES = {"train": [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)],
            "test": ["data/test-00000-of-00001.parquet"]}

class SmolTalk(HubTask):
    def __init__(self, split="train", data_path=None, skip_bad=None, **slice_kwargs):
        # of the downloaded parquet only the messages column is needed (keeps memory down)
        columns = None if data_path is not None else ["messages"]
        super().__init__(split, data_path, HF_REPO, HF_FILES, chat_record_to_conversation, skip_bad, columns=columns,
                         **slice_kwargs)
