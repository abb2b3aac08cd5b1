"""Shared base of the hand-crafted curves: ``scale_l(t) = curve(progress(t), depth_l)``.

A subclass writes one vectorised numpy function

    curve(progress [T], depth [L]) -> scales [T, L]      (float64)

with ``progress = step / total_steps`` (``Plan.progress``: 0 at the first step) and
``depth = index / (L - 1)`` (0 for the first layer or group, 1 for the last). ``setup``
evaluates it once for every step of the run to check it and plan the freezing, then keeps
only one epoch of it on the device (``[steps_per_epoch, L]`` float32, rebuilt at each epoch
boundary, so a long run of a small model holds no ``[T, L]`` table); ``scales(step)`` is a row
of that window (a view: no work, no sync, per step).
The same ``curve`` draws the plots (``meta_llr.plot_schedules``) and answers the tests.

Zeros freeze layers. A layer whose scale is exactly 0 at a step is reported frozen by
``trainable(step)`` at that step, so the loop turns its ``requires_grad`` off and computes
no gradient for it (FreezeOut, gradual unfreezing). ``frozen_at`` holds, per layer, the
step from which it stays frozen to the end of training; ``records()`` writes it, and the
step at which a layer that starts frozen first trains, to ``freezing.csv`` in the run
directory.

List options (``per_layer_options``) take 1 value (every layer), 2 values (first and last
layer, linear in depth between) or one value per layer (or per group: ``layers.groups=K``).
"""
from __future__ import annotations

import bisect
from abc import abstractmethod

import numpy as np
import torch

from meta_llr.errors import UserError
from meta_llr.interface import Controller


def spread(values, depth: np.ndarray, option: str) -> np.ndarray:
    """Per-layer values ``[L]`` from 1 value, 2 values (first, last; linear in depth) or L values."""
    values = np.asarray(values, dtype=np.float64)
    count = len(depth)
    if len(values) == 1:
        return np.full(count, values[0])
    if len(values) == count:
        return values.copy()
    if len(values) == 2:
        return values[0] + (values[1] - values[0]) * depth
    raise UserError(f"controller.{option} has {len(values)} values but the model has {count} layers; "
                    f"give 1 value, 2 (first and last layer) or {count}, or set layers.groups={len(values)}")


def check_nonnegative(option: str, values) -> None:
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if not (np.isfinite(values).all() and (values >= 0).all()):
        raise ValueError(f"{option} must be finite and >= 0, got {values.tolist()}")


def check_progress(option: str, values) -> None:
    values = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if not ((values >= 0).all() and (values <= 1).all()):
        raise ValueError(f"{option} is a fraction of training and must lie in [0, 1], got {values.tolist()}")


def check_list(option: str, values) -> None:
    if len(values) == 0:
        raise ValueError(f"{option} is empty; give 1 value, 2 (first and last layer) or one per layer")


class ClosedForm(Controller):
    """A per-layer curve that is a pure function of (progress, depth); see the module docstring."""

    per_layer_options: tuple[str, ...] = ()

    @abstractmethod
    def curve(self, progress: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Scales ``[T, L]`` (float64, >= 0) at fractions of training ``progress [T]``."""

    def required_layers(self) -> int | None:
        """The layer count a per-layer list pins down (a list of more than 2 values), else None."""
        counts = {len(getattr(self, name)) for name in self.per_layer_options} - {1, 2}
        return max(counts) if counts else None

    def setup(self, layers, plan) -> None:
        super().setup(layers, plan)
        self.epochs, self.steps_per_epoch = plan.epochs, plan.steps_per_epoch
        self.depth = np.array([layer.depth for layer in layers], dtype=np.float64)
        total = plan.total_steps
        name = getattr(self, "registry_name", type(self).__name__)
        try:
            table = np.asarray(self.curve(np.arange(total) / total, self.depth), dtype=np.float64)
        except ValueError as error:  # a range error only visible with the real layer count
            raise UserError(f"controller={name}: {error}") from None
        assert table.shape == (total, self.num_layers), f"{name}.curve returned shape {table.shape}"
        table32 = table.astype(np.float32)
        if not (np.isfinite(table32).all() and (table32 >= 0).all()):
            raise UserError(f"controller={name}: the curve gives negative or non-finite scales; "
                            "check its options")
        dead = np.flatnonzero(~(table32 > 0).any(axis=1))
        if len(dead):
            raise UserError(f"controller={name}: every layer has scale 0 at progress {dead[0] / total:.3f}, "
                            "so nothing would train; raise the lowest scale")
        self._plan_freezing(table32 == 0)
        self.window_start, self.window = 0, self._window(0)

    def _window(self, start: int) -> torch.Tensor:
        """Rows ``start .. start + steps_per_epoch`` of the curve, as a device tensor."""
        total = self.plan.total_steps
        steps = np.arange(start, min(start + self.steps_per_epoch, total))
        rows = torch.from_numpy(np.asarray(self.curve(steps / total, self.depth), dtype=np.float32))
        if self.plan.device.type == "cuda":  # pinned: the copy is asynchronous, no host sync
            return rows.pin_memory().to(self.plan.device, non_blocking=True)
        return rows.to(self.plan.device)

    def _plan_freezing(self, frozen: np.ndarray) -> None:
        """Precompute the steps where the trainable mask changes, so ``trainable`` is a lookup."""
        self.frozen_at: list[int | None] = [None] * self.num_layers
        self.trains_from: list[int | None] = [None] * self.num_layers
        self._change_steps: list[int] = []
        self._masks: list[list[bool]] = []
        if not frozen.any():
            return
        changes = np.flatnonzero((frozen[1:] != frozen[:-1]).any(axis=1)) + 1
        self._change_steps = [0, *changes.tolist()]
        self._masks = [(~frozen[s]).tolist() for s in self._change_steps]
        for layer in range(self.num_layers):
            column = frozen[:, layer]
            if column[-1]:
                training = np.flatnonzero(~column)
                self.frozen_at[layer] = int(training[-1]) + 1 if len(training) else 0
            if column[0] and not column.all():
                self.trains_from[layer] = int(np.argmin(column))

    def scales(self, step: int) -> torch.Tensor:
        step = min(step, self.plan.total_steps - 1)
        if not 0 <= step - self.window_start < len(self.window):  # once per epoch
            self.window_start = step - step % self.steps_per_epoch
            self.window = self._window(self.window_start)
        return self.window[step - self.window_start]

    def trainable(self, step: int) -> list[bool] | None:
        if not self._change_steps:
            return None
        return self._masks[bisect.bisect_right(self._change_steps, step) - 1]

    def records(self) -> dict[str, list[dict]]:
        """``freezing.csv``: per layer, the step from which it stays frozen to the end and the
        step at which a layer that starts frozen first trains (empty cells: never)."""
        if not self._change_steps:
            return {}
        total = self.plan.total_steps
        return {"freezing": [
            {"index": layer.index, "layer": layer.name,
             "frozen_from_step": frozen, "frozen_from_progress": None if frozen is None else frozen / total,
             "trains_from_step": trains}
            for layer, frozen, trains in zip(self.layers, self.frozen_at, self.trains_from)]}
