"""``width_scaled``: μP's per-layer learning-rate multipliers from each layer's width.

Source: Yang, Hu, Babuschkin, Sidor, Liu, Farhi, Ryder, Pachocki, Chen & Gao, "Tensor
Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter Transfer",
arXiv 2203.03466, Table 3 ("μP and SP for general neural networks"), checked against the
``mup`` package's documentation (its README: the Adam LR of hidden weights is
``globalLR / width_mult`` with ``width_mult = fan_in / base_fan_in``). Table 3, LR rows
(standard parametrisation, SP, in brackets):

===========  ============================  ==================  ==================
             input weights & all biases    output weights      hidden weights
===========  ============================  ==================  ==================
SGD LR       fan_out  (1)                  1/fan_in  (1)       1  (1)
Adam LR      1  (1)                        1/fan_in  (1)       1/fan_in  (1)
===========  ============================  ==================  ==================

As multipliers of the LR tuned at a base width, with the width ratio ``m`` of the layer::

    m_in  = fan_out / base_fan_in     (first layer: its fan_in is the data's, fixed)
    m_l   = fan_in  / base_fan_in     (every other layer)

    column sgd  (trainer.optimizer=sgd):    input m_in,  hidden 1,       output 1/m_out
    column adam (trainer.optimizer=adamw):  input 1,     hidden 1/m_l,   output 1/m_out

``scale_l`` is that multiplier, constant in time; the global LR plays the role of the LR
tuned at ``fan_in = base_fan_in``. Roles: the first layer (forward order) holds the input
weights, the last the output weights, the others are hidden; a model of one layer maps a
finite dimension to a finite one and gets 1. ``fan_in``/``fan_out`` come from ``layer.weight``
as torch counts them: ``in_features × kernel area`` and ``out_features × kernel area``
(for a conv followed by a conv of the same kernel, the first's fan_out is the second's fan_in,
so ``m_in`` is the next layer's ``m``). With ``layers.groups=K`` a group is sized by its first
weighted module. ``column=auto`` reads ``plan.optimizer.name``.

Biases and normalisation parameters (Table 3: like input weights, SGD ``fan_out``, Adam 1):
with the Adam column they keep the global LR (``scale_1d = False``), which is Table 3 exactly;
with the SGD column they follow their layer's scale (``scale_1d = True``), which is Table 3
for the first layer only (hidden biases get 1 instead of ``m``, the output bias ``1/m``
instead of 1): the framework has one 1-D LR per layer, either the layer's or the global one.

What this is not, in this framework: μP also prescribes the initialisation and a forward
multiplier, and its guarantee (the optimal LR stays put as width grows, every layer's
features move by Θ(1)) holds only with them: Table 3 initialises the output weights with
variance ``1/fan_in²`` (the ``mup`` package: variance 1/base width and an output multiplier
``1/m``; or zero). The models here use standard PyTorch init (``Linear``'s default, He init
for convs), i.e. SP's variance ``1/fan_in`` for the output layer too: its initial weights are
``√fan_in`` times μP's, so at init the logits are O(1) instead of O(1/√fan_in), and with SGD
the gradient reaching the hidden layers is ``√m`` times μP's, so the SGD column's hidden
updates grow like ``√m`` with width (no transfer guarantee; close to μP only near the base
width). With Adam the update sizes are μP's (Adam normalises the gradient's scale) but the
initial readout's contribution does not vanish, so the limit is not μP's either. Zero-init
or rescale the output layer (``× 1/√m``) to get μP proper; BatchNorm after a conv also makes
that layer's function invariant to its weights' scale, which μP's derivation does not assume.

Cost: none per step (a constant ``[L]`` tensor). ``records()`` writes ``width_scaled.csv``:
role, fan_in, fan_out, width ratio and multiplier of every layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from meta_llr.interface import Controller, Layer, Plan
from meta_llr.registry import register

COLUMNS = ("auto", "sgd", "adam")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel as torch counts them (times the kernel area)."""
    if weight.dim() < 2:
        return 1, weight.numel()
    area = weight[0][0].numel()
    return weight.shape[1] * area, weight.shape[0] * area


def mup_multipliers(shapes: Sequence[tuple[int, int]], base_fan_in: int, column: str) -> list[dict]:
    """Per layer (``(fan_in, fan_out)`` in forward order): role, width ratio and Table 3's LR
    multiplier for ``column`` (``sgd`` or ``adam``)."""
    if column not in ("sgd", "adam"):
        raise ValueError(f"column must be sgd or adam, got {column}")
    rows, last = [], len(shapes) - 1
    for index, (fan_in, fan_out) in enumerate(shapes):
        if last == 0:
            role, ratio, multiplier = "input+output", 1.0, 1.0
        elif index == 0:
            role, ratio = "input", fan_out / base_fan_in
            multiplier = ratio if column == "sgd" else 1.0
        elif index == last:
            role, ratio = "output", fan_in / base_fan_in
            multiplier = 1.0 / ratio
        else:
            role, ratio = "hidden", fan_in / base_fan_in
            multiplier = 1.0 if column == "sgd" else 1.0 / ratio
        rows.append({"role": role, "fan_in": fan_in, "fan_out": fan_out, "width_ratio": ratio,
                     "multiplier": multiplier})
    return rows


@register("width_scaled")
class WidthScaled(Controller):
    """μP's LR multipliers (Tensor Programs V, Table 3) from fan-in relative to ``base_fan_in``."""

    def __init__(self, base_fan_in: int = 128, column: str = "auto"):
        if base_fan_in < 1:
            raise ValueError(f"base_fan_in must be >= 1, got {base_fan_in}")
        if column not in COLUMNS:
            raise ValueError(f"column must be one of {', '.join(COLUMNS)}, got {column}")
        self.base_fan_in, self.column = base_fan_in, column

    def setup(self, layers: Sequence[Layer], plan: Plan) -> None:
        super().setup(layers, plan)
        self.used_column = self.column if self.column != "auto" else (
            "adam" if plan.optimizer.name == "adamw" else "sgd")
        self.scale_1d = self.used_column == "sgd"  # read by the loop after setup
        self.table = mup_multipliers([fans(layer.weight) for layer in layers], self.base_fan_in, self.used_column)
        self.value = torch.tensor([row["multiplier"] for row in self.table], dtype=torch.float32,
                                  device=plan.device)

    def scales(self, step: int) -> torch.Tensor:
        return self.value

    def records(self) -> dict[str, list[dict]]:
        """``width_scaled.csv``: one row per layer."""
        return {"width_scaled": [{"index": layer.index, "name": layer.name, "column": self.used_column, **row}
                                 for layer, row in zip(self.layers, self.table)]}
