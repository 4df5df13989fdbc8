"""
AdamW for the embedding and lm_head (see gpt.setup_optimizers), single-process and sharded.

Distributed contract (same as DistMuon, see muon.py):
  - the model is NOT wrapped in DDP: DistAdamW.step() averages gradients across ranks itself;
  - to clip gradients, call nanochat.distributed.all_reduce_gradients(model), clip, then
    step(grads_already_averaged=True) so the gradients are not reduced a second time;
  - each rank holds optimizer state only for its slice, so optimizer checkpoints are per rank
    and must be resumed with the same world size.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.distributed import has_tensor_collectives


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step() also accepts grads_already_averaged, so a training loop
    calls single-process and sharded optimizers the same way. One process: nothing to average."""

    def step(self, closure=None, grads_already_averaged=False):
        return super().step(closure)


def _adamw_update(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """Decoupled-weight-decay Adam on (a slice of) one parameter, in place. Same arithmetic as
    torch.optim.AdamW so single-process and sharded runs agree."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class DistAdamW(torch.optim.Optimizer):
    """
    ZeRO-2-style AdamW. Each parameter is viewed flat and cut into world_size equal slices
    (zero-padded when numel does not divide); rank r owns slice r. step(): reduce-scatter the
    gradient (average) so rank r gets the averaged gradient of its slice -> Adam update of that
    slice with state (exp_avg, exp_avg_sq) kept only for it -> all-gather the slices back into
    the full parameter on every rank.
    Without reduce_scatter support (old Gloo): all_reduce the gradient and take the slice.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, grads_already_averaged=False):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, ws = dist.get_rank(), dist.get_world_size()
        tensor_collectives = has_tensor_collectives()

        # phase 1: launch every gradient reduction at once so they overlap
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                numel = p.numel()
                shard = -(-numel // ws)
                flat_grad = p.grad.reshape(-1)
                if shard * ws != numel:
                    flat_grad = F.pad(flat_grad, (0, shard * ws - numel))
                work = None
                if grads_already_averaged:
                    g = flat_grad[rank * shard:(rank + 1) * shard]
                elif tensor_collectives:
                    g = torch.empty(shard, dtype=flat_grad.dtype, device=flat_grad.device)
                    work = dist.reduce_scatter_tensor(g, flat_grad, op=dist.ReduceOp.SUM, async_op=True)
                else:
                    work = dist.all_reduce(flat_grad, op=dist.ReduceOp.SUM, async_op=True)
                    g = flat_grad[rank * shard:(rank + 1) * shard]
                pending.append((group, p, shard, g, work))

        # phase 2: update this rank's slice as each reduction lands, then all-gather it
        gathers = []
        for group, p, shard, g, work in pending:
            if work is not None:
                work.wait()
                g.mul_(1.0 / ws)  # SUM -> mean
            numel = p.numel()
            padded = shard * ws != numel
            flat_param = F.pad(p.detach().reshape(-1), (0, shard * ws - numel)) if padded else p.detach().view(-1)
            p_slice = flat_param[rank * shard:(rank + 1) * shard]
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_slice)
                state["exp_avg_sq"] = torch.zeros_like(p_slice)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            _adamw_update(p_slice, g, state["exp_avg"], state["exp_avg_sq"], state["step"],
                          group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if tensor_collectives:  # in place: rank r's input already sits at offset r of the output
                work = dist.all_gather_into_tensor(flat_param, p_slice, async_op=True)
            else:
                work = dist.all_gather(list(flat_param.chunk(ws)), p_slice, async_op=True)
            gathers.append((work, p, flat_param if padded else None))
        for work, p, padded_flat in gathers:
            work.wait()
            if padded_flat is not None:
                p.detach().view(-1).copy_(padded_flat[:p.numel()])
        return loss
