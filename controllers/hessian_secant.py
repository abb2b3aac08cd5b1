"""Per-layer secant estimate of the inverse curvature along the step, used as the layer's LR.

Smith & Topin, "Super-Convergence", arXiv 1708.07120 (section on estimating the optimal LR
from the Hessian): the secant (quasi-Newton) estimate of the inverse curvature, per layer l
here instead of one global scalar, with L1 sums over the layer's elements as in the authors'
code:

    form=gradients (default):  ε*_l = Σ|θ_l(a) − θ_l(b)| / Σ|g_l(θ(a)) − g_l(θ(b))|

with ``a``, ``b`` = ``interval`` steps apart (the paper used 1 and 10; longer intervals average
out minibatch noise), and the paper's snapshot-only form, from the weights alone:

    form=snapshots:  ε*_l = η_l·Σ|θ_{i+1} − θ_i| / Σ|2θ_{i+1} − θ_i − θ_{i+2}|

(snapshots ``interval`` steps apart, η_l the layer's LR at the latest step; equal to the
gradient form for plain SGD with ``interval=1``). Each new estimate enters an EMA,
``ε ← (1−ema)·ε + ema·ε_new`` (``ema=0.1``, the authors' value; the first estimate is taken
as is). The layer's scale is ``gain·ε*_l / η(t)`` (so its LR is ``gain·ε*_l``, the
Newton-like step ``1/h`` along the last step's direction for ``gain=1``; with momentum μ the
effective step is ``η/(1−μ)``, so ``gain≈1−μ`` is the comparable choice), optionally
normalised to mean 1 across layers (``normalize=true``, keeping only the layer profile), then
clamped to ``[min_scale, max_scale]``. Until the first estimate exists the scale is 1.

Minibatch noise enters ``Δg`` and biases ε* low (the plain form). ``same_batch=true``
recomputes, once per probe, the gradient at the earlier weights ``θ(a)`` on the current
step's batch (the loop's ``loss_at`` statistic), so ``Δg`` is the curvature's alone. It costs
one extra forward and backward every ``interval`` steps, plus the transient gradient tensors.

State: at most two parameter-sized copies (gradients form: the earlier weights and the
earlier gradient; same_batch: the earlier weights and the staged next ones; snapshots: the
last snapshot and the last difference). All arithmetic is batched per layer on the device.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register
from meta_llr.per_layer import PerLayer


@register("hessian_secant")
class HessianSecant(Controller):
    def __init__(self, interval: int = 1, ema: float = 0.1, form: str = "gradients", gain: float = 1.0,
                 normalize: bool = False, same_batch: bool = False, min_scale: float = 0.01,
                 max_scale: float = 100.0):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if form not in ("gradients", "snapshots"):
            raise ValueError(f"form must be gradients or snapshots, got {form}")
        if same_batch and form != "gradients":
            raise ValueError("same_batch=true needs form=gradients (the snapshot form uses no gradients)")
        if gain <= 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.interval, self.ema, self.form, self.gain = interval, ema, form, gain
        self.normalize, self.same_batch = normalize, same_batch
        self.min_scale, self.max_scale = min_scale, max_scale
        self.needs = frozenset({"loss_at"}) if same_batch else frozenset()

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        self.per_layer = PerLayer.of_layers(layers, device)
        self.params = self.per_layer.tensors
        self.current = [p.detach() for p in self.params]  # views: always the current weights
        # gradients form: weights = θ(a), other = g(θ(a)); same_batch: other = staged θ(b);
        # snapshots: weights = last snapshot, other = last snapshot difference.
        self.weights = [p.detach().float().clone() for p in self.params]
        self.other = [torch.zeros_like(w) for w in self.weights]
        self.numerator = torch.zeros(self.num_layers, device=device)
        self.estimate = torch.ones(self.num_layers, device=device)
        self.count = 0          # estimates made so far (a host int: they happen at fixed steps)
        self.have_other = False
        self.ones = torch.ones(self.num_layers, device=device)
        self.steps_seen = 0
        self.rows: list[dict] = []

    def _new_estimate(self, value: torch.Tensor) -> None:
        value = torch.where(torch.isfinite(value) & (value > 0), value, self.estimate)
        if self.count == 0:
            self.estimate.copy_(value)
        else:
            self.estimate.lerp_(value, self.ema)
        self.count += 1

    @torch.no_grad()
    def observe(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        # Here the weights are θ(step+1) and p.grad is g(θ(step)) on this step's batch.
        k = self.interval
        if self.form == "snapshots":
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

    def scales(self, step: int) -> torch.Tensor:
        if not self.count:
            return self.ones
        ratio = self.gain * self.estimate / self.plan.global_lr(step)
        if self.normalize:
            ratio = ratio / ratio.mean()
        return ratio.clamp(self.min_scale, self.max_scale)

    def records(self) -> dict[str, list[dict]]:
        """``secant.csv``: the current estimate per layer at each evaluation."""
        if self.count:
            estimate = self.estimate.cpu().tolist()
            self.rows.extend({"step": self.steps_seen, "estimates": self.count, "layer": i, "name": layer.name,
                              "epsilon": e, "inverse_epsilon": 1 / e if e else float("nan")}
                             for i, (layer, e) in enumerate(zip(self.layers, estimate)))
        return {"secant": self.rows} if self.rows else {}

    def state_dict(self) -> dict:
        return {"weights": self.weights, "other": self.other, "numerator": self.numerator,
                "estimate": self.estimate, "count": self.count, "have_other": self.have_other,
                "steps_seen": self.steps_seen, "rows": list(self.rows)}

    def load_state_dict(self, state: Mapping) -> None:
        torch._foreach_copy_(self.weights, state["weights"])
        torch._foreach_copy_(self.other, state["other"])
        self.numerator = state["numerator"].clone()
        self.estimate.copy_(state["estimate"])
        self.count, self.have_other = int(state["count"]), bool(state["have_other"])
        self.steps_seen, self.rows = int(state["steps_seen"]), list(state["rows"])
