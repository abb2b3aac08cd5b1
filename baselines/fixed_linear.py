"""``fixed_linear``: each layer moves linearly in time from a start to an end value over
its own window of training (Leslie Smith's proposal in the discussion "Cyclical Layer
Learning Rates", fast.ai forum, prompted by arXiv 1806.01603).

    scale_l(p) = start_l                                             p <= t0_l
               = start_l + (end_l - start_l) (p - t0_l) / (t1_l - t0_l)   t0_l < p < t1_l
               = end_l                                               p >= t1_l

with p the fraction of training done. ``start``, ``end``, ``t0``, ``t1`` are lists: 1 value
(every layer), 2 values (first and last layer, linear in depth between) or one per layer
(or per group with ``layers.groups=K``). Defaults: start 1.5 -> 0.5 with depth, end
reversed 0.5 -> 1.5, window the whole run. The discussion's 3-layer, 100-epoch example
(layer 1: 2.0 -> 0.5 over the first 10 epochs; layer 2: 1.0; layer 3: 0.5 -> 2.0 over all
100) is ``controller=fixed_linear_discussion``.
"""
import numpy as np

from baselines._closed_form import ClosedForm, check_list, check_nonnegative, check_progress, spread
from meta_llr.registry import register


@register("fixed_linear")
class FixedLinear(ClosedForm):
    """Linear in time from ``start`` to ``end`` over the window ``[t0, t1]``, per layer."""

    per_layer_options = ("start", "end", "t0", "t1")

    def __init__(self, start: list[float] = (1.5, 0.5), end: list[float] = (0.5, 1.5),
                 t0: list[float] = (0.0,), t1: list[float] = (1.0,)):
        self.start, self.end, self.t0, self.t1 = list(start), list(end), list(t0), list(t1)
        for option in self.per_layer_options:
            check_list(option, getattr(self, option))
            check_nonnegative(option, getattr(self, option))
        check_progress("t0", self.t0)
        check_progress("t1", self.t1)

    def curve(self, progress, depth):
        start, end = spread(self.start, depth, "start"), spread(self.end, depth, "end")
        t0, t1 = spread(self.t0, depth, "t0"), spread(self.t1, depth, "t1")
        if (t0 > t1).any():
            layer = int(np.argmax(t0 > t1))
            raise ValueError(f"layer {layer} has window t0={t0[layer]:g} > t1={t1[layer]:g}; "
                             "each layer needs t0 <= t1")
        p = progress[:, None]
        width = np.maximum(t1 - t0, np.finfo(np.float64).tiny)  # t0 == t1: a jump at t0
        fraction = np.where(p >= t1, 1.0, np.clip((p - t0) / width, 0.0, 1.0))
        return start + (end - start) * fraction
