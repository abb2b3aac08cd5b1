"""Datasets as uint8 tensors in memory, plus batched on-device augmentation.

Every dataset is loaded whole into CPU memory as ``uint8 [N, C, H, W]`` images
and ``int64 [N]`` labels (all supported datasets are small). The training loop
moves them to the device once, normalises with :attr:`Dataset.mean` /
:attr:`Dataset.std` and augments each batch with :func:`augment`, so no
``DataLoader`` worker is involved.

Datasets (``cfg.name``; one YAML per name in ``meta_llr/conf/data/``):

``digits``
    scikit-learn's bundled 8x8 digits (1797 images, works offline). Pixel
    values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). The train/test
    split is *stratified* by class and seeded by ``split_seed`` (see
    :func:`stratified_holdout`); ``test_size`` images go to test.
``cifar10`` / ``cifar100``
    The official python-version archives, downloaded (md5-checked) into
    ``cfg.root`` and parsed by :func:`read_cifar`.
``imagefolder``
    A class-per-folder tree with ``train/`` and ``test/`` splits, as folders
    or inside zip files (see :func:`read_imagefolder`). Decoded once with PIL
    and cached as an ``.npz``.
``synthetic``
    Seeded random pixels and random labels, for benchmarks only.

All datasets accept ``val_size``: when > 0, that many train images are held
out (stratified, seeded by ``split_seed``) as :attr:`Dataset.val`. Mean and std
are computed from the remaining train images.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import mmap
import os
import pickle
import re
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meta_llr.errors import UserError

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
]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")

# Bump when the layout of the imagefolder cache file changes.
_CACHE_VERSION = 1

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
    name: str
    train: Split
    test: Split
    val: Split | None
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    synthetic: bool
    source: str

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
# Augmentation
# --------------------------------------------------------------------------- #


def augment(x: torch.Tensor, crop_pad: int, flip: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, batched.

    ``x`` is ``[B, C, H, W]`` (uint8 or float) on any device; ``generator`` must
    live on the same device (``None`` uses torch's default generator there).
    Each sample is translated by its own integer offset in ``[-crop_pad, crop_pad]``
    along each axis, with zeros shifted in (equivalent to zero-padding by
    ``crop_pad`` and cropping back to ``H x W`` at a random position). Then each
    sample is mirrored left-right with probability 0.5. One pass for the whole
    batch: no Python loop over samples and no host-device synchronisation.

    Random draws, in order: crop row starts ``[B]``, crop column starts ``[B]``
    (both only when ``crop_pad > 0``), flip coin ``[B]`` (only when ``flip``).
    The result is therefore deterministic given the generator state.

    ``crop_pad == 0`` and ``flip == False`` returns ``x`` itself.
    """
    crop_pad = int(crop_pad)
    if crop_pad < 0:
        raise UserError(f"augment.crop_pad must be >= 0, got {crop_pad}; use augment.crop_pad=0 to disable cropping")
    if crop_pad == 0 and not flip:
        return x
    if x.dim() != 4:
        raise ValueError(f"augment expects a [B, C, H, W] batch, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    out = x
    if crop_pad > 0:
        p = crop_pad
        padded = F.pad(x, (p, p, p, p))  # zeros, [B, C, H+2p, W+2p]
        top = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        left = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=dev)
        rows = top[:, None] + torch.arange(h, device=dev)[None, :]  # [B, H]
        cols = left[:, None] + torch.arange(w, device=dev)[None, :]  # [B, W]
        # Gather rows, then columns; indices broadcast over channels.
        row_idx = rows[:, None, :, None].expand(b, c, h, w + 2 * p)
        out = torch.gather(padded, 2, row_idx)
        col_idx = cols[:, None, None, :].expand(b, c, h, w)
        out = torch.gather(out, 3, col_idx)
    if flip:
        coin = torch.rand((b,), generator=generator, device=dev) < 0.5
        out = torch.where(coin[:, None, None, None], out.flip(3), out)
    return out


# --------------------------------------------------------------------------- #
# Config helpers
# --------------------------------------------------------------------------- #


