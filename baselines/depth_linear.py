"""``depth_linear``: constant in time, linear in depth (Smith's first guess in the discussion).

    scale_l(t) = first + (last - first) * d_l,     d_l = l / (L - 1)

Defaults ``first=1.5, last=0.5``: larger LRs in the first layers, smaller in the last, the
discussion's first pass ("Cyclical Layer Learning Rates", fast.ai forum; see
arXiv 1806.01603 for the paper that prompted it). ``first=0.5 last=1.5`` is the reversed
hypothesis.
"""
import numpy as np

from baselines._closed_form import ClosedForm, check_nonnegative
from meta_llr.registry import register


@register("depth_linear")
class DepthLinear(ClosedForm):
    """``first`` at the first layer, ``last`` at the last, linear in depth, fixed in time."""

    def __init__(self, first: float = 1.5, last: float = 0.5):
        check_nonnegative("first", first)
        check_nonnegative("last", last)
        self.first, self.last = first, last

    def curve(self, progress, depth):
        row = self.first + (self.last - self.first) * depth
        return np.broadcast_to(row, (len(progress), len(depth)))
