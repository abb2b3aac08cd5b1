"""``discriminative``: discriminative fine-tuning (Howard & Ruder, ULMFiT, arXiv 1801.06146).

    scale_l = factor ** -(L - 1 - l)

The last layer (group) trains at the global LR, each earlier one at the LR of the next
divided by ``factor`` (2.6 in ULMFiT); constant in time. With ``layers.groups=K`` the
division is per group, as in fastai's layer groups.
"""
import numpy as np

from baselines._closed_form import ClosedForm
from meta_llr.registry import register


def layers_from_last(depth: np.ndarray) -> np.ndarray:
    """L - 1 - l for each layer, from its depth d = l / (L - 1)."""
    return np.rint((1.0 - depth) * (len(depth) - 1))


@register("discriminative")
class Discriminative(ClosedForm):
    """Last layer 1, each earlier layer divided by ``factor``; constant in time."""

    def __init__(self, factor: float = 2.6):
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor

    def curve(self, progress, depth):
        row = self.factor ** -layers_from_last(depth)
        return np.broadcast_to(row, (len(progress), len(depth)))
