"""``data=cifar10`` / ``data=cifar100``: the official python-version archives, downloaded
(md5-checked, via torchvision) into ``data.root`` and parsed by :func:`read_cifar`.

The pickles are read with an unpickler that only rebuilds numpy arrays (no code from the files
runs). Cost: reads the ~170 MB of pickles on every load (they are the cache; nothing else is kept).
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from meta_llr.data.cache import cache_root
from meta_llr.data.containers import DataConfig, Dataset, Split, _finish, _one_line, check_val_size
from meta_llr.errors import UserError
from meta_llr.options import opt

__all__ = ["Cifar10Config", "Cifar100Config", "load_cifar", "read_cifar"]

CIFAR_TRAIN_IMAGES = 50000  # both CIFAR-10 and CIFAR-100


@dataclass
class Cifar10Config(DataConfig):
    """Official CIFAR-10 python archive (cifar-10-python.tar.gz), downloaded md5-checked
    into root. Offline: put the archive in root, or use data=imagefolder data.path=DIR."""

    name: str = opt("cifar10", choices=("cifar10",))
    root: Optional[str] = opt(None, free=True, doc="null: $XDG_CACHE_HOME/meta_llr or ~/.cache/meta_llr")
    download: bool = opt(True, free=True, doc="false: never touch the network, fail if the data is absent")

    def validate(self) -> None:
        check_val_size(self, CIFAR_TRAIN_IMAGES, f"{CIFAR_TRAIN_IMAGES} CIFAR train images")


@dataclass
class Cifar100Config(Cifar10Config):
    """Official CIFAR-100 python archive (cifar-100-python.tar.gz), downloaded md5-checked
    into root. Offline: put the archive in root, or use data=imagefolder data.path=DIR."""

    name: str = opt("cifar100", choices=("cifar100",))
    fine_labels: bool = opt(True, free=True, doc="true: 100 fine classes; false: 20 coarse superclasses")


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


def _field(meta: dict[str, object], key: str, where: str) -> object:
    if key not in meta:
        raise UserError(f"CIFAR pickle {where} lacks '{key}'; delete it and download the archive again")
    return meta[key]


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
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"cannot read CIFAR archive {src}: {_one_line(exc)}; delete it and download it again") from None
    elif src.is_dir():
        folder = src
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (src / sub).is_dir():
                folder = src / sub
                break
        try:
            for p in folder.iterdir():
                if p.is_file():
                    files[p.name] = p.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read CIFAR folder {folder}: {_one_line(exc)}; make it readable or delete it and download again") from None
    else:
        raise UserError(f"CIFAR data '{src}' does not exist; pass the archive or its extracted folder")

    if all(k in files for k in _C10_TRAIN + ["test_batch", "batches.meta"]):
        meta = _unpickle(files["batches.meta"], f"{src}/batches.meta")
        classes = _names(_field(meta, "label_names", f"{src}/batches.meta"))
        train = _cifar_split([_unpickle(files[k], f"{src}/{k}") for k in _C10_TRAIN], "labels", str(src))
        test = _cifar_split([_unpickle(files["test_batch"], f"{src}/test_batch")], "labels", str(src))
    elif all(k in files for k in ("train", "test", "meta")):
        meta = _unpickle(files["meta"], f"{src}/meta")
        kind = "fine" if fine_labels else "coarse"
        classes = _names(_field(meta, f"{kind}_label_names", f"{src}/meta"))
        train = _cifar_split([_unpickle(files["train"], f"{src}/train")], f"{kind}_labels", str(src))
        test = _cifar_split([_unpickle(files["test"], f"{src}/test")], f"{kind}_labels", str(src))
    else:
        found = ", ".join(sorted(files)) or "nothing"
        raise UserError(
            f"'{src}' is not CIFAR python-version data (found: {found}); expected data_batch_1..5, test_batch, batches.meta "
            "(CIFAR-10) or train, test, meta (CIFAR-100); delete it and download the archive again"
        )
    for split in (train, test):
        if split.y.numel() and (int(split.y.min()) < 0 or int(split.y.max()) >= len(classes)):
            raise UserError(f"CIFAR labels in '{src}' fall outside the {len(classes)} class names; delete the data and download it again")
    return train, test, classes


def _download_archive(url: str, root: Path, filename: str, md5: str) -> None:
    """Download and extract an archive (md5-checked); separate so tests can replace it."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(url, download_root=str(root), filename=filename, md5=md5)


def load_cifar(cfg: Cifar10Config) -> Dataset:
    """``data=cifar10`` and ``data=cifar100`` (``cfg.name``)."""
    name = str(cfg.name)
    info = _CIFAR[name]
    root = cache_root(cfg.root)
    folder = root / info["folder"]
    marker = folder / ("test_batch" if name == "cifar10" else "test")
    pretty = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    hint = (
        f"put {info['filename']} (md5 {info['md5']}) in {root} (set data.root=DIR to use another folder), "
        f"or use data=imagefolder data.path=DIR"
    )
    if root.exists() and not root.is_dir():
        raise UserError(f"data.root '{root}' is a file, not a folder; set data.root=DIR (or null for the default cache folder)")
    if not marker.is_file():
        archive = root / info["filename"]
        download = bool(cfg.download)
        if not download and not archive.is_file():
            raise UserError(f"{pretty} not found in {root} and data.download=false; {hint}")
        if not download:  # extract the archive that is there, never fetch a fresh one
            from torchvision.datasets.utils import check_integrity

            if not check_integrity(str(archive), info["md5"]):
                raise UserError(f"{pretty} archive {archive} is damaged (md5 is not {info['md5']}) and data.download=false; "
                                "delete it and set data.download=true, or put the original archive there")
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
    train, test, classes = read_cifar(folder, fine_labels=bool(getattr(cfg, "fine_labels", True)))
    return _finish(cfg, name, train, test, classes, str(folder))
