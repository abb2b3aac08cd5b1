"""LARS: layer-wise adaptive rate scaling by the trust ratio (and LARC, its clipped form).

You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", arXiv 1708.03888.
Per layer l, over its kernels only (the layer's >=2-D tensors; with ``exclude_1d=true``
biases and normalisation parameters keep scale 1, i.e. the global LR):

    lars:             scale_l = trust · ‖θ_l‖ / (‖g_l‖ + wd·‖θ_l‖)
    LARC (trust_clip): scale_l = min(trust · ‖θ_l‖ / (‖g_l‖ + wd·‖θ_l‖) / η(t), 1)

with the ratio 1 where ``‖θ_l‖`` or ``‖g_l‖`` is 0 (``trust``, the paper's η; ``wd``, the
paper's β, default 5e-4 like ``trainer.weight_decay``: keep the two equal); then clamped to
``[min_scale, max_scale]``.

Defaults: LARC with ``trust=0.02`` (the clipped form and coefficient of NVIDIA's LARC), which
trains at the default ``trainer.lr``: on digits (shallow, 10 epochs, seed 0) 0.9944 test
accuracy, as ``uniform``; most kernels sit at the clip (scale 1) and the head is slowed where
its gradient is large. Plain LARS multiplies the global LR by ``trust·‖θ‖/‖g‖`` (≈ 0.01–0.05
here), so it needs the large global LRs of the paper: ``controller.trust_clip=false
controller.trust=0.001 trainer.lr=5`` (digits 0.9972; at ``trainer.lr=0.05`` it reaches only
0.7333, since every layer then steps at ~1e-3).

Timing: the loop calls ``scales(t)`` after step t's backward and before its update, so the
ratio uses this step's gradient ``g(t)`` and the weights ``θ(t)`` it updates, as in the paper
(and timm's ``Lars``). The loop applies ``scale_l`` to the layer's LR, after the momentum
buffer (torch.optim's convention: ``b ← μb + (g + wd·θ)``, ``θ ← θ − η·scale_l·b``, or along
``g + wd·θ + μb`` with ``trainer.nesterov=true``, the default); the paper puts the ratio inside
the buffer (``v ← μv + η·λ_l·(g + β·θ)``). Without Nesterov the two are identical on a first
step (tests/test_trust_ratio.py writes it out by hand) and whenever ``λ_l`` is constant; under
momentum and a changing ratio they differ by how past steps are weighted.
Cost: two batched norms over the kernels per step; no state.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register
from meta_llr.per_layer import PerLayer


def trust_ratio(weight_norm: torch.Tensor, grad_norm: torch.Tensor, trust: float, wd: float) -> torch.Tensor:
    """``trust·‖θ‖/(‖g‖ + wd·‖θ‖)``, 1 where either norm is 0 (per layer, batched)."""
    ratio = trust * weight_norm / (grad_norm + wd * weight_norm)
    return torch.where((weight_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))


@register("lars")
class Lars(Controller):
    def __init__(self, trust: float = 0.02, wd: float = 5e-4, trust_clip: bool = True, exclude_1d: bool = True,
                 min_scale: float = 1e-4, max_scale: float = 100.0):
        if trust <= 0:
            raise ValueError(f"trust must be > 0, got {trust}")
        if wd < 0:
            raise ValueError(f"wd must be >= 0, got {wd}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.trust, self.wd, self.trust_clip = trust, wd, trust_clip
        self.min_scale, self.max_scale = min_scale, max_scale
        self.exclude_1d = exclude_1d
        self.scale_1d = not exclude_1d

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        self.per_layer = PerLayer.of_layers(layers, plan.device, keep=lambda p: p.dim() > 1 or not self.exclude_1d)
        self.kernels = self.per_layer.tensors
        self.zero = torch.zeros((), device=plan.device)

    def layer_scales(self, weight_norm: torch.Tensor, grad_norm: torch.Tensor, global_lr: torch.Tensor) -> torch.Tensor:
        ratio = trust_ratio(weight_norm, grad_norm, self.trust, self.wd)
        if self.trust_clip:
            ratio = torch.clamp(ratio / global_lr, max=1.0)
        return ratio.clamp(self.min_scale, self.max_scale)

    @torch.no_grad()
    def scales(self, step: int) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else self.zero for p in self.kernels]
        weight_norm, grad_norm = self.per_layer.norm(self.kernels), self.per_layer.norm(grads)
        return self.layer_scales(weight_norm, grad_norm, self.plan.global_lr(step))