def _opt(cfg: Mapping, key: str, default=None):
    try:
        value = cfg.get(key, default)
    except Exception:  # omegaconf raises on missing mandatory ('???') values
        value = default
    return default if value is None else value


def _int_opt(cfg: Mapping, key: str, default: int) -> int:
    value = _opt(cfg, key, default)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise UserError(f"data.{key} must be an integer, got {value!r}; pass data.{key}=N")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/meta_llr`` or ``~/.cache/meta_llr``."""
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        return Path(base) / "meta_llr"
    return Path.home() / ".cache" / "meta_llr"


def _root(cfg: Mapping) -> Path:
    root = _opt(cfg, "root", None)
    return Path(os.path.expanduser(str(root))) if root else default_cache_dir()


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


def _finish(cfg: Mapping, name: str, train: Split, test: Split, classes: list[str], source: str, synthetic: bool = False) -> Dataset:
    val_size = _int_opt(cfg, "val_size", 0)
    split_seed = _int_opt(cfg, "split_seed", 0)
    n = len(train)
    if val_size < 0 or val_size >= n:
        raise UserError(
            f"data.val_size={val_size} is invalid for {n} training examples of '{name}'; "
            f"pass data.val_size=K with 0 <= K < {n} (0 disables the validation split)"
        )
    val = None
    if val_size > 0:
        keep, hold = stratified_holdout(train.y, val_size, split_seed)
        val = _take(train, hold)
        train = _take(train, keep)
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


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def _load_digits(cfg: Mapping) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], 0..16
    x = torch.from_numpy(np.rint(images * 255.0 / 16.0).astype(np.uint8)).unsqueeze(1).contiguous()
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    test_size = _int_opt(cfg, "test_size", 360)
    if not 0 < test_size < len(y):
        raise UserError(f"data.test_size={test_size} is invalid for the {len(y)} digits images; pass data.test_size=K with 0 < K < {len(y)}")
    keep, hold = stratified_holdout(y, test_size, _int_opt(cfg, "split_seed", 0))
    full = Split(x, y)
    classes = [str(int(c)) for c in bunch.target_names]
    return _finish(cfg, "digits", _take(full, keep), _take(full, hold), classes, "sklearn digits (load_digits, 8x8, stratified split)")


# --------------------------------------------------------------------------- #
# synthetic
# --------------------------------------------------------------------------- #


def _load_synthetic(cfg: Mapping) -> Dataset:
    channels = _int_opt(cfg, "channels", 3)
    size = _int_opt(cfg, "size", 32)
    classes = _int_opt(cfg, "classes", 10)
    n_train = _int_opt(cfg, "train_size", 2048)
    n_test = _int_opt(cfg, "test_size", 512)
    for key, value, low in (("channels", channels, 1), ("size", size, 1), ("classes", classes, 2), ("train_size", n_train, 1), ("test_size", n_test, 1)):
        if value < low:
            raise UserError(f"data.{key}={value} is too small for data=synthetic; pass data.{key}=N with N >= {low}")
    gen = torch.Generator().manual_seed(_int_opt(cfg, "seed", 0))

    def make(n: int) -> Split:
        x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
        y = torch.randint(0, classes, (n,), generator=gen, dtype=torch.int64)
        return Split(x, y)

    train = make(n_train)
    test = make(n_test)
    names = [f"class{i}" for i in range(classes)]
    return _finish(cfg, "synthetic", train, test, names, "synthetic (random pixels)", synthetic=True)


# --------------------------------------------------------------------------- #
# CIFAR
# --------------------------------------------------------------------------- #

_CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "filename": "cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "filename": "cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
    },
}

_C10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays (the CIFAR pickles need nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, object]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise UserError(f"cannot read CIFAR pickle {where}: {_one_line(exc)}; delete it and download the archive again") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR pickle {where} does not hold a dict; delete it and download the archive again")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _names(value: object) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]  # type: ignore[union-attr]


def _cifar_split(dicts: list[dict[str, object]], label_key: str, where: str) -> Split:
    xs, ys = [], []
    for d in dicts:
        if "data" not in d or label_key not in d:
            raise UserError(f"CIFAR pickle in {where} lacks 'data' or '{label_key}'; delete it and download the archive again")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"CIFAR pickle in {where} has data of shape {data.shape}, expected [N, 3072]; delete it and download again")
        labels = np.asarray(d[label_key], dtype=np.int64).reshape(-1)
        if labels.shape[0] != data.shape[0]:
            raise UserError(f"CIFAR pickle in {where} has {data.shape[0]} images but {labels.shape[0]} labels; delete it and download again")
        xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, 1024 G, 1024 B, each row-major 32x32
        ys.append(labels)
    x = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)))
    y = torch.from_numpy(np.concatenate(ys))
    return Split(x, y)


def read_cifar(dir_or_archive: str | os.PathLike, fine_labels: bool = True) -> tuple[Split, Split, list[str]]:
    """Parse the official python-version CIFAR-10 or CIFAR-100 data.

    ``dir_or_archive`` is either the ``.tar.gz`` archive itself (read without
    extracting), the extracted folder (``cifar-10-batches-py`` /
    ``cifar-100-python``), or a folder that contains one of them. The variant
    is detected from the file names: CIFAR-10 has ``data_batch_1..5``,
    ``test_batch`` and ``batches.meta`` (``label_names``); CIFAR-100 has
    ``train``, ``test`` and ``meta``. For CIFAR-100, ``fine_labels`` picks the
    100 fine labels (``fine_labels`` / ``fine_label_names``) or the 20 coarse
    ones; CIFAR-10 ignores it. No checksums are verified here.

    Returns ``(train, test, classes)``.
    """
    src = Path(dir_or_archive)
    files: dict[str, bytes] = {}
    if src.is_file():
        wanted = set(_C10_TRAIN) | {"test_batch", "batches.meta", "train", "test", "meta"}
        try:
            with tarfile.open(src, "r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    parts = member.name.split("/")
                    base = parts[-1]
                    if base in wanted and len(parts) <= 2:
                        f = tar.extractfile(member)
                        if f is not None:
                            files[base] = f.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read CIFAR archive {src}: {_one_line(exc)}; delete it and download it again") from None
    elif src.is_dir():
        folder = src
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (src / sub).is_dir():
                folder = src / sub
                break
        for p in folder.iterdir():
            if p.is_file():
                files[p.name] = p.read_bytes()
    else:
        raise UserError(f"CIFAR data '{src}' does not exist; pass the archive or its extracted folder")

    if all(k in files for k in _C10_TRAIN + ["test_batch", "batches.meta"]):
        meta = _unpickle(files["batches.meta"], f"{src}/batches.meta")
        classes = _names(meta["label_names"])
        train = _cifar_split([_unpickle(files[k], f"{src}/{k}") for k in _C10_TRAIN], "labels", str(src))
        test = _cifar_split([_unpickle(files["test_batch"], f"{src}/test_batch")], "labels", str(src))
    elif all(k in files for k in ("train", "test", "meta")):
        meta = _unpickle(files["meta"], f"{src}/meta")
        kind = "fine" if fine_labels else "coarse"
        classes = _names(meta[f"{kind}_label_names"])
        train = _cifar_split([_unpickle(files["train"], f"{src}/train")], f"{kind}_labels", str(src))
        test = _cifar_split([_unpickle(files["test"], f"{src}/test")], f"{kind}_labels", str(src))
    else:
        found = ", ".join(sorted(files)) or "nothing"
        raise UserError(
            f"'{src}' is not CIFAR python-version data (found: {found}); expected data_batch_1..5, test_batch, batches.meta "
            "(CIFAR-10) or train, test, meta (CIFAR-100)"
        )
    for split in (train, test):
        if split.y.numel() and (int(split.y.min()) < 0 or int(split.y.max()) >= len(classes)):
            raise UserError(f"CIFAR labels in '{src}' fall outside the {len(classes)} class names; delete the data and download it again")
    return train, test, classes


def _download_archive(url: str, root: Path, filename: str, md5: str) -> None:
    """Download and extract an archive (md5-checked); separate so tests can replace it."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=str(root), filename=filename, md5=md5)


