"""``uniform``: every layer at the global LR, ``scale_l(t) = 1`` (common practice)."""
import torch

from meta_llr.interface import Controller
from meta_llr.registry import register


@register("uniform")
class Uniform(Controller):
    """Scale 1 for every layer at every step: the reference baseline."""

    def setup(self, layers, plan):
        super().setup(layers, plan)
        self.ones = torch.ones(self.num_layers, device=plan.device)

    def scales(self, step: int) -> torch.Tensor:
        return self.ones
