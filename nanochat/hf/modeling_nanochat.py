"""A nanochat GPT as a Hugging Face `transformers` model (trust_remote_code): exactly what nanochat/gpt.py computes."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_nanochat import NanoChatConfig

# Every norm is parameter-free RMSNorm (F.rms_norm with no weight): nothing to export or load
def norm(x):
    return F.rms_norm(x, (x.size(-1),))

# rotary embeddings as nanochat rotates them: the two halves of each head, not interleaved pairs
# (x1 cos + x2 sin, x2 cos - x1 sin); another convention would scramble the trained positions
def apply_rotary_emb(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)

class NanoChatAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head = layer_idx, config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # the layer names of nanochat/gpt.py, so its state_dict loads as is; no biases anywhere
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # rotary first, then QK-norm (RMSNorm of each head's queries and keys), in nanochat's order
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if cache is not None:  # DynamicCache: model.generate() decodes incrementally
            k, v = cache.update(k, v, self.layer_idx)
        # grouped-query attention: each key/value head serves n_rep query heads
        if (n_rep := self.n_head // self.n_kv_head) > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, T, C))

class NanoChatMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        # ReLU(x W_fc)^2 W_proj: nanochat's squared ReLU, no gate, no biases
        return self.c_proj(F.relu(self.c_fc(x)).square())

class NanoChatBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = NanoChatAttention(config, layer_idx)
        self.mlp = NanoChatMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        # pre-norm residual blocks: x += attn(norm(x)); x += mlp(norm(x))
        x = x + self.attn(norm(x), cos, sin, mask, cache)
        return x + self.mlp(norm(x))

class NanoChatPreTrainedModel(PreTrainedModel):
    config_class = NanoChatConfig
    base_model_prefix = "transformer"
    # PreTrainedModel's get/set_input_embeddings find `wte` (on the head model through base_model_prefix), and
    # get/set_output_embeddings `lm_head`
    _input_embed_layer = "wte"
    _no_split_modules = ["NanoChatBlock"]
    _supports_cache_class = True
    # no gradient checkpointing: this file is for inference and evaluation of an export
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        # only for weights missing from a checkpoint (a fresh model); exported ones load as saved
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)

class NanoChatModel(NanoChatPreTrainedModel):
    """The Transformer without its head: (B, T) ids -> (B, T, n_embd) final-normed hidden states."""

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList([NanoChatBlock(config, i) for i in range(config.n_layer)])
        self.post_init()

    def rotary(self, positions, dtype):
        # cos, sin of shape (B, T, 1, head_dim / 2) for integer positions (B, T), computed in fp32
        # exactly as nanochat's precomputed tables are (outer product, then cos/sin), so the same angles
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = self.config.rotary_base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                             device=positions.device) / head_dim)
        freqs = positions.to(torch.float32)[..., None] * inv_freq
        # half-precision weights rotate in their dtype
        dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
        return freqs.cos()[:, :, None, :].to(dtype), freqs.sin()[:, :, None, :].to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        # positions already in the cache (earlier generate() steps): this call's tokens come after them
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total, device = past + T, x.device

        if position_ids is None:
            # attention_mask (1 = token, 0 = padding) is honoured, so left-padded batches work: padding does
            # not count as a position
            position_ids = ((attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:] if attention_mask is not None
                            else torch.arange(past, total, device=device)[None].expand(B, T))
        cos, sin = self.rotary(position_ids.to(device), x.dtype)

        # causal over the cache (query i sits at cache index past + i), minus padded keys; a query
        # that would see nothing (a padding position itself) keeps its own key, avoiding NaNs
        q_idx, k_idx = torch.arange(past, total, device=device)[:, None], torch.arange(total, device=device)[None, :]
        mask = (k_idx <= q_idx)[None, None]  # (1, 1, T, total)
        if attention_mask is not None:
            mask = (mask & attention_mask[:, None, None, :total].bool().to(device)) | (k_idx == q_idx)[None, None]

        x = norm(x)  # nanochat norms the token embedding before the first block
        for block in self.h:
            x = block(x, cos, sin, mask, past_key_values if use_cache else None)
        x = norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, past_key_values=past_key_values if use_cache else None)

# The model with its head, what AutoModelForCausalLM loads: the exported weight names are nanochat's own
class NanoChatForCausalLM(NanoChatPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = NanoChatModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None, **kwargs):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        # generate() asks for the last position's logits only: no (B, T, V) tensor per step (0, as -0: keep all)
        hidden = out.last_hidden_state[:, (-logits_to_keep if isinstance(logits_to_keep, int) else 0):]
        # an untied lm_head; the soft-cap softcap * tanh(logits / softcap) in fp32, as nanochat does
        logits, cap = self.lm_head(hidden).float(), self.config.logit_softcap
        logits = cap * torch.tanh(logits / cap)
        # HF convention: labels are the inputs; predict token t+1 at t
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                           labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
