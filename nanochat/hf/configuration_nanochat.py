"""The configuration of a nanochat GPT for Hugging Face `transformers` (trust_remote_code)."""
from transformers import PretrainedConfig

class NanoChatConfig(PretrainedConfig):
    model_type = "nanochat"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=50304, sequence_len=1024, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 logit_softcap=15.0, rotary_base=10000.0, use_cache=True, tie_word_embeddings=False, **kwargs):
        # nanochat's own field names (GPTConfig), plus the constants nanochat/gpt.py hard-codes
        # (the logit soft-cap, the rotary base), so an export carries everything the model computes with
        self.vocab_size, self.sequence_len, self.n_layer = vocab_size, sequence_len, n_layer
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.logit_softcap, self.rotary_base, self.use_cache = logit_softcap, rotary_base, use_cache
        # the generic names that tools look for
        self.hidden_size, self.num_hidden_layers, self.intermediate_size = n_embd, n_layer, 4 * n_embd
        self.num_attention_heads, self.num_key_value_heads = n_head, n_kv_head
        self.head_dim, self.max_position_embeddings = n_embd // n_head, sequence_len
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
