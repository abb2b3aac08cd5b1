"""Prodigy / D-Adaptation per layer: each layer estimates its own distance to the solution.

Sources: Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner",
arXiv 2306.06101 (ICML 2024), and Defazio & Mishchenko, "Learning-Rate-Free Learning by
D-Adaptation", arXiv 2301.07733 (ICML 2023). Both run one global ``d``; here every layer ``l``
(all of its tensors: kernel, bias, norm parameters) has its own ``d_l``.

The estimate (the Adam version of Prodigy in 2306.06101, run per layer). At step ``k``,
with ``g`` this step's gradient and ``x`` the weights it updates (``scales(k)`` runs after the
backward pass and before the update, so both are at hand), and ``λ_k = η(k)/max_t η(t)`` the
global schedule's factor (the paper's schedule weight)::

    w_l    = λ_k · d_l²                                   (the paper's weight γ_k d_k²)
    r_l   ← β₃ r_l + w_l · ⟨g_l, x0_l − x_l⟩              (x0: the weights at the first step)
    s_l   ← β₃ s_l + w_l · g_l                            (a vector, the layer's size)
    d̂_l   = r_l / ‖s_l‖                                    (0 while s_l = 0)
    d_l   ← max(d_l, d̂_l)                                 (monotone; d_l starts at d0)

The paper's ``(1 − √β₂)`` factors multiply ``r`` and ``s`` alike and cancel in the ratio, and
``β₃`` defaults to its ``√β₂ = √0.999``. Why it estimates a distance: for a convex loss
``⟨g_i, x_i − x*⟩ ≥ 0``, so ``Σ w_i⟨g_i, x0 − x_i⟩ ≤ ⟨Σ w_i g_i, x0 − x*⟩ ≤ ‖Σ w_i g_i‖ ·
‖x0 − x*‖_*`` for any weights ``w_i ≥ 0`` (``‖·‖_*`` the dual norm: ℓ2 for ``‖s‖₂``, ℓ∞ for
``‖s‖₁``): ``d̂ ≤ D``, as in the papers' analyses; per layer when the loss separates across
layers (tests/test_new_controllers.py checks it). The norm follows the base optimizer:

* ``trainer.optimizer=adamw``: ``‖s‖₁`` as in Prodigy-Adam, so ``d`` bounds the ℓ∞ distance
  (a per-coordinate size, which is what an Adam step moves each coordinate by);
* ``trainer.optimizer=sgd`` (the adaptation, see below): ``‖s‖₂`` as in Prodigy's and
  D-Adaptation's gradient-descent versions, so ``d`` bounds the layer's Euclidean distance.

The step size the estimate asks for, ``η*_l`` (per unit of the paper's LR ``γ``, ``gamma``):

* AdamW: ``η*_l = d_l``, Prodigy-Adam's ``γ d_k`` (the paper also puts ``d`` inside Adam's
  moments, ``m ← β₁m + (1−β₁)d_k g``, ``v ← β₂v + (1−β₂)d_k² g²``; torch's AdamW keeps the
  moments of ``g``, so past gradients get today's ``d``: equal whenever ``d`` is constant).
* SGD (momentum μ, torch's convention ``b ← μb + g``, ``θ ← θ − lr·b``):
  ``η*_l = (1 − μ) · d_l / G_l`` with ``G_l = √(EMA_β₂ ‖g_l‖²)`` (bias-corrected, this step
  included). SGD moves a layer by ``lr·‖b_l‖ ≤ lr·G_l/(1 − μ)`` a step (consistent gradients),
  so ``η*_l`` makes that ``γ·d_l``: the Euclidean analogue of Prodigy-Adam's step of ``γ d`` per
  coordinate, normalised by a gradient size as D-Adaptation's SGD variant is (by the first
  gradient's norm there; a running RMS per layer here, as a layer's gradient size changes by
  orders of magnitude during training). ``(1 − μ)`` undoes the momentum buffer's
  ``1/(1 − μ)`` gain (D-Adaptation writes momentum as primal averaging, which has no gain).
  Weight decay (torch's L2 inside the fused step) is not in ``g`` here.

The scale (``mode``):

* ``relative`` (default): the estimates set the profile across layers and the global LR keeps
  its meaning: ``scale_l = clamp(η*_l / mean_l(η*_l), min_scale, max_scale)``, so the layers'
  LRs average ``global_lr(t)`` (before the clamp) and ``trainer.lr``, the schedule and the
  comparisons at equal global LR work as for every other controller. The clamp matters: a
  layer's ``d̂`` grows only with its own displacement, so a layer the profile starves would stay
  at ``d0`` for good (measured on a noisy quadratic); ``min_scale`` (0.1) keeps every layer
  moving, and the arithmetic mean bounds every scale by ``L`` even before ``max_scale``.
* ``free``: the LR-free method: ``scale_l = γ · η*_l / max_t η(t)``, so
  ``lr_l(t) = γ · λ(t) · η*_l``: the layer's LR is what Prodigy asks for, times the global
  schedule's *shape*; ``trainer.lr`` cancels (it sets nothing but the schedule's unit) and
  ``gamma`` (Prodigy's ``lr``, 1.0) is the only multiplier. Clamped to ``[1e-12, 1e12]`` only
  (guards; ``min_scale``/``max_scale`` do not apply). Steps start tiny (``d0``) and ``d`` grows
  geometrically while a layer's gradients agree (about ×1.4 a step on digits), so reaching
  the distance scale takes ~``log(D/d0)/log 1.4`` steps plus the momentum ramp: ~45 of the
  120 steps of a digits run at ``d0=1e-6``, which then ends 4.7 points below ``uniform``
  (``d0=1e-3``: 0.2 below; ``relative``: 0.2 above; 5 seeds, docs/controllers.md).

The step at ``k`` uses ``d_l`` from before ``g_k`` enters the estimate (the paper's order);
``G_l`` includes ``g_k`` (as Adam's ``v`` does). A layer with no gradient yet has ``η* = 0``.

Cost per step: two flat copies (the gradient and the weights, 2× P transient), the three
per-layer sums ``‖g‖², ⟨g, x0 − x⟩, ‖s‖²`` (AdamW: ``Σ|s|``) in one segmented reduction over a
``[3, P]`` stack, one scaled add into ``s``: about six passes over the parameters, no host sync (measured on one CPU thread: 0.9 ms for the 94 k
parameters of ``shallow``, 6.3 ms for 1.5 M, ~4 ns per parameter, a few % of a step). Memory: ``x0`` (1× P) and ``s`` (1× P), float32,
plus ``[L]`` vectors (``d, r`` and the gradient EMA): 2× the parameter bytes. ``records()``
writes ``prodigy_layer.csv``: per evaluation and layer, ``d_l`` and (SGD) ``G_l``.
"""
from __future__ import annotations

