"""Hypergradient descent on each layer's learning rate.

Baydin, Cornish, Martínez Rubio, Schmidt & Wood, "Online Learning Rate Adaptation with
Hypergradient Descent", arXiv 1703.04782, per layer. The loss after the step depends on the
layer's previous LR through ``θ_l(t) = θ_l(t−1) + u_l(t−1)`` with ``u_l(t−1) = −η_l(t−1)·d_l``,
so its hypergradient is ``∂L(θ(t))/∂η_l(t−1) = g_l(t)·u_l(t−1)/η_l(t−1)``. Writing

    h_l = −g_l(t)·u_l(t−1)/η_l(t−1)      (= g_l(t)·g_l(t−1) for plain SGD, the paper's h)

the layer LR ``α_l`` (``α_l(0) = η(0)``, the global LR at the first step, or its first
positive value when a schedule starts at 0) follows

    rule=additive:        α_l ← α_l + β·h_l                                (the paper's SGD-HD)
    rule=multiplicative:  α_l ← α_l·(1 + β·cos(g_l(t), −u_l(t−1)))         (default)

and ``scale_l = α_l/α_l(0)``, clamped to ``[min_scale, max_scale]`` (α is kept clamped too,
so it cannot wander off and take long to come back). Sign convention: the issue writes
``h = g·u``; with ``u`` the applied update (``−η·g``) that sign would raise the LR when
successive gradients disagree, so the descent sign is used here. The multiplicative rule is
scale-free (a cosine in [−1, 1]): ``β`` is a per-step relative change (0.02 = at most 2%),
stable without tuning to the loss scale; the additive rule's ``β`` has units of LR²/loss and
is unstable without the clamps (the default β suits the multiplicative rule only; for
additive try 1e-4..1e-3 × ``trainer.lr``). With a schedule, the effective LR is
``global_lr(t)·scale_l``: the schedule multiplies what the hypergradient learns.
Statistics: ``grad_dot_prev_update``, ``grad_norm``, ``update_norm`` (one ``[L]`` state:
the previous update's norm and LR).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register


@register("hypergrad")
class Hypergrad(Controller):
    needs = frozenset({"grad_dot_prev_update", "grad_norm", "update_norm"})

    def __init__(self, rule: str = "multiplicative", beta: float = 0.02, min_scale: float = 0.01,
                 max_scale: float = 100.0):
        if rule not in ("additive", "multiplicative"):
            raise ValueError(f"rule must be additive or multiplicative, got {rule}")
        if beta < 0 or (rule == "multiplicative" and beta >= 1):
            raise ValueError(f"beta must be >= 0 (and < 1 for the multiplicative rule), got {beta}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.rule, self.beta = rule, beta
        self.min_scale, self.max_scale = min_scale, max_scale

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        # a schedule may start at 0 (triangular with low=0): α/α(0) needs a positive α(0)
        positive = plan.lr_table[plan.lr_table > 0]
        self.alpha0 = (positive[0] if len(positive) else plan.lr_table.new_ones(())).detach().clone().float()
        self.alpha = torch.full((self.num_layers,), 1.0, device=device) * self.alpha0
        self.prev_update_norm = torch.zeros(self.num_layers, device=device)
        self.prev_lr = torch.full((self.num_layers,), 1.0, device=device) * self.alpha0

    @torch.no_grad()
    def observe(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        dot = stats["grad_dot_prev_update"]  # g(t)·u(t−1), 0 at the first step
        if self.rule == "additive":
            h = -dot / self.prev_lr.clamp_min(1e-30)
            self.alpha.add_(self.beta * h)
        else:
            cos = -dot / (stats["grad_norm"] * self.prev_update_norm).clamp_min(1e-30)
            self.alpha.mul_(1 + self.beta * cos.clamp(-1, 1))
        self.alpha.clamp_(self.min_scale * self.alpha0, self.max_scale * self.alpha0)
        self.prev_update_norm.copy_(stats["update_norm"])
        self.prev_lr.copy_(stats["global_lr"] * stats["scales"])

    def scales(self, step: int) -> torch.Tensor:
        return (self.alpha / self.alpha0).clamp(self.min_scale, self.max_scale)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "alpha0": self.alpha0, "prev_update_norm": self.prev_update_norm,
                "prev_lr": self.prev_lr}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("alpha", "alpha0", "prev_update_norm", "prev_lr"):
            setattr(self, key, state[key].to(self.plan.device).clone())
