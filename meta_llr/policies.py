"""Global LR policies: closed-form multipliers of the base LR as functions of the step.

``global_lr(t) = lr * policy(t) * warmup(t)``. Each policy maps the step indices
``0..T-1`` of a run with ``T`` steps to factors; where ``torch.optim.lr_scheduler`` has the
same policy the factors equal its values step for step (``tests/test_policies.py``).

* ``constant``: 1.
* ``step``: ``gamma ** (number of milestones passed)``, milestones at fractions of the run
  (default x0.1 at 50%, 75%, 90%: the first experiment proposed in the LLR discussion).
  Equals ``MultiStepLR`` with milestones ``round(m*T)``.
* ``triangular``: cyclical LR, Smith 2017 (arXiv 1506.01186), ``cycles`` full cycles between
  ``low`` and 1. Equals ``CyclicLR(mode="triangular")`` with ``step_size_up = T/(2*cycles)``.
* ``onecycle``: Smith & Topin 2018 (arXiv 1708.07120): from ``1/div_factor`` up to 1 over the
  first ``pct_start`` of the run, then down to ``1/(div_factor*final_div_factor)``,
  cosine or linear. Equals ``OneCycleLR`` (two phases).
* ``cosine``: ``min_factor + (1-min_factor)(1+cos(pi t/T))/2``. Equals ``CosineAnnealingLR``.

``warmup`` (a fraction of the run, default 0) multiplies any policy by ``min(1, (t+1)/W)``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from meta_llr.errors import UserError

POLICIES: dict[str, Callable[..., np.ndarray]] = {}


def policy(name: str):
    def add(fn):
        POLICIES[name] = fn
        return fn
    return add


@policy("constant")
def constant(steps: np.ndarray, total: int) -> np.ndarray:
    return np.ones_like(steps, dtype=np.float64)


@policy("step")
def step(steps: np.ndarray, total: int, milestones=(0.5, 0.75, 0.9), gamma: float = 0.1) -> np.ndarray:
    at = np.array([round(m * total) for m in milestones])
    passed = (steps[:, None] >= at[None, :]).sum(axis=1)
    return gamma ** passed


@policy("triangular")
def triangular(steps: np.ndarray, total: int, cycles: float = 2.0, low: float = 0.1) -> np.ndarray:
    half = total / (2.0 * cycles)
    cycle = np.floor(1 + steps / (2 * half))
    x = np.abs(steps / half - 2 * cycle + 1)
    return low + (1 - low) * np.maximum(0.0, 1 - x)


def _anneal(start, end, pct, how):
    if how == "cos":
        return end + (start - end) / 2.0 * (np.cos(np.pi * pct) + 1)
    return start + (end - start) * pct


@policy("onecycle")
def onecycle(steps: np.ndarray, total: int, pct_start: float = 0.3, div_factor: float = 25.0,
             final_div_factor: float = 1e4, anneal: str = "cos") -> np.ndarray:
    if anneal not in ("cos", "linear"):
        raise UserError(f"schedule.anneal must be cos or linear, got {anneal!r}")
    initial = 1.0 / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * total) - 1
    down_end = float(total - 1)
    up = _anneal(initial, 1.0, steps / max(up_end, 1e-12), anneal)
    down = _anneal(1.0, final, (steps - up_end) / max(down_end - up_end, 1e-12), anneal)
    return np.where(steps <= up_end, up, down)


@policy("cosine")
def cosine(steps: np.ndarray, total: int, min_factor: float = 0.0) -> np.ndarray:
    return min_factor + (1 - min_factor) * (1 + np.cos(np.pi * steps / total)) / 2


def lr_factors(config: Mapping, total_steps: int) -> np.ndarray:
    """Factors for steps ``0..total_steps-1`` from a ``schedule`` config node."""
    options = {k: (list(v) if not isinstance(v, (str, int, float, bool)) and v is not None else v)
               for k, v in dict(config).items()}
    name = options.pop("name", None)
    warmup = float(options.pop("warmup", 0.0) or 0.0)
    if name not in POLICIES:
        raise UserError(f"unknown schedule '{name}'; valid: {', '.join(sorted(POLICIES))}")
    if not 0.0 <= warmup < 1.0:
        raise UserError(f"schedule.warmup must be a fraction of the run in [0, 1), got {warmup}")
    steps = np.arange(total_steps, dtype=np.float64)
    try:
        factors = POLICIES[name](steps, total_steps, **options)
    except TypeError as error:
        raise UserError(f"schedule={name}: {error}; see meta_llr/conf/schedule/{name}.yaml") from None
    if warmup > 0:
        factors = factors * np.minimum(1.0, (steps + 1) / (warmup * total_steps))
    return factors
