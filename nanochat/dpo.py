"""Direct Preference Optimization (Rafailov et al., 2023): preference pairs into token ids, the
frozen reference's log-probabilities computed once, and the loss."""
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.chat_data import collate_padded
from nanochat.common import autocast_ctx

# With h = [log pi(chosen) - log ref(chosen)] - [log pi(rejected) - log ref(rejected)]:
#   sigmoid (DPO):  -log sigmoid(beta * h)     = ln 2 while the policy is still the reference
#   ipo (IPO):      (h - 1 / (2 * beta))^2     (Azar et al., 2023: a bounded target margin)
# The implicit rewards beta * (log pi - log ref) of chosen and rejected are what we log.
LOSS_TYPES = ("sigmoid", "ipo")
DROP_REASONS = ("empty", "identical", "too_long", "identical_after_truncation")

# -----------------------------------------------------------------------------
# Pairs into token ids, truncated to fit
def truncate_pair(prompt, chosen, rejected, max_seq_len, min_prompt_tokens=2, min_response_tokens=1):
    """Fit prompt + either answer into max_seq_len tokens: (prompt, chosen, rejected, what_was_cut),
    or None when it cannot fit. The answers are never cut to nothing."""
    if min_prompt_tokens < 2 or min_response_tokens < 1:
        raise ValueError("need min_prompt_tokens >= 2 (<|bos|> and <|assistant_start|>) and min_response_tokens >= 1")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected, None
    # first the prompt, from the left: its <|bos|> stays, and its end, which primes the answer
    keep = max(max_seq_len - longest, min(len(prompt), min_prompt_tokens))
    if keep < len(prompt):
        prompt = prompt[:1] + prompt[len(prompt) - (keep - 1):]
    if len(prompt) + longest <= max_seq_len:
        return prompt, chosen, rejected, "prompt"
    # then both answers, from the right, as long as each keeps min_response_tokens
    if (room := max_seq_len - len(prompt)) < min_response_tokens:
        return None
    return prompt, chosen[:room], rejected[:room], "response"

def tokenize_pairs(items, tokenizer, max_seq_len, min_prompt_tokens=32, min_response_tokens=16):
    """(pairs, counts) of preference items {"prompt_messages", "chosen", "rejected"}: pairs are
    (prompt_ids, chosen_ids, rejected_ids); counts say how many were kept, cut, and dropped why."""
    end = tokenizer.encode_special("<|assistant_end|>")
    pairs, counts = [], Counter()
    for item in items:
        # the prompt is rendered once and shared; an answer ends with <|assistant_end|>, so the
        # model also learns where a good answer stops
        prompt = tokenizer.render_for_completion({"messages": item["prompt_messages"]})
        chosen, rejected = tokenizer.encode(item["chosen"]), tokenizer.encode(item["rejected"])
        why = "empty" if not chosen or not rejected else "identical" if chosen == rejected else None
        if not why:
            fitted = truncate_pair(prompt, chosen + [end], rejected + [end], max_seq_len,
                                   min(min_prompt_tokens, len(prompt)), min_response_tokens)
            # identical after truncation: the two only differed past the cut
            why = "too_long" if fitted is None else "identical_after_truncation" if fitted[1] == fitted[2] else None
        if why:
            counts[f"dropped_{why}"] += 1
            continue
        prompt, chosen, rejected, cut = fitted
        if cut:
            counts[f"truncated_{cut}"] += 1
        counts["kept"] += 1
        pairs.append((prompt, chosen, rejected))
    return pairs, counts

def describe_counts(counts):
    dropped = ", ".join(f"{counts[f'dropped_{r}']} {r.replace('_', ' ')}" for r in DROP_REASONS)
    return (f"{counts['kept']} pairs kept ({counts['truncated_prompt']} with the prompt cut from the left, "
            f"{counts['truncated_response']} with the answers cut) | dropped: {dropped}")

def collate_pairs(pairs, pad_id, device="cpu"):
    """inputs/targets (2B, L): rows 0..B-1 the chosen answers, rows B..2B-1 the rejected ones."""
    # a row is prompt + answer, its mask 1 on the answer's tokens only: the loss is on what is preferred
    rows = [(prompt + answers[k], [0] * len(prompt) + [1] * len(answers[k])) for k in (0, 1) for prompt, *answers in pairs]
    return collate_padded(rows, pad_id, device)

# -----------------------------------------------------------------------------
# Log-probabilities and the loss
def answer_logps(model, inputs, targets):
    """(sum of log-probs of the supervised targets per row, number of them per row)."""
    per_token = model(inputs, targets, loss_reduction="none")  # nats; 0 where the target is -1
    return -per_token.sum(dim=1), (targets >= 0).sum(dim=1)

@torch.no_grad()
def reference_logps(model, pairs, batch_size, pad_id, device, rank=0, world_size=1):
    """The frozen reference: summed answer log-probs (N, 2) [chosen, rejected] of every pair, in one
    pass before training, so that training holds only one model in memory."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32, device=device)
    # each rank scores every world_size-th pair (then the ranks add up their disjoint parts),
    # longest first so that batches hold pairs of similar length: less padding
    mine = sorted(range(rank, len(pairs), world_size), key=lambda i: -sum(map(len, pairs[i])))
    was_training = model.training
    model.eval()
    for start in range(0, len(mine), batch_size):
        index = mine[start:start + batch_size]
        inputs, targets = collate_pairs([pairs[i] for i in index], pad_id, device)
        with autocast_ctx(torch.device(device).type):  # in the precision the policy trains in
            logps, _ = answer_logps(model, inputs, targets)
        out[index] = logps.float().view(2, -1).t()  # (2B,) -> (B, 2): chosen, rejected
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid"):
    """Per-pair losses and the implicit rewards (chosen, rejected), each of shape (B,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {LOSS_TYPES}")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()

def pair_losses(model, batch, beta, loss_type="sigmoid", length_norm=False, sft_weight=0.0):
    """The losses and the statistics we log, all per pair (B,), of a collated batch {"inputs", "targets", "ref" (B, 2)}."""
    logps, counts = answer_logps(model, batch["inputs"], batch["targets"])
    counts = counts.clamp(min=1).to(logps.dtype)
    ref_chosen, ref_rejected = batch["ref"].to(logps.dtype).unbind(1)
    n = ref_chosen.size(0)
    policy_chosen, policy_rejected = logps[:n], logps[n:]
    if length_norm:  # averaged over the answer's tokens instead of summed: less length bias
        policy_chosen, policy_rejected = policy_chosen / counts[:n], policy_rejected / counts[n:]
        ref_chosen, ref_rejected = ref_chosen / counts[:n], ref_rejected / counts[n:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen,
                                                        ref_rejected, beta, loss_type)
    if sft_weight:  # the chosen answer's NLL: plain DPO may push both answers down, the rejected faster
        losses = losses + sft_weight * (-logps[:n] / counts[:n])
    # accuracies: pairs whose chosen answer gets the higher implicit reward (ties, as at the start, do not count)
    return losses, {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                    "logps/chosen": policy_chosen.detach(), "logps/rejected": policy_rejected.detach()}
