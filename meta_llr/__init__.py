"""meta_llr: layer-level learning rates for PyTorch.

The Python API (the commands are ``python -m meta_llr.train|compare|export|study|bench|
metatrain|plot_schedules``):

* :func:`fit` trains a model (yours or a named one) on data (your tensors or a named source)
  with a controller and writes the same records as the CLI; :func:`compose` gives the checked
  config of a list of overrides; :func:`build_run` assembles a :class:`Run` from parts.
* :class:`Controller`, :class:`Layer`, :class:`Plan`, :class:`Lookahead` and :func:`register`
  are the contract for writing a controller (docs/writing-a-controller.md).
"""
from meta_llr.api import FitResult, dataset_from_tensors, fit
from meta_llr.config import compose
from meta_llr.errors import UserError
from meta_llr.interface import Controller, Layer, Lookahead, Plan
from meta_llr.registry import available, build_controller, register
from meta_llr.run import Run, build_run

__all__ = ["FitResult", "dataset_from_tensors", "fit", "compose", "UserError", "Controller", "Layer", "Lookahead",
           "Plan", "available", "build_controller", "register", "Run", "build_run"]
