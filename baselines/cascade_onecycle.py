"""``cascade_onecycle``: one one-cycle curve per layer (group), peaks staggered with depth.

The discussion's decoupled proposal ("Cyclical Layer Learning Rates", fast.ai forum): the
global LR stays constant (``schedule=constant``) and each layer group gets its own
one-cycle curve (Smith's 1cycle, arXiv 1708.07120 and 1803.09820), with earlier groups peaking
earlier ("5 groups over 50 epochs: group 1 peaks at epoch 10, group 2 at 15, ...") and
all groups ending at the same low value:

    a_l = peak_at_l                                      (default 0.2 -> 0.6 with depth)
    scale_l(p) = start + (peak_l - start) * w(p / a_l)              p <= a_l
               = end   + (peak_l - end) * w((1 - p) / (1 - a_l))    p >  a_l
    w(x) = (1 - cos(pi x)) / 2  (anneal=cos)   or   x  (anneal=linear)

``peak_at`` and ``peak`` take 1 value, 2 (first and last group, linear in depth) or one
per layer/group.
"""
import warnings

import numpy as np
import torch

from baselines._closed_form import ClosedForm, check_list, check_nonnegative, spread
from meta_llr.registry import register


@register("cascade_onecycle")
class CascadeOneCycle(ClosedForm):
    """Per-layer one-cycle: ``start`` -> ``peak`` at ``peak_at`` -> ``end`` at the end."""

    per_layer_options = ("peak_at", "peak")

    def __init__(self, peak_at: list[float] = (0.2, 0.6), peak: list[float] = (1.0,), start: float = 0.1,
                 end: float = 0.001, anneal: str = "cos"):
        self.peak_at, self.peak = list(peak_at), list(peak)
        for option in self.per_layer_options:
            check_list(option, getattr(self, option))
        check_nonnegative("peak", self.peak)
        check_nonnegative("start", start)
        check_nonnegative("end", end)
        if not all(0 < a < 1 for a in self.peak_at):
            raise ValueError(f"peak_at (fractions of training) must lie strictly between 0 and 1, got {self.peak_at}")
        if anneal not in ("cos", "linear"):
            raise ValueError(f"anneal must be cos or linear, got {anneal!r}")
        self.start, self.end, self.anneal = start, end, anneal

    def setup(self, layers, plan):
        super().setup(layers, plan)
        if not torch.equal(plan.lr_table.amin(), plan.lr_table.amax()):  # once, at setup
            warnings.warn("cascade_onecycle carries the whole cycle in the layer scales; it is meant "
                          "for schedule=constant (the global schedule multiplies it)", stacklevel=2)

    def curve(self, progress, depth):
        peak_at, peak = spread(self.peak_at, depth, "peak_at"), spread(self.peak, depth, "peak")
        p = progress[:, None]
        rising = np.clip(p / peak_at, 0.0, 1.0)
        falling = np.clip((1.0 - p) / (1.0 - peak_at), 0.0, 1.0)
        if self.anneal == "cos":
            rising, falling = (1 - np.cos(np.pi * rising)) / 2, (1 - np.cos(np.pi * falling)) / 2
        return np.where(p <= peak_at, self.start + (peak - self.start) * rising,
                        self.end + (peak - self.end) * falling)
