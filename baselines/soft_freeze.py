"""``soft_freeze``: soft freezing of the first layers and soft unfreezing of the last.

Smith's reply in the discussion ("Cyclical Layer Learning Rates", fast.ai forum): rather
than freezing layers one at a time, start the first layers high and let them decay
towards a floor while the last layers rise from low to high. Each layer relaxes
exponentially with its own half-life h_l (in fractions of training):

    w_l(p) = 2 ** (-p / h_l)
    scale_l(p) = low + (high - low) * ((1 - d_l) w_l(p) + d_l (1 - w_l(p)))

The first layer (d = 0) decays high -> low, the last (d = 1) rises low -> high, the ones
between mix the two: at the start the scales fall linearly with depth from high to low,
and they end (p >> h) reversed, the smooth analogue of ``fixed_linear``. ``half_life``
takes 1 value, 2 (first and last layer, linear in depth) or one per layer/group.
"""

from baselines._closed_form import ClosedForm, check_list, check_nonnegative, spread
from meta_llr.registry import register


@register("soft_freeze")
class SoftFreeze(ClosedForm):
    """First layers decay ``high`` -> ``low``, last ones rise ``low`` -> ``high``, half-life ``h_l``."""

    per_layer_options = ("half_life",)

    def __init__(self, high: float = 1.5, low: float = 0.1, half_life: list[float] = (0.1, 0.2)):
        check_nonnegative("low", low)
        if not low <= high:
            raise ValueError(f"need low <= high, got low={low} high={high}")
        self.half_life = list(half_life)
        check_list("half_life", self.half_life)
        if not all(h > 0 for h in self.half_life):
            raise ValueError(f"half_life (fraction of training) must be > 0, got {self.half_life}")
        self.high, self.low = high, low

    def curve(self, progress, depth):
        half_life = spread(self.half_life, depth, "half_life")
        remaining = 2.0 ** (-progress[:, None] / half_life)
        return self.low + (self.high - self.low) * ((1 - depth) * remaining + depth * (1 - remaining))
