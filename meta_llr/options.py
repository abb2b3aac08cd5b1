"""Typed options: each option declared once, with its type, default and allowed range.

A config section is a dataclass whose fields are made with :func:`opt`; Hydra's ConfigStore
holds it, so OmegaConf checks the *type* of every override (``trainer.epochs=abc`` fails when
the config is composed) and :func:`check_section` checks the *range* declared beside the
default (``trainer.epochs=0`` fails before anything is built). Both end in one
:class:`~meta_llr.errors.UserError` line that names the option, the value and what is allowed.
Checks that tie several options together are a ``validate(self)`` method of the dataclass,
run after the field checks.

    @dataclass
    class TrainerConfig:
        section: ClassVar[str] = "trainer"
        epochs: int = opt(10, ge=1, doc="passes over the training set")
        optimizer: str = opt("sgd", choices=("sgd", "adamw"))
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from meta_llr.errors import UserError


@dataclass(frozen=True)
class Range:
    """What values an option allows (``None``: that bound is absent). For a list option the
    bounds apply to every item, and ``length`` (min, max) to the list itself."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    finite: bool = True          # numbers must be finite (no inf, nan)
    length: tuple[int, int | None] | None = None
    nullable: bool = False       # None allowed
    free: bool = False           # free text, a flag or a path: no range to check

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            parts = [f"{sign} {bound}" if isinstance(bound, int) else f"{sign} {bound:g}"  # ints exact
                     for sign, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                     if bound is not None]
            text = " and ".join(parts) if parts else "any number"
            if self.finite:
                text = ("finite, " + text) if parts else "any finite number"
        if self.length is not None:
            low, high = self.length
            size = f"{low} " if high == low else f"{low} to {high} " if high is not None else f"at least {low} " if low else ""
            text = f"a list of {size}values, each {text}"
        return text + (", or null" if self.nullable else "")

    def admits_item(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # non-numbers: their type was checked by OmegaConf
        if self.finite and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def admits(self, value) -> bool:
        if self.free:
            return True
        if value is None:
            return self.nullable
        if self.length is not None:
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                return False
            low, high = self.length
            if len(value) < low or (high is not None and len(value) > high):
                return False
            return all(self.admits_item(item) for item in value)
        return self.admits_item(value)


def opt(default: Any = None, *, doc: str = "", **bounds) -> Any:
    """A dataclass field with its default and its :class:`Range` (keyword arguments of Range).
    Lists and other mutable defaults are copied per instance."""
    metadata = {"range": Range(**bounds), "doc": doc}
    if isinstance(default, (list, tuple, dict)):
        value = list(default) if isinstance(default, tuple) else default
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def range_of(cls, name: str) -> Range | None:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range")
    return None


def plain(value):
    """OmegaConf containers to plain Python (lists, dicts); other values unchanged."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def check_section(node, cls=None, prefix: str | None = None) -> None:
    """Check every declared range of the dataclass ``cls`` (default: ``node``'s own type) on
    ``node`` (a dataclass instance or an OmegaConf node), then its ``validate()``; nested
    dataclass sections are checked too. Raises a one-line UserError."""
    from omegaconf import OmegaConf

    if cls is None:
        cls = OmegaConf.get_type(node) if OmegaConf.is_config(node) else type(node)
    prefix = prefix if prefix is not None else getattr(cls, "section", "")
    for f in dataclasses.fields(cls):
        value = getattr(node, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = OmegaConf.get_type(value) if OmegaConf.is_config(value) else type(value)
        if dataclasses.is_dataclass(nested):
            check_section(value, nested, key)
            continue
        bounds = f.metadata.get("range")
        if bounds is not None and not bounds.admits(plain(value)):
            raise UserError(f"{key}={_show(value)} is out of range; allowed: {bounds.describe()}")
    validate = getattr(cls, "validate", None)
    if validate is not None:
        validate(node)


def _show(value) -> str:
    value = plain(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return "null" if value is None else str(value)


def fail(key: str, value, allowed: str) -> None:
    """Raise the one-line error of a cross-field check, in the same words as a range check."""
    raise UserError(f"{key}={_show(value)} is out of range; allowed: {allowed}")