def _load_cifar(cfg: Mapping, name: str) -> Dataset:
    info = _CIFAR[name]
    root = _root(cfg)
    folder = root / info["folder"]
    marker = folder / ("test_batch" if name == "cifar10" else "test")
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    hint = (
        f"put {info['filename']} (md5 {info['md5']}) in {root} (set data.root=DIR to use another folder), "
        f"or use data=imagefolder data.path=DIR"
    )
    if not marker.is_file():
        archive = root / info["filename"]
        download = bool(_opt(cfg, "download", True))
        if not download and not archive.is_file():
            raise UserError(f"{pretty} not found in {root} and data.download=false; {hint}")
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download_archive(info["url"], root, info["filename"], info["md5"])
        except UserError:
            raise
        except BaseException as exc:  # network errors, md5 mismatch, interrupted downloads ...
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise UserError(f"{pretty} not found in {root} and download failed ({type(exc).__name__}: {_one_line(exc)[:200]}); {hint}") from None
        if not marker.is_file():
            raise UserError(f"{pretty} archive in {root} did not extract to {folder}; {hint}")
    train, test, classes = read_cifar(folder, fine_labels=bool(_opt(cfg, "fine_labels", True)))
    return _finish(cfg, name, train, test, classes, str(folder))


# --------------------------------------------------------------------------- #
# imagefolder
# --------------------------------------------------------------------------- #

