"""Find a model's layers in forward execution order, and merge them into depth groups.

A *layer* is a module that owns a weight of two or more dimensions (Conv, Linear), together
with its bias and the normalisation module(s) executed right after it. Order comes from
running one batch with forward hooks, not from registration order, so a ResNet's shortcut
convolution lands where it really runs (after the block's residual branch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from meta_llr.errors import UserError
from meta_llr.interface import Layer


NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norm_parameters(model: nn.Module) -> set[int]:
    """The ``id``s of the parameters of ``model``'s normalisation modules (BatchNorm, InstanceNorm,
    LayerNorm, GroupNorm): what ``trainer.norm_lr_mult`` multiplies."""
    return {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}


@dataclass
class TracedLayer:
    name: str                       # the weighted module's name
    weight: torch.Tensor
    params: list[torch.Tensor] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def _own_params(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


@torch.no_grad()
def trace_layers(model: nn.Module, example: torch.Tensor) -> list[TracedLayer]:
    """Run ``example`` through ``model`` and return its layers in execution order.

    Modules with parameters but no >=2-D weight (BatchNorm, LayerNorm, a free scale) attach
    to the weighted module executed just before them (the first one, if none ran before).
    Parameters of modules that never ran are attached to the last layer; frozen parameters
    (``requires_grad=False``) are left out.
    """
    order: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module, _inputs, _output):
        name = names[module]
        if name not in seen:
            seen.add(name)
            order.append(name)

    seen: set[str] = set()
    handles = [m.register_forward_hook(hook) for m in model.modules() if _own_params(m)]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    modules = dict(model.named_modules())
    layers: list[TracedLayer] = []
    pending: list[tuple[str, list[torch.Tensor]]] = []  # param-owning modules before any weight
    for name in order:
        weight = getattr(modules[name], "weight", None)
        params = _own_params(modules[name])
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.requires_grad:
            layers.append(TracedLayer(name, weight, params, [name]))
            for pending_name, pending_params in pending:
                layers[-1].params.extend(pending_params)
                layers[-1].modules.append(pending_name)
            pending.clear()
        elif layers:
            layers[-1].params.extend(params)
            layers[-1].modules.append(name)
        else:
            pending.append((name, params))
    if not layers:
        raise UserError(f"model {type(model).__name__} has no trainable Conv/Linear weight; "
                        "meta_llr needs at least one layer with a >=2-D weight")
    placed = {id(p) for layer in layers for p in layer.params}
    for _, params in pending:  # param modules that ran but no weight ever followed
        layers[-1].params.extend(p for p in params if id(p) not in placed)
        placed.update(id(p) for p in params)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in placed:
            layers[-1].params.append(p)
            layers[-1].modules.append(name)
            placed.add(id(p))
    return layers


def group_layers(traced: list[TracedLayer], groups: int | None) -> tuple[list[Layer], list[int]]:
    """Merge traced layers into ``groups`` contiguous depth groups (None or 0: no merging).

    Returns the controller-facing ``Layer`` list and, for each traced layer, its group index.
    Groups differ in size by at most one layer; earlier groups take the extra layers.
    """
    count = len(traced)
    if not groups:
        groups = count
    if groups < 1 or groups > count:
        raise UserError(f"layers.groups={groups} but the model has {count} layers; "
                        f"use 1..{count}, or 0 for one group per layer")
    bounds = np.array_split(np.arange(count), groups)
    units: list[Layer] = []
    group_of: list[int] = [0] * count
    for g, members in enumerate(bounds):
        members = [int(i) for i in members]
        first, last = traced[members[0]], traced[members[-1]]
        for i in members:
            group_of[i] = g
        units.append(Layer(
            index=g,
            name=first.name if len(members) == 1 else f"{first.name}..{last.name}",
            depth=g / (groups - 1) if groups > 1 else 0.0,
            params=[p for i in members for p in traced[i].params],
            weight=first.weight,
            modules=[m for i in members for m in traced[i].modules],
        ))
    return units, group_of


def layer_table(traced: list[TracedLayer], group_of: list[int]) -> list[dict]:
    """Rows of the layer table (``layers.csv``): index, name, modules, params, group."""
    return [
        {"index": i, "name": layer.name, "modules": "+".join(layer.modules),
         "params": layer.num_params, "group": group_of[i]}
        for i, layer in enumerate(traced)
    ]
