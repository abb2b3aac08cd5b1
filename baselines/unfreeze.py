"""``unfreeze``: gradual unfreezing, one more layer (group) every ``every`` epochs.

    n(e) = min(L, 1 + floor(e / every))     layers trained in epoch e
    scale_l = 1 if layer l is among them, else 0 (frozen: no gradient computed)

``direction=last_to_first`` starts from the last layer and unfreezes downwards (ULMFiT,
Howard & Ruder, arXiv 1801.06146); ``first_to_last`` starts from the first layer and adds
layers upwards, the greedy layer-wise pretraining analogy of the discussion (Bengio et al.
2006, "Greedy layer-wise training of deep networks"). Combine with ``layers.groups=K`` to
unfreeze by group.
"""
import numpy as np

from baselines._closed_form import ClosedForm
from meta_llr.registry import register


@register("unfreeze")
class Unfreeze(ClosedForm):
    """Train 1 layer, then one more every ``every`` epochs, from the last or the first."""

    def __init__(self, every: int = 1, direction: str = "last_to_first"):
        if every < 1:
            raise ValueError(f"every (epochs per stage) must be >= 1, got {every}")
        if direction not in ("last_to_first", "first_to_last"):
            raise ValueError(f"direction must be last_to_first or first_to_last, got {direction!r}")
        self.every, self.direction = every, direction
        self.epochs = 10  # replaced by the run's epoch count in setup

    def curve(self, progress, depth):
        # progress * epochs is the epoch number up to rounding; the margin (far below one
        # step, 1 / steps_per_epoch) keeps an epoch's first step in that epoch.
        epoch = np.floor(progress * self.epochs + 1e-9)
        trained = np.minimum(len(depth), 1 + np.floor(epoch / self.every))[:, None]
        index = np.rint(depth * (len(depth) - 1))
        rank = len(depth) - 1 - index if self.direction == "last_to_first" else index
        return (rank < trained).astype(np.float64)
