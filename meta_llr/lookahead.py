"""The unrolled hypergradient: how the loss after a few SGD steps depends on the layers' LR scales.

From the model's current weights ``θ_0``, ``k = len(train_batches)`` plain SGD steps with
per-layer log-scales ``log s`` (``l(p)``: the layer of parameter ``p``)::

    θ_{i+1,p} = θ_{i,p} − lr · exp(log s_{l(p)}) · ∇_p L(θ_i; batch_i)      i = 0 .. k−1

and then the held-out loss ``L_val(θ_k)`` together with its gradient ``∂L_val(θ_k)/∂log s``,
differentiated through all k steps (second order, ``torch.func.grad`` of ``grad``). This is
the meta-gradient of ``rnn_meta``'s ``learn=unrolled`` (a longer horizon than the one-step
hypergradient, hence less short-horizon bias; Wu et al. 2018, arXiv 1803.02021).

Cost per call: about ``3k + 1`` forward/backward passes of the model on one batch (each inner
step a gradient, and the outer gradient back through it), and memory for the k unrolled steps'
graphs. The model's parameters and buffers are left untouched.
"""
from __future__ import annotations

import torch


def unrolled_hypergradient(model, loss_fn, log_scales: torch.Tensor, layer_of: dict, train_batches,
                           held_out, lr) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_val(θ_k), ∂L_val(θ_k)/∂log s)`` after ``k = len(train_batches)`` plain SGD steps.

    ``θ_{i+1} = θ_i − lr·exp(log s_l)·∇L(θ_i; batch_i)`` for each parameter of layer ``l``
    (``layer_of[id(param)] = l``; parameters in no layer stay fixed), from the model's current
    weights, differentiated through all k steps (second order) with ``torch.func``. Costs about
    3k+1 forward/backward passes. Momentum is not unrolled. A model with BatchNorm in train
    mode uses batch statistics; its running statistics are updated on throw-away copies.
    """
    from torch.func import functional_call, grad, grad_and_value

    params = {n: p.detach() for n, p in model.named_parameters()}
    layer = {n: layer_of[id(p)] for n, p in model.named_parameters() if id(p) in layer_of}
    buffers = dict(model.named_buffers())

    def batch_loss(p, x, y):
        # fresh copies inside the transform: BatchNorm may update them; the model's stay untouched
        return loss_fn(functional_call(model, (p, {n: b.clone() for n, b in buffers.items()}), (x,)), y)

    def val_after(log_s):
        p = params
        for x, y in train_batches:
            g = grad(batch_loss)(p, x, y)
            p = {n: p[n] - lr * log_s[layer[n]].exp() * g[n] if n in layer else p[n] for n in p}
        return batch_loss(p, *held_out)

    gradient, value = grad_and_value(val_after)(log_scales)
    return value, gradient