import math

from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.per_layer import PerLayer
from meta_llr.registry import register

MODES = ("free", "relative")
FREE_GUARD = 1e-12  # mode=free clamps to [1e-12, 1e12]: no scale of 0 (a layer with no gradient yet)


@register("prodigy_layer")
class ProdigyLayer(Controller):
    """Per-layer Prodigy distance estimates ``d_l`` turned into LR scales (module docstring)."""

    def __init__(self, mode: str = "relative", d0: float = 1e-6, gamma: float = 1.0, beta3: float = 0.9995,
                 beta2: float = 0.999, min_scale: float = 0.1, max_scale: float = 10.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode}")
        if not d0 > 0:
            raise ValueError(f"d0 must be > 0, got {d0}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not 0 < beta3 <= 1:
            raise ValueError(f"beta3 must be in (0, 1], got {beta3}")
        if not 0 <= beta2 < 1:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.mode, self.d0, self.gamma, self.beta3, self.beta2 = mode, d0, gamma, beta3, beta2
        self.min_scale, self.max_scale = min_scale, max_scale

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        self.adam = plan.optimizer.name == "adamw"
        self.momentum = 0.0 if self.adam else float(plan.optimizer.momentum)
        self.per_layer = PerLayer.of_layers(layers, device)
        self.params = self.per_layer.tensors
        self.lr_peak = float(plan.lr_table.max())  # once, at setup (not in a step)
        self.lr_factor = plan.lr_table / self.lr_peak  # λ_k, the schedule's factor per step
        with torch.no_grad():
            self.x0 = self.per_layer.flat([p.detach() for p in self.params]).float()  # a copy
        self.s = torch.zeros_like(self.x0)
        self.d = torch.full((self.num_layers,), self.d0, device=device)
        self.r = torch.zeros(self.num_layers, device=device)
        self.grad_sq = torch.zeros(self.num_layers, device=device)  # EMA of ‖g_l‖² (SGD)
        self.zero = torch.zeros((), device=device)
        self.t = 0  # steps seen (host): bias correction of the EMA
        self.history: list[tuple[int, list[float], list[float]]] = []  # (step, d, G) at evaluations

    def grad_rms(self) -> torch.Tensor:
        """``G_l``: the bias-corrected RMS of the layer's gradient norm (SGD)."""
        return (self.grad_sq / (1 - self.beta2 ** max(self.t, 1))).sqrt()

    @torch.no_grad()
    def scales(self, step: int) -> torch.Tensor:
        pl = self.per_layer
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        g = pl.flat(grads).float()
        self.t += 1
        d_before = self.d  # η* uses d_k, before g_k enters the estimate (self.d is replaced below)
        # The estimate: r += w <g, x0 - x>, s += w g, d = max(d, r / |s|); the three per-layer
        # sums (‖g‖², <g, x0 - x>, ‖s‖² or Σ|s|) in one segmented reduction.
        weight = self.d.square().mul_(self.lr_factor[min(step, len(self.lr_factor) - 1)])
        diff = torch.sub(self.x0, pl.flat(self.params))
        self.s.mul_(self.beta3).addcmul_(g, pl.expand(weight))
        size_term = self.s.abs() if self.adam else self.s * self.s
        gg, gx, size = pl.totals_of_flat(torch.stack([g * g, g * diff, size_term])).unbind()
        del diff
        self.r.mul_(self.beta3).addcmul_(weight, gx)
        if self.adam:
            eta = d_before
        else:  # η* ∝ d_l / G_l, G_l² the bias-corrected EMA of ‖g_l‖² (constant factors: below)
            self.grad_sq.lerp_(gg, 1 - self.beta2)
            eta = torch.where(self.grad_sq > 0, d_before * self.grad_sq.rsqrt(), self.zero)
            size = size.clamp_min_(0).sqrt_()
        estimate = torch.where(size > 0, self.r / size, self.zero)
        self.d = torch.maximum(self.d, estimate)
        if self.mode == "free":  # LR-free: guards only (d >= d0 > 0 keeps it positive)
            factor = self.gamma / self.lr_peak
            if not self.adam:  # (1 − μ) and the bias correction sqrt(1 − β₂^t) of G_l
                factor *= (1 - self.momentum) * math.sqrt(1 - self.beta2 ** self.t)
            return (eta * factor).clamp(FREE_GUARD, 1 / FREE_GUARD)
        return (eta / eta.mean().clamp_min(1e-30)).clamp(self.min_scale, self.max_scale)

    def records(self) -> dict[str, list[dict]]:
        """``prodigy_layer.csv``: per evaluation and layer, the distance estimate ``d`` and (SGD)
        the gradient RMS ``G`` it is divided by."""
        if self.t and (not self.history or self.history[-1][0] != self.t):
            rms = self.grad_rms() if not self.adam else torch.full_like(self.d, float("nan"))
            self.history.append((self.t, self.d.cpu().tolist(), rms.cpu().tolist()))
        return {"prodigy_layer": [
            {"step": step, "layer": l, "name": self.layers[l].name, "d": d[l], "grad_rms": rms[l]}
            for step, d, rms in self.history for l in range(self.num_layers)]} if self.history else {}

    def state_dict(self) -> dict:
        return {"x0": self.x0, "s": self.s, "d": self.d, "r": self.r, "grad_sq": self.grad_sq, "t": self.t,
                "history": list(self.history)}

    def load_state_dict(self, state: Mapping) -> None:
        for key in ("x0", "s", "d", "r", "grad_sq"):
            getattr(self, key).copy_(state[key])
        self.t = int(state["t"])
        self.history = [(int(step), list(d), list(rms)) for step, d, rms in state["history"]]
