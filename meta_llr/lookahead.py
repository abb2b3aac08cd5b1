"""The unrolled hypergradient: how the loss after a few steps of the run's optimizer depends on
the layers' LR scales.

From the model's current weights ``θ_0`` (and the optimizer's current momentum buffers ``b_0``),
``k = len(train_batches)`` steps of the run's own SGD (momentum ``μ``, Nesterov, L2 weight
decay ``λ`` as ``torch.optim.SGD`` applies them) with per-layer log-scales ``log s``
(``l(p)``: the layer of parameter ``p``)::

    d_i = ∇_p L(θ_i; batch_i) + λ_p θ_{i,p}
    b_{i+1} = μ b_i + d_i
    θ_{i+1,p} = θ_{i,p} − lr · exp(log s_{l(p)}) · (d_i + μ b_{i+1} if Nesterov else b_{i+1})

then the held-out loss ``L_val(θ_k)`` and its gradient ``∂L_val(θ_k)/∂log s``, differentiated
through all k steps (second order, ``torch.func.grad`` of ``grad``). This is the meta-gradient
of ``rnn_meta``'s ``learn=unrolled`` (a longer horizon than the one-step hypergradient, hence
less short-horizon bias; Wu et al. 2018, arXiv 1803.02021). With ``momentum=0`` and no decay
it is plain SGD.

Cost per call: about ``3k + 1`` forward/backward passes of the model on one batch (each inner
step a gradient, and the outer gradient back through it), and memory for the k unrolled steps'
graphs. The model's parameters, buffers and the optimizer's state are left untouched.
"""
from __future__ import annotations

import torch


def unrolled_hypergradient(model, loss_fn, log_scales: torch.Tensor, layer_of: dict, train_batches,
                           held_out, lr, momentum: float = 0.0, nesterov: bool = False,
                           decay_of: dict | None = None, momentum_buffers: dict | None = None,
                           scaled: set | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_val(θ_k), ∂L_val(θ_k)/∂log s)`` after ``k = len(train_batches)`` SGD steps (module
    docstring). ``layer_of[id(param)] = l`` (parameters in no layer stay fixed); ``decay_of``:
    ``id(param) -> λ_p`` (default 0); ``momentum_buffers``: ``id(param) -> b_0`` (default 0);
    ``scaled``: ids of the parameters whose LR the layer scale multiplies (default all; the
    others step at ``lr``). A model with BatchNorm in train mode uses batch statistics; its
    running statistics are updated on throw-away copies.
    """
    from torch.func import functional_call, grad, grad_and_value

    named = list(model.named_parameters())
    params = {n: p.detach() for n, p in named}
    layer = {n: layer_of[id(p)] for n, p in named if id(p) in layer_of}
    decay = {n: float((decay_of or {}).get(id(p), 0.0)) for n, p in named}
    scales_it = {n: scaled is None or id(p) in scaled for n, p in named}
    start = {n: (momentum_buffers or {}).get(id(p)) for n, p in named}
    buffers = dict(model.named_buffers())

    def batch_loss(p, x, y):
        # fresh copies inside the transform: BatchNorm may update them; the model's stay untouched
        return loss_fn(functional_call(model, (p, {n: b.clone() for n, b in buffers.items()}), (x,)), y)

    def val_after(log_s):
        p = params
        b = {n: (start[n].detach() if start[n] is not None else torch.zeros_like(params[n])) for n in layer}
        for x, y in train_batches:
            g = grad(batch_loss)(p, x, y)
            new = dict(p)
            for n in layer:
                d = g[n] + decay[n] * p[n] if decay[n] else g[n]
                b[n] = momentum * b[n] + d if momentum else d
                direction = d + momentum * b[n] if (nesterov and momentum) else b[n]
                rate = lr * log_s[layer[n]].exp() if scales_it[n] else lr
                new[n] = p[n] - rate * direction
            p = new
        return batch_loss(p, *held_out)

    gradient, value = grad_and_value(val_after)(log_scales)
    return value, gradient
