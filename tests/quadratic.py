"""A separable quadratic with known per-layer curvatures, and a minimal loop that drives a
controller through exactly the calls ``meta_llr.run.Run.train_step`` makes.

    loss(θ) = ½ Σ_l h_l ‖θ_l − θ*_l‖²  +  Σ_l ξ_l·θ_l

Each "layer" l is one 2-D parameter tensor θ_l (a kernel, so kernel-only controllers treat
it as such), optionally with a 1-D "bias" of the same curvature. ``ξ`` is the batch: noise
drawn per step (``noise`` is its standard deviation), so the gradient ``h_l(θ_l − θ*_l) + ξ_l``
carries minibatch noise, and two gradients on the same batch differ by exactly
``h_l·Δθ_l``. Shared by the adaptive-controller and learned-controller tests.

Two options leave that separable, isotropic case (both 0 by default): ``spread > 0`` gives
each element of a kernel its own curvature ``h_l·d_e`` with ``d_e`` spaced geometrically in
``[e^−spread, e^spread]`` (so the curvature along a direction ``u`` is the Rayleigh quotient
``h_l Σ d_e u_e² / Σ u_e²``, no longer ``h_l``), and ``coupling = κ`` adds
``κ Σ_l (θ_l − θ*_l)·(θ_{l+1} − θ*_{l+1})`` over consecutive kernels (all of one shape): Hessian
blocks ``H_{l,l±1} = κ·I`` between layers, the diagonal blocks unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from meta_llr.interface import Controller, Layer, Plan


class Quadratic(nn.Module):
    def __init__(self, curvatures: Sequence[float] = (1.0, 10.0, 100.0), shape: tuple[int, int] = (4, 4),
                 noise: float = 0.0, bias: bool = False, seed: int = 0, spread: float = 0.0,
                 coupling: float = 0.0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.curvatures = [float(h) for h in curvatures]
        self.noise = float(noise)
        self.coupling, self.anisotropic = float(coupling), spread != 0
        count = shape[0] * shape[1]
        self.register_buffer("spread", torch.logspace(-spread, spread, count, base=math.e).view(shape))
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(shape, generator=gen)) for _ in curvatures])
        self.biases = nn.ParameterList([nn.Parameter(torch.randn(shape[0], generator=gen)) for _ in curvatures]
                                       if bias else [])
        for l in range(len(curvatures)):
            self.register_buffer(f"target{l}", torch.randn(shape, generator=gen))

    def layers(self) -> list[Layer]:
        count = len(self.curvatures)
        return [Layer(index=l, name=f"layer{l}", depth=l / max(count - 1, 1),
                      params=[self.weights[l]] + ([self.biases[l]] if len(self.biases) else []),
                      weight=self.weights[l], modules=[f"layer{l}"]) for l in range(count)]

    def params(self) -> list[torch.Tensor]:
        return [p for layer in self.layers() for p in layer.params]

    def curvature_of_params(self) -> list[float]:
        return [h for h, layer in zip(self.curvatures, self.layers()) for _ in layer.params]

    def targets(self) -> list[torch.Tensor]:
        out = []
        for l, layer in enumerate(self.layers()):
            out.append(getattr(self, f"target{l}"))
            if len(layer.params) > 1:
                out.append(torch.zeros_like(layer.params[1]))
        return out

    def sample_batch(self, gen: torch.Generator) -> list[torch.Tensor]:
        return [self.noise * torch.randn(p.shape, generator=gen) for p in self.params()]

    def element_curvatures(self) -> list[torch.Tensor]:
        """The diagonal of each parameter tensor's own Hessian block (``h_l·d_e`` for kernels)."""
        return [h * self.spread if p.dim() > 1 else torch.full_like(p, h)
                for p, h in zip(self.params(), self.curvature_of_params())]

    def loss(self, params: Sequence[torch.Tensor] | None = None, batch: Sequence[torch.Tensor] | None = None):
        params = self.params() if params is None else params
        total = 0.0
        kernels = []
        for i, (p, target, h) in enumerate(zip(params, self.targets(), self.curvature_of_params())):
            if self.anisotropic and p.dim() > 1:
                total = total + 0.5 * h * (self.spread * (p - target).pow(2)).sum()
            else:
                total = total + 0.5 * h * (p - target).pow(2).sum()
            if p.dim() > 1:
                kernels.append(p - target)
            if batch is not None:
                total = total + (batch[i] * p).sum()
        if self.coupling:
            for a, b in zip(kernels, kernels[1:]):
                total = total + self.coupling * (a * b).sum()
        return total


