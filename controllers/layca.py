"""Layca: layer-level control of the amount of rotation per step.

Carbonnelle & De Vleeschouwer, "Layer rotation: a surprisingly powerful indicator of
generalization in deep networks?", arXiv 1806.01603. After the base optimizer's step (SGD,
momentum, AdamW: whatever ``trainer.optimizer`` is), with ``w`` the layer's kernels before
the step (all of the layer's >=2-D tensors as one vector) and ``s = w − w_after`` the step:

    s⊥ = s − (s·w / ‖w‖²) w                 project the step orthogonal to the weights
    w  ← w − ρ_l(t) · (‖w‖ / ‖s⊥‖) · s⊥      rescale it to ‖w‖ and step
    w  ← w · ‖w(0)‖ / ‖w‖                   renormalise to the initial norm

so each step rotates the layer's kernels by exactly ``atan(ρ_l(t))`` and keeps their norm.
``ρ_l(t) = global_lr(t) · m_l``: ρ0 is ``trainer.lr`` and its course the global LR schedule; the
layer multipliers are the paper's, with L layers and l = 0..L−1 in forward order:

    alpha > 0:  m_l = m^(L−1−l),  m = (1 − alpha)^(5/(L−1))   (first layers rotate less)
    alpha < 0:  m_l = (1 + alpha)^(5l/(L−1))                   (last layers rotate less)

The scales returned are ``m_l`` (so ``effective_lr`` in the diagnostics is ρ_l). Biases and
normalisation parameters are not trained, as in the paper (``other_params=none``: restored
to their value before the step), or trained by the base optimizer at the global LR
(``other_params=sgd``). A layer whose step has no orthogonal part that the float type
resolves is left unrotated and only renormalised: with ε the machine epsilon, ``‖s⊥‖²`` is
trusted when it exceeds ``64ε·(‖s‖² + ε‖w‖²)``, the rounding of ``‖s‖² − (s·w)²/‖w‖²`` plus
that of ``s = w − w_after`` itself (a layer with no gradient, whose step is weight decay
alone, would otherwise turn in a direction made of rounding noise). No extra state beyond the
loop's copy of the weights before the step; the update is computed on flat vectors of all
kernels (``meta_llr.per_layer``: a fixed number of kernel launches, a few kernel-sized
temporaries during the step).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register
from meta_llr.per_layer import PerLayer


def layca_multipliers(num_layers: int, alpha: float) -> torch.Tensor:
    """The paper's per-layer multipliers ``m_l`` for ``num_layers`` layers (float64)."""
    l = torch.arange(num_layers, dtype=torch.float64)
    if num_layers == 1 or alpha == 0:
        return torch.ones(num_layers, dtype=torch.float64)
    if alpha > 0:
        return ((1 - alpha) ** (5 / (num_layers - 1))) ** (num_layers - 1 - l)
    return (1 + alpha) ** (5 * l / (num_layers - 1))


@register("layca")
class Layca(Controller):
    scale_1d = False  # 1-D parameters, if trained (other_params=sgd), use the global LR

    def __init__(self, alpha: float = 0.0, other_params: str = "none", min_scale: float = 1e-3,
                 max_scale: float = 10.0):
        if not -1 < alpha < 1:
            raise ValueError(f"alpha must be in (-1, 1), got {alpha}")
        if other_params not in ("none", "sgd"):
            raise ValueError(f"other_params must be none or sgd, got {other_params}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.alpha, self.other_params = alpha, other_params
        self.min_scale, self.max_scale = min_scale, max_scale

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        self.multipliers = layca_multipliers(self.num_layers, self.alpha).float().to(device)
        self.multipliers = self.multipliers.clamp(self.min_scale, self.max_scale)
        # Which entries of layer.params are kernels; the per-kernel layer index for gathers.
        self.kernel_index = [[k for k, p in enumerate(layer.params) if p.dim() > 1] for layer in layers]
        self.per_layer = PerLayer.of_layers(layers, device, keep=lambda p: p.dim() > 1)
        self.kernels = self.per_layer.tensors
        self.other_index = [[k for k, p in enumerate(layer.params) if p.dim() <= 1] for layer in layers]
        with torch.no_grad():
            self.initial_norm = self.per_layer.norm(self.kernels)
        self.zero, self.one = torch.zeros((), device=device), torch.ones((), device=device)
        self.eps = torch.finfo(self.kernels[0].dtype).eps if self.kernels else 0.0
        # The kernels as one flat vector: a view of the run's parameter buffer, where they lie
        # back to back (meta_llr.optim.flatten_); elsewhere a copy per step, written back.
        kernels = [k.detach() for k in self.kernels]  # same storage, outside autograd
        self.kernels_flat = self.per_layer.flat_view(kernels) if self.per_layer.is_block(kernels) else None

    def scales(self, step: int) -> torch.Tensor:
        return self.multipliers

    @torch.no_grad()
    def transform_update(self, step: int, before: Sequence[Sequence[torch.Tensor]]) -> None:
        if self.other_params == "none":
            restore = [layer.params[k] for layer, ks in zip(self.layers, self.other_index) for k in ks]
            if restore:
                torch._foreach_copy_(restore, [b[k] for b, ks in zip(before, self.other_index) for k in ks])
        # In closed form on the flat kernels (views of the run's buffers: no copy). With
        # q = s·w/ww and P = ‖s⊥‖² = ss − sw·q, the rotated step w − c·s⊥ (c = ρ‖w‖/‖s⊥‖) has norm
        # ‖w‖·sqrt(1 + ρ²) exactly (s⊥ ⊥ w), so the renormalised result is, with k = w − s the
        # kernels after the base step,   w_new = α·w + β·k,
        #   β = ‖w(0)‖·ρ / (sqrt(1 + ρ²)·sqrt(P)),   α = ‖w(0)‖ / (‖w‖·sqrt(1 + ρ²)) + β·(q − 1),
        # and with P = 0 (no orthogonal step, or none above rounding) ρ = 0: w_new = w·‖w(0)‖/‖w‖.
        pl = self.per_layer
        w = pl.flat_view([b[k] for b, ks in zip(before, self.kernel_index) for k in ks])
        k = self.kernels_flat if self.kernels_flat is not None else pl.flat(self.kernels)
        s = w - k
        ws = torch.stack([w, s])
        (ww, _), (sw, ss) = pl.totals_of_flat((ws.unsqueeze(1) * ws.unsqueeze(0)).flatten(0, 1)).view(2, 2, -1)
        q = sw / ww
        p = torch.addcmul(ss, sw, q, value=-1)
        moves = torch.add(ss, ww, alpha=self.eps).mul_(64 * self.eps) < p
        rho = torch.where(moves, self.plan.global_lr(step) * self.multipliers, self.zero)
        root = torch.hypot(rho, self.one)
        beta = torch.where(moves, self.initial_norm * rho / (root * p.sqrt()), self.zero)
        alpha = torch.addcmul(self.initial_norm / (root * ww.sqrt()), beta, q - 1)
        beta_e, alpha_e = pl.expand(torch.stack([beta, alpha]))
        k.mul_(beta_e).addcmul_(w, alpha_e)
        if self.kernels_flat is None:  # k was a copy
            pl.unflat_into(k, self.kernels)

    def state_dict(self) -> dict:
        return {"initial_norm": self.initial_norm}

    def load_state_dict(self, state: Mapping) -> None:
        self.initial_norm = state["initial_norm"].to(self.plan.device).clone()
