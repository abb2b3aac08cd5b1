"""Named components and their typed configs: controllers, models, and plugins that add either.

``@register("name")`` makes a :class:`~meta_llr.interface.Controller` selectable as
``controller=name``; ``@register_model("name")`` (in :mod:`meta_llr.models`) does the same for
``model=name``. Each registration also stores the component's config dataclass in Hydra's
ConfigStore (group ``controller`` or ``model``), so ``controller=name controller.opt=V`` is
type-checked by OmegaConf when the config is composed. The dataclass is the one passed as
``config=`` or, by default, derived from ``__init__``: one field per keyword argument, with its
annotation and default, so a component's defaults are written once, in its signature. Ranges
of derived options are checked by the component's ``__init__`` (a ``ValueError`` becomes the
one-line :class:`~meta_llr.errors.UserError`); a controller's float options, alone or in lists,
must be finite, which :func:`build_controller` checks for every controller (a ``x <= 0`` test
lets NaN through).

Where components come from (:func:`load_all`, once per process):

* the modules of the top-level packages ``baselines`` and ``controllers``;
* installed plugins: every entry point in the groups ``meta_llr.controllers`` and
  ``meta_llr.models`` (``importlib.metadata``) is loaded, which runs its ``@register``.
  A plugin package declares e.g. ``[project.entry-points."meta_llr.controllers"]
  my_ctrl = "my_pkg.my_ctrl"`` and nothing of meta_llr is touched.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import pkgutil
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from meta_llr.errors import UserError

PACKAGES = ("baselines", "controllers")
ENTRY_POINT_GROUPS = ("meta_llr.controllers", "meta_llr.models")

CONTROLLERS: dict[str, type] = {}
CONTROLLER_CONFIGS: dict[str, type] = {}


def register(name: str, config: type | None = None):
    """Class decorator: make a controller selectable as ``controller=name``. ``config``: its
    options as a dataclass (default: derived from ``__init__``)."""

    def add(cls):
        if name in CONTROLLERS and CONTROLLERS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"controller name '{name}' registered twice")
        cls.registry_name = name
        CONTROLLERS[name] = cls
        CONTROLLER_CONFIGS[name] = store("controller", name, config or config_from_signature(cls, name))
        return cls

    return add


def store(group: str, name: str, config: type) -> type:
    """Put ``config`` (a dataclass with a ``name`` field) into Hydra's ConfigStore as ``group/name``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=config)
    return config


def _omegaconf_type(annotation):
    """The nearest type OmegaConf can check: Optional, lists of primitives, primitives, else Any."""
    if annotation is inspect.Parameter.empty:
        return Any
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return Optional[_omegaconf_type(rest[0])]
        return Any
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        item = args[0] if args else Any
        return list[item] if item in (int, float, bool, str) else list
    if annotation in (int, float, bool, str):
        return annotation
    return Any


def config_from_signature(cls, name: str, skip: int = 0) -> type:
    """A dataclass ``<Cls>Config`` with ``name`` and one field per keyword argument of ``cls``
    (after ``self`` and the first ``skip`` arguments)."""
    hints = typing.get_type_hints(cls.__init__)
    fields = [("name", str, dataclasses.field(default=name))]
    parameters = list(inspect.signature(cls.__init__).parameters.items())[1 + skip:]
    for key, parameter in parameters:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if default is inspect.Parameter.empty:
            default = dataclasses.MISSING
        elif isinstance(default, (list, tuple)):
            default = dataclasses.field(default_factory=lambda value=list(default): list(value))
        kind = _omegaconf_type(hints.get(key, inspect.Parameter.empty))
        fields.append((key, kind, default if isinstance(default, dataclasses.Field) else dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def typed(schema: type, values: Mapping, prefix: str) -> dict:
    """``values`` checked and converted by OmegaConf against the dataclass ``schema`` (plain
    Python back); a wrong type is a one-line UserError."""
    from omegaconf import OmegaConf

    from meta_llr.errors import one_line_config_error

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), dict(values))
        return OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except Exception as error:
        raise one_line_config_error(error, prefix) from None


_loaded = False


def load_all() -> None:
    """Import the built-in packages and every installed plugin (once per process)."""
    global _loaded
    if _loaded:
        return
    import meta_llr.models  # noqa: F401  (registers the built-in models)

    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")
    _loaded = True
    load_plugins()


def load_plugins() -> list[str]:
    """Load every entry point of the plugin groups; returns their names. Safe to call again
    (after installing a plugin into the running process)."""
    from importlib.metadata import entry_points

    loaded = []
    for group in ENTRY_POINT_GROUPS:
        for entry in entry_points(group=group):
            try:
                entry.load()
            except Exception as error:  # a broken plugin must not take the built-ins down
                raise UserError(f"plugin {entry.name} ({entry.value}, group {group}) failed to load: "
                                f"{type(error).__name__}: {error}; fix or uninstall it") from None
            loaded.append(entry.name)
    return loaded


def available() -> dict[str, type]:
    """All registered controllers, by name."""
    load_all()
    return dict(sorted(CONTROLLERS.items()))


def build_controller(config) -> Any:
    """Instantiate the controller a ``controller`` config node names (a DictConfig, a dataclass
    or a mapping with ``name`` and the options). Unknown names and options, and options its
    ``__init__`` rejects, raise one-line UserErrors."""
    from meta_llr.options import plain

    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    config = dict(plain(config) if not isinstance(config, Mapping) else {k: plain(v) for k, v in config.items()})
    name = config.pop("name", None)
    registry = available()
    if name not in registry:
        raise UserError(f"unknown controller '{name}'; valid: {', '.join(registry)}")
    options = typed(CONTROLLER_CONFIGS[name], {"name": name, **config}, prefix="controller")
    options.pop("name")
    for key, value in options.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            raise UserError(f"controller.{key}={value} is out of range; allowed: finite numbers "
                            f"(controller={name})")
    try:
        return registry[name](**options)
    except ValueError as error:  # controllers check their own ranges with ValueError
        raise UserError(f"controller={name}: {error}") from None
