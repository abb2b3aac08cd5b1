"""``data=synthetic``: random pixels and random labels from a seeded generator, for benchmarks
only (nothing can be learned from it). Shapes and augmentation mirror CIFAR-10.

Cost: one ``torch.randint`` per split; identical tensors for identical options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meta_llr.data.containers import DataConfig, Dataset, Split, _finish, check_val_size
from meta_llr.options import opt

__all__ = ["SyntheticConfig", "load_synthetic"]


@dataclass
class SyntheticConfig(DataConfig):
    """Random pixels and random labels from a seeded generator. For benchmarks only:
    nothing can be learned from it. Shapes and augmentation mirror CIFAR-10."""

    name: str = opt("synthetic", choices=("synthetic",))
    channels: int = opt(3, ge=1, doc="image channels")
    size: int = opt(32, ge=1, doc="image height and width")
    classes: int = opt(10, ge=2, doc="number of classes")
    train_size: int = opt(2048, ge=1, doc="train images")
    test_size: int = opt(512, ge=1, doc="test images")
    seed: int = opt(0, ge=0, doc="seeds images and labels")

    def validate(self) -> None:
        check_val_size(self, self.train_size, f"data.train_size={self.train_size} train images")


def load_synthetic(cfg: SyntheticConfig) -> Dataset:
    channels, size, classes = int(cfg.channels), int(cfg.size), int(cfg.classes)
    gen = torch.Generator().manual_seed(int(cfg.seed))

    def make(n: int) -> Split:
        x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
        y = torch.randint(0, classes, (n,), generator=gen, dtype=torch.int64)
        return Split(x, y)

    train = make(int(cfg.train_size))
    test = make(int(cfg.test_size))
    names = [f"class{i}" for i in range(classes)]
    return _finish(cfg, "synthetic", train, test, names, "synthetic (random pixels)", synthetic=True)
