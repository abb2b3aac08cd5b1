"""Datasets as uint8 tensors in memory, plus batched on-device augmentation.

Every dataset is loaded whole into CPU memory as ``uint8 [N, C, H, W]`` images
and ``int64 [N]`` labels (all supported datasets are small). The training loop
moves them to the device once, normalises with :attr:`Dataset.mean` /
:attr:`Dataset.std` and augments each batch with :func:`augment`, so no
``DataLoader`` worker is involved.

Sources (``data.name``; one typed config per name in :data:`SOURCES`, written beside its
loader; each option's range is checked by :func:`meta_llr.options.check_section`):

``digits`` (:mod:`meta_llr.data.digits`)
    scikit-learn's bundled 8x8 digits (1797 images, works offline). Pixel
    values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). The train/test
    split is *stratified* by class and seeded by ``split_seed`` (see
    :func:`stratified_holdout`); ``test_size`` images go to test.
``cifar10`` / ``cifar100`` (:mod:`meta_llr.data.cifar`)
    The official python-version archives, downloaded (md5-checked) into
    ``data.root`` and parsed by :func:`read_cifar`.
``imagefolder`` (:mod:`meta_llr.data.imagefolder`, :mod:`meta_llr.data.cache`)
    A class-per-folder tree with ``train/`` and ``test/`` splits, as folders
    or inside zip files (see :func:`read_imagefolder`). Decoded once with PIL
    and cached as an ``.npz``. Augmented by random crops only: ``data.augment.flip``
    is false by default (a generic image is not assumed mirror-symmetric; the CIFAR
    sources and ``synthetic`` flip).
``synthetic`` (:mod:`meta_llr.data.synthetic`)
    Seeded random pixels and random labels, for benchmarks only.

All sources accept ``val_size``: when > 0, that many train images are held
out (stratified, seeded by ``split_seed``) as :attr:`Dataset.val`. Mean and std
are computed from the remaining train images (:mod:`meta_llr.data.containers`).
A dataset whose train images hold fewer than 2 classes is refused (:class:`Dataset`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from meta_llr.data.augment import AugmentConfig, augment
from meta_llr.data.cache import default_cache_dir
from meta_llr.data.cifar import Cifar10Config, Cifar100Config, load_cifar, read_cifar
from meta_llr.data.containers import DATASET_NAMES, DataConfig, Dataset, Split, stratified_holdout
from meta_llr.data.digits import DigitsConfig, load_digits
from meta_llr.data.imagefolder import ImageFolderConfig, load_imagefolder, read_imagefolder
from meta_llr.data.synthetic import SyntheticConfig, load_synthetic
from meta_llr.errors import UserError
from meta_llr.options import check_section

__all__ = [
    "Split",
    "Dataset",
    "load_data",
    "augment",
    "read_cifar",
    "read_imagefolder",
    "stratified_holdout",
    "default_cache_dir",
    "DATASET_NAMES",
    "SOURCES",
    "DataConfig",
    "AugmentConfig",
    "DigitsConfig",
    "Cifar10Config",
    "Cifar100Config",
    "ImageFolderConfig",
    "SyntheticConfig",
]

# name -> (config class, loader). The loader gets the checked config (a DictConfig typed by
# the class, so attribute access matches the dataclass).
_REGISTRY: dict[str, tuple[type[DataConfig], Callable[[Any], Dataset]]] = {
    "digits": (DigitsConfig, load_digits),
    "cifar10": (Cifar10Config, load_cifar),
    "cifar100": (Cifar100Config, load_cifar),
    "imagefolder": (ImageFolderConfig, load_imagefolder),
    "synthetic": (SyntheticConfig, load_synthetic),
}
assert tuple(_REGISTRY) == DATASET_NAMES

SOURCES: dict[str, type[DataConfig]] = {name: cls for name, (cls, _) in _REGISTRY.items()}


def _name_of(cfg: Any) -> str:
    if dataclasses.is_dataclass(cfg):
        return str(cfg.name)
    try:
        name = cfg.get("name", None)
    except Exception:  # omegaconf raises on a missing mandatory ('???') name
        name = None
    return "digits" if name is None else str(name)


def _typed(cfg: Any, cls: type[DataConfig]):
    """``cfg`` merged onto ``cls``'s defaults as a typed DictConfig: missing options take their
    defaults, an unknown option or a value of the wrong type is a one-line UserError."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), cfg)
        defaults = cls()
        for f in dataclasses.fields(cls):
            if OmegaConf.is_missing(node, f.name):  # '???': the default, as for an absent option
                node[f.name] = getattr(defaults, f.name)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        hint = ""
        if isinstance(exc, ConfigKeyError):
            section, node_cls = cls.section, cls
            for part in str(key).split(".")[:-1]:  # the dataclass that lacks the key
                node_cls = type(getattr(node_cls(), part, None))
                section = f"{section}.{part}"
            if dataclasses.is_dataclass(node_cls):
                label = f"data={cls().name}" if section == cls.section else section
                hint = f"; {label} takes " + ", ".join(f.name for f in dataclasses.fields(node_cls))
        raise UserError(f"{cls.section}.{key}: {' '.join(lines[0].split())}{hint}") from None
    return node


def load_data(cfg: DataConfig | Mapping | None) -> Dataset:
    """Load the dataset described by the ``data`` config group node.

    ``cfg`` is a :class:`DataConfig` instance (``SOURCES[name]``), an omegaconf
    ``DictConfig`` or a plain dict with ``name`` and that source's options
    (missing options take their defaults; ``name`` defaults to ``digits``). The
    options are checked (:func:`~meta_llr.options.check_section`) before anything
    is read. The ``augment`` block is not used here; pass its values to :func:`augment`.
    """
    if cfg is None:
        cfg = {}
    name = _name_of(cfg)
    if name not in _REGISTRY:
        raise UserError(f"unknown dataset data.name='{name}'; choose data= one of {', '.join(DATASET_NAMES)}")
    cls, loader = _REGISTRY[name]
    node = _typed(cfg, cls)
    check_section(node, cls)
    return loader(node)
