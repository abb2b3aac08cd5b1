"""Global LR schedules: closed-form multipliers of the base LR as functions of the step.

``global_lr(t) = lr * schedule(t) * warmup(t)`` (``schedule=NAME``, base LR ``trainer.lr``). Each
schedule maps the step indices ``0..T-1`` of a run with ``T`` steps to factors; where
``torch.optim.lr_scheduler`` has the same schedule the factors equal its values step for step
(``tests/test_schedules.py``). The per-layer scales a controller multiplies them with are
*curves* (:mod:`meta_llr.curves`), not schedules.

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

``warmup`` (a fraction of the run, default 0) multiplies any schedule by ``min(1, (t+1)/W)``.

Each schedule's options are a dataclass beside its function (:class:`StepConfig` beside
:func:`step`, ...), declared with :func:`meta_llr.options.opt`: type, default and range in one
place; :data:`SCHEDULES` maps each name to its dataclass. :func:`lr_factors` takes a
``schedule`` config node (DictConfig, mapping or dataclass instance) and checks it against
that dataclass (unknown option, wrong type, out of range: one-line UserError).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from omegaconf import MISSING

from meta_llr.errors import UserError
from meta_llr.options import check_section, fail, opt, plain

SCHEDULES: dict[str, type[ScheduleConfig]] = {}
_FACTORS: dict[str, Callable[..., np.ndarray]] = {}


@dataclass
class ScheduleConfig:
    """Options every schedule has (``schedule.NAME``)."""

    section: ClassVar[str] = "schedule"
    name: str = opt(MISSING, free=True, doc="the schedule: one of SCHEDULES")
    warmup: float = opt(0.0, ge=0, lt=1, doc="linear warmup over this fraction of the run (0: none)")


def schedule(config: type[ScheduleConfig]):
    """Decorator: ``fn(steps, total, **options)`` computes the factors of the schedule whose
    options ``config`` declares (its name: ``config``'s default ``name``)."""

    def add(fn):
        SCHEDULES[config.name] = config
        _FACTORS[config.name] = fn
        return fn

    return add


@dataclass
class ConstantConfig(ScheduleConfig):
    name: str = opt("constant", choices=("constant",))


@schedule(ConstantConfig)
def constant(steps: np.ndarray, total: int) -> np.ndarray:
    return np.ones_like(steps, dtype=np.float64)


@dataclass
class StepConfig(ScheduleConfig):
    name: str = opt("step", choices=("step",))
    milestones: list[float] = opt([0.5, 0.75, 0.9], gt=0, lt=1, length=(0, None),
                                  doc="fractions of the run, increasing, where the LR is multiplied by gamma")
    gamma: float = opt(0.1, gt=0, doc="factor at each milestone")

    def validate(self):
        milestones = list(self.milestones)
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            fail("schedule.milestones", milestones, "fractions of the run in (0, 1), in increasing order")


@schedule(StepConfig)
def step(steps: np.ndarray, total: int, milestones, gamma: float) -> np.ndarray:
    at = np.array([round(m * total) for m in milestones])
    passed = (steps[:, None] >= at[None, :]).sum(axis=1)
    return gamma ** passed


@dataclass
class TriangularConfig(ScheduleConfig):
    name: str = opt("triangular", choices=("triangular",))
    cycles: float = opt(2.0, gt=0, doc="full cycles over the run")
    low: float = opt(0.1, ge=0, le=1, doc="lowest factor (the highest is 1)")


@schedule(TriangularConfig)
def triangular(steps: np.ndarray, total: int, cycles: float, low: float) -> np.ndarray:
    half = total / (2.0 * cycles)
    cycle = np.floor(1 + steps / (2 * half))
    x = np.abs(steps / half - 2 * cycle + 1)
    return low + (1 - low) * np.maximum(0.0, 1 - x)


def _anneal(start, end, pct, how):
    if how == "cos":
        return end + (start - end) / 2.0 * (np.cos(np.pi * pct) + 1)
    return start + (end - start) * pct


@dataclass
class OneCycleConfig(ScheduleConfig):
    name: str = opt("onecycle", choices=("onecycle",))
    pct_start: float = opt(0.3, gt=0, lt=1, doc="fraction of the run spent rising to the peak")
    div_factor: float = opt(25.0, gt=0, doc="the first factor is 1/div_factor")
    final_div_factor: float = opt(1e4, gt=0, doc="the last factor is 1/(div_factor*final_div_factor)")
    anneal: str = opt("cos", choices=("cos", "linear"), doc="shape of both phases")


@schedule(OneCycleConfig)
def onecycle(steps: np.ndarray, total: int, pct_start: float, div_factor: float,
             final_div_factor: float, anneal: str) -> np.ndarray:
    initial = 1.0 / div_factor
    final = initial / final_div_factor
    up_end = float(pct_start * total) - 1
    down_end = float(total - 1)
    up = _anneal(initial, 1.0, steps / max(up_end, 1e-12), anneal)
    down = _anneal(1.0, final, (steps - up_end) / max(down_end - up_end, 1e-12), anneal)
    return np.where(steps <= up_end, up, down)


@dataclass
class CosineConfig(ScheduleConfig):
    name: str = opt("cosine", choices=("cosine",))
    min_factor: float = opt(0.0, ge=0, le=1, doc="the factor at the end of the run")


@schedule(CosineConfig)
def cosine(steps: np.ndarray, total: int, min_factor: float) -> np.ndarray:
    return min_factor + (1 - min_factor) * (1 + np.cos(np.pi * steps / total)) / 2


def schedule_config(config) -> ScheduleConfig:
    """The checked dataclass instance of a ``schedule`` config node (a DictConfig, a mapping or
    a :class:`ScheduleConfig`): unknown name or option, wrong type, out of range: UserError."""
    from omegaconf import OmegaConf

    from meta_llr.errors import one_line_config_error

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping) or OmegaConf.is_config(config):
        values = {key: plain(value) for key, value in dict(config).items()}
    else:
        raise UserError(f"a schedule config is a mapping with a name, got {config!r}")
    name = values.get("name")
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule '{name}'; valid: {', '.join(sorted(SCHEDULES))}")
    cls = SCHEDULES[name]
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"schedule={name} has no option {', '.join(unknown)}; "
                        f"its options: {', '.join(k for k in known if k != 'name')}")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
    except Exception as error:  # OmegaConf's type errors
        raise one_line_config_error(error, "schedule") from None
    check_section(typed)
    return typed


def lr_factors(config, total_steps: int) -> np.ndarray:
    """Factors for steps ``0..total_steps-1`` from a ``schedule`` config node (DictConfig,
    mapping or dataclass instance; see :func:`schedule_config`)."""
    typed = schedule_config(config)
    options = {f.name: getattr(typed, f.name) for f in dataclasses.fields(typed) if f.name not in ("name", "warmup")}
    steps = np.arange(total_steps, dtype=np.float64)
    factors = _FACTORS[typed.name](steps, total_steps, **options)
    if typed.warmup > 0:
        factors = factors * np.minimum(1.0, (steps + 1) / (typed.warmup * total_steps))
    return factors