# A "source" is one image: (zip path or "" for a plain file, entry name or file path).
_Item = tuple[str, str]


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(split_dir: Path) -> dict[str, list[_Item]]:
    out: dict[str, list[_Item]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(f) for f in class_dir.iterdir() if f.is_file() and _is_image(f.name))
        if files:
            out[class_dir.name] = [("", f) for f in files]
    return out


def _scan_zip(zpath: Path) -> dict[str, dict[str, list[_Item]]]:
    """Entries ``[...]/<split>/<class>/<file>`` of a zip, grouped by split then class."""
    out: dict[str, dict[str, list[_Item]]] = {}
    with zipfile.ZipFile(zpath) as zf:
        for info in zf.infolist():
            if info.is_dir() or not _is_image(info.filename):
                continue
            parts = info.filename.split("/")
            if len(parts) < 3 or parts[-3] not in ("train", "test") or parts[0] == "__MACOSX":
                continue
            out.setdefault(parts[-3], {}).setdefault(parts[-2], []).append((str(zpath), info.filename))
    for classes in out.values():
        for items in classes.values():
            items.sort()
    return out


def _split_sources(path: Path) -> tuple[dict[str, dict[str, list[_Item]]], list[Path]]:
    """Find train/test as folders under ``path`` or in zips; returns (splits, files for the cache key)."""
    found: dict[str, dict[str, list[_Item]]] = {}
    where: dict[str, str] = {}
    as_folder: set[str] = set()
    zips: list[Path]
    if path.is_file():
        zips = [path]
    else:
        for split in ("train", "test"):
            d = path / split
            if d.is_dir():
                classes = _scan_folder(d)
                if classes:
                    found[split] = classes
                    where[split] = f"{split}/"
                    as_folder.add(split)
        zips = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".zip")
    for zp in zips:
        if all(s in found for s in ("train", "test")):
            break
        try:
            content = _scan_zip(zp)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot read zip '{zp}': {_one_line(exc)}; fix or remove it from data.path") from None
        for split, classes in content.items():
            if split in as_folder:
                continue  # a folder wins over a zip
            if split in found:
                raise UserError(
                    f"split '{split}' appears in both {where[split]} and {zp.name} under '{path}'; keep only one copy"
                )
            found[split] = classes
            where[split] = zp.name
    return found, zips


def _describe(path: Path) -> str:
    if path.is_file():
        return f"zip {path.name} with no train/<class>/<image> or test/<class>/<image> entries"
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        entries = []
    shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
    return shown or "an empty folder"


