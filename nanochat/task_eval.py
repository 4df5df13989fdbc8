"""Scoring a chat model on tasks (scripts/chat_eval.py, chat_sft's quick evaluations): multiple choice by the answer
letters' logits, free answers generated and graded by the task, and the loss of conversations' assistant tokens."""
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.chat_data import collate_padded
from nanochat.common import get_dist_info

def all_reduce_sum(values, device):
    """A list of numbers summed over ranks (returned as is in a single process)."""
    # float64 so counts and NLL sums stay exact; MPS has no float64
    tensor = torch.tensor(values, dtype=torch.float32 if "mps" in str(device) else torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()

def my_indices(num_problems, max_problems=-1):
    """This rank's share of the first max_problems problems (all when -1)."""
    n = num_problems if max_problems is None or max_problems < 0 else min(num_problems, max_problems)
    _, rank, _, world_size = get_dist_info()
    return list(range(rank, n, world_size))

def right_padded(rows, pad_id, device):
    """Rows of different lengths as one right-padded (B, width) batch: causal attention never lets a row see its pad."""
    width = max(map(len, rows))
    return torch.tensor([list(row) + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long, device=device)

@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, device, batch_size=8, max_len=None):
    """(number right, number asked) over task[indices]: the choice letter likeliest after <|assistant_start|>."""
    # scoring by the logits of the letters alone: a small model that cannot yet write "B." well
    # may still know which letter is right, and there is nothing to parse
    letter_ids, right = {}, 0
    for begin in tqdm(range(0, len(indices), batch_size), desc=task.__class__.__name__, unit="batch", leave=False,
                      delay=10, disable=get_dist_info()[1] != 0):  # a bar only after 10 s, on one rank
        conversations = [task[i] for i in indices[begin:begin + batch_size]]
        # a prompt too long keeps its end: the end of the question and <|assistant_start|>
        prompts = [tokenizer.render_for_completion(c)[-max_len if max_len else 0:] for c in conversations]
        logits = model(right_padded(prompts, tokenizer.get_bos_token_id(), device))  # (B, width, V)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:  # each letter must be one token, or its logit would mean nothing
                if letter not in letter_ids:
                    if len(ids := tokenizer.encode(letter)) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer, not one")
                    letter_ids[letter] = ids[0]
            scores = logits[row, len(prompt) - 1, [letter_ids[letter] for letter in letters]]
            right += int(task.evaluate(conversation, letters[int(scores.argmax())]))
    return right, len(indices)

def engine_generate_fn(model, tokenizer, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50, seed=42,
                       batch_size=None):
    """generate(prompts: lists of ids) -> per prompt, num_samples completions (str); batch_size rows at a time."""
    # the Engine seeds every row on its own, so a completion does not depend on its batch neighbours
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    def generate(prompts):
        # prompts of any lengths decode together in one ragged batch (continuous batching)
        outputs = engine.generate_multi(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, seed=seed,
                                        max_batch_size=batch_size and max(batch_size, num_samples))
        return [[tokenizer.decode(ids[len(prompt):]) for ids in results] for prompt, (results, _) in zip(prompts, outputs)]
    return generate

def run_generative(generate, tokenizer, task, indices, batch_size=8, max_len=None, first_samples=None):
    """(number passed, number asked) over task[indices], pass@N; first_samples: a list to get each first sample."""
    passed = 0
    for begin in tqdm(range(0, len(indices), batch_size), desc=task.__class__.__name__, unit="batch", leave=False,
                      delay=10, disable=get_dist_info()[1] != 0):  # a bar only after 10 s, on one rank
        conversations = [task[i] for i in indices[begin:begin + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-max_len if max_len else 0:] for c in conversations]
        # pass@N: the task grades each sample (HumanEval runs the code in the sandbox)
        for conversation, completions in zip(conversations, generate(prompts)):
            passed += int(any(task.evaluate(conversation, completion) for completion in completions))
            if first_samples is not None:
                first_samples.append(completions[0])
    return passed, len(indices)

@torch.no_grad()
def assistant_nll(model, tokenizer, conversations, device, batch_size=8, max_len=None):
    """(NLL in nats, tokens, NLL of their text tokens, bytes of that text) of the assistant's tokens in the
    conversations, summed over ranks: the last two give bits per byte, which compares across tokenizers."""
    # the supervised tokens of render_conversation's mask; a conversation longer than max_len + 1 is cut at the end
    sums, mine = [0.0, 0, 0.0, 0], my_indices(len(conversations))
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)  # 0 for special tokens
    for begin in range(0, len(mine), batch_size):
        rows = [tokenizer.render_conversation(conversations[i], max_tokens=(max_len + 1) if max_len else 10**9)
                for i in mine[begin:begin + batch_size]]
        # input t predicts token t + 1: a target counts (is not -1) where the mask says the model produces it
        x, y = collate_padded(rows, tokenizer.get_bos_token_id(), device)
        losses = model(x, y, loss_reduction="none")  # (B, T) nats, 0 where ignored
        counted = y >= 0
        # bpb as evaluate_bpb counts it: special tokens (<|assistant_end|>) are no text, in neither sum
        text = counted & (token_bytes[y.clamp(min=0)] > 0)
        # summed in float64: thousands of conversations' NLLs would lose digits in fp32
        sums = [a + b for a, b in zip(sums, [losses[counted].double().sum().item(), int(counted.sum()),
                                             losses[text].double().sum().item(), int(token_bytes[y[text]].sum())])]
    total_nll, total_tokens, text_nll, text_bytes = all_reduce_sum(sums, device)
    return total_nll, int(total_tokens), text_nll, int(text_bytes)
