"""Adam in shadow: per-layer LR scales from how Adam would size each layer's step.

The run trains with its own optimizer (SGD); this controller keeps Adam's moments (Kingma &
Ba, arXiv 1412.6980) on the same gradients without applying them. Per layer l, per unit LR:

    Adam's step   a = m̂ / (√v̂ + ε),  m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)
    SGD's step    g (this step's gradient)
    r_l = RMS_l(a) / RMS_l(g)         (RMS over all of the layer's elements)

``r`` is normalised to geometric mean 1 across layers (only the layer profile is kept; the
global LR still sets the size), smoothed with an EMA (``ema``, first value taken as is) and
clamped to ``[min_scale, max_scale]``: ``scale_l``. A layer whose gradients are 100× larger
gets a 100× smaller scale (Adam is invariant to the gradient's scale, SGD is not).

``apply=false`` keeps every scale at 1 and only records (the discussion's question: how do
Adam's step sizes differ by layer, and how do they evolve?): every ``probe_every`` steps,
per layer, the ``quantiles`` (default 10/50/90%) of Adam's per-element step sizes ``|a|``
(per unit LR; multiply by ``global_lr`` for the step Adam would take), with ``RMS(a)`` and
``RMS(g)``. Values stay on the device during the run and are written as ``adam_probe.csv``
at each evaluation (``Controller.records``). The probes are recorded with ``apply=true`` too.

Cost: two parameter-sized moment buffers (2× the model's parameter bytes), a few fused
element-wise ops per step, a sort per layer at each probe; no host sync in the step.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register
from meta_llr.per_layer import PerLayer


def sorted_quantiles(sorted_values: torch.Tensor, quantiles: Sequence[float]) -> torch.Tensor:
    """Quantiles of a sorted 1-D tensor with linear interpolation (``torch.quantile``'s
    default), positions computed on the host from its length: no device sync."""
    n = sorted_values.numel()
    out = []
    for q in quantiles:
        position = q * (n - 1)
        lo = math.floor(position)
        hi = min(lo + 1, n - 1)
        frac = position - lo
        out.append(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)
    return torch.stack(out)


@register("adam_probe")
class AdamProbe(Controller):
    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, ema: float = 0.1,
                 apply: bool = True, probe_every: int = 100, quantiles: list[float] = [0.1, 0.5, 0.9],
                 min_scale: float = 0.01, max_scale: float = 100.0):
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if probe_every < 0:
            raise ValueError(f"probe_every must be >= 0 (0 = no probes), got {probe_every}")
        if not quantiles or any(not 0 <= q <= 1 for q in quantiles):
            raise ValueError(f"quantiles must be a non-empty list of values in [0, 1], got {quantiles}")
        names = [round(q * 100) for q in quantiles]  # the adam_probe.csv columns q10, q50, ...
        if len(set(names)) < len(names):
            raise ValueError(f"quantiles must differ in whole percent (columns q00..q100), got {quantiles}")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.beta1, self.beta2, self.eps, self.ema = beta1, beta2, eps, ema
        self.apply, self.probe_every, self.quantiles = apply, probe_every, list(quantiles)
        self.min_scale, self.max_scale = min_scale, max_scale

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        device = plan.device
        self.per_layer = PerLayer.of_layers(layers, device)
        self.params = self.per_layer.tensors
        self.bounds = [0]
        for layer in layers:
            self.bounds.append(self.bounds[-1] + len(layer.params))
        self.m = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.layer_numel = self.per_layer.layer_numel.float()
        self.t = 0
        self.smoothed = torch.ones(self.num_layers, device=device)
        self.ones = torch.ones(self.num_layers, device=device)
        # Probes wait on the device until the next evaluation moves them to the host
        # (``records``): room for one epoch of them, doubled if evaluations are rarer.
        probes = -(-plan.steps_per_epoch // self.probe_every) + 1 if self.probe_every else 0
        self.probe_values = torch.zeros(probes, self.num_layers, len(self.quantiles) + 2, device=device)
        self.probe_steps: list[int] = []                  # steps of the probes still on the device
        self.probe_history: list[tuple[int, list]] = []   # (step, per-layer values) on the host

    @torch.no_grad()
    def observe(self, step: int, stats: Mapping[str, torch.Tensor]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(m) for p, m in zip(self.params, self.m)]
        self.t += 1
        torch._foreach_lerp_(self.m, grads, 1 - self.beta1)
        torch._foreach_mul_(self.v, self.beta2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - self.beta2)
        adam_step = torch._foreach_sqrt(self.v)                       # a = m̂ / (√v̂ + ε), per unit LR
        torch._foreach_div_(adam_step, math.sqrt(1 - self.beta2 ** self.t))
        torch._foreach_add_(adam_step, self.eps)
        torch._foreach_reciprocal_(adam_step)
        torch._foreach_mul_(adam_step, self.m)
        torch._foreach_div_(adam_step, 1 - self.beta1 ** self.t)
        adam_sq, sgd_sq = self.per_layer.sum_sq(adam_step), self.per_layer.sum_sq(grads)
        ratio = torch.where(sgd_sq > 0, (adam_sq / sgd_sq.clamp_min(1e-38)).sqrt(), self.ones).clamp_min(1e-30)
        ratio = ratio / ratio.log().mean().exp()
        if self.t == 1:
            self.smoothed.copy_(ratio)
        else:
            self.smoothed.lerp_(ratio, self.ema)
        if self.probe_every and step % self.probe_every == 0:
            self._probe(step, adam_step, adam_sq, sgd_sq)

    def _probe(self, step: int, adam_step: list[torch.Tensor], adam_sq: torch.Tensor, sgd_sq: torch.Tensor) -> None:
        if len(self.probe_steps) == len(self.probe_values):  # no room: grow (device ops, no sync)
            grown = self.probe_values.new_zeros(2 * len(self.probe_values), *self.probe_values.shape[1:])
            grown[:len(self.probe_values)].copy_(self.probe_values)
            self.probe_values = grown
        row = self.probe_values[len(self.probe_steps)]
        for l in range(self.num_layers):
            values = torch.cat([a.abs().flatten() for a in adam_step[self.bounds[l]:self.bounds[l + 1]]])
            row[l, :len(self.quantiles)] = sorted_quantiles(values.sort().values, self.quantiles)
        row[:, -2] = (adam_sq / self.layer_numel).sqrt()
        row[:, -1] = (sgd_sq / self.layer_numel).sqrt()
        self.probe_steps.append(step)

    def scales(self, step: int) -> torch.Tensor:
        if not self.apply:
            return self.ones
        return self.smoothed.clamp(self.min_scale, self.max_scale)

    def records(self) -> dict[str, list[dict]]:
        """``adam_probe.csv``: one row per probe and layer."""
        if self.probe_steps:
            values = self.probe_values[:len(self.probe_steps)].cpu().tolist()
            self.probe_history.extend(zip(self.probe_steps, values))
            self.probe_steps = []
        if not self.probe_history:
            return {}
        lrs = self.plan.lr_table.cpu().tolist()
        names = [f"q{round(q * 100):02d}" for q in self.quantiles]
        rows = []
        for step, per_layer in self.probe_history:
            for l, layer_values in enumerate(per_layer):
                row = {"step": step, "global_lr": lrs[step], "layer": l, "name": self.layers[l].name}
                row.update(zip(names, layer_values[:len(names)]))
                row.update(adam_rms=layer_values[-2], sgd_rms=layer_values[-1])
                rows.append(row)
        return {"adam_probe": rows}

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t, "smoothed": self.smoothed,
                "probe_values": self.probe_values, "probe_steps": list(self.probe_steps),
                "probe_history": list(self.probe_history)}

    def load_state_dict(self, state: Mapping) -> None:
        torch._foreach_copy_(self.m, state["m"])
        torch._foreach_copy_(self.v, state["v"])
        self.t = int(state["t"])
        self.smoothed.copy_(state["smoothed"])
        self.probe_values = state["probe_values"].clone().to(self.probe_values.device)
        self.probe_steps = list(state["probe_steps"])
        self.probe_history = [(int(step), list(values)) for step, values in state["probe_history"]]
