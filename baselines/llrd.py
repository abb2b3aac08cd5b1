"""``llrd``: layer-wise LR decay, as used to fine-tune BERT-style models (ELECTRA,
arXiv 2003.10555; BEiT, arXiv 2106.08254; "How to Fine-Tune BERT", arXiv 1905.05583).

    scale_l = decay ** (L - 1 - l)

The last layer (group) at the global LR, each layer below it ``decay`` times the one
above; constant in time. The same family as ``discriminative`` with
``decay = 1 / factor``; the usual range of ``decay`` is 0.65-0.95.
"""
import numpy as np

from baselines._closed_form import ClosedForm
from baselines.discriminative import layers_from_last
from meta_llr.registry import register


@register("llrd")
class LayerwiseDecay(ClosedForm):
    """``decay ** (L - 1 - l)``: geometric decay from the last layer down; constant in time."""

    def __init__(self, decay: float = 0.8):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay

    def curve(self, progress, depth):
        row = self.decay ** layers_from_last(depth)
        return np.broadcast_to(row, (len(progress), len(depth)))
