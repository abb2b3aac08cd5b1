"""An exponential moving average of the weights that the model is reset to (airbench's "lookahead").

From the first multiple of ``every`` steps at or after ``start`` (airbench: the start of epoch
3) the average exists: there ``slow ← θ``. Then every ``every`` steps, after the optimizer step,
with ``n`` the steps done and ``N`` the run's::

    d       = decay^every · (n / N)^3                 (small early, rising to decay^every)
    slow   ← d · slow + (1 − d) · θ                    (parameters and floating buffers: BatchNorm's)
    θ      ← slow

and at the end of each epoch (the last step included) ``θ ← slow``, so the run ends on the
average. This is Keller Jordan's airbench weight averaging (arXiv 2404.00498; his code calls it
lookahead, after Zhang et al. 2019, arXiv 1907.08610, whose slow weights it keeps); the cubic
ramp, the start and the epoch-end resets are his. It is not the unrolled ``Lookahead`` of
:mod:`meta_llr.interface`. Cost: one copy of the parameters and buffers; two ops on the flat
parameter buffer and two ``_foreach`` ops every ``every`` steps, and one of each per epoch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightAverage:
    def __init__(self, flat_params: torch.Tensor, buffers: Sequence[torch.Tensor], every: int, decay: float,
                 total_steps: int, start: int = 0, steps_per_epoch: int | None = None):
        self.flat, self.buffers = flat_params, [b for b in buffers if b.is_floating_point()]
        self.every, self.decay, self.total = int(every), float(decay), int(total_steps)
        self.first = max(self.every, -(-int(start) // self.every) * self.every)  # the step the average starts at
        self.epoch = int(steps_per_epoch or total_steps)
        self.slow = flat_params.detach().clone()
        self.slow_buffers = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def after_step(self, done: int) -> None:
        """After the optimizer step that makes ``done`` steps in all."""
        if done < self.first:
            return
        if done % self.every == 0:
            weight = 1.0 if done == self.first else 1 - self.decay ** self.every * (done / self.total) ** 3
            self.slow.lerp_(self.flat, weight)
            self.flat.copy_(self.slow)
            if self.buffers:
                torch._foreach_lerp_(self.slow_buffers, self.buffers, weight)
                torch._foreach_copy_(self.buffers, self.slow_buffers)
        elif done % self.epoch == 0 or done == self.total:
            self.flat.copy_(self.slow)
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.slow_buffers)

    def state_dict(self) -> dict:
        return {"slow": self.slow, "slow_buffers": self.slow_buffers}

    def load_state_dict(self, state: dict) -> None:
        self.slow.copy_(state["slow"])
        torch._foreach_copy_(self.slow_buffers, list(state["slow_buffers"]))
