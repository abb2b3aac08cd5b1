"""The Python API: train your own ``nn.Module`` on your own tensors with any controller.

    import meta_llr
    result = meta_llr.fit(model=my_module, data=(x_train, y_train, x_test, y_test),
                          controller="depth_linear", overrides=["trainer.epochs=2", "controller.first=2.0"],
                          out_dir="runs/notebook")
    result.summary["final_test_acc"], result.run_dir, result.model

``fit`` composes the same checked config as ``python -m meta_llr.train`` (:func:`compose`),
builds the run with the parts you pass (:func:`meta_llr.run.build_run`) and writes the same
records into ``out_dir``. Bad arguments raise the CLI's one-line :class:`UserError`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meta_llr.config import compose
from meta_llr.data import Dataset, Split
from meta_llr.errors import UserError
from meta_llr.interface import Controller


@dataclass
class FitResult:
    summary: dict          # summary.json's content
    run_dir: Path          # where the records are
    model: nn.Module       # the trained module (the one passed in, trained in place)
    run: object            # the meta_llr.run.Run, for its controller, layers, records


def dataset_from_tensors(data: Sequence[torch.Tensor], name: str = "tensors") -> Dataset:
    """``(x_train, y_train, x_test, y_test[, x_val, y_val])``: images ``N×C×H×W`` (uint8 0..255, or
    float in any units) and integer labels ``0..K-1``. Mean and std per channel come from the
    training images (stored in the loop's units: uint8 scale, so floats are divided by 255)."""
    if len(data) not in (4, 6):
        raise UserError(f"data must be (x_train, y_train, x_test, y_test) or with (x_val, y_val) too; got {len(data)} items")
    tensors = [torch.as_tensor(t) for t in data]
    splits = []
    for i in range(0, len(tensors), 2):
        x, y = tensors[i], tensors[i + 1]
        what = ("train", "test", "val")[i // 2]
        if x.dim() != 4:
            raise UserError(f"x_{what} must be images N×C×H×W, got shape {tuple(x.shape)}; add a channel axis with x[:, None]")
        if not (x.dtype == torch.uint8 or x.is_floating_point()):
            raise UserError(f"x_{what} must be uint8 or float, got {x.dtype}")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
            raise UserError(f"y_{what} must be integer labels, one per image ({len(x)}), got {y.dtype} of shape {tuple(y.shape)}")
        splits.append(Split(x.contiguous(), y.long().contiguous()))
    if tensors[0].dtype != tensors[2].dtype or tensors[0].shape[1:] != tensors[2].shape[1:]:
        raise UserError("x_train and x_test must have the same dtype and image shape")
    classes = int(max(int(s.y.max()) for s in splits if len(s)) + 1)
    if int(min(int(s.y.min()) for s in splits if len(s))) < 0 or classes < 2:
        raise UserError(f"labels must be 0..K-1 with K >= 2, got {classes} classes")
    x = splits[0].x.double() / 255.0  # the loop multiplies Dataset.mean/std by 255 (uint8 units)
    mean = tuple(float(v) for v in x.mean((0, 2, 3)))
    std = tuple(float(v) for v in x.std((0, 2, 3), unbiased=False))
    return Dataset(name=name, train=splits[0], test=splits[1], val=splits[2] if len(splits) == 3 else None,
                   classes=[str(k) for k in range(classes)], mean=mean, std=std, synthetic=False,
                   source="tensors passed to meta_llr.fit")


def fit(model: nn.Module | None = None, data: Sequence[torch.Tensor] | Dataset | str | None = None,
        controller: str | Controller | None = None, overrides: Sequence[str] = (),
        out_dir: str | Path | None = None) -> FitResult:
    """Train once and return the summary, the run directory and the trained model.

    ``model``: any ``nn.Module`` (kept as it is, pretrained weights included), or None for the
    config's ``model=``. ``data``: tensors as in :func:`dataset_from_tensors`, a
    :class:`~meta_llr.data.Dataset`, a data source's name (``"digits"``), or None for the
    config's. ``controller``: a registered name (its options in ``overrides`` as
    ``controller.KEY=V``) or a Controller instance. ``out_dir``: where the records go (default
    ``runs/<study>/<controller>-<model>-<data>-s<seed>-<time>``)."""
    from meta_llr.run import build_run, resume_if_asked

    if isinstance(overrides, str):
        raise UserError("overrides must be a list of strings such as ['trainer.epochs=2']")
    overrides = list(overrides)
    if isinstance(data, str):
        overrides.insert(0, f"data={data}")
        data = None
    if isinstance(controller, str):
        overrides.insert(0, f"controller={controller}")
        controller = None
    elif controller is not None and not isinstance(controller, Controller):
        raise UserError(f"controller must be a name or a meta_llr.Controller, got {type(controller).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = compose(overrides)
    if data is not None and not isinstance(data, Dataset):
        data = dataset_from_tensors(data)
    if out_dir is None:
        names = [getattr(controller, "registry_name", None) or cfg.controller.name,
                 type(model).__name__ if model is not None else cfg.model.name,
                 data.name if data is not None else cfg.data.name]
        out_dir = Path(cfg.paths.root) / cfg.study / f"{'-'.join(names)}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_dir)
    run = build_run(cfg, out_dir, model=model, data=data, controller=controller)
    summary = resume_if_asked(run) or run.fit()
    return FitResult(summary=summary, run_dir=out_dir, model=run.model, run=run)