def _cache_key(path: Path, channels: int) -> str:
    """Hash of the absolute path, channels and the size+mtime of every input file."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, "path": str(path), "channels": channels}).encode())
    stamp = []
    if path.is_file():
        st = path.stat()
        stamp.append((path.name, st.st_size, st.st_mtime_ns))
    else:
        for p in sorted(path.iterdir()):
            if p.is_file() and p.suffix.lower() == ".zip":
                st = p.stat()
                stamp.append((p.name, st.st_size, st.st_mtime_ns))
        for split in ("train", "test"):
            d = path / split
            if d.is_dir():
                for dirpath, dirnames, filenames in os.walk(d):
                    dirnames.sort()
                    for fn in sorted(filenames):
                        st = os.stat(os.path.join(dirpath, fn))
                        stamp.append((os.path.relpath(os.path.join(dirpath, fn), path), st.st_size, st.st_mtime_ns))
    for item in stamp:
        h.update(repr(item).encode())
        h.update(b"\n")
    return h.hexdigest()


def _decode_one(data: bytes | str, name: str, mode: str) -> np.ndarray:
    lower = name.lower()
    formats = ["PNG"] if lower.endswith(".png") else ["JPEG"] if lower.endswith((".jpg", ".jpeg")) else None
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        im = Image.open(src, formats=formats)
    except Exception:
        if formats is None:
            raise
        if isinstance(src, io.BytesIO):
            src.seek(0)
        im = Image.open(src)  # wrong extension: let PIL sniff the format
    with im:
        if im.mode != mode:
            im = im.convert(mode)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


class _ZipReader:
    """Reads zip members; stored (uncompressed) members are sliced from a memory map.

    ``ZipFile.read`` costs ~50 us per member in Python overhead, a quarter of
    the decode time of a small JPEG; the fast path reads the local header and
    slices the data (CRC still checked). Anything unusual goes through ``ZipFile``.
    """

    def __init__(self, path: str):
        self.zf = zipfile.ZipFile(path)
        self._file = open(path, "rb")
        try:
            self.mm: mmap.mmap | None = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (ValueError, OSError):
            self.mm = None

    def read(self, name: str) -> bytes:
        info = self.zf.getinfo(name)
        if self.mm is not None and info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
            off = info.header_offset
            head = self.mm[off : off + 30]
            if len(head) == 30 and head[:4] == b"PK\x03\x04":
                n, m = struct.unpack("<HH", head[26:30])
                start = off + 30 + n + m
                data = self.mm[start : start + info.compress_size]
                if len(data) == info.file_size and zlib.crc32(data) == info.CRC:
                    return data
        return self.zf.read(name)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        self._file.close()
        self.zf.close()


# Zips opened by this process, kept across chunks: opening a zip parses its
# whole central directory (~0.3 s for 50k entries), too slow to repeat per chunk.
_OPEN_ZIPS: dict[str, _ZipReader] = {}


def _close_zips() -> None:
    while _OPEN_ZIPS:
        _OPEN_ZIPS.popitem()[1].close()


def _worker_init() -> None:
    # A forked worker must not share the parent's zip file handles (and offsets).
    _OPEN_ZIPS.clear()


def _decode_chunk(args: tuple[list[_Item], str, tuple[int, int, int]]) -> np.ndarray:
    """Decode images of size ``shape`` (H, W, C) into ``uint8 [n, C, H, W]`` (runs in pool workers)."""
    items, mode, shape = args
    out = np.empty((len(items), shape[2], shape[0], shape[1]), dtype=np.uint8)
    for i, (zpath, name) in enumerate(items):
        if zpath:
            zf = _OPEN_ZIPS.get(zpath)
            if zf is None:
                zf = _OPEN_ZIPS[zpath] = _ZipReader(zpath)
            data: bytes | str = zf.read(name)
            label = f"{zpath}:{name}"
        else:
            data = name
            label = name
        try:
            arr = _decode_one(data, name, mode)
        except Exception as exc:
            raise ValueError(f"cannot decode image {label}: {_one_line(exc)}") from None
        if arr.shape != shape:
            raise ValueError(
                f"image {label} is {arr.shape[1]}x{arr.shape[0]}, but the first image is {shape[1]}x{shape[0]}; all images must have one size"
            )
        out[i] = arr.transpose(2, 0, 1)
    return out


# Below this many images a process pool costs more than it saves.
_POOL_MIN_ITEMS = 2000


def _decode_all(items: list[_Item], mode: str, shape: tuple[int, int, int], workers: int) -> np.ndarray:
    if not items:
        return np.empty((0, shape[2], shape[0], shape[1]), dtype=np.uint8)
    if workers <= 1 or len(items) < _POOL_MIN_ITEMS:
        try:
            return _decode_chunk((items, mode, shape))
        finally:
            _close_zips()
    import multiprocessing as mp

    _close_zips()
    # fork is cheap (no re-import of torch), but unsafe once CUDA is initialised.
    method = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"
    n_chunks = workers * 4
    size = -(-len(items) // n_chunks)
    chunks = [(items[i : i + size], mode, shape) for i in range(0, len(items), size)]
    with mp.get_context(method).Pool(workers, initializer=_worker_init) as pool:
        parts = pool.map(_decode_chunk, chunks, chunksize=1)
    return np.concatenate(parts)


def read_imagefolder(path: str | os.PathLike, channels: int = 3, workers: int = 2) -> tuple[Split, Split, list[str]]:
    """Decode a class-per-folder image tree with ``train`` and ``test`` splits.

    ``path`` is a folder holding ``train/<class>/<image>`` and
    ``test/<class>/<image>`` (png, jpg, ... ; non-images and hidden files are
    skipped), and/or zip files whose entries are ``[prefix/]train/<class>/<file>``
    and ``[prefix/]test/<class>/<file>`` (one zip per split or one for both;
    which is which is read from the entry names). ``path`` may also be such a
    zip file itself. A split given as a folder takes precedence over a zip.

    Classes are the sorted names of the train class folders that hold at least
    one image; labels are their indices. Test must have exactly the same
    classes. Images are ordered by class, then by file name. All images must
    have the size of the first one; ``channels`` 3 converts to RGB, 1 to
    grayscale (L). Decoding uses a pool of ``workers`` processes.

    Returns ``(train, test, classes)`` with ``x`` as uint8 ``[N, C, H, W]``.
    """
    path = Path(path)
    if channels not in (1, 3):
        raise UserError(f"data.channels={channels} is not supported; pass data.channels=3 (RGB) or data.channels=1 (grayscale)")
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist; pass data.path=DIR holding train/ and test/ folders or zips")
    found, _ = _split_sources(path)
    missing = [s for s in ("train", "test") if s not in found]
    if missing:
        got = ", ".join(f"{s} split" for s in found) or "no split"
        raise UserError(
            f"data.path '{path}' has no {' or '.join(missing)} images (found {got}; contents: {_describe(path)}); "
            "expected train/<class>/<image> and test/<class>/<image> as folders or zip entries"
        )
    classes = sorted(found["train"])
    test_classes = sorted(found["test"])
    if classes != test_classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise UserError(
            f"data.path '{path}': train and test classes differ (only in train: {only_train[:5]}, only in test: {only_test[:5]}); "
            "give both splits the same class folders"
        )
    mode = "RGB" if channels == 3 else "L"
    # Decode the first train image alone to learn the common size.
    zpath, name = found["train"][classes[0]][0]
    try:
        if zpath:
            with zipfile.ZipFile(zpath) as zf:
                arr = _decode_one(zf.read(name), name, mode)
        else:
            arr = _decode_one(name, name, mode)
    except Exception as exc:
        raise UserError(f"cannot decode image {zpath + ':' if zpath else ''}{name}: {_one_line(exc)}; fix or remove it") from None
    shape = tuple(arr.shape)

    # Both splits go through one pool (one start-up, one zip open per worker).
    items: list[_Item] = []
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for split in ("train", "test"):
        for k, cls in enumerate(classes):
            items.extend(found[split][cls])
            labels[split].extend([k] * len(found[split][cls]))
    try:
        x = _decode_all(items, mode, shape, workers)  # [N, C, H, W]
    except ValueError as exc:
        raise UserError(f"{_one_line(exc)}; fix or remove that file") from None
    n_train = len(labels["train"])
    splits = []
    for split, part in (("train", x[:n_train]), ("test", x[n_train:])):
        x_t = torch.from_numpy(np.ascontiguousarray(part))
        splits.append(Split(x_t, torch.tensor(labels[split], dtype=torch.int64)))
    return splits[0], splits[1], classes


def _load_imagefolder(cfg: Mapping) -> Dataset:
    raw = _opt(cfg, "path", None)
    if raw is None or str(raw).strip() in ("", "???"):
        raise UserError("data=imagefolder needs data.path=DIR holding train/ and test/ class folders (or zips of them)")
    path = Path(os.path.expanduser(str(raw))).absolute()
    if not path.exists():
        raise UserError(f"data.path '{path}' does not exist; pass data.path=DIR holding train/ and test/ folders or zips")
    channels = _int_opt(cfg, "channels", 3)
    workers = _int_opt(cfg, "workers", 2)
    use_cache = bool(_opt(cfg, "cache", True))

    cache_file = None
    if use_cache:
        key = _cache_key(path, channels)
        # <folder name>-<hash of the path>-<hash of path, channels, sizes, mtimes>.npz
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name or "root")[:40]
        prefix = f"{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}-"
        cache_file = _root(cfg) / "imagefolder" / f"{prefix}{key[:20]}.npz"
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    train = Split(torch.from_numpy(z["train_x"]), torch.from_numpy(z["train_y"]))
                    test = Split(torch.from_numpy(z["test_x"]), torch.from_numpy(z["test_y"]))
                    classes = [str(c) for c in z["classes"]]
                return _finish(cfg, "imagefolder", train, test, classes, _folder_source(path))
            except Exception as exc:  # corrupt or foreign file: rebuild it
                warnings.warn(f"ignoring unreadable cache {cache_file}: {_one_line(exc)}", stacklevel=2)

    train, test, classes = read_imagefolder(path, channels=channels, workers=workers)

    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(cache_file.name + f".tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    train_x=train.x.numpy(),
                    train_y=train.y.numpy(),
                    test_x=test.x.numpy(),
                    test_y=test.y.numpy(),
                    classes=np.array(classes, dtype=np.str_),
                )
            os.replace(tmp, cache_file)
            # Caches of older versions of the same folder are stale: remove them.
            for old in cache_file.parent.glob(f"{glob.escape(prefix)}*.npz"):
                if old != cache_file:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            warnings.warn(f"could not write the image cache {cache_file}: {_one_line(exc)}", stacklevel=2)
    return _finish(cfg, "imagefolder", train, test, classes, _folder_source(path))


def _folder_source(path: Path) -> str:
    """The path, marked when its images are JPEG (lossy: accuracies run below the originals)."""
    names: list[str] = []
    for zpath in ([path] if path.is_file() else sorted(path.glob("*.zip"))):
        with zipfile.ZipFile(zpath) as archive:
            names += archive.namelist()[:20]
    if path.is_dir():
        names += [p.name for p, _ in zip(path.glob("*/*/*"), range(20))]
    lossy = any(name.lower().endswith((".jpg", ".jpeg")) for name in names)
    return f"{path} (JPEG images: lossy)" if lossy else str(path)


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #


def load_data(cfg: Mapping) -> Dataset:
    """Load the dataset described by the ``data`` config group node.

    ``cfg`` is an omegaconf ``DictConfig`` or a plain dict with ``name`` and
    the options of ``meta_llr/conf/data/<name>.yaml`` (missing options take
    their defaults). The ``augment`` block is not used here; pass its values
    to :func:`augment`.
    """
    if cfg is None:
        cfg = {}
    name = str(_opt(cfg, "name", "digits"))
    if name == "digits":
        return _load_digits(cfg)
    if name in _CIFAR:
        return _load_cifar(cfg, name)
    if name == "imagefolder":
        return _load_imagefolder(cfg)
    if name == "synthetic":
        return _load_synthetic(cfg)
    raise UserError(f"unknown dataset data.name='{name}'; choose data= one of {', '.join(DATASET_NAMES)}")
