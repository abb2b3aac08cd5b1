"""Per-layer curvature along the step, its inverse used as the layer's LR profile.

``form=hvp`` (the default) measures, every ``interval`` steps, the exact curvature of the
training loss along each layer's last update,

    c_l = u_lᵀ H_ll u_l / u_lᵀ u_l,

with ``u_l = θ_l(t+1) − θ_l(t)`` the update the optimizer applied to layer l (momentum, weight
decay and all) and ``H_ll`` the layer's diagonal block of the Hessian of this step's training
loss on this step's batch (the loop's ``loss_at`` statistic: same augmented inputs, BatchNorm
on batch statistics with its running buffers untouched), at the new weights ``θ(t+1)``. The
Hessian-vector products are taken by double backward through ``loss_at`` (``torch.autograd.grad``
with ``create_graph=True``, then the gradient of ``g_l·u_l``): no parameter is perturbed, so
the value is exact up to float round-off, and ``torch.func``'s trouble with BatchNorm's in-place
buffer updates does not arise. ``u = Σ_l u_l`` in one product would give ``u_lᵀ(H u)_l``, which
includes the cross-layer blocks ``u_lᵀ H_lm u_m``; the diagonal blocks need one of:

* ``blocks=exact`` (default): one backward of ``g_l·u_l`` per layer through the same gradient
  graph. Cost per probe: one forward, one backward with ``create_graph``, and L
  double-backward passes (each traverses the part of the gradient graph that depends on layer
  l); on the 4-layer ``shallow`` net ≈ 5 training steps per probe (CPU, below). Exact.
* ``blocks=signs``: one product with the direction ``Σ_l s_l u_l``, ``s_l = ±1`` from a
  Walsh–Hadamard pattern that changes each probe; ``s_l·u_lᵀ(H Σ_m s_m u_m)_l`` is
  ``u_lᵀ H_ll u_l`` plus cross terms ``s_l s_m u_lᵀ H_lm u_m`` that cancel exactly over a period
  of ``2^⌈log₂ L⌉`` probes (for fixed ``H``, ``u``) and average out in the EMA. Cost per probe:
  one forward, one backward with ``create_graph``, one double backward (≈ 4 steps on
  ``shallow``), whatever L. Unbiased but noisy (the cross terms can exceed the diagonal); a negative smoothed value is
  floored (see below). For deep nets where L products per probe are too dear.

Each new ``c_l`` enters an EMA, ``c ← (1−ema)·c + ema·c_new`` (a layer's first valid value taken
as it is). A value is not used (the previous estimate is kept) where it is not finite, where
``blocks=exact`` gives ``c_l ≤ 0`` (no inverse), or where the update is too small for float32 to
resolve its direction: ``‖u_l‖ < min_update_ratio·‖θ_l‖`` (default 1e-6; at a relative update of
1e-6 the rounding of θ(t+1) − θ(t) is already a few % of u; at the end of a step schedule,
digits' first conv moves by 6e-7 of its norm per step).

Scales, from ``ε_l = 1/c_l`` (an inverse curvature, the secant forms' ``ε*``):

    normalize=true (default):  scale_l = clamp(gain · (ε_l / geomean_m ε_m)^power, min_scale, max_scale)
    normalize=false:           scale_l = clamp(gain · ε_l / η(t), min_scale, max_scale)

With ``normalize=true`` the layer LR is ``global_lr(t)·gain·profile_l``: the global schedule
keeps its role and the controller sets only the layer profile (geometric mean 1 across the
layers that have an estimate; a layer without one yet gets 1). ``power=1`` equalises
``η_l·c_l`` across layers (each layer at the same fraction of its stability limit ``η c < 2``
along its own step); ``power < 1`` flattens the profile. With ``normalize=false`` the layer LR
is ``gain/c_l`` (a Newton step along the last update; with momentum μ the effective step is
``η/(1−μ)``, so ``gain ≈ 1−μ`` is the comparable choice) and the schedule is ignored. Before
the first probe the scale is 1. For ``blocks=signs`` a smoothed ``c_l`` is floored at
``max_m c_m · min_scale/max_scale`` before inverting (the clamp range bounds the spread).

The plain secant forms, Smith & Topin, "Super-Convergence", arXiv 1708.07120 (section on
estimating the optimal LR from the Hessian), per layer l instead of one global scalar, with L1
sums over the layer's elements as in the authors' code:

    form=gradients:  ε*_l = Σ|θ_l(a) − θ_l(b)| / Σ|g_l(θ(a)) − g_l(θ(b))|   (a, b ``interval`` steps apart)
    form=snapshots:  ε*_l = η_l·Σ|θ_{i+1} − θ_i| / Σ|2θ_{i+1} − θ_i − θ_{i+2}|

(snapshots ``interval`` steps apart, η_l the layer's LR at the latest step; equal to the gradient
form for plain SGD with ``interval=1``), ``ε ← (1−ema)·ε + ema·ε*`` (the first estimate as it
is), then the same scale formulas with ``ε`` in place of ``1/c``. ``same_batch=true``
(``form=gradients`` only) recomputes the gradient at the earlier weights on the current batch
(``loss_at``), so ``Δg`` holds no minibatch noise: one extra forward and backward per probe.

**The plain forms are circular as LR controllers.** With minibatch gradients, ``Δg`` is
dominated by the noise of two different batches, not by ``H·Δθ``, while ``Σ|Δθ_l| ≈ η_l·Σ|m_l|``
(``m`` the momentum buffer): so ``ε*_l ∝ η_l`` and ``ε*_l/η_l`` is ≈ 2–3 in every layer whatever
its curvature (``layer_stats.csv`` column ``eps_over_lr``: on digits with ``uniform``, 1.2–5.5,
mostly 2–3, in all four layers and at every LR of the step schedule from 0.05 down to 5e-5,
while the exact curvature along the step differs 20–60× between the first conv and the head).
Used as the layer's LR (``normalize=false``, ``gain=1``) that is a feedback loop on the layer's
own LR: each estimate pulls the layer LR towards 2–3× its current value, so it grows
geometrically (at the EMA's pace) until ``max_scale``. The old defaults collapsed on digits:
0.146 ± 0.062 test accuracy over 5 seeds; seed 0 has every scale at 100 from step 38 of 120 and
its loss at 2.6e8 in epoch 5 (the loop now stops it as diverged, ``loss_explosion``, at
epoch 8). Normalised, the profile is ≈ flat noise around 1. ``same_batch=true`` removes the noise; even then an L1 ratio
``Σ|Hu|/Σ|u|`` is not the curvature along u (H = diag(1, 4), u = (2, 1): 6/3 = 2.0 against
``uᵀHu/uᵀu`` = 8/5 = 1.6). ``form=hvp`` measures ``c_l``, which does not scale with ``η_l``.

Defaults, chosen on measurements (final test accuracy, mean ± sd over seeds; SGD momentum 0.9
Nesterov, lr 0.05, step schedule as in the default config; "old defaults" = ``form=gradients
interval=1 ema=0.1 gain=1 normalize=false min_scale=0.01 max_scale=100``; "[a, b]" = the clamps):

digits (sklearn 8×8), ``model=shallow`` (width 32), 10 epochs, batch 128, seeds 0–4 (the
default command, at digits' ceiling: every sane profile scores the same)::

    uniform                                           0.9939 ± 0.0012
    old defaults                                      0.1461 ± 0.0619   (scales at 100, loss → 1e6+)
    hvp defaults (interval=10 ema=0.3, [0.25, 4])     0.9956 ± 0.0015
    hvp interval=10 ema=0.3, [0.1, 10]                0.9956 ± 0.0025
    hvp interval=4 ema=0.1, [0.1, 10]                 0.9961 ± 0.0015
    hvp interval=20 ema=0.3, [0.1, 10]                0.9956 ± 0.0025
    hvp interval=10 ema=0.3 power=0.5, [0.1, 10]      0.9950 ± 0.0023

digits, harder (``model.width=8 trainer.epochs=4 trainer.batch_size=64``), seeds 0–7::

    uniform                                           0.9726 ± 0.0070
    old defaults                                      0.5684 ± 0.3473
    hvp defaults                                      0.9806 ± 0.0066   (≥ uniform on 7/8 seeds, paired +0.008)
    hvp defaults with [0.2, 5]                        0.9785 ± 0.0075
    hvp defaults with [0.1, 10]                       0.9729 ± 0.0069
    hvp interval=5, [0.1, 10]                         0.9764 ± 0.0077
    hvp interval=4 ema=0.1, [0.1, 10]                 0.9722 ± 0.0058
    hvp interval=20, [0.1, 10]                        0.9698 ± 0.0100
    hvp power=0.5, [0.1, 10]                          0.9663 ± 0.0127
    hvp blocks=signs, [0.1, 10]                       0.9618 ± 0.0072   (interval=4 ema=0.1: 0.9601)
    form=gradients interval=1 normalize=true, [0.1, 10]  0.9802 ± 0.0064

The clamps were chosen on this setting (the full inverse-curvature profile puts the head, the
layer of highest curvature along its step, at 0.1–0.2 × the global LR; [0.25, 4] bounds the
spread at 16×); the CIFAR runs below came after the choice. The normalised plain secant also
trains here: its profile is ≈ flat noise around 1 (ε/η ≈ 2–3 everywhere), a bounded random
walk of the layer LRs, not a curvature measurement.

CIFAR-10 JPEG copy (lossy, quality 75: figures run below those on the official data),
``data=imagefolder data.val_size=45000`` (5,000 training images), ``model=shallow``, 2 epochs,
seeds 0–4::

    uniform                                           0.2954 ± 0.0154
    old defaults                                      0.3376 ± 0.0181
    hvp defaults                                      0.3081 ± 0.0136   (> uniform on 5/5 seeds, paired +0.013)
    hvp defaults with [0.1, 10]                       0.3068 ± 0.0135

The old defaults score higher on this 2-epoch run only because every scale sits at
``max_scale=100`` from the first steps: a uniform LR of 5 (100 × the default), which a net
whose convolutions are BatchNorm-scale-invariant tolerates for 80 steps. That is the feedback
loop pinned at its clamp, not a curvature estimate; over 5 epochs on the same data the same
defaults end at 0.1000 (docs/results.md).

Cost (CPU, one thread, digits ``shallow``, batch 128; a training step ≈ 25 ms): a probe ≈ 130 ms
with ``blocks=exact`` (forward and backward with ``create_graph`` ≈ 27 ms, then 4 double
backwards; one Hessian-vector product costs ≈ 70 ms on top of the gradient, ≈ 2.7 × a
forward-backward) and ≈ 95 ms with ``blocks=signs``: ≈ 5 and ≈ 4 training steps. At
``interval=10`` that is ≈ +50 % per step on average (+25 % at 20); the other steps cost nothing
(the scales are a cached tensor between probes; one parameter copy at each probe step). The
double-backward graph holds about two steps' activations during a probe. Under bf16 autocast
(CUDA) ``loss_at`` runs in bf16, so each ``c_l`` carries bf16 round-off; the EMA averages it.

State: one parameter-sized copy (the weights before a probe step) and per-layer scalars
(``form=hvp``); two copies for the secant forms. All arithmetic on the device, no host sync.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.per_layer import PerLayer
from meta_llr.registry import register

FORMS = ("hvp", "gradients", "snapshots")
BLOCKS = ("exact", "signs")


def walsh_signs(count: int) -> torch.Tensor:
    """``[P, count]`` ±1, ``P = 2^⌈log₂ count⌉``: row k, column l is ``(−1)^popcount(k & l)``.
    Distinct columns are orthogonal over the P rows."""
    period = 1 << max(count - 1, 0).bit_length()
    return torch.tensor([[-1.0 if bin(k & l).count("1") % 2 else 1.0 for l in range(count)]
                         for k in range(period)])


@register("hessian_secant")
class HessianSecant(Controller):
    def __init__(self, form: str = "hvp", interval: int = 10, ema: float = 0.3, gain: float = 1.0,
                 normalize: bool = True, power: float = 1.0, blocks: str = "exact",
                 same_batch: bool = False, min_update_ratio: float = 1e-6, min_scale: float = 0.25,
                 max_scale: float = 4.0):
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if same_batch and form != "gradients":
            raise ValueError("same_batch=true needs form=gradients (the other forms use no earlier gradient)")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {', '.join(BLOCKS)}, got {blocks}")
        if gain <= 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}")
        if not 0 <= min_update_ratio < 1:
            raise ValueError(f"min_update_ratio must be in [0, 1), got {min_update_ratio}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.form, self.interval, self.ema, self.gain = form, interval, ema, gain
        self.normalize, self.power, self.blocks, self.same_batch = normalize, power, blocks, same_batch
        self.min_update_ratio = min_update_ratio
        self.min_scale, self.max_scale = min_scale, max_scale
        self.needs = frozenset({"loss_at"}) if (same_batch or form == "hvp") else frozenset()

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        self.per_layer = PerLayer.of_layers(layers, device)
        self.params = self.per_layer.tensors
        self.current = [p.detach() for p in self.params]  # views: always the current weights
        self.estimate = torch.ones(self.num_layers, device=device)  # ε per layer
        self.count = 0          # estimates (probes) made so far: a host int, they happen at fixed steps
        self.ones = torch.ones(self.num_layers, device=device)
        self.steps_seen = 0
        self.rows: list[dict] = []
        self.have = torch.zeros(self.num_layers, dtype=torch.bool, device=device)  # layers with an estimate
        if self.form == "hvp":
            self.before = [w.clone() for w in self.current]  # θ(t) at a probe step, then −u(t)
            self.curvature = torch.ones(self.num_layers, device=device)   # smoothed c per layer
            self.last_value = torch.zeros(self.num_layers, device=device)  # the last raw c, where valid
            self.last_valid = torch.zeros(self.num_layers, dtype=torch.bool, device=device)
            self.cached = self.ones.clone()
            self.signs = walsh_signs(self.num_layers).to(device)
            bounds, start = [], 0
            for layer in layers:
                bounds.append((start, start + len(layer.params)))
                start += len(layer.params)
            self.bounds = bounds
            return
        # gradients form: weights = θ(a), other = g(θ(a)); same_batch: other = staged θ(b);
        # snapshots: weights = last snapshot, other = last snapshot difference.
        self.weights = [p.detach().float().clone() for p in self.params]
        self.other = [torch.zeros_like(w) for w in self.weights]
        self.numerator = torch.zeros(self.num_layers, device=device)
        self.have_other = False

    # ------------------------------------------------------------------ the scales
    def _profile(self, estimate: torch.Tensor, have: torch.Tensor | None = None) -> torch.Tensor:
        """``gain·(ε/geomean ε)^power`` over the layers that ``have`` an estimate (others: gain)."""
        log = estimate.clamp_min(1e-30).log() * self.power
        if have is None:
            log = log - log.mean()
        else:
            mean = torch.where(have, log, 0).sum() / have.sum().clamp_min(1)
            log = torch.where(have, log - mean, 0)
        return (self.gain * log.exp()).clamp(self.min_scale, self.max_scale)

    def scales(self, step: int) -> torch.Tensor:
        if self.form == "hvp" and step % self.interval == 0:
            torch._foreach_copy_(self.before, self.current)  # θ(step): observe takes u from it
        return self._scales(step)

    def _scales(self, step: int) -> torch.Tensor:
        if not self.count:
            return self.ones
        if self.form == "hvp" and self.normalize:
            return self.cached  # refreshed at each probe
        if self.normalize:
            return self._profile(self.estimate, self.have)
        ratio = self.gain * self.estimate / self.plan.global_lr(step)
        ratio = torch.where(self.have, ratio, 1.0)  # a layer without an estimate yet keeps the global LR
        return ratio.clamp(self.min_scale, self.max_scale)

    # ------------------------------------------------------------------ form=hvp
    def _diagonal_blocks(self, loss_at, u: list[torch.Tensor]) -> torch.Tensor:
        """``[L]`` ``u_lᵀ H_ll u_l`` (exact) or its Walsh-sign estimate, by double backward."""
        ps = [p.detach().requires_grad_(True) for p in self.params]
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_at(ps), ps, create_graph=True, allow_unused=True)
            zero = torch.zeros((), device=self.plan.device)
            if self.blocks == "exact":
                out = []
                for start, end in self.bounds:
                    terms = [(grads[i] * u[i]).sum() for i in range(start, end)
                             if grads[i] is not None and grads[i].requires_grad]
                    if not terms:  # the layer's gradient does not depend on the parameters
                        out.append(zero)
                        continue
                    hv = torch.autograd.grad(sum(terms), ps[start:end], retain_graph=True, allow_unused=True)
                    out.append(sum(((h * u[i]).sum() for h, i in zip(hv, range(start, end)) if h is not None),
                                   zero))
                return torch.stack(out)
            signs = self.signs[self.count % len(self.signs)]
            sign_of = signs[self.per_layer.tensor_layer]
            terms = [(g * v * s).sum() for g, v, s in zip(grads, u, sign_of.unbind()) if g is not None and g.requires_grad]
            if not terms:
                return torch.zeros(self.num_layers, device=self.plan.device)
            hv = torch.autograd.grad(sum(terms), ps, allow_unused=True)
            dots = [(h * v).sum() if h is not None else zero for h, v in zip(hv, u)]
            return signs * self.per_layer.combine(dots)

    def _probe_hvp(self, stats: Mapping) -> None:
        u = self.before
        torch._foreach_sub_(u, self.current)  # θ(t) − θ(t+1) = −u(t): c is even in u
        uu = self.per_layer.sum_sq(u)
        ww = self.per_layer.sum_sq(self.current)
        value = self.plan.reduce(self._diagonal_blocks(stats["loss_at"], u).float()) / uu  # torchrun: all shards
        valid = torch.isfinite(value) & (uu > 0) & (uu >= self.min_update_ratio ** 2 * ww)
        if self.blocks == "exact":
            valid &= value > 0
        self.last_value, self.last_valid = torch.where(valid, value, 0.0), valid
        value = torch.where(valid, value, self.curvature)
        smoothed = torch.where(self.have, self.curvature.lerp(value, self.ema), value)
        self.curvature = torch.where(valid, smoothed, self.curvature)
        self.have = self.have | valid
        c = self.curvature
        if self.blocks == "signs":
            top = torch.where(self.have, c, -math.inf).max().clamp_min(1e-30)
            c = c.maximum(top * (self.min_scale / self.max_scale))
        self.estimate = torch.where(self.have, 1 / c, 1.0)
        self.count += 1
        if self.normalize:
            self.cached = self._profile(self.estimate, self.have)

    @property
    def last(self) -> torch.Tensor:
        """``form=hvp``: the last probe's raw ``c_l``, NaN where it was not valid."""
        return torch.where(self.last_valid, self.last_value, math.nan)

    # ------------------------------------------------------------------ the secant forms
    def _new_estimate(self, value: torch.Tensor) -> None:
        """Fold one secant value per layer into ε: a layer's first valid value as it is, later ones
        by the EMA; an invalid one (not finite, or ≤ 0) leaves the layer's ε as it was."""
        valid = torch.isfinite(value) & (value > 0)
        smoothed = torch.where(self.have, self.estimate.lerp(value, self.ema), value)
        self.estimate = torch.where(valid, smoothed, self.estimate)
        self.have = self.have | valid
        self.count += 1

    @torch.no_grad()
    def observe(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        # Here the weights are θ(step+1) and p.grad is g(θ(step)) on this step's batch.
        k = self.interval
        if self.form == "hvp":
            if step % k == 0:
                self._probe_hvp(stats)
        elif self.form == "snapshots":
            if (step + 1) % k == 0:
                torch._foreach_sub_(self.weights, self.current)          # θ_i+1 − θ_i+2 (negated new diff)
                if self.have_other:                                       # other = θ_i+1 − θ_i
                    layer_lr = stats["global_lr"] * stats["scales"]
                    first = self.per_layer.norm(self.other, 1)
                    torch._foreach_add_(self.other, self.weights)         # 2θ_i+1 − θ_i − θ_i+2
                    self._new_estimate(layer_lr * first / self.per_layer.norm(self.other, 1))
                torch._foreach_neg_(self.weights)
                torch._foreach_copy_(self.other, self.weights)
                torch._foreach_copy_(self.weights, self.current)
                self.have_other = True
        elif not self.same_batch:
            if step % k == 0:  # g(θ(step)) pairs with weights = θ(step), captured one observe ago
                grads = [p.grad if p.grad is not None else torch.zeros_like(w)
                         for p, w in zip(self.params, self.weights)]
                if self.have_other:
                    torch._foreach_sub_(self.other, grads)
                    self._new_estimate(self.numerator / self.per_layer.norm(self.other, 1))
                torch._foreach_copy_(self.other, grads)
                self.have_other = True
            if (step + 1) % k == 0:  # weights θ(step+1): the next pair's point
                torch._foreach_sub_(self.weights, self.current)
                self.numerator = self.per_layer.norm(self.weights, 1)
                torch._foreach_copy_(self.weights, self.current)
        else:
            if step % k == 0 and step > 0:  # g(θ(step)) and g(θ(step−k)) on this batch
                earlier = [w.clone().requires_grad_(True) for w in self.weights]
                with torch.enable_grad():
                    earlier_grads = torch.autograd.grad(stats["loss_at"](earlier), earlier, allow_unused=True)
                grads = [p.grad if p.grad is not None else torch.zeros_like(w)
                         for p, w in zip(self.params, self.weights)]
                diffs = [g - (e if e is not None else torch.zeros_like(g)) for g, e in zip(grads, earlier_grads)]
                self._new_estimate(self.numerator / self.per_layer.norm(diffs, 1))
                torch._foreach_copy_(self.weights, self.other)           # θ(step) becomes θ(a)
            if (step + 1) % k == 0:  # stage θ(step+1) and measure |θ(step+1) − θ(a)|
                current = self.current
                torch._foreach_copy_(self.other, current)
                self.numerator = self.per_layer.norm(torch._foreach_sub(current, self.weights), 1)
        self.steps_seen = step + 1

    # ------------------------------------------------------------------ records, state
    def records(self) -> dict[str, list[dict]]:
        """``secant.csv``: the current estimate per layer at each evaluation (``form=hvp``: also the
        smoothed and the last raw curvature along the step, and the scale)."""
        if self.count:
            estimate = self.estimate.cpu().tolist()
            extra = [{} for _ in estimate]
            if self.form == "hvp":
                step = max(self.steps_seen - 1, 0)
                scale = self._scales(step)
                extra = [{"curvature": c if h else float("nan"), "curvature_last": r, "scale": s}
                         for c, h, r, s in zip(self.curvature.cpu().tolist(), self.have.cpu().tolist(),
                                               self.last.cpu().tolist(), scale.cpu().tolist())]
            self.rows.extend({"step": self.steps_seen, "estimates": self.count, "layer": i, "name": layer.name,
                              "epsilon": e, "inverse_epsilon": 1 / e if e else float("nan"), **more}
                             for i, (layer, e, more) in enumerate(zip(self.layers, estimate, extra)))
        return {"secant": self.rows} if self.rows else {}

    def state_dict(self) -> dict:
        common = {"estimate": self.estimate, "count": self.count, "steps_seen": self.steps_seen,
                  "rows": list(self.rows), "have": self.have}
        if self.form == "hvp":
            return {**common, "curvature": self.curvature, "last_value": self.last_value,
                    "last_valid": self.last_valid, "cached": self.cached}
        return {**common, "weights": self.weights, "other": self.other, "numerator": self.numerator,
                "have_other": self.have_other}

    def load_state_dict(self, state: Mapping) -> None:
        self.estimate = state["estimate"].clone()
        self.count, self.steps_seen, self.rows = int(state["count"]), int(state["steps_seen"]), list(state["rows"])
        # checkpoints of the secant forms before the per-layer mask: every layer had its estimate
        self.have = state["have"].clone() if "have" in state else torch.full_like(self.have, self.count > 0)
        if self.form == "hvp":
            self.curvature = state["curvature"].clone()
            self.last_value, self.last_valid = state["last_value"].clone(), state["last_valid"].clone()
            self.cached = state["cached"].clone()
            return
        torch._foreach_copy_(self.weights, state["weights"])
        torch._foreach_copy_(self.other, state["other"])
        self.numerator = state["numerator"].clone()
        self.have_other = bool(state["have_other"])
