"""The per-layer optimizer: one param group per layer, each LR a 0-d device tensor, and a lean step.

``layer_optimizer`` builds a ``torch.optim.SGD`` (momentum, Nesterov, weight decay) or
``torch.optim.AdamW`` with one param group per layer (two when the layer's 1-D parameters get
another LR or decay), each group's ``lr`` a 0-d view into the loop's ``[2, L]`` tensor
``group_lrs``, so that ``group_lrs = global_lr[t] * scales`` sets every layer's LR in one op.

``FusedStep`` performs that optimizer's step with the same fused kernels torch.optim calls
(``torch._fused_sgd_`` / ``torch._fused_adamw_``, one call per group, the group's LR tensor
read on the device) on the state held in ``optimizer.state``, without torch.optim's per-group
Python bookkeeping (state look-ups, flag checks, hooks; about 20 us per group per step on a
CPU core, 1.4 ms for the 58 groups of a ResNet-56 against 0.2 ms here), which on a GPU is
host time the step waits for. The arithmetic, the state and therefore ``state_dict()`` are
torch's: results are bit-identical to ``optimizer.step()`` (tests/test_optim.py). State is
created once, up front (zero momentum buffers and Adam moments, step counts 0), which is
what torch's lazily created first-step state equals: ``0·μ + g = g`` exactly.
Parameters without a gradient (frozen layers) are skipped, as torch.optim skips them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_optimizer(layers: Sequence, group_lrs: torch.Tensor, trainer, scale_1d: bool) -> torch.optim.Optimizer:
    """One group per layer (or per layer and kind: 0 = tensors of >= 2 dims, 1 = 1-D)."""
    groups = []
    # Same LR and decay for both kinds (the usual case): one group per layer, as each group
    # costs one kernel call per step (a fused kernel takes one LR tensor per call).
    merge = scale_1d and (trainer.decay_1d or trainer.weight_decay == 0)
    for layer in layers:
        kernels, others = [p for p in layer.params if p.dim() > 1], [p for p in layer.params if p.dim() <= 1]
        for kind, params in (((0, kernels + others),) if merge else ((0, kernels), (1, others))):
            if params:
                decay = trainer.weight_decay if kind == 0 or trainer.decay_1d else 0.0
                groups.append({"params": params, "lr": group_lrs[kind, layer.index],
                               "weight_decay": decay, "layer": layer.index, "kind": kind})
    if trainer.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=trainer.lr, momentum=trainer.momentum,
                               nesterov=bool(trainer.nesterov and trainer.momentum > 0),
                               weight_decay=trainer.weight_decay, fused=True)
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=tuple(trainer.betas), weight_decay=trainer.weight_decay,
                             fused=True)


def link_group_lrs(optimizer: torch.optim.Optimizer, group_lrs: torch.Tensor) -> None:
    """Point every group's LR at its entry of ``group_lrs`` again (after ``load_state_dict``)."""
    for group in optimizer.param_groups:
        group["lr"] = group_lrs[group["kind"], group["layer"]]


class FusedStep:
    """``step()`` = ``optimizer.step()`` for a fused SGD or AdamW built by :func:`layer_optimizer`.

    Build it again after ``optimizer.load_state_dict`` (which replaces the state tensors).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.adam = isinstance(optimizer, torch.optim.AdamW)
        defaults = optimizer.defaults
        if not defaults.get("fused") or defaults.get("maximize") or defaults.get("amsgrad") \
                or defaults.get("dampening", 0) or defaults.get("capturable") or defaults.get("differentiable"):
            raise ValueError("FusedStep steps fused SGD/AdamW without maximize, amsgrad, dampening, capturable")
        self.groups = []   # (params, state tensor lists, lr tensor, weight decay)
        for group in optimizer.param_groups:
            states = [self._state(p) for p in group["params"]]
            if self.adam:
                lists = tuple([s[k] for s in states] for k in ("exp_avg", "exp_avg_sq", "step"))
            else:
                lists = ([s["momentum_buffer"] for s in states] if defaults["momentum"] else [],)
            self.groups.append((list(group["params"]), lists, group["lr"], group["weight_decay"]))
        self.steps = [s for _, lists, _, _ in self.groups for s in lists[2]] if self.adam else []

    def _state(self, p: torch.Tensor) -> dict:
        state = self.optimizer.state[p]
        if self.adam:
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif self.optimizer.defaults["momentum"] and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self) -> None:
        work, complete = [], True
        for params, lists, lr, decay in self.groups:
            grads = [p.grad for p in params]
            if not all(g is not None for g in grads):    # frozen layer: no gradient, no step
                keep = [i for i, g in enumerate(grads) if g is not None]
                complete = False
                if not keep:
                    continue
                params, grads = [params[i] for i in keep], [grads[i] for i in keep]
                lists = tuple([values[i] for i in keep] if values else values for values in lists)
            work.append((params, grads, lists, lr, decay))
        defaults = self.optimizer.defaults
        if self.adam:
            beta1, beta2 = defaults["betas"]
            torch._foreach_add_(self.steps if complete else [s for w in work for s in w[2][2]], 1)
            for params, grads, (exp_avg, exp_avg_sq, steps), lr, decay in work:
                torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                    weight_decay=decay, eps=defaults["eps"], amsgrad=False, maximize=False,
                                    grad_scale=None, found_inf=None)
        else:
            for params, grads, (momentum_buffers,), lr, decay in work:
                torch._fused_sgd_(params, grads, momentum_buffers, weight_decay=decay, momentum=defaults["momentum"],
                                  lr=lr, dampening=0.0, nesterov=defaults["nesterov"], maximize=False,
                                  is_first_step=False, grad_scale=None, found_inf=None)
