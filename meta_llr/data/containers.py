"""What every source returns and shares: :class:`Split`, :class:`Dataset`, the base config
:class:`DataConfig`, the stratified holdout, per-channel statistics and :func:`_finish`
(validation holdout + mean/std), common to all loaders.

Cost: one pass over the train images (a 256-bin histogram per channel); no float copy of the
data. The holdout is deterministic given ``split_seed`` and keeps the original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from meta_llr.data.augment import AugmentConfig
from meta_llr.errors import UserError
from meta_llr.options import fail, opt

__all__ = ["DATASET_NAMES", "DataConfig", "Dataset", "Split", "stratified_holdout"]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")


# --------------------------------------------------------------------------- #
# Containers
# --------------------------------------------------------------------------- #


@dataclass
class Split:
    """Images and labels of one split.

    ``x``: uint8 ``[N, C, H, W]``, contiguous, on CPU. ``y``: int64 ``[N]``, on CPU.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class Dataset:
    """A whole dataset in CPU memory. Every source and ``meta_llr.dataset_from_tensors`` build
    one; building one with fewer than 2 distinct labels in ``train`` is a one-line UserError
    naming ``name`` and ``source`` (nothing can be learned from one class)."""

    name: str
    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    synthetic: bool
    source: str

    def __post_init__(self) -> None:
        present = torch.unique(self.train.y).tolist()
        if len(present) < 2:
            shown = ", ".join(self.classes[k] if 0 <= k < len(self.classes) else str(k) for k in present) or "none"
            raise UserError(
                f"data '{self.name}' ({self.source}) has {len(present)} class ({shown}) among its {len(self.train)} "
                "training images; a classifier needs at least 2: add training images of another class"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        """Image height (all supported datasets are square; see ``train.x.shape`` otherwise)."""
        return int(self.train.x.shape[2])


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


@dataclass
class DataConfig:
    """``data``: the options every source takes. Each source's config (``SOURCES[name]``)
    subclasses it with its own ``name``, its options and its ``augment`` defaults."""

    section: ClassVar[str] = "data"
    name: str = opt("digits", choices=DATASET_NAMES, doc="the data source")
    val_size: int = opt(0, ge=0, doc="> 0: hold out this many train images as a validation split")
    split_seed: int = opt(0, ge=0, doc="seeds the val holdout and the train subset")
    train_subset: int = opt(0, ge=0, doc="> 0: train on this many of the (remaining) train images, "
                                         "class-stratified and fixed by split_seed (0: all)")
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        """Cross-field checks that need only the config (the loaders check the rest)."""


def check_val_size(cfg: Any, n_train: int, what: str) -> None:
    """``val_size`` must leave at least one of the ``n_train`` train images (``what`` names them):
    the configs' ``validate``, imagefolder before decoding, and :func:`_finish` all ask here."""
    if cfg.val_size >= n_train:
        fail(f"{DataConfig.section}.val_size", cfg.val_size, f"< {n_train}, the {what} (0: no validation split)")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- #
# Splitting and statistics
# --------------------------------------------------------------------------- #


def stratified_holdout(y: torch.Tensor, n_holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices ``0..N-1`` into (keep, holdout), stratified by label.

    Each class contributes ``n_holdout * count / N`` images to the holdout, with
    the leftover slots going to the classes with the largest remainders (ties
    to the lower label). Which images of a class are held out is decided by a
    ``torch.Generator`` seeded with ``seed``. Both index tensors are sorted, so
    the original order of the data is kept within each part.
    """
    n = int(y.shape[0])
    if not 0 <= n_holdout <= n:
        raise ValueError(f"n_holdout={n_holdout} out of range for {n} examples")
    labels, counts = torch.unique(y, return_counts=True)
    counts_l = [int(c) for c in counts]
    base = [n_holdout * c // n for c in counts_l]
    rem = [n_holdout * c % n for c in counts_l]
    left = n_holdout - sum(base)
    for k in sorted(range(len(counts_l)), key=lambda k: (-rem[k], k))[:left]:
        base[k] += 1
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    for label, take in zip(labels.tolist(), base):
        idx = torch.nonzero(y == label, as_tuple=False).flatten()
        perm = torch.randperm(idx.numel(), generator=gen)
        held.append(idx[perm[:take]])
    hold = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold] = False
    keep = torch.nonzero(mask, as_tuple=False).flatten()
    return keep, hold


def _take(split: Split, idx: torch.Tensor) -> Split:
    return Split(split.x[idx].contiguous(), split.y[idx].contiguous())


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Computed exactly from a 256-bin histogram per channel (fast, no float copy of the data).
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def _finish(cfg: Any, name: str, train: Split, test: Split, classes: list[str], source: str, synthetic: bool = False) -> Dataset:
    """Hold out ``cfg.val_size`` train images (stratified, seeded by ``cfg.split_seed``) and
    compute mean/std from the rest. ``cfg`` is a checked :class:`DataConfig` (or its node)."""
    val_size, split_seed = int(cfg.val_size), int(cfg.split_seed)
    check_val_size(cfg, len(train), f"{len(train)} train images of '{name}'")
    val = None
    if val_size > 0:
        keep, hold = stratified_holdout(train.y, val_size, split_seed)
        val = _take(train, hold)
        train = _take(train, keep)
    subset = int(getattr(cfg, "train_subset", 0) or 0)
    if 0 < subset < len(train):  # a fixed, class-stratified subset (the same for every run with this split_seed)
        _, kept = stratified_holdout(train.y, subset, split_seed + 1)
        train = _take(train, kept)
    mean, std = _channel_stats(train.x)
    return Dataset(
        name=name,
        train=train,
        test=test,
        val=val,
        classes=list(classes),
        mean=mean,
        std=std,
        synthetic=synthetic,
        source=source,
    )
