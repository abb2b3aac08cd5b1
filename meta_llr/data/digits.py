"""``data=digits``: scikit-learn's bundled 8x8 digits (1797 images, works offline).

Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``); the train/test split is
stratified by class and seeded by ``split_seed``. Cost: well under a second, no disk or network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from meta_llr.data.augment import AugmentConfig
from meta_llr.data.containers import DataConfig, Dataset, Split, _finish, _take, check_val_size, stratified_holdout
from meta_llr.options import opt

__all__ = ["DigitsConfig", "load_digits"]

DIGITS_IMAGES = 1797  # sklearn.datasets.load_digits()


@dataclass
class DigitsConfig(DataConfig):
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to 0..255).
    Works offline. Train/test split is stratified by class and seeded by split_seed."""

    name: str = opt("digits", choices=("digits",))
    split_seed: int = opt(0, ge=0, doc="seeds the test split and the val holdout")
    # 8x8 digits are too small to crop; mirrored digits are different digits.
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_pad=0, flip=False))
    test_size: int = opt(360, gt=0, lt=DIGITS_IMAGES, doc="images held out as the test split")

    def validate(self) -> None:
        check_val_size(self, DIGITS_IMAGES - self.test_size, f"digits train images left by data.test_size={self.test_size}")


def load_digits(cfg: DigitsConfig) -> Dataset:
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], 0..16
    x = torch.from_numpy(np.rint(images * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1).contiguous()
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    keep, hold = stratified_holdout(y, int(cfg.test_size), int(cfg.split_seed))
    full = Split(x, y)
    classes = [str(int(c)) for c in bunch.target_names]
    return _finish(cfg, "digits", _take(full, keep), _take(full, hold), classes, "sklearn digits (load_digits, 8x8, stratified split)")