def run_controller(controller: Controller, model: Quadratic, steps: int, lr: float | Sequence[float],
                   momentum: float = 0.0, seed: int = 0,
                   on_step: Callable[[int, list[torch.Tensor]], None] | None = None) -> dict:
    """Train ``model`` with SGD (per-layer LR ``global_lr·scale``) under ``controller``.

    ``lr``: a constant global LR or one value per step. Follows ``Run.train_step``: scales
    before the step, statistics after backward, ``before`` copies for ``transform_update``,
    ``observe`` with the statistics named in ``needs`` (plus loss, global_lr, scales).
    ``on_step(step, before)`` is called after each step with copies of the parameters from
    before it. Returns per-step ``loss`` (before the step), ``scales`` ``[steps, L]`` and the
    final loss (noise-free)."""
    layers = model.layers()
    table = torch.full((steps,), float(lr)) if isinstance(lr, (int, float)) else torch.tensor(list(lr))
    plan = Plan(total_steps=steps, steps_per_epoch=steps, epochs=1, device=torch.device("cpu"),
                lr_table=table.float())
    controller.setup(layers, plan)
    params = [p for layer in layers for p in layer.params]
    param_layer = torch.tensor([layer.index for layer in layers for _ in layer.params])
    prev = [torch.zeros_like(p) for p in params]  # after the step: -u(t)
    buffers = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    needs = set(controller.needs) | {"loss", "global_lr", "scales"}

    def per_layer(values, squared=True):
        values = torch.stack(values).float()
        out = torch.zeros(len(layers))
        return out.index_add_(0, param_layer, values * values).sqrt_() if squared else out.index_add_(0, param_layer, values)

    losses, scales_seen = [], []
    for step in range(steps):
        controller.trainable(step)
        scales = controller.scales(step)
        global_lr = plan.lr_table[step]
        batch = model.sample_batch(gen)
        loss = model.loss(params, batch)
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params]
        stats = {"loss": loss.detach(), "global_lr": global_lr, "scales": scales,
                 "grad_norm": per_layer(torch._foreach_norm(grads)),
                 "grad_dot_prev_update": -per_layer([torch.sum(g * d) for g, d in zip(grads, prev)], squared=False),
                 "loss_at": lambda ps, batch=batch: model.loss(ps, batch)}
        torch._foreach_copy_(prev, params)
        with torch.no_grad():
            for i, p in enumerate(params):
                layer_scale = scales[param_layer[i]] if (p.dim() > 1 or controller.scale_1d) else 1.0
                buffers[i].mul_(momentum).add_(p.grad)
                p.sub_(global_lr * layer_scale * buffers[i])
            if "transform_update" in controller.hooks():
                by_layer, i = [], 0
                for layer in layers:
                    by_layer.append(prev[i:i + len(layer.params)])
                    i += len(layer.params)
                controller.transform_update(step, by_layer)
            torch._foreach_sub_(prev, params)
        stats["update_norm"] = per_layer(torch._foreach_norm(prev))
        stats["weight_norm"] = per_layer(torch._foreach_norm(params))
        controller.observe(step, {k: stats[k] for k in needs})
        if on_step is not None:
            on_step(step, [(p + d).detach() for p, d in zip(params, prev)])
        losses.append(loss.item())
        scales_seen.append(scales.detach().clone())
    for p in params:
        p.grad = None
    return {"loss": losses, "scales": torch.stack(scales_seen), "final_loss": model.loss().item()}
