"""``freezeout``: FreezeOut (Brock, Lim, Ritchie & Weston 2017, arXiv 1706.04983).

Layer l anneals its scale to 0 with a cosine over its own part of training ``[0, t_l]``,
then is frozen (no gradient computed, which is where the speed-up comes from):

    scale_l(p) = s_l / 2 * (1 + cos(pi p / t_l))   for p < t_l,   0 for p >= t_l
    t_l = t0 + (1 - t0) d_l                         spacing=linear
    t_l = (c + (1 - c) d_l) ** 3,  c = t0 ** (1/3)  spacing=cubic (cubed after interpolation)
    s_l = 1 / t_l if scale_lr else 1

with p the fraction of training done and d_l the layer's depth: the first layer freezes
at ``t0``, the last trains to the end. The paper's best setting (its t0 = 0.8, cubic,
scaled) is ``t0=0.512 spacing=cubic scale_lr=true`` here, since ``t0`` here is the first
layer's own t_l. The paper uses the per-layer cosines alone: use ``schedule=constant``
for the paper's setting. Unlike the paper, a frozen layer's BatchNorm stays in train mode
(its output is the same; its running statistics keep tracking the moving input).
"""
import math

import numpy as np

from baselines._closed_form import ClosedForm
from meta_llr.registry import register


@register("freezeout")
class FreezeOut(ClosedForm):
    """Per-layer cosine annealing to 0 at t_l, then frozen; t_l from ``t0`` (first) to 1 (last)."""

    def __init__(self, t0: float = 0.5, spacing: str = "linear", scale_lr: bool = False):
        if not 0 < t0 <= 1:
            raise ValueError(f"t0 (the first layer's freezing point) must be in (0, 1], got {t0}")
        if spacing not in ("linear", "cubic"):
            raise ValueError(f"spacing must be linear or cubic, got {spacing!r}")
        self.t0, self.spacing, self.scale_lr = t0, spacing, scale_lr

    def freeze_points(self, depth: np.ndarray) -> np.ndarray:
        """t_l, the fraction of training at which each layer reaches 0."""
        if self.spacing == "linear":
            return self.t0 + (1.0 - self.t0) * depth
        root = self.t0 ** (1.0 / 3.0)
        return (root + (1.0 - root) * depth) ** 3

    def curve(self, progress, depth):
        t = self.freeze_points(depth)
        initial = 1.0 / t if self.scale_lr else np.ones_like(t)
        p = progress[:, None]
        # cos^2(x/2) = (1 + cos x) / 2, accurate near t_l where 1 + cos x cancels
        annealed = initial * np.cos(0.5 * math.pi * np.minimum(p / t, 1.0)) ** 2
        return np.where(p < t, annealed, 0.0)
