"""``depth_cyclic``: a triangular cycle per layer whose cycle length depends on depth.

A cyclical LR (Smith, "Cyclical Learning Rates", arXiv 1506.01186) in every layer, with
whole cycles that fit the run, short in the first layers and long in the last
(``short_first=true``, Smith's reply in the discussion: the first layers converge
quickly, the last need most of the training) or the reverse (``short_first=false``,
the suggestion it answered):

    n_l = round(max_cycles + (min_cycles - max_cycles) d_l)   (d_l -> 1 - d_l if not short_first)
    scale_l(p) = low + (high - low) (1 - |2 frac(n_l p) - 1|)

Each cycle starts at ``low``, peaks at ``high`` half way, and every layer is back at
``low`` at the end of training. Defaults 0.5 / 1.5 average to 1, the uniform LR.
"""
import numpy as np

from baselines._closed_form import ClosedForm, check_nonnegative
from meta_llr.registry import register


@register("depth_cyclic")
class DepthCyclic(ClosedForm):
    """Triangular cycles between ``low`` and ``high``; ``max_cycles`` .. ``min_cycles`` with depth."""

    def __init__(self, low: float = 0.5, high: float = 1.5, max_cycles: int = 8, min_cycles: int = 1,
                 short_first: bool = True):
        check_nonnegative("low", low)
        if not low <= high:
            raise ValueError(f"need low <= high, got low={low} high={high}")
        if not 1 <= min_cycles <= max_cycles:
            raise ValueError(f"need 1 <= min_cycles <= max_cycles, got {min_cycles} and {max_cycles}")
        self.low, self.high = low, high
        self.max_cycles, self.min_cycles, self.short_first = max_cycles, min_cycles, short_first

    def cycles(self, depth: np.ndarray) -> np.ndarray:
        """Whole cycles over the run for each layer."""
        d = depth if self.short_first else 1.0 - depth
        return np.floor(self.max_cycles + (self.min_cycles - self.max_cycles) * d + 0.5)

    def curve(self, progress, depth):
        phase = np.mod(progress[:, None] * self.cycles(depth), 1.0)
        return self.low + (self.high - self.low) * (1.0 - np.abs(2.0 * phase - 1.0))
