"""LAMB: the layer-wise trust ratio over the AdamW update direction.

You, Li, Reddi et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", arXiv 1904.00962 (Algorithm 2, with φ the identity). With ``trainer.optimizer=adamw``
the run's step for layer l is ``θ_l ← θ_l − η(t)·scale_l·r_l`` with AdamW's direction

    r_l = m̂_l / (√v̂_l + ε) + λ·θ_l,   m̂ = m/(1−β1^t),  v̂ = v/(1−β2^t)

(``λ`` = ``trainer.weight_decay``, decoupled), and LAMB sets

    scale_l = ‖θ_l‖ / ‖r_l‖            (1 where either norm is 0; then clamped)

over the layer's kernels (its >=2-D tensors); with ``exclude_1d=true`` (the default, as is
usual for LAMB in practice) biases and normalisation parameters keep scale 1, i.e. plain AdamW.
With ``exclude_1d=false`` they join their layer's ``r_l`` with the decay the run gives them
(none under ``trainer.decay_1d=false``); that needs ``trainer.norm_lr_mult=1``, since another
multiplier would move normalisation parameters along a different direction than ``r_l``.
So the layer moves by ``η·‖θ_l‖`` along the unit direction ``r_l/‖r_l‖``: exactly LAMB, since
AdamW applies one LR to its decay and its adaptive step.

The ratio needs this step's moments before the optimizer forms them: the controller keeps its
own copy of AdamW's moments for the kernels (same β, ε, gradients and update order as the
run's AdamW), updated in ``scales(t)``, which the loop calls after step t's backward.
Cost: two kernel-sized buffers (up to 2× the parameter bytes), a few fused element-wise ops
and two batched norms per step; no host sync.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from meta_llr.errors import UserError
from meta_llr.interface import Controller, Layer, Plan
from meta_llr.per_layer import PerLayer
from meta_llr.registry import register


@register("lamb")
class Lamb(Controller):
    requires = ("trainer.optimizer=adamw", "trainer.lr=0.01")
    def __init__(self, exclude_1d: bool = True, min_scale: float = 1e-3, max_scale: float = 10.0):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.exclude_1d, self.min_scale, self.max_scale = exclude_1d, min_scale, max_scale
        self.scale_1d = not exclude_1d

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        spec = plan.optimizer
        if spec.name != "adamw":
            raise UserError("controller=lamb scales the AdamW direction: set trainer.optimizer=adamw "
                            "(e.g. trainer.lr=0.01)")
        if not self.exclude_1d and spec.norm_lr_mult != 1:
            raise UserError(f"controller.exclude_1d=false puts normalisation parameters in the trust ratio, "
                            f"which trainer.norm_lr_mult={spec.norm_lr_mult:g} would change; set "
                            f"trainer.norm_lr_mult=1 or controller.exclude_1d=true")
        self.beta1, self.beta2 = spec.betas
        self.eps, self.decay = spec.eps, spec.weight_decay
        self.per_layer = PerLayer.of_layers(layers, plan.device, keep=lambda p: p.dim() > 1 or not self.exclude_1d)
        self.kernels = self.per_layer.tensors
        self.decays = [p.dim() > 1 or spec.decay_1d for p in self.kernels]  # as the run's AdamW groups
        self.exp_avg = [torch.zeros_like(p) for p in self.kernels]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.kernels]
        self.zero = torch.zeros((), device=plan.device)
        self.count = 0  # host-side step count, as torch's AdamW bias corrections (a pure function of t)

    @torch.no_grad()
    def scales(self, step: int) -> torch.Tensor:
        live = [i for i, p in enumerate(self.kernels) if p.grad is not None]
        if not live:  # everything frozen: nothing moves
            return torch.ones(self.num_layers, device=self.plan.device)
        self.count += 1
        grads = [self.kernels[i].grad for i in live]
        m = [self.exp_avg[i] for i in live]
        v = [self.exp_avg_sq[i] for i in live]
        torch._foreach_lerp_(m, grads, 1 - self.beta1)
        torch._foreach_mul_(v, self.beta2)
        torch._foreach_addcmul_(v, grads, grads, 1 - self.beta2)
        bias1 = 1 - self.beta1 ** self.count
        bias2_sqrt = math.sqrt(1 - self.beta2 ** self.count)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        direction = torch._foreach_div(m, denom)
        torch._foreach_div_(direction, bias1)
        decayed = [(d, self.kernels[i]) for i, d in zip(live, direction) if self.decays[i]] if self.decay else []
        if decayed:
            directions, weights = zip(*decayed)
            torch._foreach_add_(list(directions), list(weights), alpha=self.decay)
        full = [self.zero] * len(self.kernels)  # a frozen kernel: norm 0
        for i, d in zip(live, direction):
            full[i] = d
        weight_norm, update_norm = self.per_layer.norm(self.kernels), self.per_layer.norm(full)
        ratio = torch.where((weight_norm > 0) & (update_norm > 0), weight_norm / update_norm,
                            torch.ones_like(weight_norm))
        return ratio.clamp(self.min_scale, self.max_scale)

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "count": self.count}

    def load_state_dict(self, state: Mapping) -> None:
        torch._foreach_copy_(self.exp_avg, list(state["exp_avg"]))
        torch._foreach_copy_(self.exp_avg_sq, list(state["exp_avg_sq"]))
        self.count = int(state["count"])
